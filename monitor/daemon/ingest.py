"""From a validated batch to state, detectors and alerts: dedup, durable store, apply."""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import threading
import time
from concurrent.futures import Future
from typing import Any, Iterable, Mapping

from monitor.daemon.alerts import AlertManager
from monitor.daemon.detectors import build_detectors
from monitor.daemon.detectors.base import Finding
from monitor.daemon.state import Registry, RunState
from monitor.daemon.store import Store, StoreError
from monitor.records import RecordBlock
from monitor.wire import Batch, reencode_kept

log = logging.getLogger("trainguard.ingest")
_INDEX = re.compile(r"\[\d+\]")
# A batch at least this big takes the bulk lane (see Ingest.lane). A rank sending every 0.1 s stays
# far below it unless it runs faster than 2,000 steps per second.
BULK_RECORDS = 200
BULK_BYTES = 64 * 1024


def field_label(field: str) -> str:
    """A bounded metric label from a field path: "records[3].names[2]" -> "names"."""
    return _INDEX.sub("", field).split(".")[-1][:32] or "batch"


class Ingest:
    """Applies batches: each is committed to the store, then folded into state and detectors."""

    def __init__(self, registry: Registry, store: Store, alerts: AlertManager,
                 detector_config: Mapping[str, Any] | None = None, commit_timeout: float = 30.0):
        self.registry = registry
        self.store = store
        self.alerts = alerts
        self.detector_config = dict(detector_config or {})
        self.commit_timeout = commit_timeout
        self._pending: dict[tuple[str, int, str], tuple[int, Future]] = {}
        self._lock = threading.Lock()
        self.bulk = threading.Lock()
        self.batches = 0
        self.duplicates = 0
        self.records_by_kind: collections.Counter[str] = collections.Counter()
        self.rejected_records: collections.Counter[str] = collections.Counter()
        self.rejected_batches: collections.Counter[str] = collections.Counter()
        self.detector_errors: collections.Counter[str] = collections.Counter()
        self.errors = 0

    # -- runs --------------------------------------------------------------------------------------

    def run_state(self, run: str, persist_new: bool = False) -> RunState:
        """The run's state; a new run gets its own detectors (and, with persist_new, a row in the store)."""
        st, created = self.registry.get_or_create(run)
        if created:
            with st.lock:
                if not st.detectors:
                    st.set_detectors(build_detectors(self.detector_config))
                # A run can have stored batches but no saved summary (a crash before the first
                # save): the stored sequence numbers still tell a resend from new data.
                for key, seq in self.store.max_sequences(run).items():
                    if seq > st.seqs.get(key, 0):
                        st.seqs[key] = seq
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
        """Store and apply one batch; return True if it had been applied before (a resend)."""
        st = self.run_state(batch.run, persist_new=True)
        key = (batch.rank, batch.incarnation)
        pkey = (batch.run, batch.rank, batch.incarnation)
        with st.lock:
            if batch.sequence <= st.seqs.get(key, 0):
                self.duplicates += 1
                return True
            with self._lock:
                pending = self._pending.get(pkey)
            if pending is not None and pending[0] == batch.sequence:
                fut, own = pending[1], False
            else:
                if batch.rejections:
                    raw = reencode_kept(batch)
                t_min, t_max = batch.t_range
                fut = self.store.put_batch(batch.run, batch.rank, batch.incarnation, batch.sequence,
                                           t_min, t_max, batch.n_records, raw)
                own = True
                with self._lock:
                    self._pending[pkey] = (batch.sequence, fut)
        try:
            fut.result(self.commit_timeout)  # acknowledge only what is durable
        except Exception as e:
            if own:
                with self._lock:
                    self._pending.pop(pkey, None)
            self.errors += 1
            raise StoreError(str(e)) from e
        if not own:
            self.duplicates += 1
            return True
        with self.lane(batch.n_records):
            with st.lock:
                with self._lock:
                    self._pending.pop(pkey, None)
                st.seqs[key] = max(st.seqs.get(key, 0), batch.sequence)
                findings = self._apply(st, batch.parts, detect=True)
        self.batches += 1
        # Counted with the batch it belongs to, so that a resend does not count its refusals twice.
        for rj in batch.rejections:
            self.rejected_records[field_label(rj.field)] += 1
        if findings:
            self.alerts.apply(batch.run, findings)
        return False

    def _apply(self, st: RunState, parts: Iterable[Any], detect: bool) -> list[Finding]:
        """Fold records (and blocks of them) into the run's state and detectors (caller holds st.lock)."""
        if not isinstance(parts, list):
            parts = list(parts)
        findings = st.apply(parts, time.monotonic(), detect, self._detector_failed)
        counts = self.records_by_kind
        for p in parts:
            if type(p) is RecordBlock:
                counts[p.kind] += len(p)
            else:
                counts[p.kind] += 1
        return findings

    def _detector_failed(self, det: Any, e: Exception) -> None:
        self.detector_errors[det.name] += 1
        if self.detector_errors[det.name] <= 3:
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
        self.alerts.restore([r["run"] for r in rows])
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
                        det.restore(det_states[det.name])
                findings: list[Finding] = []
                for _bid, rank, inc, seq, data in self.store.batches(st.run, limit=restore_batches, newest=True):
                    try:
                        batch = decode_batch(data)
                    except InvalidBatch:
                        continue
                    after = seq > saved_seqs.get((rank, inc), 0)
                    findings.extend(self._apply(st, batch.parts, detect=after))
                st.seqs.update(self.store.max_sequences(st.run))
                if row.get("status") in ("completed", "failed", "stopped"):
                    st.run_status = row["status"]
            if findings:
                self.alerts.apply(st.run, findings)
        return len(rows)
