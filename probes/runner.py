"""Runs a probe suite on a causal language model: batched, in eval mode, under a time budget, leaving no trace.

`CausalLMAdapter` wraps a Hugging Face causal LM and tokenizer (or any torch module that maps token ids
to next-token logits, with a tokenizer that has `encode` and `decode`). Anything else that can score and
generate plugs in through the three methods of `Adapter`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol, Sequence

from probes import scoring
from probes.suite import Item, Suite


class Adapter(Protocol):
    """What the runner needs from a model: score continuations, generate, and give next-token log-probs."""

    module: Any  # the torch module put in eval mode while probing (None if there is none)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Summed log-probability (nats) of each continuation given its context."""
        ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy continuations of each prompt (the new text only); may end early once `stop` text appeared."""
        ...

    def next_token_logprobs(self, prompts: Sequence[str]) -> Any:
        """A [len(prompts), vocab] float32 CPU tensor of log-softmax next-token distributions."""
        ...


_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "OptimizedModule")


def unwrap(model: Any) -> Any:
    """The module underneath DDP, DataParallel, a DeepSpeed engine or torch.compile.

    Probing through a DDP wrapper would run its forward (and its buffer broadcast, a collective
    the other ranks are not in); the plain module computes the same logits without it.
    """
    for _ in range(8):
        name = type(model).__name__
        if name == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif name in _WRAPPERS and hasattr(model, "module"):
            model = model.module
        else:
            break
    return model


def _logits_of(out: Any) -> Any:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


class CausalLMAdapter:
    """A causal LM (`model(input_ids, attention_mask) -> logits`) and its tokenizer, scored in batches.

    Sequences are right-padded, so for a causal model every real position sees only real tokens;
    inputs longer than the model's context keep their last `max_length` tokens (the answer end).
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 16, max_length: int | None = None):
        if tokenizer is None:
            raise ValueError("tokenizer: required to probe a language model (pass tokenizer=... to the Probe)")
        self.module = unwrap(model)
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        cfg = getattr(self.module, "config", None)
        ctx = None
        for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int) and v > 0:
                ctx = v
                break
        self.max_length = int(max_length or ctx or 2048)
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad if pad is not None else (eos if eos is not None else 0))
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        if self.bos_id is None:
            self.bos_id = eos
        self._mask_ok = True
        self._stop: tuple[str, ...] = ()

    # -- tokens ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        tok = self.tokenizer
        try:
            return list(tok.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tok.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        try:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))
        except TypeError:
            return str(self.tokenizer.decode(list(ids)))

    def _device(self) -> Any:
        try:
            return next(self.module.parameters()).device
        except (StopIteration, AttributeError, TypeError):
            return "cpu"

    def _forward(self, rows: Sequence[Sequence[int]]) -> Any:
        """Logits [B, T, V] for right-padded rows."""
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
        dev = self._device()
        ids, mask = ids.to(dev), mask.to(dev)
        if self._mask_ok:
            try:
                return _logits_of(self.module(input_ids=ids, attention_mask=mask))
            except TypeError:
                self._mask_ok = False  # a plain module: forward(ids) only
        return _logits_of(self.module(ids))

    # -- the Adapter methods ---------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Summed log-probability of each continuation given its context (lm-evaluation-harness's split)."""
        import torch

        rows: list[tuple[list[int], int]] = []
        for ctx, cont in requests:
            ctx_ids = self.encode(ctx)
            whole = self.encode(ctx + cont)
            # Tokenise context and continuation together (merges at the seam stay natural) when the
            # context's tokens are a prefix of the whole; otherwise apart.
            cont_ids = whole[len(ctx_ids):] if whole[: len(ctx_ids)] == ctx_ids else self.encode(cont)
            if not ctx_ids and self.bos_id is not None:
                ctx_ids = [int(self.bos_id)]
            seq = (ctx_ids + cont_ids)[-(self.max_length + 1):]
            n_cont = min(len(cont_ids), len(seq) - 1)
            rows.append((seq, n_cont))
        out = [0.0] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            logits = self._forward([rows[i][0][:-1] for i in chunk]).float()
            logp = torch.log_softmax(logits, dim=-1)
            for j, i in enumerate(chunk):
                seq, n = rows[i]
                if n <= 0:
                    continue
                L = len(seq) - 1
                tgt = torch.tensor(seq[L - n + 1:], dtype=torch.long, device=logp.device)
                pos = torch.arange(L - n, L, device=logp.device)
                out[i] = float(logp[j, pos, tgt].sum())
        return out

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy continuations: the model's own `generate` (KV cache) when it has one, else a plain loop.

        Generation of a row ends once its new text holds one of the `stop` strings; what comes before
        the stop is what it would have been without it, and scoring cuts there anyway.
        """
        self._stop = tuple(x for x in stop if x)
        if not prompts:
            return []
        enc = [self.encode(p)[-(self.max_length - max_new_tokens):] or [int(self.bos_id or 0)] for p in prompts]
        out: list[str] = [""] * len(enc)
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
        hf = hasattr(self.module, "generate") and hasattr(self.module, "generation_config")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows = [enc[i] for i in chunk]
            new = self._generate_hf(rows, max_new_tokens) if hf else self._generate_loop(rows, max_new_tokens)
            for i, ids in zip(chunk, new):
                out[i] = self.decode(ids)
        return out

    def _generate_hf(self, rows: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: generation continues from the last column
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        dev = self._device()
        extra: dict[str, Any] = {}
        if self._stop:
            from transformers import StoppingCriteria, StoppingCriteriaList

            adapter = self

            class _Stopped(StoppingCriteria):
                def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                    done = [adapter._stopped(row) for row in input_ids[:, width:].tolist()]
                    return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

            extra["stopping_criteria"] = StoppingCriteriaList([_Stopped()])
        gen = self.module.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                   do_sample=False, num_beams=1, pad_token_id=self.pad_id,
                                   temperature=None, top_p=None, top_k=None, **extra)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        res = []
        for row in gen[:, width:].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            res.append(row)
        return res

    def _generate_loop(self, rows: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        seqs = [list(r) for r in rows]
        new: list[list[int]] = [[] for _ in rows]
        for _ in range(max_new_tokens):
            window = [s[-self.max_length:] for s in seqs]  # the newest tokens when the text outgrows the context
            logits = self._forward(window)
            for i, s in enumerate(seqs):
                tok = int(logits[i, len(window[i]) - 1].argmax())
                s.append(tok)
                new[i].append(tok)
            if self._stop and all(self._stopped(r) for r in new):
                break
        return new

    def _stopped(self, new_ids: Sequence[int]) -> bool:
        """Whether a row's new text holds a stop string (its generation may end)."""
        text = self.decode(new_ids)
        return any(x in text for x in self._stop)

    def next_token_logprobs(self, prompts: Sequence[str]) -> Any:
        """[n, vocab] log-softmax of the next token after each prompt, float32 on the CPU."""
        import torch

        enc = [self.encode(p)[-self.max_length:] or [int(self.bos_id or 0)] for p in prompts]
        parts = []
        for start in range(0, len(enc), self.batch_size):
            rows = enc[start:start + self.batch_size]
            logits = self._forward(rows).float()
            last = torch.stack([logits[i, len(r) - 1] for i, r in enumerate(rows)])
            parts.append(torch.log_softmax(last, dim=-1).cpu())
        return torch.cat(parts) if parts else torch.zeros((0, 0))


