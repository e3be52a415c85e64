"""DataLoaderBottleneck: the training loop spends a large share of each step waiting for its batch. Info."""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._timing import finite, floats, median, num
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record


class DataLoaderBottleneck(Detector):
    """Fires when the median of data_time_seconds / step_time_seconds over `window` steps stays above `share`.

    The median of per-step shares ignores the one long wait of a new epoch or a shard download,
    and `confirm` evaluations `stride` steps apart make it a sustained condition. Reads the lead
    rank only, which keeps its cost independent of the world size (every rank usually runs the same
    loader); a loader that starves only some other rank slows the whole job and shows as
    ThroughputDrop. Info: the run is healthy, only slower than it could be. Resolves below
    `resolve_below`.
    """

    name = "DataLoaderBottleneck"
    severity = "info"
    kinds: ClassVar[frozenset[str]] = frozenset({"train"})
    ranks = "lead"
    defaults: ClassVar[Mapping[str, Any]] = {
        # A 64-step median: the slow first batches of an epoch or a shard (up to 31 in a row) do
        # not count; judged every 16 steps.
        "window": 64,
        "stride": 16,
        # A quarter of every step spent waiting for data: the accelerator idles 25 % of the time.
        # The healthy labelled traces wait at most 1.5 % (0.1-0.3 ms of a 20-40 ms step).
        "share": 0.25,
        "resolve_below": 0.15,
        # Three evaluations 16 steps apart: the condition held over 96 steps in all.
        "confirm": 3,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.window = max(3, int(c["window"]))
        self.stride = max(1, int(c["stride"]))
        self.share = float(c["share"])
        self.resolve_below = float(c["resolve_below"])
        self.confirm = max(1, int(c["confirm"]))
        self.shares: deque[float] = deque(maxlen=self.window)
        self.count = 0
        self.hits = 0
        self.clear = 0
        self.firing = False
        self.last: float | None = None

    def update(self, rec: Record, run: Any) -> list[Finding]:
        vals = rec.values
        d = finite(vals.get("data_time_seconds"))
        if d is None:
            return []
        s = finite(vals.get("step_time_seconds"))
        if s is None or s <= 0.0 or d < 0.0:
            return []
        # Some loops time the data wait outside the step: the share is then d / (d + s).
        self.shares.append(d / s if d <= s else d / (d + s))
        self.count += 1
        if self.count % self.stride or len(self.shares) < self.window:
            return []
        m = self.last = median(self.shares)
        if not self.firing:
            self.hits = self.hits + 1 if m >= self.share else 0
            if self.hits < self.confirm:
                return []
            self.firing = True
            self.clear = 0
            return [Finding(
                alert=self.name, action="fire", t=rec.t, severity=self.severity, step=rec.step, rank=None,
                value=m,
                summary=(f"{100 * m:.0f} % of each step waits for data (median of the last {self.window} steps, "
                         f"step {rec.step})"),
                description=(f"The training loop waited for its next batch for a median {100 * m:.0f} % of the step "
                             f"time over the last {self.window} steps, for {self.confirm * self.stride} steps in a "
                             "row: the accelerator idles that long. More DataLoader workers, pin_memory, "
                             "prefetching, or faster storage would speed the run up."),
                labels={"share": f"{m:.3f}"},
            )]
        self.clear = self.clear + 1 if m < self.resolve_below else 0
        if self.clear >= self.confirm:
            self.firing = False
            self.hits = 0
            return [Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step,
                            summary=f"data wait down to {100 * m:.0f} % of the step at step {rec.step}")]
        return []

    def statistic(self) -> float | None:
        return self.last

    def state(self) -> dict[str, Any]:
        return {"shares": list(self.shares), "count": self.count, "hits": self.hits, "clear": self.clear,
                "firing": self.firing}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.shares.clear()
        self.shares.extend(floats(state.get("shares"), self.window))
        self.count = max(0, int(num(state, "count", 0.0)))
        self.hits = max(0, int(num(state, "hits", 0.0)))
        self.clear = max(0, int(num(state, "clear", 0.0)))
        self.firing = bool(state.get("firing", False))
