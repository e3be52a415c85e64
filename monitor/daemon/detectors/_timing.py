"""Shared code of the system detectors (throughput, stragglers, stalls, lost ranks, memory, data loader).

Plain Python: small medians, a Theil-Sen slope with its confidence interval, bounded label lists,
and `Heard`, which tells how long ago each rank was last heard from in a way that clock skew
between hosts cannot fake.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

# Labels and summaries name at most this many ranks; a page about 900 ranks lists a few and counts the rest.
MAX_NAMED_RANKS = 16


def median(xs: Sequence[float]) -> float:
    """The median of a non-empty sequence (NaN when empty)."""
    n = len(xs)
    if not n:
        return math.nan
    s = sorted(xs)
    h = n // 2
    return s[h] if n & 1 else 0.5 * (s[h - 1] + s[h])


def mad(xs: Sequence[float]) -> float:
    """The median absolute deviation from the median (NaN when empty)."""
    m = median(xs)
    return median([abs(x - m) for x in xs])


def lag1(xs: Sequence[float]) -> float:
    """The lag-1 autocorrelation of a sequence about its mean (0 when it cannot be told)."""
    n = len(xs)
    if n < 3:
        return 0.0
    m = sum(xs) / n
    d = [x - m for x in xs]
    den = sum(x * x for x in d)
    if not den > 0.0:
        return 0.0
    return sum(d[i] * d[i + 1] for i in range(n - 1)) / den


def finite(v: Any) -> float | None:
    """v as a float if it is a finite number, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # an integer beyond any double
        return None
    return f if math.isfinite(f) else None


def num(state: Mapping[str, Any], key: str, default: float) -> float:
    """A finite float from restored (untrusted) state, or `default`."""
    v = state.get(key) if isinstance(state, Mapping) else None
    f = finite(v)
    return default if f is None else f


def floats(v: Any, limit: int) -> list[float]:
    """The newest `limit` finite numbers of a restored list (anything else is skipped)."""
    if not isinstance(v, (list, tuple)):
        return []
    out = [f for f in (finite(x) for x in v) if f is not None]
    return out[-limit:] if limit > 0 else []


def ints(v: Any, limit: int) -> list[int]:
    """The first `limit` integers of a restored list."""
    if not isinstance(v, (list, tuple)):
        return []
    out = []
    for x in v:
        if isinstance(x, int) and not isinstance(x, bool):
            out.append(x)
        if len(out) >= limit:
            break
    return out


def name_ranks(ranks: Iterable[int], limit: int = MAX_NAMED_RANKS) -> str:
    """'1, 5, 9' or '1, 5, 9 and 40 more': a bounded list of ranks for summaries and labels."""
    rs = sorted(ranks)
    head = ", ".join(str(r) for r in rs[:limit])
    return head if len(rs) <= limit else f"{head} and {len(rs) - limit} more"


def fmt_bytes(b: float) -> str:
    """Bytes in binary units, three significant figures."""
    x = float(b)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024.0 or unit == "TiB":
            return f"{x:.3g} {unit}" if unit != "B" else f"{x:.0f} B"
        x /= 1024.0
    return f"{x:.3g} TiB"


def fmt_duration(s: float) -> str:
    """Seconds as '45 s', '12 min', '3.2 h' or '5.1 d'."""
    if not math.isfinite(s):
        return "never"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def theil_sen_ci(xs: Sequence[float], ys: Sequence[float], z: float = 2.576) -> tuple[float, float, float]:
    """(slope, lower, upper): the Theil-Sen slope and Sen's distribution-free confidence bounds.

    The bounds are order statistics of the pairwise slopes around the median, placed by the
    variance of Kendall's S under no trend (Sen 1968; Hollander & Wolfe, Nonparametric
    Statistical Methods, 3rd ed., section 9.4): z = 2.576 gives a two-sided 99 % interval.
    O(n^2): callers keep n near 32 and rate-limit the calls. NaNs when fewer than 3 points.
    """
    n = len(xs)
    slopes = []
    for i in range(n):
        xi = xs[i]
        yi = ys[i]
        for j in range(i + 1, n):
            dx = xs[j] - xi
            if dx > 0.0:
                slopes.append((ys[j] - yi) / dx)
            elif dx < 0.0:
                slopes.append((yi - ys[j]) / -dx)
    m = len(slopes)
    if n < 3 or m < 3:
        return math.nan, math.nan, math.nan
    slopes.sort()
    h = m // 2
    mid = slopes[h] if m & 1 else 0.5 * (slopes[h - 1] + slopes[h])
    c = z * math.sqrt(n * (n - 1) * (2 * n + 5) / 18.0)
    lo_i = int(math.floor((m - c) / 2.0))
    hi_i = int(math.ceil((m + c) / 2.0))
    lo = slopes[lo_i] if 0 <= lo_i < m else -math.inf
    hi = slopes[hi_i] if 0 <= hi_i < m else math.inf
    return mid, lo, hi


class Heard:
    """When each rank was last heard from, on the run's event clock, robust to clock skew between hosts.

    A rank is "heard" at a scan when its newest record time (`RankState.last_t`) moved since the
    previous scan. It is credited with that record time when it lies within `slack` seconds of
    the run's clock (hosts whose clocks agree: exact), and with the scan's clock otherwise (a host
    whose clock runs behind): silence is then "how long since anything new arrived". When the
    run's clock leaps between two scans by more than `slack` (a host whose clock runs ahead has
    just reported, or the whole job was quiet), the leap does not count as silence for anyone.
    Scan once per second or so of event time; a rank first seen is heard at the scan that finds it.
    """

    __slots__ = ("last_t", "at", "slack", "prev")

    def __init__(self, slack: float = 2.0):
        self.last_t: dict[int, float] = {}
        self.at: dict[int, float] = {}
        self.slack = slack
        self.prev: float | None = None  # the clock at the previous scan

    def scan(self, ranks: Mapping[int, Any], now: float) -> None:
        """Take note of every rank's newest record time (O(ranks); callers rate-limit it)."""
        last_t = self.last_t
        at = self.at
        lo = now - self.slack
        leap = 0.0 if self.prev is None else now - self.prev - self.slack
        self.prev = now
        for r, rs in ranks.items():
            lt = rs.last_t
            prev = last_t.get(r)
            if prev is None:
                last_t[r] = lt
                at[r] = now
            elif lt != prev:
                last_t[r] = lt
                at[r] = lt if lo <= lt <= now else now
            elif leap > 0.0:
                a = at[r] + leap
                at[r] = a if a < now else now

    def silent_for(self, r: int, now: float) -> float:
        """Event seconds since rank r was last heard (0 for a rank never scanned)."""
        a = self.at.get(r)
        return 0.0 if a is None else now - a
