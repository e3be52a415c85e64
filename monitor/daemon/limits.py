"""What one client may cost the daemon: size, shape, cardinality and rate limits, each named in its refusal.

The contract (records.py, wire.py) fixes ceilings that every daemon enforces while decoding. The limits
here are the daemon's own, set in [daemon] config: the per-record ones can only be lowered below the
contract's ceilings; the cardinality and rate limits exist only here, because they depend on what the
daemon already holds (its live runs, each run's ranks, each rank's series) and on who is sending.
Every refusal names the setting and its value, so an operator knows what to raise.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Iterable

from monitor.records import MAX_NAME_CHARS, MAX_SUITE_CHARS, MAX_VALUES, Record, RecordBlock
from monitor.wire import MAX_BATCH_BYTES, Rejection

# The metadata key of a refusal that says how long to wait before sending again (milliseconds, an integer).
# gRPC's own retry machinery reads grpc-retry-pushback-ms; both carry the same number.
RETRY_AFTER_KEY = "retry-after-ms"
GRPC_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# A new run refused because the daemon is full waits this long: runs leave only when they expire.
FULL_RETRY_AFTER_MS = 30_000
# Kinds whose value names the state keeps per rank (run and end records keep no values).
SERIES_KINDS = frozenset(("train", "eval", "system", "heartbeat", "probe"))


class LimitExceeded(Exception):
    """A batch as a whole went past a limit that waiting can cure (rate, live runs): RESOURCE_EXHAUSTED."""

    def __init__(self, limit: str, message: str, retry_after_ms: int):
        super().__init__(message)
        self.limit = limit
        self.message = message
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True)
class Limits:
    """The daemon's limits; see docs/limits.md for each default and why."""

    max_message_bytes: int = MAX_BATCH_BYTES
    max_records_per_batch: int = 10_000
    max_values_per_record: int = MAX_VALUES
    max_name_chars: int = MAX_NAME_CHARS
    max_run_id_chars: int = 128
    max_suite_chars: int = MAX_SUITE_CHARS
    max_live_runs: int = 1000
    max_ranks_per_run: int = 4096
    max_live_ranks: int = 8192
    max_series_per_rank: int = 512
    max_future_skew_seconds: float = 300.0
    max_step_jump: int = 100_000
    max_steps_per_second: float = 1000.0
    rate_limit_records_per_second: float = 100_000.0  # 0 turns the rate limit off
    rate_limit_burst_records: int = 200_000

    # (setting, smallest, largest): the largest of a per-record limit is the contract's ceiling.
    INTEGER_RANGES = (
        ("max_message_bytes", 1024, 64 * 1024 * 1024),
        ("max_records_per_batch", 1, 1_000_000),
        ("max_values_per_record", 1, MAX_VALUES),
        ("max_name_chars", 1, MAX_NAME_CHARS),
        ("max_run_id_chars", 1, 128),
        ("max_suite_chars", 1, MAX_SUITE_CHARS),
        ("max_live_runs", 1, 1_000_000),
        ("max_ranks_per_run", 1, 1 << 20),
        ("max_live_ranks", 1, 1 << 24),
        ("max_series_per_rank", 1, 1_000_000),
        ("max_step_jump", 1, 1 << 53),
        ("rate_limit_burst_records", 1, 1 << 40),
    )
    NUMBER_RANGES = (
        ("max_future_skew_seconds", 0.0, 10 * 365 * 86400.0),
        ("max_steps_per_second", 0.0, 1e9),
        ("rate_limit_records_per_second", 0.0, 1e12),
    )

    @classmethod
    def names(cls) -> list[str]:
        """Every setting's name (the [daemon] keys that build a Limits)."""
        return [f.name for f in fields(cls)]

    @classmethod
    def check(cls, values: dict[str, Any]) -> str | None:
        """The first problem with these settings, as `name: what is wrong`, or None."""
        for name, lo, hi in cls.INTEGER_RANGES:
            v = values[name]
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                return f"{name}: must be a whole number from {lo} to {hi}, got {v!r}"
        for name, lo, hi in cls.NUMBER_RANGES:
            v = values[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
                return f"{name}: must be a number from {lo:g} to {hi:g}, got {v!r}"
        if values["max_live_ranks"] < values["max_ranks_per_run"]:
            return (f"max_live_ranks: {values['max_live_ranks']} is below max_ranks_per_run "
                    f"({values['max_ranks_per_run']}); one run could never reach its own limit")
        if values["rate_limit_records_per_second"] and \
                values["rate_limit_burst_records"] < values["max_records_per_batch"]:
            return (f"rate_limit_burst_records: {values['rate_limit_burst_records']} is below "
                    f"max_records_per_batch ({values['max_records_per_batch']}); a full batch could never pass")
        return None

    @property
    def grpc_receive_bytes(self) -> int:
        """The largest message gRPC reads: twice the limit, so that a batch over it gets our clear refusal."""
        return 2 * self.max_message_bytes


def human_bytes(n: int) -> str:
    """1048576 -> '1 MiB' (for messages)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} bytes"


def limit_of(rj: Rejection) -> str | None:
    """The [daemon] limit behind a rejection, if a limit (rather than a malformed value) caused it.

    Rejections made while decoding come from the contract's ceilings, which are the largest values
    of the per-record limits; records.py names the field and the ceiling, not the setting.
    """
    if rj.limit is not None:
        return rj.limit
    if "the limit is" not in rj.reason:
        return None
    last = rj.field.rsplit(".", 1)[-1]
    if last.startswith("names"):
        return "max_values_per_record" if "names, the limit" in rj.reason else "max_name_chars"
    if last == "values":
        return "max_values_per_record"
    if last == "suite":
        return "max_suite_chars"
    return None


# -------------------------------------------------------------------------------------------------
# the rate limit


class RateLimiter:
    """A token bucket of records per client: (peer host, run).

    The peer's host is the one identity a client cannot choose (the port changes with each
    connection); the run splits a host's budget between the jobs on it, so one job's flood does not
    throttle another's. A host that floods under many run ids meets max_live_runs. Buckets that
    have refilled are forgotten: a fresh bucket starts full, the same thing. They are swept once per
    refill time, so a client inventing run ids (each refused by max_live_runs) leaves no trail.
    """

    def __init__(self, rate: float, burst: int, max_buckets: int = 100_000):
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_buckets = max_buckets
        self._buckets: dict[tuple[str, str], list[float]] = {}  # key -> [tokens, monotonic time]
        self._lock = threading.Lock()
        self._swept: float | None = None

    @property
    def enabled(self) -> bool:
        """Whether any limit applies (a rate of 0 turns it off)."""
        return self.rate > 0

    def take(self, key: tuple[str, str], cost: int, now: float | None = None) -> int:
        """Spend `cost` tokens: 0 if allowed, else the milliseconds until they will be there."""
        if not self.enabled:
            return 0
        now = time.monotonic() if now is None else now
        cost = min(float(max(cost, 1)), self.burst)
        with self._lock:
            if self._swept is None:
                self._swept = now
            elif now - self._swept >= max(1.0, self.burst / self.rate):
                self._forget(now)
            b = self._buckets.get(key)
            if b is None:
                if len(self._buckets) >= self.max_buckets:
                    self._forget(now)
                b = self._buckets[key] = [self.burst, now]
            else:
                b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
                b[1] = now
            if b[0] >= cost:
                b[0] -= cost
                return 0
            return max(1, math.ceil((cost - b[0]) / self.rate * 1000.0))

    def __len__(self) -> int:
        return len(self._buckets)

    def _forget(self, now: float) -> None:
        """Drop buckets that have refilled; if that is not enough, the oldest half (caller holds the lock)."""
        full_after = self.burst / self.rate
        self._swept = now
        self._buckets = {k: b for k, b in self._buckets.items() if now - b[1] < full_after}
        if len(self._buckets) >= self.max_buckets:
            keep = sorted(self._buckets.items(), key=lambda kv: kv[1][1])[len(self._buckets) // 2:]
            self._buckets = dict(keep)


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string: 'ipv4:10.0.0.5:51234' -> '10.0.0.5', 'ipv6:[::1]:5' -> '::1'."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.find("]")] if "]" in rest else rest
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    return peer  # unix sockets and the like: the whole string


# -------------------------------------------------------------------------------------------------
# admission: the limits that depend on what a run already holds


class RankBudget:
    """The value names one rank of a run was admitted with, by kind (a probe's kind includes its suite)."""

    __slots__ = ("names", "series")

    def __init__(self) -> None:
        self.names: dict[str, set[str]] = {}
        self.series = 0


class LiveRanks:
    """How many ranks all live runs hold together (for max_live_ranks)."""

    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def add(self, limit: int) -> bool:
        """Count one more rank if there is room under `limit`."""
        with self._lock:
            if self.n >= limit:
                return False
            self.n += 1
            return True

    def remove(self, n: int) -> None:
        """Forget the ranks of a run that left."""
        with self._lock:
            self.n = max(0, self.n - n)


class Admission:
    """Per-run bookkeeping of what was admitted: ranks, series, the largest step and event time.

    It runs before a batch is stored, so that the store holds exactly what state will hold, and
    again over stored batches at restart, so that a restart respects the limits too.
    """

    __slots__ = ("ranks", "max_step", "max_t")

    def __init__(self) -> None:
        self.ranks: dict[int, RankBudget] = {}
        self.max_step: int | None = None
        self.max_t = 0.0


def _series_key(kind: str, suite: str | None) -> str:
    return f"probe:{suite}" if kind == "probe" else kind


# A block that must be judged record by record (its times or steps need a look at each).
_ONE_BY_ONE = ("", "", None)


def admit(adm: Admission, run: str, parts: Iterable[Any], positions: Iterable[int], limits: Limits,
          live: LiveRanks, now: float) -> tuple[list[Any], list[Rejection]]:
    """The parts of a batch that fit the run's limits, and a rejection for each record that does not.

    `positions` are the batch positions of the kept records, in order (blocks take one per record).
    The caller holds the run's lock.
    """
    latest_t = now + limits.max_future_skew_seconds
    pos = iter(positions)
    kept: list[Any] = []
    rejections: list[Rejection] = []
    for part in parts:
        if type(part) is RecordBlock:
            at = [next(pos) for _ in range(len(part))]
            problem = _block_problem(adm, run, part, limits, live, latest_t)
            if problem is None:
                _admit_steps(adm, part.steps, part.ts)
                kept.append(part)
                continue
            if problem is not _ONE_BY_ONE:  # the whole block fails alike: each record refused the same way
                field, reason, limit = problem
                rejections.extend(Rejection(i, f"records[{i}].{field}", reason, limit) for i in at)
                continue
            records = list(zip(at, part.records()))
        else:
            records = [(next(pos), part)]
        for i, rec in records:
            problem = _record_problem(adm, run, rec, limits, live, latest_t)
            if problem is None:
                if rec.step is not None:
                    _admit_steps(adm, (rec.step,), (rec.t,))
                elif rec.t > adm.max_t:
                    adm.max_t = rec.t
                kept.append(rec)
            else:
                field, reason, limit = problem
                rejections.append(Rejection(i, f"records[{i}].{field}", reason, limit))
    return kept, rejections


def _admit_steps(adm: Admission, steps: Any, ts: Any) -> None:
    top = max(steps)
    if adm.max_step is None or top > adm.max_step:
        adm.max_step = top
    hi = max(ts)
    if hi > adm.max_t:
        adm.max_t = hi


def _step_problem(max_step: int | None, max_t: float, step: int, t: float, limits: Limits) -> str | None:
    """Why `step` is too far past the run's own pace (its largest step and latest time so far), or None."""
    if max_step is None or step <= max_step:
        return None
    gap = max(0.0, t - max_t)
    allowed = limits.max_step_jump + limits.max_steps_per_second * gap
    jump = step - max_step
    if jump <= allowed:
        return None
    return (f"step {step} is {jump} steps past the run's largest step {max_step}; the limit is {allowed:.0f} "
            f"(max_step_jump {limits.max_step_jump} + max_steps_per_second {limits.max_steps_per_second:g} "
            f"x {gap:.0f} event seconds since the run's latest record)")


def _steps_fit(adm: Admission, steps: list[int], ts: list[float], limits: Limits) -> bool:
    """Whether every step of a block keeps the run's pace, taken in order as records one by one would be."""
    max_step, max_t = adm.max_step, adm.max_t
    if max_step is not None and max(steps) <= max_step:
        return True
    for s, t in zip(steps, ts):
        if _step_problem(max_step, max_t, s, t, limits) is not None:
            return False
        if max_step is None or s > max_step:
            max_step = s
        if t > max_t:
            max_t = t
    return True


def _rank_budget(adm: Admission, run: str, rank: int, limits: Limits, live: LiveRanks
                 ) -> RankBudget | tuple[str, str, str]:
    """The rank's budget, admitting a new rank if the limits allow; else (field, reason, limit)."""
    b = adm.ranks.get(rank)
    if b is not None:
        return b
    if len(adm.ranks) >= limits.max_ranks_per_run:
        return ("rank", f"run {run!r} already has {len(adm.ranks)} ranks, the limit is {limits.max_ranks_per_run} "
                        f"(max_ranks_per_run); rank {rank} is refused", "max_ranks_per_run")
    if not live.add(limits.max_live_ranks):
        return ("rank", f"the daemon holds {live.n} ranks of live runs, the limit is {limits.max_live_ranks} "
                        f"(max_live_ranks); rank {rank} of run {run!r} is refused", "max_live_ranks")
    b = adm.ranks[rank] = RankBudget()
    return b


def _names_problem(b: RankBudget, key: str, names: Any, rank: int, limits: Limits) -> tuple[str, str, str] | None:
    """Admit the new names of one record (or block); (field, reason, limit) if one does not fit.

    A probe suite seen for the first time counts as one series of its own: the rank keeps a table per suite.
    """
    known = b.names.get(key)
    if known is not None and known.issuperset(names):
        return None
    new = [(j, n) for j, n in enumerate(names) if known is None or n not in known]
    for j, n in new:
        if len(n) > limits.max_name_chars:
            return (f"names[{j}]", f"value name is {len(n)} characters, the limit is {limits.max_name_chars} "
                                   "(max_name_chars)", "max_name_chars")
    cost = len(new) + (1 if known is None and key.startswith("probe:") else 0)
    if b.series + cost > limits.max_series_per_rank:
        # The field is the first new name past the limit.
        j = new[min(len(new) - 1, max(0, limits.max_series_per_rank - b.series))][0] if new else None
        shown = ", ".join(repr(n) for _, n in new[:3]) + (", ..." if len(new) > 3 else "")
        what = f"{len(new)} new ({shown})" if new else f"the new suite {key[6:]!r}"
        return ("names" if j is None else f"names[{j}]",
                f"rank {rank} has {b.series} series (value names) and the record brings {what}, the limit is "
                f"{limits.max_series_per_rank} (max_series_per_rank)", "max_series_per_rank")
    if known is None:
        known = b.names[key] = set()
    known.update(n for _, n in new)
    b.series += cost
    return None


def _block_problem(adm: Admission, run: str, block: RecordBlock, limits: Limits, live: LiveRanks,
                   latest_t: float) -> tuple[str, str, str | None] | None:
    """None if the whole block fits (it is admitted); _ONE_BY_ONE if its records must be judged one by one;
    else the (field, reason, limit) that refuses all of it."""
    if max(block.ts) > latest_t or not _steps_fit(adm, block.steps, block.ts, limits):
        return _ONE_BY_ONE
    if len(block.names) > limits.max_values_per_record:
        return ("names", f"{len(block.names)} names, the limit is {limits.max_values_per_record} per record "
                         "(max_values_per_record)", "max_values_per_record")
    b = _rank_budget(adm, run, block.rank, limits, live)
    if type(b) is tuple:
        return b
    return _names_problem(b, block.kind, block.names, block.rank, limits)


def _record_problem(adm: Admission, run: str, rec: Record, limits: Limits, live: LiveRanks,
                    latest_t: float) -> tuple[str, str, str] | None:
    """(field, reason, limit) if the record goes past a limit, else None (and its rank and names are admitted)."""
    if rec.t > latest_t:
        ahead = rec.t - (latest_t - limits.max_future_skew_seconds)
        return ("t", f"event time {rec.t:.3f} is {ahead:.0f} s ahead of the daemon's clock; the limit is "
                     f"{limits.max_future_skew_seconds:g} s (max_future_skew_seconds): check the sender's clock",
                "max_future_skew_seconds")
    if rec.step is not None:
        why = _step_problem(adm.max_step, adm.max_t, rec.step, rec.t, limits)
        if why is not None:
            return ("step", why, "max_step_jump")
    vals = rec.values
    if len(vals) > limits.max_values_per_record:
        return ("values", f"{len(vals)} values, the limit is {limits.max_values_per_record} per record "
                          "(max_values_per_record)", "max_values_per_record")
    kind = rec.kind
    if kind == "probe" and rec.suite is not None and len(rec.suite) > limits.max_suite_chars:
        return ("suite", f"{len(rec.suite)} characters, the limit is {limits.max_suite_chars} (max_suite_chars)",
                "max_suite_chars")
    b = _rank_budget(adm, run, rec.rank, limits, live)
    if type(b) is tuple:
        return b
    if kind not in SERIES_KINDS:  # run and end records: their values are not kept, only their names checked
        for j, n in enumerate(vals):
            if len(n) > limits.max_name_chars:
                return (f"names[{j}]", f"value name is {len(n)} characters, the limit is {limits.max_name_chars} "
                                       "(max_name_chars)", "max_name_chars")
        return None
    return _names_problem(b, _series_key(kind, rec.suite), vals, rec.rank, limits)
