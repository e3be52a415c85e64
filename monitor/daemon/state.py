"""Per-run, per-rank state with bounded windows; each run keeps its own event-time clock.

Event time (the records' `t`) drives every time-based rule, so a trace replayed at any speed gives
the same result as the live run. Only expiry (forgetting a run nobody reports on) uses the
daemon's own clock.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from array import array
from bisect import bisect_left
from itertools import groupby
from operator import attrgetter, itemgetter, methodcaller
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from monitor.daemon.limits import Admission, LiveRanks
from monitor.records import Record, RecordBlock

# Series kept as windows per rank: what per-rank rules and rates need. Everything else keeps its
# latest value only, so memory per rank stays flat however many names a client sends.
WINDOW_SERIES = (
    "loss", "grad_norm", "lr", "step_time_seconds", "compute_time_seconds", "data_time_seconds",
    "tokens", "host_rss_bytes", "gpu_memory_allocated_bytes", "gpu_memory_reserved_bytes",
)
END_SEVERITY = {"completed": 0, "stopped": 1, "failed": 2}
_WINDOW_GETTERS = tuple((name, methodcaller("get", name)) for name in WINDOW_SERIES)
_T, _STEP, _VALUES, _KIND = attrgetter("t"), attrgetter("step"), attrgetter("values"), attrgetter("kind")
# Detectors' `tick` runs at least this often in event time (seconds) while a batch is applied.
TICK_EVERY = 1.0
# Records whose points wait to reach a rank's windows; past this many they are folded in at once.
FOLD_AT = 512
# Probe values that are bookkeeping, not scores: not exported as probe series.
PROBE_BOOKKEEPING = frozenset({"items_scored", "items_total", "seconds", "prompts", "min_drop", "errors"})
# Probe series (suite, value) kept per run: 8 suites with every aggregate score (8), their
# "/gold_logprob" (1) and "/judge" (4) series are 104; drift (3) and spare make 128.
MAX_PROBE_SERIES = 128


class Ring:
    """A fixed-capacity window of (event time, step, value), oldest first, in flat float arrays."""

    __slots__ = ("cap", "_t", "_s", "_v", "n", "_i")

    def __init__(self, cap: int):
        self.cap = cap
        self._t = array("d", bytes(8 * cap))
        self._s = array("d", bytes(8 * cap))
        self._v = array("d", bytes(8 * cap))
        self.n = 0
        self._i = 0

    def append(self, t: float, step: float, v: float) -> None:
        """Add one point, overwriting the oldest when full."""
        i = self._i
        self._t[i] = t
        self._s[i] = step
        self._v[i] = v
        self._i = (i + 1) % self.cap
        if self.n < self.cap:
            self.n += 1

    def extend(self, ts: Sequence[float], steps: Sequence[float], vs: Sequence[float]) -> None:
        """Add points in order from parallel lists, as that many append() calls would."""
        k = len(vs)
        if not k:
            return
        cap = self.cap
        if k >= cap:
            self._t[:] = array("d", ts[k - cap:])
            self._s[:] = array("d", steps[k - cap:])
            self._v[:] = array("d", vs[k - cap:])
            self._i = 0
            self.n = cap
            return
        at, ast, av = array("d", ts), array("d", steps), array("d", vs)
        i = self._i
        room = cap - i
        if k <= room:
            self._t[i:i + k] = at
            self._s[i:i + k] = ast
            self._v[i:i + k] = av
        else:
            self._t[i:] = at[:room]
            self._s[i:] = ast[:room]
            self._v[i:] = av[:room]
            self._t[:k - room] = at[room:]
            self._s[:k - room] = ast[room:]
            self._v[:k - room] = av[room:]
        self._i = (i + k) % cap
        self.n = min(cap, self.n + k)

    def _order(self) -> Iterable[int]:
        start = (self._i - self.n) % self.cap
        return ((start + k) % self.cap for k in range(self.n))

    def values(self) -> list[float]:
        """The values, oldest first."""
        return [self._v[i] for i in self._order()]

    def points(self) -> list[tuple[float, float, float]]:
        """(t, step, value) triples, oldest first."""
        return [(self._t[i], self._s[i], self._v[i]) for i in self._order()]

    def last(self) -> float | None:
        """The newest value, or None when empty."""
        return self._v[(self._i - 1) % self.cap] if self.n else None

    def __len__(self) -> int:
        return self.n


class RankState:
    """What the daemon knows about one rank of one run.

    Window points are not written one record at a time: the records wait in a list and reach
    the windows together, a column at a time, when the list grows long, when the run settles
    after a batch, or when anything reads `windows`. Readers see exactly what appending one point
    per record would have given; the ingest path saves most of its per-record work.
    """

    __slots__ = ("rank", "last_t", "last_recv", "last_step", "heartbeat_step", "latest", "_windows",
                 "records", "status", "client", "window_cap", "host", "_unfolded", "_dirty")

    def __init__(self, rank: int, window_cap: int, dirty: list["RankState"] | None = None):
        self.rank = rank
        self.last_t = 0.0
        self.last_recv = 0.0
        self.last_step: int | None = None
        self.heartbeat_step: int | None = None
        self.latest: dict[str, dict[str, float]] = {}
        self._windows: dict[str, Ring] = {}
        self.records = 0
        self.status: str | None = None
        self.client: dict[str, float] = {}
        self.window_cap = window_cap
        self._unfolded: list[Record] = []
        self._dirty = dirty  # the run's list of ranks with unfolded records, so it can settle them

    @property
    def windows(self) -> dict[str, Ring]:
        """Per-series windows (WINDOW_SERIES), up to date with every record observed."""
        if self._unfolded:
            self.fold()
        return self._windows

    def observe(self, rec: Record) -> None:
        """Fold one record into the rank's state."""
        self.records += 1
        t = rec.t
        if t > self.last_t:
            self.last_t = t
        kind = rec.kind
        vals = rec.values
        if kind == "train":
            step = rec.step
            if step is not None and (self.last_step is None or step >= self.last_step):
                self.last_step = step
            self._keep(kind, rec, vals)
        elif kind == "system" or kind == "eval":
            self._keep(kind, rec, vals)
        elif kind == "heartbeat":
            self.heartbeat_step = rec.step
            if vals:
                self.client.update(vals)
        elif kind == "end":
            self.status = rec.status or "completed"
            if rec.step is not None and (self.last_step is None or rec.step > self.last_step):
                self.last_step = rec.step
        elif kind == "probe":
            self._keep(f"probe:{rec.suite}", rec, vals)

    def observe_block(self, block: RecordBlock) -> None:
        """Fold a block of records into the rank's state, a column at a time."""
        self.records += len(block)
        hi = max(block.ts)
        if hi > self.last_t:
            self.last_t = hi
        kind = block.kind
        last = block.last_values()
        if kind == "heartbeat":
            self.heartbeat_step = block.steps[-1]
            if last:
                self.client.update(last)
            return
        if kind == "train":
            top = max(block.steps)
            if self.last_step is None or top >= self.last_step:
                self.last_step = top
        latest = self.latest.get(kind)
        if latest is None:
            latest = self.latest[kind] = {}
        latest.update(last)
        if kind == "eval" or not last:
            return
        if self._unfolded:
            self.fold()  # earlier records first: windows keep arrival order
        names, k, vals = block.names, len(block.names), block.values
        for name in WINDOW_SERIES:
            if name in last:
                j = names.index(name)
                self._ring(name).extend(block.ts, block.steps, vals[j::k])

    def _keep(self, kind: str, rec: Record, vals: dict[str, float]) -> None:
        latest = self.latest.get(kind)
        if latest is None:
            latest = self.latest[kind] = {}
        latest.update(vals)
        if kind == "eval" or not vals:
            return
        pending = self._unfolded
        if not pending and self._dirty is not None:
            self._dirty.append(self)
        pending.append(rec)
        if len(pending) >= FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Write the points of the records observed so far into the windows, in order."""
        recs = self._unfolded
        if not recs:
            return
        self._unfolded = []
        # Usually every record carries the same window series: one column per series, taken in C.
        # Otherwise runs of one kind usually do; and failing that, series by series. Each way
        # appends every series' points in record order.
        try:
            self._fold_uniform(recs)
        except KeyError:
            for _kind, group in groupby(recs, _KIND):
                run = list(group)
                try:
                    self._fold_uniform(run)
                except KeyError:
                    self._fold_mixed(run)

    def _columns(self, recs: list[Record]) -> tuple[list[float], list[float]]:
        ts = list(map(_T, recs))
        steps = list(map(_STEP, recs))
        if None in steps:
            steps = [math.nan if s is None else s for s in steps]
        return ts, steps

    def _ring(self, name: str) -> Ring:
        w = self._windows.get(name)
        if w is None:
            w = self._windows[name] = Ring(self.window_cap)
        return w

    def _fold_uniform(self, recs: list[Record]) -> None:
        """Fold records that all carry the same window series; KeyError (before any change) if not."""
        vals = list(map(_VALUES, recs))
        present = set().union(*vals)
        names = [name for name in WINDOW_SERIES if name in present]
        if not names:
            return
        rows = list(map(itemgetter(*names), vals))
        ts, steps = self._columns(recs)
        cols = zip(*rows) if len(names) > 1 else (rows,)
        for name, col in zip(names, cols):
            self._ring(name).extend(ts, steps, col)

    def _fold_mixed(self, recs: list[Record]) -> None:
        """Fold records with differing series, one series at a time."""
        vals = list(map(_VALUES, recs))
        cols: tuple[list[float], list[float]] | None = None
        for name, get in _WINDOW_GETTERS:
            vs = list(map(get, vals))
            missing = vs.count(None)
            if missing == len(vs):
                continue
            if cols is None:
                cols = self._columns(recs)
            ts, steps = cols
            if missing:
                keep = [i for i, v in enumerate(vs) if v is not None]
                self._ring(name).extend([ts[i] for i in keep], [steps[i] for i in keep], [vs[i] for i in keep])
            else:
                self._ring(name).extend(ts, steps, vs)

    def value(self, kind: str, name: str) -> float | None:
        """The latest value of `name` among records of `kind`."""
        d = self.latest.get(kind)
        return d.get(name) if d else None

    def tokens_per_second(self) -> float | None:
        """Tokens over wall time of the rank's recent steps (None when the rank reports no tokens)."""
        tok = self.windows.get("tokens")
        st = self.windows.get("step_time_seconds")
        if not tok or not st:
            return None
        k = min(len(tok), len(st), 50)
        tsum = sum(st.values()[-k:])
        return sum(tok.values()[-k:]) / tsum if tsum > 0 else None


