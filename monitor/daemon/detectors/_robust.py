"""Robust statistics shared by the detectors: a rolling median/MAD window, a one-sided CUSUM, Theil-Sen slopes.

Plain Python on purpose: the daemon does not depend on numpy, and windows of ~100 points are
cheaper to keep sorted with bisect than to hand to an array library one record at a time.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from typing import Any, Iterable, Mapping, Sequence

_INF = math.inf
_log = math.log

# 0.6745 = the 0.75 quantile of the standard normal: MAD / 0.6745 estimates sigma for Gaussian data,
# so 0.6745 * (u - median) / MAD is on the scale of a standard z-score.
MAD_TO_Z = 0.6745


class RollingMedian:
    """A bounded window of the last `size` finite values with O(log n) median and MAD.

    Values are kept twice: in arrival order (to know which one leaves) and sorted (bisect insort
    and delete, a memmove of at most `size` pointers). The MAD is found exactly by a binary search
    over the two sorted runs of distances either side of the median, so no per-update sort.
    Non-finite values are refused: they say nothing about the spread of healthy data.
    """

    __slots__ = ("size", "mad_floor", "mad_every", "_order", "_sorted", "_mad", "_stale")

    def __init__(self, size: int = 100, mad_floor: float = 1e-12, mad_every: int = 1):
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = int(size)
        self.mad_floor = float(mad_floor)
        # The MAD is the costly part (~3 us for 100 points); over a window of 100 it moves little in
        # a few pushes, so callers on the ingest path may let it be recomputed every `mad_every` pushes.
        self.mad_every = max(1, int(mad_every))
        self._order: deque[float] = deque()
        self._sorted: list[float] = []
        self._mad = math.nan
        self._stale = self.mad_every

    def __len__(self) -> int:
        return len(self._order)

    def push(self, x: float) -> bool:
        """Add one value (dropping the oldest when full); False, and nothing kept, if it is not finite."""
        if not -_INF < x < _INF:
            return False
        order = self._order
        srt = self._sorted
        if len(order) >= self.size:
            del srt[bisect_left(srt, order.popleft())]
        order.append(x)
        insort(srt, x)
        self._stale += 1
        return True

    def clear(self) -> None:
        """Forget every value."""
        self._order.clear()
        self._sorted.clear()
        self._mad = math.nan
        self._stale = self.mad_every

    def median(self) -> float:
        """The median of the window (NaN when empty)."""
        srt = self._sorted
        n = len(srt)
        if not n:
            return math.nan
        h = n // 2
        return srt[h] if n & 1 else 0.5 * (srt[h - 1] + srt[h])

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1, linear interpolation) of the window (NaN when empty)."""
        srt = self._sorted
        n = len(srt)
        if not n:
            return math.nan
        pos = min(max(q, 0.0), 1.0) * (n - 1)
        i = int(pos)
        if i >= n - 1:
            return srt[-1]
        f = pos - i
        return srt[i] + f * (srt[i + 1] - srt[i])

    def mad(self) -> float:
        """The median absolute deviation from the median (NaN when empty), at most `mad_every - 1` pushes old."""
        if self._stale >= self.mad_every or len(self._sorted) < self.size:
            self._mad = self.exact_mad()
            self._stale = 0
        return self._mad

    def exact_mad(self) -> float:
        """The median absolute deviation of the current window, computed now, O(log^2 n)."""
        srt = self._sorted
        n = len(srt)
        if not n:
            return math.nan
        m = self.median()
        h = n // 2
        # Distances below the median, nearest first: m - srt[lo-1], m - srt[lo-2], ...; above it:
        # srt[hi] - m, srt[hi+1] - m, ... Both runs are ascending; the MAD is the median of their merge.
        lo = bisect_left(srt, m)
        left = lo  # count of values strictly below m
        right = n - lo
        if n & 1:
            return _kth_merged(srt, m, left, lo, right, h)
        return 0.5 * (_kth_merged(srt, m, left, lo, right, h - 1) + _kth_merged(srt, m, left, lo, right, h))

    def scale(self) -> float:
        """The MAD with its floor applied: the divisor of `z`."""
        d = self.mad()
        return d if d > self.mad_floor else self.mad_floor

    def z(self, u: float) -> float:
        """Robust z of u against the window: 0.6745 (u - median) / max(MAD, floor); 0 when empty."""
        if not self._order:
            return 0.0
        return MAD_TO_Z * (u - self.median()) / self.scale()

    def values(self) -> list[float]:
        """The window, oldest first."""
        return list(self._order)

    def state(self) -> list[float]:
        """JSON-serialisable contents (at most `size` floats)."""
        return list(self._order)

    def restore(self, values: Iterable[Any]) -> None:
        """Refill from `state()` output, keeping only finite numbers and the newest `size` of them."""
        self.clear()
        kept = []
        # A damaged store can hold anything where a list was saved: anything else restores nothing.
        for v in values if isinstance(values, (list, tuple)) else ():
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(f):
                kept.append(f)
        for f in kept[-self.size:]:
            self.push(f)


