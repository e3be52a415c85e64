"""From a validated batch to state, detectors and alerts: dedup, durable store, apply."""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Mapping

from monitor.daemon.alerts import AlertManager
from monitor.daemon.detectors import build_detectors
from monitor.daemon.detectors.base import Finding
from monitor.daemon.limits import FULL_RETRY_AFTER_MS, LimitExceeded, Limits, admit, limit_of
from monitor.daemon.state import Registry, RunState
from monitor.daemon.store import Store, StoreError
from monitor.records import RecordBlock
from monitor.wire import Batch, Rejection, reencode_kept

log = logging.getLogger("trainguard.ingest")
_INDEX = re.compile(r"\[\d+\]")
# A batch at least this big takes the bulk lane (see Ingest.lane). A rank sending every 0.1 s stays
# far below it unless it runs faster than 2,000 steps per second.
BULK_RECORDS = 200
BULK_BYTES = 64 * 1024


def field_label(field: str) -> str:
    """A bounded metric label from a field path: "records[3].names[2]" -> "names"."""
    return _INDEX.sub("", field).split(".")[-1][:32] or "batch"


def kept_positions(batch: Batch) -> list[int]:
    """The batch position of each kept record, in order (the positions no rejection took)."""
    refused = {rj.index for rj in batch.rejections}
    if not refused:
        return list(range(batch.total))
    return [i for i in range(batch.total) if i not in refused]


