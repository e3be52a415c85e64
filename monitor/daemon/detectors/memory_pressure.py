"""MemoryPressure: a rank ran out of GPU memory, keeps flushing its allocator cache, or has no headroom. Critical."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._timing import finite, fmt_bytes, ints, name_ranks, num
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record


class _Rank:
    """What one rank's allocator counters looked like (bounded)."""

    __slots__ = ("ooms", "retries", "retry_t", "full", "ratio")

    def __init__(self) -> None:
        self.ooms: float | None = None
        self.retries: float | None = None
        self.retry_t: deque[tuple[float, float]] = deque(maxlen=64)  # (t, retries added)
        self.full = 0  # consecutive records with reserved memory near the total
        self.ratio = 0.0  # latest reserved / total


class MemoryPressure(Detector):
    """Fires on the first of: an out-of-memory error, repeated allocator retries, or no headroom left.

    - `num_ooms` went up: the CUDA caching allocator raised an out-of-memory error (caught or not,
      the step it happened in was lost).
    - `num_alloc_retries` went up by `retries` within `retry_window_s`: cudaMalloc failed and the
      allocator freed its whole cache and retried, a synchronising stall each time and the step
      before an OOM.
    - `gpu_memory_reserved_bytes` at least `reserved_ratio` of `gpu_memory_total_bytes` on
      `full_records` system records in a row.
    Counters are compared with the rank's own first report, so errors before the daemon saw the
    process (an automatic batch-size search) do not page. Names the rank(s); resolves after
    `resolve_after_s` event seconds without any of the three.
    """

    name = "MemoryPressure"
    severity = "critical"
    kinds: ClassVar[frozenset[str]] = frozenset({"system"})
    ranks = "all"
    defaults: ClassVar[Mapping[str, Any]] = {
        # Three cache flushes within 5 minutes: one is a one-off (a larger batch, fragmentation);
        # recurring ones mean every few steps the run is on the edge (PyTorch's CUDA memory notes:
        # "num_alloc_retries ... cudaMalloc calls that result in a cache flush and retry").
        "retries": 3,
        "retry_window_s": 300.0,
        # 97 % reserved: the caching allocator reserves what the peak step needs plus
        # fragmentation; 3 % of an 80 GB card (2.4 GB) is less than one more activation buffer of a
        # large model, and 3 records in a row (15 s at the client's 5 s period) make it a state.
        "reserved_ratio": 0.97,
        "full_records": 3,
        "resolve_after_s": 600.0,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.retries = float(c["retries"])
        self.retry_window = float(c["retry_window_s"])
        self.reserved_ratio = float(c["reserved_ratio"])
        self.full_records = max(1, int(c["full_records"]))
        self.resolve_after = float(c["resolve_after_s"])
        self.per: dict[int, _Rank] = {}
        self.firing = False
        self.ranks_hit: list[int] = []
        self.last_bad = -math.inf

    def update(self, rec: Record, run: Any) -> list[Finding]:
        vals = rec.values
        p = self.per.get(rec.rank)
        if p is None:
            p = self.per[rec.rank] = _Rank()
        t = rec.t
        causes: list[tuple[str, str]] = []
        ooms = finite(vals.get("num_ooms"))
        if ooms is not None:
            if p.ooms is not None and ooms > p.ooms:
                causes.append(("oom", f"{ooms - p.ooms:.0f} CUDA out-of-memory error(s)"))
            p.ooms = ooms
        retries = finite(vals.get("num_alloc_retries"))
        if retries is not None:
            if p.retries is not None and retries > p.retries:
                p.retry_t.append((t, retries - p.retries))
            p.retries = retries
            rt = p.retry_t
            while rt and rt[0][0] < t - self.retry_window:
                rt.popleft()
            added = sum(x for _, x in rt)
            if added >= self.retries:
                causes.append(("alloc_retries",
                               f"{added:.0f} allocator retries (cache flushes) in the last {self.retry_window:.0f} s"))
        reserved = finite(vals.get("gpu_memory_reserved_bytes"))
        total = finite(vals.get("gpu_memory_total_bytes"))
        if reserved is not None and total is not None and total > 0:
            p.ratio = ratio = reserved / total
            p.full = p.full + 1 if ratio >= self.reserved_ratio else 0
            if p.full >= self.full_records:
                causes.append(("reserved", f"{100 * ratio:.1f} % of GPU memory reserved ({fmt_bytes(reserved)} "
                                           f"of {fmt_bytes(total)}) for {p.full} records"))
        if causes:
            self.last_bad = t
            if rec.rank not in self.ranks_hit and len(self.ranks_hit) < 1024:
                self.ranks_hit.append(rec.rank)
            if not self.firing:
                return [self._fire(rec, run, causes)]
            return []
        if self.firing and t - self.last_bad >= self.resolve_after:
            self.firing = False
            back = self.ranks_hit
            self.ranks_hit = []
            return [Finding(alert=self.name, action="resolve", t=t, step=rec.step,
                            summary=f"no OOM, allocator retry or full memory on rank(s) {name_ranks(back)} "
                                    f"for {self.resolve_after:.0f} s")]
        return []

    def _fire(self, rec: Record, run: Any, causes: list[tuple[str, str]]) -> Finding:
        self.firing = True
        self.ranks_hit = [rec.rank]
        rs = run.ranks.get(rec.rank)
        step = rec.step if rec.step is not None else (rs.last_step if rs is not None else None)
        text = "; ".join(c[1] for c in causes)
        return Finding(
            alert=self.name, action="fire", t=rec.t, severity=self.severity, step=step, rank=rec.rank,
            value=self.per[rec.rank].ratio or None,
            summary=f"rank {rec.rank}: {text}",
            description=(f"Rank {rec.rank} is out of GPU memory or close to it: {text}. The next larger "
                         "batch or longer sequence may crash the run. Lower the micro-batch size, enable activation "
                         "checkpointing, set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True against "
                         "fragmentation, or look for a leak (MemoryLeak)."),
            labels={"cause": ",".join(c[0] for c in causes)},
        )

    def statistic(self) -> float | None:
        """The highest reserved / total GPU memory among the ranks' latest reports."""
        return max((p.ratio for p in self.per.values()), default=None)

    def state(self) -> dict[str, Any]:
        # Counters are re-read from the next records; the episode and when it was last seen survive.
        return {"firing": self.firing, "ranks": self.ranks_hit[:1024],
                "last_bad": self.last_bad if math.isfinite(self.last_bad) else None}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.firing = bool(state.get("firing", False))
        self.ranks_hit = ints(state.get("ranks"), 1024)
        self.last_bad = num(state, "last_bad", -math.inf)
