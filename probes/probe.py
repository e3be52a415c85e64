"""Scheduled probes inside a training job: `Probe` (a suite), `Drift` (output drift) and `ProbeSet`.

Every framework integration takes `probes=[...]` and hands the set the model after each optimizer
step; the set runs what is due, sends `probe` records through the run's Reporter, and never raises
into the training loop. A probe runs once at train start (the baseline the daemon compares with),
then every `every_steps` steps or `every_minutes` minutes, and postpones itself whenever running
would take more than `max_share` of the wall time since the last run.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Iterable, Sequence

from probes.runner import adapter_for, merge, probing, run_suite, series, shard

log = logging.getLogger("trainguard")

# Probing every 500 optimizer steps keeps a 100-item suite on a small model near 1 % of training time
# (bench/probes.py); max_share caps it at 5 % whatever the model and step time.
DEFAULT_EVERY_STEPS = 500
DEFAULT_MAX_SHARE = 0.05
DEFAULT_BUDGET_SECONDS = 120.0

Record = tuple[str, dict[str, float], "list[float] | None"]


def _dist() -> tuple[Any, int, int]:
    """(torch.distributed or None, rank, world size) of this process."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist, dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001
        pass
    return None, 0, 1


class Scheduled:
    """When a probe runs: at start, every N steps or M minutes, and never above a share of wall time."""

    name: str

    def __init__(self, *, every_steps: int | None = None, every_minutes: float | None = None, at_start: bool = True,
                 max_share: float | None = DEFAULT_MAX_SHARE, shard: bool = False, select: Callable[[Any], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if every_steps is not None and (not isinstance(every_steps, int) or isinstance(every_steps, bool)
                                        or every_steps < 1):
            raise ValueError(f"every_steps: a whole number of steps >= 1, got {every_steps!r}")
        if every_minutes is not None and not (isinstance(every_minutes, (int, float)) and every_minutes > 0):
            raise ValueError(f"every_minutes: a number of minutes > 0, got {every_minutes!r}")
        if max_share is not None and not (isinstance(max_share, (int, float)) and 0 < max_share <= 1):
            raise ValueError(f"max_share: a fraction in (0, 1], got {max_share!r}")
        if shard and every_minutes is not None:
            raise ValueError("every_minutes: ranks cannot agree on wall time without a collective every step; "
                             "with shard=True schedule by every_steps")
        if every_steps is None and every_minutes is None:
            every_steps = DEFAULT_EVERY_STEPS
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.at_start = bool(at_start)
        self.max_share = max_share
        self.shard = bool(shard)
        self.select = select
        self.clock = clock
        self.runs = 0
        self.postponed = 0
        self.errors = 0
        self.seconds = 0.0
        self.next_step: int | None = None
        self._last_end: float | None = None
        self._last_step: int | None = None
        self._not_before = 0.0
        self._waiting = False  # a slot came due but the share cap held it back (counted once)

    def due(self, step: int, *, start: bool = False) -> bool:
        """Whether to run now, at `step` (`start`: the training has not begun)."""
        if start:
            return self.at_start and self.runs == 0
        now = self.clock()
        if self.next_step is None:
            self.next_step = self._after(step if self._last_step is None else self._last_step)
        hit = self.every_steps is not None and step >= self.next_step
        if self.every_minutes is not None and not self.shard:
            ref = self._last_end
            if ref is None:
                ref = self._last_end = now  # no probe yet: count minutes from the first step seen
            hit = hit or now - ref >= self.every_minutes * 60.0
        if not hit:
            return False
        if not self.shard and now < self._not_before:
            if not self._waiting:
                self._waiting = True
                self.postponed += 1
            return False
        return True

    def _after(self, step: int) -> int:
        """The next scheduled step after `step` (multiples of every_steps), or never."""
        if self.every_steps is None:
            return 1 << 62
        return (step // self.every_steps + 1) * self.every_steps

    def ran(self, step: int, started: float, ended: float, round_seconds: float | None = None) -> int:
        """Book a run; returns the next step it is due (the share cap turned into steps by this rank's pace).

        `round_seconds`: the time of every probe that ran at this step together. The cap holds for the
        set of probes, not for each alone: five probes at 5 % each would otherwise take 25 %.
        """
        took = max(0.0, ended - started)
        nxt = self._after(step)
        if self.max_share is not None:
            spent = max(took, round_seconds or 0.0)
            gap = spent * (1.0 / self.max_share - 1.0)  # training time needed to keep the share
            self._not_before = ended + gap
            if self._last_end is not None and self._last_step is not None and step > self._last_step:
                pace = max(0.0, started - self._last_end) / (step - self._last_step)
                if pace > 0 and math.isfinite(gap / pace):
                    nxt = max(nxt, step + int(math.ceil(gap / pace)))
        self.runs += 1
        self.seconds += took
        self._last_end = ended
        self._last_step = step
        self._waiting = False
        self.next_step = nxt
        return nxt

    def hold(self, ended: float, spent: float) -> None:
        """Wait, under the share cap, for `spent` seconds of probing by the set that ended at `ended`."""
        if self.max_share is not None:
            self._not_before = max(self._not_before, ended + spent * (1.0 / self.max_share - 1.0))

    def model_of(self, model: Any) -> Any:
        """The language model to probe inside what the integration hands over."""
        return self.select(model) if self.select is not None else model


class Probe(Scheduled):
    """A suite run on the training model: exact match, F1, choice accuracy, gold log-probability per item.

    `suite`: a `Suite`, a builtin name ("arithmetic", "reading", "faithfulness", "format") or a path
    to a JSONL suite. `tokenizer` is needed for the default adapter (a Hugging Face causal LM, or any
    module mapping token ids to logits); `adapter` replaces it for other models. `shard=True` splits
    the items over the ranks of a torch.distributed job and gathers them (every rank must then pass
    the same probes); otherwise rank 0 runs them alone. `judge` compares each generated answer with
    the baseline's (see probes.judge). `min_drop` is the drop in mean item score worth a page.

    Example:
        probe = Probe("arithmetic", tokenizer, every_steps=200)
        mon = monitor.watch(model, optimizer, probes=[probe])
    """

    def __init__(self, suite: Any, tokenizer: Any = None, *, name: str | None = None, every_steps: int | None = None,
                 every_minutes: float | None = None, at_start: bool = True, max_share: float | None = DEFAULT_MAX_SHARE,
                 budget_seconds: float | None = DEFAULT_BUDGET_SECONDS, batch_size: int = 16, shard: bool = False,
                 items: Sequence[str] = ("gold_logprob",), judge: Any = None, min_drop: float | None = None,
                 adapter: Any = None, select: Callable[[Any], Any] | None = None, n: int | None = None, seed: int = 0):
        super().__init__(every_steps=every_steps, every_minutes=every_minutes, at_start=at_start,
                         max_share=max_share, shard=shard, select=select)
        from probes.suite import Suite, resolve

        if isinstance(suite, str) and n is not None:
            from probes.builtin import builtin

            suite = builtin(suite.removeprefix("builtin:"), n=n, seed=seed)
        self.suite: Suite = resolve(suite)
        self.name = name or self.suite.name
        if budget_seconds is not None and not budget_seconds > 0:
            raise ValueError(f"budget_seconds: a number of seconds > 0 or None, got {budget_seconds!r}")
        if min_drop is not None and not (isinstance(min_drop, (int, float)) and min_drop >= 0):
            raise ValueError(f"min_drop: a number >= 0, got {min_drop!r}")
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.budget_seconds = budget_seconds
        self.batch_size = int(batch_size)
        self.items = tuple(items)
        self.min_drop = min_drop
        if judge is not None:
            from probes.judge import PairwiseJudge

            judge = judge if isinstance(judge, PairwiseJudge) else PairwiseJudge(judge)
        self.judge = judge
        self.baseline_outputs: list[str | None] | None = None
        self.last: Any = None  # the last SuiteRun, for users who want the per-item detail

    def run(self, model: Any, rank: int = 0, world: int = 1, dist: Any = None,
            tokenizer: Any = None) -> list[Record]:
        """Score the suite now; every rank calls this when sharded, else rank 0 alone. Records on rank 0."""
        adapter = adapter_for(self.model_of(model), self.tokenizer or tokenizer, adapter=self.adapter,
                              batch_size=self.batch_size)
        n = len(self.suite.items)
        indices = range(rank, n, world) if (self.shard and world > 1) else None
        with probing(getattr(adapter, "module", None) or _Null()):
            res = run_suite(adapter, self.suite, indices=indices, budget_seconds=self.budget_seconds,
                            batch_size=self.batch_size)
        if self.shard and world > 1 and dist is not None:
            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, shard(res))
            res = merge(parts, res)
        self.last = res
        if rank != 0:
            return []
        recs: list[Record] = list(series(res, extra=self.items, min_drop=self.min_drop, name=self.name))
        if self.judge is not None:
            if self.baseline_outputs is None:
                self.baseline_outputs = list(res.outputs)
            prompts = [self.suite.prompt(it) for it in self.suite.items]
            vals, items = self.judge.score(prompts, res.outputs, self.baseline_outputs)
            recs.append((f"{self.name}/judge", vals, items))
        return recs


class _Null:
    def modules(self) -> Iterable[Any]:
        return ()


def check_probes(probes: Iterable[Any] | None) -> list[Any]:
    """The probes as a list; a TypeError naming the entry that is neither a Probe nor a Drift."""
    out = list(probes or [])
    for i, p in enumerate(out):
        if not isinstance(p, Scheduled):
            raise TypeError(f"probes[{i}]: must be a probes.Probe or probes.Drift, got {type(p).__name__}")
    return out


class ProbeSet:
    """The probes of one rank's run: runs what is due, logs `probe` records, never raises."""

    def __init__(self, probes: Iterable[Any] | None, reporter: Any, *, tokenizer: Any = None):
        self.probes = check_probes(probes)
        self.reporter = reporter
        self.tokenizer = tokenizer
        self._warned: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.probes)

    def start(self, step: int, model: Any) -> bool:
        """Run the baselines (the probes with at_start) before training."""
        return self._run(step, model, start=True)

    def after_step(self, step: int, model: Any) -> bool:
        """Run the probes due at `step`; True if any ran (the caller then restarts its step timer)."""
        return self._run(step, model, start=False)

    def _run(self, step: int, model: Any, start: bool) -> bool:
        if not self.probes or model is None:
            return False
        dist, rank, world = _dist()
        done: list[tuple[Any, float, float]] = []
        for p in self.probes:
            try:
                sharded = p.shard and world > 1
                if not sharded and rank != 0:
                    continue
                # Sharded probes follow rank 0's schedule, shared when they gather: every rank agrees.
                if not p.due(step, start=start):
                    continue
                t0 = p.clock()
                recs = p.run(model, rank, world, dist, tokenizer=self.tokenizer)
                done.append((p, t0, p.clock()))
                for suite, values, items in recs:
                    self.reporter.log("probe", step, values, suite=suite,
                                      items=list(items) if items is not None else None)
            except Exception as e:  # noqa: BLE001 - a probe must never break training
                self._failed(p, step, e)
        spent = sum(t1 - t0 for _, t0, t1 in done)
        for p, t0, t1 in done:
            try:
                nxt = p.ran(step, t0, t1, round_seconds=spent)
                if p.shard and world > 1 and dist is not None:
                    box = [nxt]
                    dist.broadcast_object_list(box, src=0)
                    p.next_step = int(box[0])
            except Exception as e:  # noqa: BLE001
                self._failed(p, step, e)
        if done:
            # Every probe of the set waits for the round, not only those in it: otherwise the probes
            # drift apart into rounds of one, each keeping only its own share.
            ended = max(t1 for _, _, t1 in done)
            for p in self.probes:
                p.hold(ended, spent)
        return bool(done)

    def _failed(self, p: Any, step: int, e: BaseException) -> None:
        """Count a probe's failure, warn once per probe, and report the count."""
        p.errors += 1
        p.next_step = p._after(step)
        if p.name not in self._warned:
            self._warned.add(p.name)
            log.warning("trainguard: probe %r failed at step %s (%s: %s); training goes on, later "
                        "failures are counted in the probe's 'errors' value", p.name, step, type(e).__name__, e)
        try:
            self.reporter.log("probe", step, {"errors": float(p.errors)}, suite=p.name)
        except Exception:  # noqa: BLE001
            pass


__all__ = ["DEFAULT_EVERY_STEPS", "DEFAULT_MAX_SHARE", "Probe", "ProbeSet", "Scheduled", "check_probes"]