def _kth_merged(srt: Sequence[float], m: float, left: int, lo: int, right: int, k: int) -> float:
    """k-th smallest (0-based) distance to m among srt[:lo] (as m - x, descending index) and srt[lo:]."""
    # Binary search on how many of the k+1 smallest come from the left run.
    a_lo = max(0, k + 1 - right)
    a_hi = min(k + 1, left)
    while a_lo < a_hi:
        a = (a_lo + a_hi) // 2
        b = k + 1 - a
        # Take a from the left, b from the right; valid if left[a] (next unused) >= right[b-1].
        la = m - srt[lo - 1 - a] if a < left else math.inf
        rb1 = srt[lo + b - 1] - m if b >= 1 else -math.inf
        if la < rb1:
            a_lo = a + 1
        else:
            a_hi = a
    a = a_lo
    b = k + 1 - a
    la1 = m - srt[lo - a] if a >= 1 else -math.inf
    rb1 = srt[lo + b - 1] - m if b >= 1 else -math.inf
    return la1 if la1 > rb1 else rb1


class Cusum:
    """One-sided upper CUSUM: s = max(0, s + x - k); `alarm` once s exceeds h.

    Feed it standardised residuals (clipped, so one wild point cannot trip it alone).
    """

    __slots__ = ("k", "h", "s", "run")

    def __init__(self, k: float = 0.5, h: float = 15.0):
        self.k = float(k)
        self.h = float(h)
        self.s = 0.0
        self.run = 0  # consecutive updates with s > 0: how long the current excursion has lasted

    def update(self, x: float) -> float:
        """Add one observation (non-finite ones are ignored) and return the new sum."""
        if math.isfinite(x):
            s = self.s + x - self.k
            if s > 0.0:
                self.s = s
                self.run += 1
            else:
                self.s = 0.0
                self.run = 0
        return self.s

    @property
    def alarm(self) -> bool:
        """Whether the sum is above h."""
        return self.s > self.h

    def reset(self) -> None:
        """Back to zero."""
        self.s = 0.0
        self.run = 0

    def state(self) -> dict[str, float]:
        """JSON-serialisable state."""
        return {"s": self.s, "run": self.run}

    def restore(self, state: Mapping[str, Any] | None) -> None:
        """Take back `state()` output."""
        state = state if isinstance(state, Mapping) else {}
        s = _finite(state.get("s"), 0.0)
        self.s = s if s > 0.0 else 0.0
        self.run = int(_finite(state.get("run"), 0.0))