# Incarnations (sender processes) remembered per rank: a restarted rank is a new incarnation, and an old one
# only resends from a spill file another process adopted. Forgotten ones are looked up in the store.
INCARNATIONS_PER_RANK = 64


class SenderSeqs:
    """The last applied batch sequence of each sender (rank, incarnation), bounded per rank.

    A client sending under ever new incarnations grew this without bound; past INCARNATIONS_PER_RANK the
    one applied least recently is forgotten (the store still knows it: see Ingest.last_sequence).
    """

    def __init__(self, per_rank: int = INCARNATIONS_PER_RANK):
        self.per_rank = per_rank
        self._by_rank: dict[int, collections.OrderedDict[str, int]] = {}

    def __contains__(self, key: tuple[int, str]) -> bool:
        d = self._by_rank.get(key[0])
        return d is not None and key[1] in d

    def get(self, key: tuple[int, str], default: int = 0) -> int:
        d = self._by_rank.get(key[0])
        return d.get(key[1], default) if d is not None else default

    def set(self, key: tuple[int, str], seq: int) -> None:
        """Record `seq` for the sender if it is newer; the sender becomes the most recent of its rank."""
        d = self._by_rank.setdefault(key[0], collections.OrderedDict())
        if key[1] not in d or seq > d[key[1]]:
            d[key[1]] = seq
        d.move_to_end(key[1])
        while len(d) > self.per_rank:
            d.popitem(last=False)

    def update(self, seqs: dict[tuple[int, str], int]) -> None:
        for key, seq in seqs.items():
            self.set(key, seq)

    def items(self) -> list[tuple[tuple[int, str], int]]:
        return [((rank, inc), seq) for rank, d in self._by_rank.items() for inc, seq in d.items()]

    def __len__(self) -> int:
        return sum(len(d) for d in self._by_rank.values())


