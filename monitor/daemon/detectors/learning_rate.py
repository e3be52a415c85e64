"""LearningRateAnomaly: the learning rate drops to zero, jumps, or leaves its configured range."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._robust import fmt, meta_number, state_int as _int, state_float as _float
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record

# Where clients put the configured (peak) learning rate and the warm-up length in the run record's meta.
LR_KEYS = ("lr", "learning_rate", "max_lr", "optimizer.lr", "optimizer.learning_rate", "schedule.max_lr")
WARMUP_KEYS = ("schedule.warmup", "schedule.warmup_steps", "warmup_steps", "warmup", "lr_warmup_steps")


class LearningRateAnomaly(Detector):
    """Step-to-step rules on the reported lr; no baseline needed, so it fires at the first bad step.

    - an abrupt drop: lr below 1/`drop_ratio` of the previous step's while that one was at least
      `active_frac` of the peak so far (a schedule annealing to zero gets there gradually and
      never trips it; a reset to zero does);
    - zero for `zero_steps` steps after warm-up (the run trains nothing);
    - an abrupt rise: more than `jump_ratio` times the previous step's (linear warm-up at most
      doubles it, at its second step);
    - above `peak_factor` times the lr configured in the run's meta, when it names one;
    - negative or non-finite.
    """

    name = "LearningRateAnomaly"
    severity = "warning"
    kinds = frozenset({"train"})
    ranks = "lead"
    defaults: ClassVar[Mapping[str, Any]] = {
        # Healthy cpu runs: the smallest step-to-step ratio is 0.99 and the largest 2.0 (the second
        # warm-up step); step schedules drop by 10x at a milestone, so 100x leaves room for them.
        "drop_ratio": 100.0,
        "jump_ratio": 4.0,
        # The previous lr must be at least 1 % of the peak for a drop to count: the last steps of
        # a schedule that anneals to zero are below that.
        "active_frac": 0.01,
        # lr at or below this fraction of the peak counts as zero.
        "zero_frac": 1e-6,
        # 100 steps at zero past warm-up (or, warm-up unknown, past step 100): longer than any
        # warm-up that starts at zero on the healthy runs (50-100 steps).
        "zero_steps": 100,
        # 2x the configured lr: a schedule never exceeds its configured peak (healthy max ratio 1.0).
        "peak_factor": 2.0,
        # Resolve after this many consecutive steps without an anomaly in force.
        "resolve_steps": 50,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.drop_ratio = float(c["drop_ratio"])
        self.jump_ratio = float(c["jump_ratio"])
        self.active_frac = float(c["active_frac"])
        self.zero_frac = float(c["zero_frac"])
        self.zero_steps = int(c["zero_steps"])
        self.peak_factor = float(c["peak_factor"])
        self.resolve_steps = int(c["resolve_steps"])
        self.prev: float | None = None
        self.peak = 0.0
        self.zeros = 0
        self.firing = False
        self.kind = ""
        self.clean = 0
        self.ratio = 1.0
        self._meta: Any = None  # the meta object the two numbers below were read from
        self._configured: float | None = None
        self._warmup: float | None = None

    def _read_meta(self, run: Any) -> None:
        """Re-read the configured lr and warm-up only when the run's meta object changes (cheap per record)."""
        meta = getattr(run, "meta", None)
        if meta is not self._meta:
            self._meta = meta
            self._configured = meta_number(meta, *LR_KEYS)
            self._warmup = meta_number(meta, *WARMUP_KEYS)

    def update(self, rec: Record, run: Any) -> list[Finding]:
        lr = rec.values.get("lr")
        if lr is None:
            return []
        self._read_meta(run)
        prev = self.prev
        peak = self.peak
        step = rec.step if rec.step is not None else 0
        why = ""
        kind = ""
        in_force = False  # the condition still holds (keeps an episode open)
        if not math.isfinite(lr) or lr < 0:
            why, kind, in_force = f"lr is {fmt(lr)} at step {step}", "invalid", True
            self.ratio = math.nan
        else:
            if lr > peak:
                self.peak = lr
            is_zero = lr <= self.zero_frac * max(peak, lr) or lr == 0.0
            self.zeros = self.zeros + 1 if is_zero else 0
            self.ratio = lr / prev if prev is not None and prev > 0 else 1.0
            configured = self._configured
            if prev is not None and prev > 0 and prev >= self.active_frac * peak and lr * self.drop_ratio < prev:
                how = "to zero" if is_zero else f"{fmt(prev / lr)}x"
                why = (f"lr dropped from {fmt(prev)} to {fmt(lr)} at step {step} ({how}"
                       f"; peak so far {fmt(peak)}, threshold {fmt(self.drop_ratio)}x)")
                kind = "zero" if is_zero else "drop"
            elif is_zero and self.zeros >= self.zero_steps:
                warmup = self._warmup
                if step > (warmup if warmup is not None else self.zero_steps):
                    why = (f"lr has been zero for {self.zeros} steps at step {step}"
                           f"{f', past the {int(warmup)}-step warm-up' if warmup is not None else ''}")
                    kind = "zero"
            elif prev is not None and prev > 0 and lr > self.jump_ratio * prev:
                why = (f"lr jumped from {fmt(prev)} to {fmt(lr)} ({fmt(lr / prev)}x) at step {step}; "
                       f"threshold {fmt(self.jump_ratio)}x")
                kind = "jump"
            elif configured and configured > 0 and lr > self.peak_factor * configured:
                why = (f"lr {fmt(lr)} at step {step} is {fmt(lr / configured)}x the configured {fmt(configured)}; "
                       f"threshold {fmt(self.peak_factor)}x")
                kind = "above_configured"
            in_force = bool(why) or is_zero or (configured is not None and configured > 0
                                                and lr > self.peak_factor * configured)
            self.prev = lr
        if self.firing:
            if in_force:
                self.clean = 0
                return []
            self.clean += 1
            if self.clean >= self.resolve_steps:
                self.firing = False
                self.clean = 0
                return [Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step,
                                summary=f"lr {fmt(lr)} normal for {self.resolve_steps} steps up to step {step}")]
            return []
        if not why:
            return []
        self.firing = True
        self.kind = kind
        self.clean = 0
        return [Finding(
            alert=self.name, action="fire", t=rec.t, severity=self.severity, step=rec.step, rank=None,
            value=lr, summary=why,
            description=("The learning rate is not what a schedule produces: a scheduler bug, a resumed run that "
                         "lost its scheduler state, or an override. A zero lr trains nothing; a jump often starts "
                         "a divergence. Check the scheduler and the optimizer's param groups."),
            labels={"kind": kind},
        )]

    def statistic(self) -> float | None:
        return self.ratio if math.isfinite(self.ratio) else None

    def state(self) -> dict[str, Any]:
        return {"prev": self.prev, "peak": self.peak, "zeros": self.zeros, "firing": self.firing,
                "kind": self.kind, "clean": self.clean}

    def restore(self, state: Mapping[str, Any]) -> None:
        p = _float(state.get("prev"), math.nan)
        self.prev = p if p == p and p >= 0 else None
        pk = _float(state.get("peak"), 0.0)
        self.peak = pk if pk > 0 else 0.0
        self.zeros = _int(state.get("zeros"))
        self.firing = bool(state.get("firing", False))
        self.kind = str(state.get("kind") or "")[:32]
        self.clean = _int(state.get("clean"))
