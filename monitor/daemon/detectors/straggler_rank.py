"""StragglerRank: one rank (or a few) computes markedly slower than its peers. Warning, names the rank."""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._timing import ints, median, name_ranks
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record, RecordBlock


class _Rank:
    """One rank's recent compute times (bounded) and its pace."""

    __slots__ = ("times", "fresh", "level", "levels", "last_t")

    def __init__(self, window: int, keep: int) -> None:
        self.times: deque[float] = deque(maxlen=window)
        self.fresh = 0  # times added since the pace was last computed
        self.level = math.nan  # median of the window: the rank's current pace
        self.levels: deque[float] = deque(maxlen=keep)  # the last few paces, newest last
        self.last_t = -math.inf  # event time of the rank's latest value


class StragglerRank(Detector):
    """Fires when a rank's score, the fastest rank's pace over its own, stays below `threshold`.

    Each rank's pace is the median of its last `window` values of `compute_time_seconds` (this
    rank's own forward and loss time, measured before any collective, so it is not hidden by the
    synchronisation that makes every rank's step time equal), recomputed every `block` steps;
    ranks that report only `step_time_seconds` are scored on that. The score follows NVIDIA's
    resiliency extension (nvidia-resiliency-ext straggler detection: relative performance score =
    best rank's median time / this rank's median time); from 20 ranks up the reference is the
    5th-percentile pace rather than the very fastest, so that one unusually fast rank among
    thousands does not make the others stragglers. A rank fires once its score stayed below
    `threshold` for `confirm_blocks` more blocks; the alert lists every rank below it. Scores are
    computed in `tick`, once per `scan_every_s` of event time, so a record costs an append (and
    every `block`-th a median of `window`); `scores()` gives every rank's. Resolves when every
    rank scores at least `resolve_above`.
    """

    name = "StragglerRank"
    severity = "warning"
    kinds: ClassVar[frozenset[str]] = frozenset({"train"})
    ranks = "all"
    defaults: ClassVar[Mapping[str, Any]] = {
        # Pace = median of the last 64 steps, recomputed every 16: a burst of up to 31 slow steps
        # on one rank (a GC pause, a checkpoint shard write) does not move it.
        "window": 64,
        "block": 16,
        # 0.75: a rank 33 % slower than the reference. Healthy ranks of the labelled 2-rank traces
        # score 0.95-1.00; the labelled straggler (2.2x compute) scores 0.45.
        "threshold": 0.75,
        "resolve_above": 0.85,
        "confirm_blocks": 1,
        "scan_every_s": 1.0,
        # A rank with no value for this long (it ended, or went silent) is neither a reference
        # nor a suspect: RankLost and TrainingStalled speak for it.
        "stale_after_s": 60.0,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.window = max(3, int(c["window"]))
        self.block = max(1, int(c["block"]))
        self.threshold = float(c["threshold"])
        self.resolve_above = float(c["resolve_above"])
        self.confirm = max(0, int(c["confirm_blocks"]))
        self.scan_every = float(c["scan_every_s"])
        self.stale = float(c["stale_after_s"])
        self.per: dict[int, _Rank] = {}
        self.source: str | None = None  # "compute_time_seconds" once any rank reports it
        self.next_scan = -math.inf
        self.score: dict[int, float] = {}
        self.lowest: float | None = None
        self.reference = "fastest"
        self.firing = False
        self.suspects: list[int] = []

    def update(self, rec: Record, run: Any) -> list[Finding]:
        vals = rec.values
        v = vals.get("compute_time_seconds")
        if v is not None:
            if self.source != "compute_time_seconds":
                if self.source is not None:
                    self.per.clear()  # never compare compute time with step time
                self.source = "compute_time_seconds"
        elif self.source == "compute_time_seconds":
            return []
        else:
            v = vals.get("step_time_seconds")
            if v is None:
                return []
            self.source = "step_time_seconds"
        if not (0.0 < v < math.inf):
            return []
        p = self.per.get(rec.rank)
        if p is None:
            p = self.per[rec.rank] = _Rank(self.window, self.confirm + 1)
        p.times.append(v)
        p.last_t = rec.t
        p.fresh += 1
        if p.fresh >= self.block and len(p.times) >= self.window:
            p.fresh = 0
            p.level = median(p.times)
            p.levels.append(p.level)
        return []

    def update_block(self, block: RecordBlock, run: Any) -> list[Finding]:
        # The same as `update` on each record, a column at a time: the values are appended at
        # once and only the paces that the last few block boundaries would have taken are computed.
        col = block.column("compute_time_seconds")
        if col is not None:
            if self.source != "compute_time_seconds":
                if self.source is not None:
                    self.per.clear()
                self.source = "compute_time_seconds"
        elif self.source == "compute_time_seconds":
            return []
        else:
            col = block.column("step_time_seconds")
            if col is None:
                return []
            self.source = "step_time_seconds"
        keep = [j for j, v in enumerate(col) if 0.0 < v < math.inf]
        if not keep:
            return []
        vals = [col[j] for j in keep] if len(keep) < len(col) else col
        p = self.per.get(block.rank)
        if p is None:
            p = self.per[block.rank] = _Rank(self.window, self.confirm + 1)
        hist = list(p.times) + vals
        base, n, w, b = len(p.times), len(vals), self.window, self.block
        # The pace is taken after the i-th new value (1-based) once the window is full and at
        # least `block` values came since the last one: first at i1, then every `block` values.
        i1 = max(1, w - base, b - p.fresh)
        points = range(i1, n + 1, b)
        for i in points[-(self.confirm + 1):]:
            p.level = median(hist[base + i - w:base + i])
            p.levels.append(p.level)
        p.fresh = (n - points[-1]) if points else p.fresh + n
        p.times.extend(vals)
        p.last_t = block.ts[keep[-1]]
        return []

    def tick(self, now: float, run: Any) -> list[Finding]:
        if now < self.next_scan:
            return []
        self.next_scan = now + self.scan_every
        ranks = run.ranks
        fresh = {}
        for r, p in self.per.items():
            if p.level == p.level and now - p.last_t <= self.stale:
                rs = ranks.get(r)
                if rs is None or rs.status is None:
                    fresh[r] = p
        if len(fresh) < 2:
            self.score = {}
            self.lowest = None
            # Nothing to compare: resolve only once every suspect has ended (after a daemon restart
            # the paces are simply not relearnt yet).
            gone = all(r in ranks and ranks[r].status is not None for r in self.suspects)
            return self._maybe_resolve(now, [] if gone else self.suspects)
        k = len(fresh) // 20  # the 5th percentile from 20 ranks up, else the fastest
        best = heapq.nsmallest(k + 1, (p.level for p in fresh.values()))[-1]
        if not best > 0.0:
            return []
        self.reference = "fastest" if k == 0 else "5th-percentile"
        score = {r: best / p.level for r, p in fresh.items()}
        self.score = score
        self.lowest = min(score.values())
        # Confirmed: the rank's last `confirm` + 1 paces, `block` steps apart, all score low.
        limit = best / self.threshold
        slow = [r for r, p in fresh.items()
                if score[r] < self.threshold and len(p.levels) == p.levels.maxlen and min(p.levels) > limit]
        if self.firing:
            return self._maybe_resolve(now, [r for r, s in score.items() if s < self.resolve_above])
        if not slow:
            return []
        low = [r for r, s in score.items() if s < self.threshold]
        return [self._fire(now, run, low, best)]

    def _maybe_resolve(self, now: float, still: list[int]) -> list[Finding]:
        if not self.firing or still:
            return []
        self.firing = False
        back = self.suspects
        self.suspects = []
        return [Finding(alert=self.name, action="resolve", t=now,
                        summary=f"rank(s) {name_ranks(back)} back within {100 * (1 - self.resolve_above):.0f} % "
                                "of the fastest, or gone")]

    def _fire(self, now: float, run: Any, slow: list[int], best: float) -> Finding:
        self.firing = True
        slow.sort(key=lambda r: self.score[r])
        self.suspects = sorted(slow)[:1024]
        worst = slow[0]
        s = self.score[worst]
        p = self.per[worst]
        rs = run.ranks.get(worst)
        step = rs.last_step if rs is not None else None
        what = "compute time" if self.source == "compute_time_seconds" else "step time"
        who = f"rank {worst}" if len(slow) == 1 else f"{len(slow)} ranks ({name_ranks(slow)})"
        return Finding(
            alert=self.name, action="fire", t=now, severity=self.severity, step=step,
            rank=worst if len(slow) == 1 else None, value=s,
            summary=(f"{who} slow: rank {worst} scores {s:.2f} ({what} {1e3 * p.level:.3g} ms vs {self.reference} "
                     f"{1e3 * best:.3g} ms, median of {self.window} steps)"),
            description=(f"The {self.reference} rank's median {what} divided by each rank's is below "
                         f"{self.threshold:g} for {who}, and has been for {self.confirm} more blocks of {self.block} "
                         "steps. In synchronous training every rank waits for the slowest, so one slow GPU or host "
                         "slows the whole job: check its clocks and temperature (nvidia-smi -q -d PERFORMANCE), ECC "
                         "errors, CPU contention on its host, and its NIC."),
            labels={"ranks": name_ranks(slow), "score": f"{s:.3f}", "metric": what},
        )

    def scores(self) -> dict[int, float]:
        """Each rank's latest score (reference pace / its pace; 1.0 is as fast as the reference), for export."""
        return dict(self.score)

    def statistic(self) -> float | None:
        return self.lowest

    def state(self) -> dict[str, Any]:
        # Paces are relearnt in 64 steps after a restart; only the episode survives it.
        return {"firing": self.firing, "suspects": self.suspects[:1024], "source": self.source}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.suspects = ints(state.get("suspects"), 1024)
        self.firing = bool(state.get("firing", False)) and bool(self.suspects)
        src = state.get("source")
        self.source = src if src in ("compute_time_seconds", "step_time_seconds") else None
