"""Output drift: how far the model's next-token distributions have moved from the run's first probe.

On a fixed set of prompts the first run keeps the next-token log-probabilities (a [prompts, vocab]
tensor on the CPU, not a copy of the model); every later run reports the mean and max
KL(baseline || current) and the share of prompts whose most likely next token is unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from probes.probe import DEFAULT_MAX_SHARE, Record, Scheduled, _Null
from probes.runner import adapter_for, probing

DEFAULT_PROMPTS = 32


def default_prompts(n: int = DEFAULT_PROMPTS, seed: int = 0) -> list[str]:
    """`n` fixed prompts drawn in turn from the builtin suites (no few-shot examples)."""
    from probes.builtin import BUILTIN, builtin

    suites = [builtin(name, n=max(1, n // len(BUILTIN) + 1), seed=seed) for name in BUILTIN]
    out: list[str] = []
    i = 0
    while len(out) < n:
        s = suites[i % len(suites)]
        k = i // len(suites)
        if k < len(s.items):
            out.append(s.items[k].prompt)
        i += 1
        if i > 10 * n + 100:
            break
    return out


class Drift(Scheduled):
    """Sends `kl`, `kl_max`, `top1_agreement` and `prompts` as a `probe` record of suite `name`.

    `prompts`: a list of strings, a suite (its items' prompts) or None for `default_prompts()`.

    Example:
        mon = monitor.watch(model, optimizer, probes=[Drift(tokenizer=tok, every_steps=200)])
    """

    def __init__(self, prompts: Any = None, tokenizer: Any = None, *, name: str = "drift", n_prompts: int = DEFAULT_PROMPTS,
                 every_steps: int | None = None, every_minutes: float | None = None, at_start: bool = True,
                 max_share: float | None = DEFAULT_MAX_SHARE, batch_size: int = 16, adapter: Any = None,
                 select: Callable[[Any], Any] | None = None):
        super().__init__(every_steps=every_steps, every_minutes=every_minutes, at_start=at_start,
                         max_share=max_share, shard=False, select=select)
        if prompts is None:
            prompts = default_prompts(n_prompts)
        elif not isinstance(prompts, (list, tuple)):
            from probes.suite import resolve

            suite = resolve(prompts)
            prompts = [suite.prompt(it) for it in suite.items][:n_prompts]
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ValueError("prompts: needs at least one prompt")
        self.prompts: Sequence[str] = prompts
        self.name = name
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.batch_size = int(batch_size)
        self.baseline: Any = None  # [prompts, vocab] log-probs of the first run

    def run(self, model: Any, rank: int = 0, world: int = 1, dist: Any = None,
            tokenizer: Any = None) -> list[Record]:
        """Measure drift now (rank 0 only); the first run becomes the baseline."""
        import torch

        if rank != 0:
            return []
        adapter = adapter_for(self.model_of(model), self.tokenizer or tokenizer, adapter=self.adapter,
                              batch_size=self.batch_size)
        with probing(getattr(adapter, "module", None) or _Null()):
            cur = adapter.next_token_logprobs(self.prompts).float()
        if self.baseline is None:
            self.baseline = cur.clone()
        base = self.baseline
        if base.shape != cur.shape:
            raise ValueError(f"next-token distributions changed shape from {tuple(base.shape)} to {tuple(cur.shape)} "
                             "(vocabulary resized?): drift cannot be compared")
        kl = (base.exp() * (base - cur)).sum(-1).clamp_min(0.0)
        top1 = (base.argmax(-1) == cur.argmax(-1)).float()
        values = {"kl": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float(top1.mean()),
                  "prompts": float(len(self.prompts))}
        return [(self.name, values, None)]


__all__ = ["Drift", "default_prompts"]