def adapter_for(model: Any, tokenizer: Any = None, *, adapter: Any = None, batch_size: int = 16) -> Any:
    """`adapter` when given (anything with the Adapter methods), else a CausalLMAdapter of `model`."""
    if adapter is not None:
        return adapter(model) if callable(adapter) and not hasattr(adapter, "loglikelihood") else adapter
    return CausalLMAdapter(model, tokenizer, batch_size=batch_size)


@contextlib.contextmanager
def probing(module: Any) -> Iterator[None]:
    """Eval mode and no_grad for the block; afterwards every submodule's train flag and every RNG as before.

    Restoring the random generators (torch CPU and CUDA, Python's, NumPy's) means a probe leaves the
    data order, dropout masks and sampling of the training run exactly as they would have been.
    """
    import torch

    modes = [(m, m.training) for m in module.modules()] if hasattr(module, "modules") else []
    cpu_rng = torch.get_rng_state()
    cuda_rng = None
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda_rng = torch.cuda.get_rng_state_all()
    except Exception:  # noqa: BLE001 - no usable CUDA: nothing to restore
        cuda_rng = None
    py_rng = random.getstate()
    np = sys.modules.get("numpy")
    np_rng = np.random.get_state() if np is not None else None
    try:
        if hasattr(module, "eval"):
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, was in modes:
            m.training = was
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        if np_rng is not None:
            np.random.set_state(np_rng)