class Ingest:
    """Applies batches: each is committed to the store, then folded into state and detectors."""

    def __init__(self, registry: Registry, store: Store, alerts: AlertManager,
                 detector_config: Mapping[str, Any] | None = None, commit_timeout: float = 30.0,
                 limits: Limits | None = None, make_room: Callable[[], bool] | None = None):
        self.registry = registry
        self.store = store
        self.alerts = alerts
        self.detector_config = dict(detector_config or {})
        self.commit_timeout = commit_timeout
        self.limits = limits or Limits()
        # Called when max_live_runs is reached: forget a finished run to let a new one in (True if it did).
        self.make_room = make_room
        self._pending: dict[tuple[str, int, str], tuple[int, Future]] = {}
        self._lock = threading.Lock()
        self.bulk = threading.Lock()
        # The exported counters are bumped from every gRPC thread at once; `x += 1` is a read and a
        # write that threads can interleave, losing counts, so each change holds this lock.
        self._counts = threading.Lock()
        self.batches = 0
        self.duplicates = 0
        self.records_by_kind: collections.Counter[str] = collections.Counter()
        self.rejected_records: collections.Counter[str] = collections.Counter()
        self.rejected_batches: collections.Counter[str] = collections.Counter()
        self.rejected_by_limit: collections.Counter[str] = collections.Counter()
        self.detector_errors: collections.Counter[str] = collections.Counter()
        self.errors = 0

    # -- counters ----------------------------------------------------------------------------------

    def count_batch_refused(self, field: str, limit: str | None = None) -> None:
        """Count a whole batch refused (and the limit behind it, if one was)."""
        with self._counts:
            self.rejected_batches[field_label(field)] += 1
            if limit is not None:
                self.rejected_by_limit[limit] += 1

    def count_limited(self, limit: str) -> None:
        """Count a batch turned away by a limit that waiting cures (rate, live runs): it will be sent again."""
        with self._counts:
            self.rejected_by_limit[limit] += 1

    def _count_rejections(self, rejections: Iterable[Rejection]) -> None:
        with self._counts:
            for rj in rejections:
                self.rejected_records[field_label(rj.field)] += 1
                limit = limit_of(rj)
                if limit is not None:
                    self.rejected_by_limit[limit] += 1

    def counters(self) -> dict[str, Any]:
        """A consistent copy of the counters, for a scrape."""
        with self._counts:
            return {"batches": self.batches, "duplicates": self.duplicates, "errors": self.errors,
                    "records_by_kind": dict(self.records_by_kind), "rejected_records": dict(self.rejected_records),
                    "rejected_batches": dict(self.rejected_batches),
                    "rejected_by_limit": dict(self.rejected_by_limit),
                    "detector_errors": dict(self.detector_errors)}

    # -- runs --------------------------------------------------------------------------------------

    def run_state(self, run: str, persist_new: bool = False, limit: bool = False) -> RunState:
        """The run's state; a new run gets its own detectors (and, with persist_new, a row in the store).

        With `limit`, a new run past max_live_runs raises LimitExceeded (after trying to make room).
        """
        cap = self.limits.max_live_runs if limit else None
        st, created = self.registry.get_or_create(run, cap)
        if st is None and self.make_room is not None and self.make_room():
            st, created = self.registry.get_or_create(run, cap)
        if st is None:
            raise LimitExceeded("max_live_runs", f"run: the daemon holds {len(self.registry.runs)} live runs, the "
                                f"limit is {self.limits.max_live_runs} (max_live_runs); run {run!r} is refused "
                                "until a run finishes or expires", FULL_RETRY_AFTER_MS)
        if created:
            with st.lock:
                if not st.detectors:
                    st.set_detectors(build_detectors(self.detector_config))
                # A run can have stored batches but no saved summary (a crash before the first
                # save): the stored sequence numbers still tell a resend from new data.
                st.seqs.update(self.store.max_sequences(run))
            if persist_new:
                # Queued before the run's first batch on the one writer thread, so a crash at any
                # moment after that batch is acknowledged still finds the run to restore.
                self.store.put_run(self.snapshot_run(st))
        return st

    # -- the hot path ------------------------------------------------------------------------------

    def lane(self, n_records: int) -> Any:
        """The lock a batch of this size holds while it is decoded and applied (none for small ones).

        All work holds one interpreter lock, which threads take turns on. Big batches (a replay, a
        rank that fell behind) go through one at a time, so that a rank's small, fresh batch does
        not wait its turn behind dozens of them: a live run stays visible within milliseconds even
        while the daemon is saturated with bulk traffic.
        """
        return self.bulk if n_records >= BULK_RECORDS else contextlib.nullcontext()

    def handle(self, batch: Batch, raw: bytes) -> bool:
        """Store and apply one batch; return True if it had been applied before (a resend).

        Raises LimitExceeded for a new run past max_live_runs and StoreError when the batch could not
        be committed; either way nothing was applied and the client sends it again.
        """
        st = self.registry.get(batch.run)
        if st is None and not batch.parts:
            # Nothing of it would be kept: a run is not made (nor a live-run slot taken) for nothing.
            self._count_rejections(batch.rejections)
            with self._counts:
                self.batches += 1
            return False
        if st is None:
            st = self.run_state(batch.run, persist_new=True, limit=True)
        key = (batch.rank, batch.incarnation)
        pkey = (batch.run, batch.rank, batch.incarnation)
        with st.lock:
            if key not in st.seqs:
                # A sender not seen lately (or ever): the store has the last batch it committed, if any.
                st.seqs.set(key, self.store.max_sequence(batch.run, batch.rank, batch.incarnation))
            if batch.sequence <= st.seqs.get(key, 0):
                with self._counts:
                    self.duplicates += 1
                return True
            with self._lock:
                pending = self._pending.get(pkey)
            if pending is not None and pending[0] == batch.sequence:
                fut, own = pending[1], False
            else:
                # The limits that depend on what the run holds, before storing: the store keeps
                # exactly what state will hold, and a restart replays the same.
                kept, refused = admit(st.admission, batch.run, batch.parts, kept_positions(batch), self.limits,
                                      self.registry.live_ranks, time.time())
                if refused:
                    batch.parts = kept
                    batch.rejections = sorted(batch.rejections + refused, key=lambda rj: rj.index)
                if batch.rejections:
                    raw = reencode_kept(batch)
                t_min, t_max = batch.t_range
                try:
                    fut = self.store.put_batch(batch.run, batch.rank, batch.incarnation, batch.sequence,
                                               t_min, t_max, batch.n_records, raw)
                except StoreError:
                    with self._counts:
                        self.errors += 1
                    raise
                own = True
                with self._lock:
                    self._pending[pkey] = (batch.sequence, fut)
        try:
            fut.result(self.commit_timeout)  # acknowledge only what is durable
        except Exception as e:
            if own:
                with self._lock:
                    self._pending.pop(pkey, None)
            with self._counts:
                self.errors += 1
            if isinstance(e, TimeoutError):
                ok, why = self.store.health()
                raise StoreError(f"batch not committed within {self.commit_timeout:g} s"
                                 f"{'' if ok else ': ' + why}") from e
            raise StoreError(str(e) or type(e).__name__) from e
        if not own:
            with self._counts:
                self.duplicates += 1
            return True
        with self.lane(batch.n_records):
            with st.lock:
                with self._lock:
                    self._pending.pop(pkey, None)
                st.seqs.set(key, batch.sequence)
                findings = self._apply(st, batch.parts, detect=True)
        with self._counts:
            self.batches += 1
        # Counted with the batch it belongs to, so that a resend does not count its refusals twice.
        self._count_rejections(batch.rejections)
        if findings:
            self.alerts.apply(batch.run, findings)
        return False

    def _apply(self, st: RunState, parts: Iterable[Any], detect: bool) -> list[Finding]:
        """Fold records (and blocks of them) into the run's state and detectors (caller holds st.lock)."""
        if not isinstance(parts, list):
            parts = list(parts)
        findings = st.apply(parts, time.monotonic(), detect, self._detector_failed)
        counts: collections.Counter[str] = collections.Counter()
        for p in parts:
            if type(p) is RecordBlock:
                counts[p.kind] += len(p)
            else:
                counts[p.kind] += 1
        with self._counts:
            self.records_by_kind.update(counts)
        return findings

    def _detector_failed(self, det: Any, e: Exception) -> None:
        with self._counts:
            self.detector_errors[det.name] += 1
            n = self.detector_errors[det.name]
        if n <= 3:
            log.exception("detector %s failed: %s", det.name, e)

    # -- restart -----------------------------------------------------------------------------------

    def snapshot_run(self, st: RunState) -> dict[str, Any]:
        """The run's summary and detector state, for the store."""
        with st.lock:
            return {
                "run": st.run, "world_size": st.world_size, "status": st.status, "meta": st.meta,
                "first_t": st.first_t, "last_t": st.clock, "last_step": st.last_step(),
                "detector_state": {
                    "saved_at": time.time(),
                    "seqs": [[r, inc, s] for (r, inc), s in st.seqs.items()],
                    "detectors": {d.name: d.state() for d in st.detectors},
                },
            }

    def restore(self, restore_batches: int = 200) -> int:
        """Rebuild the live runs from the store after a restart; return how many runs came back.

        Detectors take back their saved state; batches stored after that state was saved are
        applied again through the detectors, and the most recent batches before it refill the
        per-rank state (latest values, windows) without the detectors.
        """
        from monitor.wire import InvalidBatch, decode_batch

        rows = self.store.load_runs()
        cap = self.limits.max_live_runs
        if len(rows) > cap:
            # Newest first: the runs past the limit are the ones that reported longest ago. They stay
            # in the store, marked expired, as if they had expired while the daemon was down.
            log.warning("store holds %d live runs, the limit is %d (max_live_runs): restoring the %d most "
                        "recent, marking the rest expired", len(rows), cap, cap)
            for row in rows[cap:]:
                self.store.put_run({**row, "expired": True})
            rows = rows[:cap]
        self.alerts.restore([r["run"] for r in rows])
        now = time.time()
        for row in rows:
            st = self.run_state(row["run"])
            saved = row.get("detector_state") or {}
            saved_seqs = {(r, inc): s for r, inc, s in saved.get("seqs", [])}
            det_states = saved.get("detectors", {})
            with st.lock:
                st.world_size = row.get("world_size")
                st.meta = row.get("meta") or {}
                for det in st.detectors:
                    if det.name in det_states:
                        try:
                            det.restore(det_states[det.name])
                        except Exception as e:  # noqa: BLE001 - a damaged saved state must not stop the start
                            self._detector_failed(det, e)
                findings: list[Finding] = []
                for _bid, rank, inc, seq, data in self.store.batches(st.run, limit=restore_batches, newest=True):
                    try:
                        batch = decode_batch(data, max_bytes=len(data))  # its size was judged when it came
                    except InvalidBatch:
                        continue
                    # The limits hold at restart too: a store written under looser ones (or by an
                    # older daemon) is read back within today's.
                    parts, _ = admit(st.admission, st.run, batch.parts, kept_positions(batch), self.limits,
                                     self.registry.live_ranks, now)
                    after = seq > saved_seqs.get((rank, inc), 0)
                    findings.extend(self._apply(st, parts, detect=after))
                st.seqs.update(self.store.max_sequences(st.run))
                if row.get("status") in ("completed", "failed", "stopped"):
                    st.run_status = row["status"]
            if findings:
                self.alerts.apply(st.run, findings, replayed=True)
        return len(rows)
