"""MemoryLeak: host RSS or GPU allocated memory of a rank grows steadily. Warning, with time to exhaustion."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._timing import (finite, fmt_bytes, fmt_duration, ints, lag1, mad, median,
                                              name_ranks, num, theil_sen_ci)
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record

SERIES = {"host_rss_bytes": "host RSS", "gpu_memory_allocated_bytes": "GPU allocated memory"}
# Where a capacity can come from, per series: the record's own values first, then the run's meta.
CAPACITY = {"host_rss_bytes": ("host_memory_total_bytes",), "gpu_memory_allocated_bytes": ("gpu_memory_total_bytes",)}


class _Scale:
    """The last `cap` points of one series at one resolution (bounded)."""

    __slots__ = ("ts", "vs", "hits", "verdict", "past")

    def __init__(self) -> None:
        self.ts: list[float] = []
        self.vs: list[float] = []
        self.past: deque[tuple[float, float]] = deque(maxlen=64)  # (t, v) that left the window
        self.hits = 0  # consecutive evaluations that found a leak
        self.verdict: tuple[float, float, int] | None = None  # (slope, growth, window) of the last find


class _Series:
    """One rank's one memory series: raw points and two coarser resolutions (8 and 64 points per point)."""

    __slots__ = ("scales", "acc", "seen", "cap_total", "last", "last_t", "quiet", "found_at")

    def __init__(self) -> None:
        self.scales = [_Scale(), _Scale(), _Scale()]
        self.acc: list[list[tuple[float, float]]] = [[], []]
        self.seen = 0
        self.cap_total: float | None = None
        self.last = math.nan
        self.last_t = math.nan
        self.quiet = 0  # raw points in a row over which memory no longer rose
        self.found_at = 0  # the resolution at which the leak was last found


def _wander(ts: list[float], vs: list[float]) -> tuple[float, float]:
    """(spread, variance-inflation factor) of a series' wander about its least-squares line.

    Detrending first keeps a leak that began before the window from passing for wander. Memory
    that wanders (autocorrelated) has fewer independent points than it seems, so the caller
    widens its tests by sqrt((1 + r) / (1 - r)): the AR(1) variance inflation that Hamed & Rao
    (1998, J. Hydrology 204: 182-196) apply to trend tests on such data. r is the smaller of two
    lag-1 estimates: of the residuals, and 1 + 2 lag1(first differences) (for AR(1) noise
    lag1(d) = -(1 - r) / 2); the second is blind to a bend in the trend (a leak that started
    inside the past), which makes the first look autocorrelated.
    """
    n = len(vs)
    mt = sum(ts) / n
    mv = sum(vs) / n
    sxx = sum((t - mt) ** 2 for t in ts)
    b = sum((t - mt) * (v - mv) for t, v in zip(ts, vs)) / sxx if sxx > 0.0 else 0.0
    res = [v - mv - b * (t - mt) for t, v in zip(ts, vs)]
    d = [vs[i + 1] - vs[i] for i in range(n - 1)]
    r = min(max(min(lag1(res), 1.0 + 2.0 * lag1(d)), 0.0), 0.95)
    return 1.4826 * mad(res), math.sqrt((1.0 + r) / (1.0 - r))