@dataclass
class SuiteRun:
    """Per-item results of one suite run: metrics (None where the budget ran out) and generated answers."""

    suite: Suite
    metrics: list[dict[str, float] | None]
    outputs: list[str | None]
    seconds: float
    indices: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every requested item was scored."""
        return all(self.metrics[i] is not None for i in self.indices)


def run_suite(adapter: Any, suite: Suite, *, indices: Sequence[int] | None = None,
              budget_seconds: float | None = None, batch_size: int = 16,
              clock: Any = time.monotonic) -> SuiteRun:
    """Score the items of `suite` at `indices` (all by default), batch by batch, until the budget is spent.

    The caller puts the model in eval mode (see `probing`); this only runs it.
    """
    n = len(suite.items)
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    metrics: list[dict[str, float] | None] = [None] * n
    outputs: list[str | None] = [None] * n
    t0 = clock()
    bs = max(1, int(batch_size))
    for start in range(0, len(idx), bs):
        if budget_seconds is not None and start and clock() - t0 >= budget_seconds:
            break
        chunk = idx[start:start + bs]
        gen = [i for i in chunk if suite.items[i].type == "generate"]
        cho = [i for i in chunk if suite.items[i].type == "choice"]
        if cho:
            reqs: list[tuple[str, str]] = []
            spans = []
            for i in cho:
                it = suite.items[i]
                ctx = suite.prompt(it)
                spans.append((len(reqs), len(it.choices)))
                reqs.extend((ctx, " " + c) for c in it.choices)
            lls = adapter.loglikelihood(reqs)
            for i, (a, k) in zip(cho, spans):
                metrics[i] = scoring.score_choices(suite.items[i], lls[a:a + k])
        if gen:
            by_len: dict[int, list[int]] = {}
            for i in gen:
                by_len.setdefault(suite.items[i].max_new_tokens or suite.max_new_tokens, []).append(i)
            for mnt, group in by_len.items():
                prompts = [suite.prompt(suite.items[i]) for i in group]
                outs = _generate(adapter, prompts, mnt, suite.stop)
                golds = adapter.loglikelihood([(p, " " + suite.items[i].gold_text()) for p, i in zip(prompts, group)])
                for i, raw, g in zip(group, outs, golds):
                    text = scoring.clean_output(raw, suite.stop)
                    outputs[i] = text
                    metrics[i] = scoring.score_generation(suite.items[i], text, gold_logprob=g)
    return SuiteRun(suite=suite, metrics=metrics, outputs=outputs, seconds=clock() - t0, indices=idx)


def _generate(adapter: Any, prompts: list[str], max_new_tokens: int, stop: Sequence[str]) -> list[str]:
    """adapter.generate with the suite's stop strings, for adapters that take them."""
    try:
        takes_stop = "stop" in inspect.signature(adapter.generate).parameters
    except (TypeError, ValueError):
        takes_stop = False
    if takes_stop:
        return list(adapter.generate(prompts, max_new_tokens, stop=tuple(stop)))
    return list(adapter.generate(prompts, max_new_tokens))


def series(run: SuiteRun, *, extra: Sequence[str] = ("gold_logprob",), min_drop: float | None = None,
           name: str | None = None) -> list[tuple[str, dict[str, float], list[float]]]:
    """The probe records of a run: (suite, values, items) for the suite itself and each `extra` per-item metric."""
    name = name or run.suite.name
    scored = [m for m in run.metrics if m is not None]
    values = scoring.aggregate(scored)
    values["items_total"] = float(len(run.suite.items))
    values["seconds"] = float(run.seconds)
    if min_drop is not None:
        values["min_drop"] = float(min_drop)
    nan = float("nan")
    out = [(name, values, [m.get("accuracy", nan) if m is not None else nan for m in run.metrics])]
    for metric in extra:
        col = [m.get(metric, nan) if m is not None else nan for m in run.metrics]
        if not any(math.isfinite(x) for x in col):
            continue
        v: dict[str, float] = {metric: values.get(metric, nan)}
        out.append((f"{name}/{metric}", v, col))
    return out


def merge(parts: Sequence[Mapping[int, tuple[dict[str, float] | None, str | None]]], run: SuiteRun) -> SuiteRun:
    """Fold per-rank shards ({index: (metrics, output)}) into `run`, in the suite's item order."""
    for part in parts:
        for i, (m, o) in part.items():
            if 0 <= int(i) < len(run.metrics) and m is not None:
                run.metrics[int(i)] = m
                run.outputs[int(i)] = o
    run.indices = list(range(len(run.metrics)))
    return run


def shard(run: SuiteRun) -> dict[int, tuple[dict[str, float] | None, str | None]]:
    """This rank's scored items of `run` as {index: (metrics, output)}, small enough to gather."""
    return {i: (run.metrics[i], run.outputs[i]) for i in run.indices if run.metrics[i] is not None}


__all__ = ["Adapter", "CausalLMAdapter", "SuiteRun", "adapter_for", "merge", "probing", "run_suite", "series",
           "shard", "unwrap"]