class RunState:
    """One run: its ranks, its event-time clock, its detectors and its bookkeeping."""

    def __init__(self, run: str, window_cap: int):
        self.run = run
        self.lock = threading.RLock()
        self.window_cap = window_cap
        self.world_size: int | None = None
        self.meta: dict[str, Any] = {}
        self.ranks: dict[int, RankState] = {}
        self.clock = 0.0  # the run's event time: the largest t seen
        self.first_t: float | None = None
        self.created = time.time()
        self.last_recv = time.monotonic()
        self.records = 0
        self.seqs = SenderSeqs()  # (rank, incarnation) -> last applied batch
        self.detectors: list[Any] = []
        # record kind -> (detectors reading every rank, those plus the ones reading the lead rank)
        self.dispatch: dict[str, tuple[list[Any], list[Any]]] = {}
        self.lead: int | None = None  # the lowest rank seen: run-wide series are read from it
        self.run_status: str | None = None  # set once every reporting rank sent `end`
        self._unsettled: list[RankState] = []
        self._next_tick = 0.0
        self._meta_rank = 1 << 62
        # (suite, value name) -> [value at the series' first probe, latest value, rank that reports it]
        self.probe_series: dict[tuple[str, str], list[float]] = {}
        self.probe_series_dropped = 0  # values of series past MAX_PROBE_SERIES, not kept
        self.admission = Admission()  # what the limits let in so far (ranks, series, pace); see limits.admit

    def set_detectors(self, detectors: list[Any]) -> None:
        """Install the run's detectors and index them by the record kinds they read."""
        self.detectors = detectors
        self.dispatch = {}
        for kind in sorted({k for det in detectors for k in det.kinds}):
            readers = [d for d in detectors if kind in d.kinds]
            every = [d for d in readers if getattr(d, "ranks", "lead") == "all"]
            self.dispatch[kind] = (every, readers)

    def rank(self, r: int) -> RankState:
        """The state of rank `r`, created on first sight."""
        st = self.ranks.get(r)
        if st is None:
            st = self.ranks[r] = RankState(r, self.window_cap, self._unsettled)
            if self.lead is None or r < self.lead:
                self.lead = r
        return st

    def settle(self) -> None:
        """Bring every rank's windows up to date (after a batch, so that no records linger)."""
        dirty = self._unsettled
        while dirty:
            dirty.pop().fold()

    def observe(self, rec: Record, recv: float) -> None:
        """Fold one record into the run."""
        self.records += 1
        t = rec.t
        if t > self.clock:
            self.clock = t
        first = self.first_t
        if first is None or t < first:
            self.first_t = t
        rs = self.ranks.get(rec.rank)
        if rs is None:
            rs = self.rank(rec.rank)
        rs.last_recv = recv
        rs.observe(rec)
        if rec.kind == "run":
            if rec.world_size:
                self.world_size = max(self.world_size or 0, rec.world_size)
            if rec.meta and rec.rank <= self._meta_rank:
                self.meta = rec.meta  # the lowest rank's account of the run wins over the others'
                self._meta_rank = rec.rank
            self.run_status = None  # a restarted job announces itself again
        elif rec.kind == "end":
            self._update_status()
        elif rec.kind == "probe":
            self._observe_probe(rec)

    def _observe_probe(self, rec: Record) -> None:
        """Keep the first and latest value of each probe series (one rank's: the first that reported it)."""
        series = self.probe_series
        suite = rec.suite or ""
        for name, v in rec.values.items():
            if name in PROBE_BOOKKEEPING or not -math.inf < v < math.inf:
                continue
            key = (suite, name)
            got = series.get(key)
            if got is None:
                if len(series) >= MAX_PROBE_SERIES:
                    self.probe_series_dropped += 1
                    continue
                series[key] = [v, v, rec.rank]
            elif got[2] == rec.rank:
                got[1] = v

    def apply(self, parts: list[Any], recv: float, detect: bool = True,
              on_error: Callable[[Any, Exception], None] | None = None) -> list[Any]:
        """Fold a batch (records and blocks of them) into the run and its detectors; return the findings.

        Detectors see each record of their kinds (from the ranks they ask for) in order, and their
        `tick` runs whenever the run's event time has moved on by TICK_EVERY seconds within the
        batch and once after it, so time-based rules give the same answer whether the records
        arrive live or as one big replayed batch. Blocks from the lead rank are taken record by
        record; those of other ranks are folded a column at a time and handed whole to the
        detectors that read every rank (`update_block`).
        """
        self.last_recv = recv
        findings: list[Any] = []
        self._next_tick = self.clock + TICK_EVERY
        loose: list[Record] = []
        for part in parts:
            if type(part) is not RecordBlock:
                loose.append(part)
                continue
            if loose:
                self._apply_records(loose, recv, detect, findings, on_error)
                loose = []
            self.rank(part.rank)
            if detect and part.rank == self.lead:
                self._apply_lead_block(part, recv, findings, on_error)
            else:
                self._apply_block(part, recv, detect, findings, on_error)
        if loose:
            self._apply_records(loose, recv, detect, findings, on_error)
        self.settle()
        if detect and self.detectors:
            self._tick(findings, on_error)
        return findings

    def _apply_records(self, records: list[Record], recv: float, detect: bool, findings: list[Any],
                       on_error: Callable[[Any, Exception], None] | None) -> None:
        dispatch = self.dispatch if detect else {}
        ticking = detect and bool(self.detectors)
        observe = self.observe
        for rec in records:
            observe(rec, recv)
            pair = dispatch.get(rec.kind)
            if pair:
                for det in pair[1] if rec.rank == self.lead else pair[0]:
                    try:
                        out = det.update(rec, self)
                    except Exception as e:  # noqa: BLE001 - one broken detector must not stop ingest
                        if on_error is not None:
                            on_error(det, e)
                        continue
                    if out:
                        findings.extend(out)
            if ticking and self.clock >= self._next_tick:
                self._next_tick = self.clock + TICK_EVERY
                self._tick(findings, on_error)

    def _apply_lead_block(self, block: RecordBlock, recv: float, findings: list[Any],
                          on_error: Callable[[Any, Exception], None] | None) -> None:
        """A block of the lead rank: folded a column at a time, then shown to each detector record by record.

        The block is cut where the run's clock crosses a tick, so ticks fall where they would
        record by record; within a piece each detector takes all its records in a row.
        """
        ts = block.ts
        if any(b < a for a, b in zip(ts, ts[1:])):  # out of order in time: the plain way
            self._apply_records(block.records(), recv, True, findings, on_error)
            return
        pair = self.dispatch.get(block.kind)
        readers = pair[1] if pair else ()
        k = len(block.names)
        i, n = 0, len(ts)
        while i < n:
            # Records up to the one that takes the clock past the next tick.
            j = bisect_left(ts, self._next_tick, i) + 1 if self.detectors else n
            j = min(max(j, i + 1), n)
            piece = block if (i, j) == (0, n) else RecordBlock(
                block.kind, block.run, block.rank, block.names, block.steps[i:j], ts[i:j],
                block.values[i * k:j * k], block.at + i)
            self._apply_block(piece, recv, False, findings, on_error)
            if readers:
                recs = piece.records()
                for det in readers:
                    update = det.update
                    for rec in recs:
                        try:
                            out = update(rec, self)
                        except Exception as e:  # noqa: BLE001 - one broken detector must not stop ingest
                            if on_error is not None:
                                on_error(det, e)
                            continue
                        if out:
                            findings.extend(out)
            if self.detectors and self.clock >= self._next_tick:
                self._next_tick = self.clock + TICK_EVERY
                self._tick(findings, on_error)
            i = j

    def _apply_block(self, block: RecordBlock, recv: float, detect: bool, findings: list[Any],
                     on_error: Callable[[Any, Exception], None] | None) -> None:
        n = len(block)
        self.records += n
        lo, hi = min(block.ts), max(block.ts)
        if hi > self.clock:
            self.clock = hi
        if self.first_t is None or lo < self.first_t:
            self.first_t = lo
        rs = self.ranks[block.rank]
        rs.last_recv = recv
        rs.observe_block(block)
        if not detect:
            return
        pair = self.dispatch.get(block.kind)
        if pair:
            for det in pair[0]:
                try:
                    out = det.update_block(block, self)
                except Exception as e:  # noqa: BLE001
                    if on_error is not None:
                        on_error(det, e)
                    continue
                if out:
                    findings.extend(out)
        if self.detectors and self.clock >= self._next_tick:
            self._next_tick = self.clock + TICK_EVERY
            self._tick(findings, on_error)

    def _tick(self, findings: list[Any], on_error: Callable[[Any, Exception], None] | None) -> None:
        for det in self.detectors:
            try:
                out = det.tick(self.clock, self)
            except Exception as e:  # noqa: BLE001
                if on_error is not None:
                    on_error(det, e)
                continue
            if out:
                findings.extend(out)

    def _update_status(self) -> None:
        statuses = [rs.status for rs in self.ranks.values()]
        expected = max(self.world_size or 1, len(self.ranks))
        if len(statuses) >= expected and all(statuses):
            self.run_status = max(statuses, key=lambda s: END_SEVERITY.get(s or "", 1))  # type: ignore[arg-type]

    @property
    def status(self) -> str:
        """running, completed, failed or stopped."""
        return self.run_status or "running"

    @property
    def effective_world_size(self) -> int:
        """The announced world size, or the number of ranks seen."""
        return max(self.world_size or 0, (max(self.ranks) + 1) if self.ranks else 0, 1)

    def lead_rank(self, kind: str = "train") -> RankState | None:
        """The lowest rank that reported `kind` values: the source of run-level values."""
        best = None
        for r, rs in self.ranks.items():
            if kind in rs.latest and (best is None or r < best.rank):
                best = rs
        return best

    def last_step(self) -> int | None:
        """The largest step any rank finished."""
        steps = [rs.last_step for rs in self.ranks.values() if rs.last_step is not None]
        return max(steps) if steps else None

    def ranks_reporting(self, silent_after: float) -> int:
        """Ranks whose latest record is within `silent_after` seconds of the run's event clock."""
        return sum(1 for rs in self.ranks.values() if rs.status is None and self.clock - rs.last_t <= silent_after)


@dataclass
class Registry:
    """All live runs."""

    window_cap: int = 256
    runs: dict[str, RunState] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    live_ranks: LiveRanks = field(default_factory=LiveRanks)  # ranks admitted over all live runs

    def get_or_create(self, run: str, limit: int | None = None) -> tuple[RunState | None, bool]:
        """The run's state, and whether it was just created; (None, False) if it is new and `limit` runs are live."""
        st = self.runs.get(run)
        if st is not None:
            return st, False
        with self.lock:
            st = self.runs.get(run)
            if st is not None:
                return st, False
            if limit is not None and len(self.runs) >= limit:
                return None, False
            st = self.runs[run] = RunState(run, self.window_cap)
            return st, True

    def get(self, run: str) -> RunState | None:
        """The run's state, or None."""
        return self.runs.get(run)

    def snapshot(self) -> list[RunState]:
        """The live runs (a list copy; each run is read under its own lock)."""
        with self.lock:
            return list(self.runs.values())

    def remove(self, run: str) -> RunState | None:
        """Forget a run (and give its ranks back to max_live_ranks)."""
        with self.lock:
            st = self.runs.pop(run, None)
        if st is not None:
            self.live_ranks.remove(len(st.admission.ranks))
        return st
