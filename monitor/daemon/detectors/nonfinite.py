"""NonFinite: a NaN or infinite training loss or gradient norm. Critical, fires at the first such step."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record, RecordBlock


class NonFinite(Detector):
    """Fires on the first train record whose loss or grad_norm is NaN or infinite.

    A NaN is never noise: a run that produced one has either lost its weights or (with fp16 loss
    scaling) skipped a step, and both deserve a look at once, so there is no `for` delay. It
    resolves after `resolve_after_steps` consecutive train records with finite values, which is
    what a loss-scaled run that recovered looks like.
    """

    name = "NonFinite"
    severity = "critical"
    kinds = frozenset({"train"})
    ranks = "all"  # a NaN on any rank poisons the all-reduced update
    defaults: ClassVar[Mapping[str, Any]] = {
        "watch": ("loss", "grad_norm"),
        # 20 clean steps: longer than the few skipped steps a dynamic loss scaler needs to back off.
        "resolve_after_steps": 20,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        self.watch = tuple(self.config["watch"])
        self.resolve_after = int(self.config["resolve_after_steps"])
        self.firing = False
        self.clean = 0
        self.count = 0

    def update(self, rec: Record, run: Any) -> list[Finding]:
        vals = rec.values
        bad = None
        seen = False
        for name in self.watch:
            v = vals.get(name)
            if v is None:
                continue
            seen = True
            if not math.isfinite(v):
                bad = (name, v)
                break
        if bad is not None:
            self.count += 1
            self.clean = 0
            if self.firing:
                return []
            self.firing = True
            name, v = bad
            return [Finding(
                alert=self.name, action="fire", t=rec.t, severity=self.severity, step=rec.step, rank=None,
                value=v, summary=f"{name} is {v} at step {rec.step} (rank {rec.rank})",
                description=(f"Rank {rec.rank} reported {name}={v} at step {rec.step}. A non-finite loss or "
                             "gradient norm means the weights or the optimizer state may already be corrupt; "
                             "stop the run or roll back to the last good checkpoint."),
                labels={"first_rank": str(rec.rank), "metric": name},
            )]
        if seen and self.firing:
            self.clean += 1
            if self.clean >= self.resolve_after:
                self.firing = False
                return [Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step,
                                summary=f"{self.clean} consecutive finite steps up to step {rec.step}")]
        return []

    def update_block(self, block: RecordBlock, run: Any) -> list[Finding]:
        if not self.firing:
            # A sum is finite only if every term is (or, rarely, overflows): then nothing to do.
            cols = [c for c in map(block.column, self.watch) if c is not None]
            if all(math.isfinite(sum(c)) for c in cols):
                return []
        return super().update_block(block, run)

    def statistic(self) -> float | None:
        return float(self.count)

    def state(self) -> dict[str, Any]:
        return {"firing": self.firing, "clean": self.clean, "count": self.count}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.firing = bool(state.get("firing", False))
        self.clean = int(state.get("clean", 0))
        self.count = int(state.get("count", 0))