class MemoryLeak(Detector):
    """Fires when a rank's memory grows steadily by at least `min_growth` over a window.

    Each rank's `host_rss_bytes` and `gpu_memory_allocated_bytes` (system records, every few
    seconds) are kept at three resolutions: raw points, medians of 8 and medians of 64, 32 of
    each, so windows span from 8 records to 2,048 (about 3 h at one record per 5 s): a fast leak
    pages within minutes, a slow one within hours. A window of the last 8, 16 or 32 points of a
    resolution shows a leak when
      - each of its quarters sits above the one before (a leak climbs through the whole window;
        one step up, a buffer allocated once, climbs in one place);
      - its end lies `k_sigma` spreads of the series' own past wander above the past's median;
      - its Theil-Sen slope's 99 % lower confidence bound is above zero, the interval widened for
        autocorrelation (memory that wanders slowly has fewer independent points than it seems);
      - the growth that slope implies across the window is at least `min_growth` of the level.
    `confirm` such windows in a row fire; the text gives the rate and, when the capacity is known
    (gpu_memory_total_bytes, or host_memory_total_bytes in the values or the run's meta), the
    projected time to exhaustion. Resolves once no leaking rank's memory has risen by a quarter
    of `min_growth` across its window, for `resolve_points` records in a row.
    """

    name = "MemoryLeak"
    severity = "warning"
    kinds: ClassVar[frozenset[str]] = frozenset({"system"})
    ranks = "all"  # a leak is usually in one process: every rank is watched and the leaking one named
    defaults: ClassVar[Mapping[str, Any]] = {
        # 5 % of the level within one window: over three times the +/- 1.5 % garbage-collector
        # wobble of host RSS in the CPU traces, and 2.5 times the steadiest rise of RSS in the
        # labelled traces without a leak (+2 % over 32 records; the other tests keep even a 0.2 %
        # floor silent on all of them). Smaller leaks show at the coarser resolutions.
        "min_growth": 0.05,
        "windows": (8, 16, 32),
        "confirm": 2,
        # The first records of a process include start-up allocation (+15 % RSS in the first 10
        # steps of every CPU trace): not a trend.
        "warmup_points": 3,
        # Sen's interval at 99 % (z = 2.576).
        "z": 2.576,
        # The window's end must sit this many (inflated) robust standard deviations of the
        # series' past wander above the past's median: wander is not a trend.
        "k_sigma": 4.0,
        # Points of history before a window (at each resolution) needed to judge it: the
        # autocorrelation and spread of fewer say little.
        "min_past": 32,
        # Resolve after this many records in a row over which the window (at the resolution that
        # found the leak) no longer rose by a quarter of `min_growth`.
        "resolve_points": 16,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.min_growth = float(c["min_growth"])
        self.windows = tuple(sorted({max(4, int(w)) for w in c["windows"]}))
        self.cap = max(self.windows)
        self.confirm = max(1, int(c["confirm"]))
        self.warmup = max(0, int(c["warmup_points"]))
        self.z = float(c["z"])
        self.k_sigma = float(c["k_sigma"])
        self.min_past = max(3, int(c["min_past"]))
        self.resolve_points = max(1, int(c["resolve_points"]))
        self.per: dict[tuple[int, str], _Series] = {}
        self.firing = False
        self.leaking: set[tuple[int, str]] = set()
        self.restored: set[int] = set()  # ranks that leaked before a restart, not seen since
        self.growth = 0.0  # growth of the last window that showed a leak (fraction of its level)

    def update(self, rec: Record, run: Any) -> list[Finding]:
        vals = rec.values
        out: list[Finding] = []
        for key in SERIES:
            v = vals.get(key)
            if v is None or not (0.0 < v < math.inf):
                continue
            sk = (rec.rank, key)
            s = self.per.get(sk)
            if s is None:
                s = self.per[sk] = _Series()
            for cname in CAPACITY[key]:
                cv = finite(vals.get(cname))
                if cv is not None and cv > 0:
                    s.cap_total = cv
            if self.restored and rec.rank in self.restored:
                self.restored.discard(rec.rank)
                self.leaking.add(sk)  # leaked before a restart: leaking until shown otherwise
            # A series already known to leak is re-judged every 8th point only: with every rank of
            # a large job leaking at once, that keeps the O(w^2) slopes off most records.
            found = self._push(s, rec.t, v, judge=not (self.firing and sk in self.leaking) or s.seen % 8 == 0)
            if found is not None:
                s.quiet = 0
                self.growth = found[1]
                self.leaking.add(sk)
                if not self.firing:
                    out.append(self._fire(rec, run, key, s, found))
            elif sk in self.leaking:
                s.quiet = 0 if self._growing(s.scales[s.found_at]) else s.quiet + 1
                if s.quiet >= self.resolve_points:
                    self.leaking.discard(sk)
        if self.firing and not self.leaking and not self.restored:
            self.firing = False
            self.growth = 0.0
            out.append(Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step,
                               summary=(f"memory no longer growing on any rank ({self.resolve_points} records "
                                        "without a trend)")))
        return out

    def _push(self, s: _Series, t: float, v: float, judge: bool = True) -> tuple[float, float, int] | None:
        s.seen += 1
        s.last = v
        s.last_t = t
        if s.seen <= self.warmup:
            return None
        found = None
        point: tuple[float, float] | None = (t, v)
        for i, sc in enumerate(s.scales):
            if point is None:
                break
            sc.ts.append(point[0])
            sc.vs.append(point[1])
            if len(sc.vs) > self.cap:
                sc.past.append((sc.ts.pop(0), sc.vs.pop(0)))
            if i or judge:
                verdict = self._test(sc)
                sc.verdict = verdict
                sc.hits = sc.hits + 1 if verdict is not None else 0
            else:
                verdict = sc.verdict
            if verdict is not None and sc.hits >= self.confirm and found is None:
                found = verdict
                s.found_at = i
            if i < 2:
                acc = s.acc[i]
                acc.append(point)
                if len(acc) >= 8:
                    point = (acc[-1][0], median([p[1] for p in acc]))
                    s.acc[i] = []
                else:
                    point = None
        return found

    def _growing(self, sc: _Scale) -> bool:
        """Whether a resolution still rises by a quarter of `min_growth` across its window (True if unknown)."""
        vs = sc.vs
        n = len(vs)
        if n < self.cap:
            return True
        q = n // 4
        first = median(vs[:q])
        return median(vs[n - q:]) - first >= 0.25 * self.min_growth * first

    def _test(self, sc: _Scale) -> tuple[float, float, int] | None:
        """(slope per second, growth over the window as a fraction of the level, window) or None."""
        ts, vs = sc.ts, sc.vs
        n = len(vs)
        mg = self.min_growth
        # O(n) gate for the usual flat series: no window's last quarter can sit 0.5 * min_growth
        # above its first quarter unless some recent point is that far above the window's lowest.
        if n < 4 or max(vs[-(self.cap // 4):]) < min(vs) * (1.0 + 0.5 * mg):
            return None
        for w in self.windows:
            if w > n:
                break
            if n - w + len(sc.past) < self.min_past:
                break  # too little history before the window to know how this series wanders
            q = w // 4
            first = median(vs[n - w:n - w + q])
            last = median(vs[n - q:])
            # A cheap look before the O(w^2) slope: the window's last quarter must sit well above its first.
            if not first > 0.0 or last - first < 0.5 * mg * first:
                continue
            # And each quarter above the one before by an eighth of that rise: a leak climbs
            # through the whole window, one step up (a buffer allocated once) climbs in one place.
            m2 = median(vs[n - w + q:n - w + 2 * q])
            m3 = median(vs[n - w + 2 * q:n - q])
            step = (last - first) / 8.0
            if m2 - first < step or m3 - m2 < step or last - m3 < step:
                continue
            past_t = [p[0] for p in sc.past]
            past_t.extend(ts[:n - w])
            past_v = [p[1] for p in sc.past]
            past_v.extend(vs[:n - w])
            sigma, inflate = _wander(past_t, past_v)
            # The window must end far outside the range the series kept before it: wander,
            # even slow, stays in its own range; a leak leaves it.
            if last - median(past_v) < max(self.k_sigma * inflate * sigma, 0.5 * mg * first):
                continue
            x0 = ts[n - w]
            xs = [x - x0 for x in ts[n - w:]]
            ys = vs[n - w:]
            if xs[-1] <= 0.0:
                continue
            slope, lo, _hi = theil_sen_ci(xs, ys, self.z * inflate)
            if not lo > 0.0:
                continue
            level = median(ys)
            growth = slope * xs[-1] / level
            if growth >= mg:
                return slope, growth, w
        return None

    def _fire(self, rec: Record, run: Any, key: str, s: _Series, found: tuple[float, float, int]) -> Finding:
        self.firing = True
        slope, growth, w = found
        cap = s.cap_total
        if cap is None:
            for cname in CAPACITY[key]:
                cv = finite(run.meta.get(cname)) if isinstance(getattr(run, "meta", None), dict) else None
                if cv is not None and cv > 0:
                    cap = cv
        if cap is not None and cap > s.last:
            eta = (cap - s.last) / slope
            until = f"; at this rate it reaches the {fmt_bytes(cap)} capacity in {fmt_duration(eta)}"
        else:
            eta = math.nan
            until = "; capacity unknown"
        ranks_leaking = sorted({r for r, _ in self.leaking})
        rs = run.ranks.get(rec.rank)
        step = rec.step if rec.step is not None else (rs.last_step if rs is not None else None)
        what = SERIES[key]
        labels = {"metric": key, "ranks": name_ranks(ranks_leaking), "growth_ratio": f"{growth:.3f}",
                  "bytes_per_second": f"{slope:.4g}"}
        if eta == eta:
            labels["seconds_to_exhaustion"] = f"{eta:.0f}"
        return Finding(
            alert=self.name, action="fire", t=rec.t, severity=self.severity, step=step,
            rank=rec.rank if len(ranks_leaking) == 1 else None, value=slope,
            summary=(f"{what} of rank {rec.rank} grows {fmt_bytes(slope * 60)}/min (+{100 * growth:.0f} % over "
                     f"the last {w} points), now {fmt_bytes(s.last)}{until}"),
            description=(f"{what} of rank {rec.rank} has grown steadily: Theil-Sen slope {fmt_bytes(slope)}/s, "
                         f"its 99 % lower bound above zero, +{100 * growth:.0f} % of the level across the window, "
                         f"every quarter of it higher than the one before{until}. Usual causes: tensors kept across "
                         "steps (a loss or output appended to a list without .item() or .detach()), a growing cache, "
                         "or DataLoader workers touching Python objects (copy-on-read)."),
            labels=labels,
        )

    def statistic(self) -> float | None:
        return self.growth

    def state(self) -> dict[str, Any]:
        # Windows are relearnt from the next records after a restart; the episode survives it.
        ranks = {r for r, _ in self.leaking} | self.restored
        return {"firing": self.firing, "leaking": sorted(ranks)[:1024], "growth": self.growth}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.leaking = set()
        self.restored = set(ints(state.get("leaking"), 1024))
        self.firing = bool(state.get("firing", False)) and bool(self.restored)
        self.growth = num(state, "growth", 0.0)