def theil_sen(xs: Sequence[float], ys: Sequence[float], max_points: int = 64) -> float:
    """Median of pairwise slopes of (x, y) points; NaN with fewer than two distinct x.

    O(n^2) in the points used, so the input is thinned evenly to `max_points` first: call it
    rate-limited (every few steps), not per record.
    """
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    n = len(pts)
    if n > max_points > 1:
        stride = (n - 1) / (max_points - 1)
        pts = [pts[round(i * stride)] for i in range(max_points)]
        n = max_points
    slopes = []
    for i in range(n):
        xi, yi = pts[i]
        for j in range(i + 1, n):
            dx = pts[j][0] - xi
            if dx != 0.0:
                slopes.append((pts[j][1] - yi) / dx)
    if not slopes:
        return math.nan
    slopes.sort()
    h = len(slopes) // 2
    return slopes[h] if len(slopes) & 1 else 0.5 * (slopes[h - 1] + slopes[h])


class Ewma:
    """Exponentially weighted mean with a half-life in observations; ignores non-finite inputs."""

    __slots__ = ("alpha", "value", "n")

    def __init__(self, halflife: float = 50.0):
        self.alpha = 1.0 - 0.5 ** (1.0 / max(float(halflife), 1e-9))
        self.value = math.nan
        self.n = 0

    def update(self, x: float) -> float:
        """Add one observation and return the mean."""
        if math.isfinite(x):
            self.value = x if self.n == 0 else self.value + self.alpha * (x - self.value)
            self.n += 1
        return self.value

    def state(self) -> dict[str, float]:
        """JSON-serialisable state (NaN written as None)."""
        return {"value": self.value if math.isfinite(self.value) else None, "n": self.n}

    def restore(self, state: Mapping[str, Any] | None) -> None:
        """Take back `state()` output."""
        state = state if isinstance(state, Mapping) else {}
        self.value = _finite(state.get("value"), math.nan)
        self.n = int(_finite(state.get("n"), 0.0)) if math.isfinite(self.value) else 0


def safe_log(x: float | None, floor: float = 1e-30) -> float:
    """log(x) for a positive finite x (floored), NaN otherwise: detectors work on log loss and log norms."""
    # Chained comparisons are False for None-free NaN and reject +inf; this is on the ingest path.
    try:
        if 0.0 < x < _INF:  # type: ignore[operator]
            return _log(x if x > floor else floor)  # type: ignore[operator]
    except TypeError:
        pass
    return math.nan


def _finite(v: Any, default: float) -> float:
    """float(v) if that is a finite number, else `default` (for restoring state from untrusted JSON)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


finite_or = _finite



def meta_number(meta: Mapping[str, Any] | None, *paths: str) -> float | None:
    """The first finite number found in `meta` at one of the dotted `paths` ("optimizer.lr"), else None."""
    if not isinstance(meta, Mapping):
        return None
    for path in paths:
        cur: Any = meta
        for part in path.split("."):
            if not isinstance(cur, Mapping) or part not in cur:
                cur = None
                break
            cur = cur[part]
        if isinstance(cur, bool) or not isinstance(cur, (int, float)):
            continue
        if math.isfinite(cur):
            return float(cur)
    return None


def fmt(x: float | None) -> str:
    """A number for a summary line: 4 significant digits, non-finite values spelt out."""
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


__all__ = ["MAD_TO_Z", "Cusum", "Ewma", "RollingMedian", "finite_or", "fmt", "meta_number", "safe_log", "theil_sen"]


# -- restoring state: what a detector saved comes back as untrusted JSON ---------------------------

def state_int(v: Any) -> int:
    """A non-negative int from untrusted JSON, 0 if it is not one."""
    try:
        return max(0, int(v))
    except (TypeError, ValueError, OverflowError):
        return 0


def state_float(v: Any, default: float = math.nan) -> float:
    """A finite float from untrusted JSON, `default` if it is not one."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def json_finite(x: float) -> float | None:
    """A float for JSON, None for the infinities and NaN that mean "not yet"."""
    return x if math.isfinite(x) else None
