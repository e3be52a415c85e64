"""The client: a bounded queue that the training thread appends to, and a background sender.

The training thread only appends a tuple to a deque (no I/O, no locks on the normal path, no
exceptions). A sender thread turns queued records into batches, ships them to the daemon over
gRPC, retries transient failures with jittered exponential backoff and resends a batch until the
daemon acknowledges its sequence number. A heartbeat thread reports the last finished step and the
reporter's own counters every second, so the daemon can tell a blocked rank from a gone one.

With a spill directory, what the memory queue cannot hold while the daemon is away goes to a bounded file
(monitor.client.spill) as encoded batches, sent in order, before newer records, once the daemon is back.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import random
import re
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

from monitor.records import Record, TraceWriter, check_run_id, InvalidRecord

log = logging.getLogger("trainguard.client")

DEFAULT_ADDRESS = "127.0.0.1:9751"
RETRYABLE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
# Trailing metadata of a RESOURCE_EXHAUSTED answer: how long the daemon asks this client to wait, in milliseconds.
RETRY_AFTER_KEY = "retry-after-ms"
# A daemon asking for longer is capped: a client silent for minutes would look lost to the daemon's own rules.
MAX_RETRY_AFTER = 60.0
# 256 MiB hold about 3 million train records of ten values (82 bytes each, encoded): three days of one rank at
# 10 steps/s, eight hours at 100.
DEFAULT_SPILL_MAX_BYTES = 256 * 1024 * 1024
_OFF = ("", "off", "none", "0")
# Kinds whose records keep their order behind a record that waits for a device value.
_ORDERED_KINDS = frozenset({"train", "eval", "probe", "end"})
_PLAIN = frozenset({float, int, bool})


class Deferred:
    """A value still on its way from a device: `ready()` never blocks, `float()` reads it once ready.

    The training thread wraps a device tensor in one (an asynchronous copy and an event); the
    sender thread holds the record back until `ready()` and only then reads it, so neither thread
    ever waits on the device.
    """

    __slots__ = ("created",)

    def __init__(self) -> None:
        self.created = time.monotonic()

    def ready(self) -> bool:
        """Whether float() can return without waiting."""
        return True

    def __float__(self) -> float:
        raise NotImplementedError


def _device_tensor(v: Any) -> bool:
    """A torch tensor that lives off the host (checked without importing torch)."""
    dev = getattr(v, "device", None)
    return dev is not None and getattr(dev, "type", "cpu") != "cpu" and hasattr(v, "detach")


def _env_run() -> str | None:
    return os.environ.get("TRAINGUARD_RUN") or os.environ.get("TORCHELASTIC_RUN_ID") or None


def sanitize_run_id(run: str) -> str:
    """Map any string onto the run-id alphabet (bad characters become '-', at most 128 characters)."""
    cleaned = re.sub(r"[^A-Za-z0-9._:/-]", "-", run)[:128]
    return cleaned or "run"


def generate_run_id() -> str:
    """A fresh run id: the local time and a short random suffix."""
    return time.strftime("run-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


@dataclass
class ReporterStats:
    """The reporter's own counters."""

    queued: int
    sent: int
    dropped: int
    rejected: int
    retries: int
    invalid_values: int
    queue_depth: int
    batches_sent: int
    last_error: str | None
    spilled: int = 0  # records written to the spill file (they count in queue_depth until sent)
    spill_bytes: int = 0  # bytes waiting in spill files, adopted ones included
    spill_torn: int = 0  # spilled batches found cut short or corrupt, and discarded
    recovered: int = 0  # records delivered from spill files that an earlier process left


class Reporter:
    """Streams telemetry records to a trainguard daemon without ever blocking or raising into the caller.

    Example:
        rep = Reporter(run="my-run", rank=0)          # or TRAINGUARD_RUN / TRAINGUARD_ADDRESS
        rep.log("train", step, {"loss": loss, "lr": lr})
        rep.close()
    """

    def __init__(
        self,
        run: str | None = None,
        rank: int | None = None,
        address: str | None = None,
        *,
        record_path: str | None = None,
        max_queue: int = 100_000,
        batch_size: int = 1000,
        flush_interval: float = 0.1,
        heartbeat_interval: float = 1.0,
        timeout: float = 10.0,
        max_backoff: float = 5.0,
        device_wait: float = 120.0,
        spill_path: str | None = None,
        spill_max_bytes: int = DEFAULT_SPILL_MAX_BYTES,
        security: Any = None,
        start: bool = True,
    ):
        run = run or _env_run() or generate_run_id()
        try:
            check_run_id(run)
        except InvalidRecord:
            fixed = sanitize_run_id(run)
            log.warning("trainguard: run id %r is not valid; using %r", run, fixed)
            run = fixed
        self.run: str = run
        if rank is None:
            rank = int(os.environ.get("RANK", "0") or 0)
        self.rank: int = rank
        if address is None:
            address = os.environ.get("TRAINGUARD_ADDRESS", DEFAULT_ADDRESS)
        self.address: str | None = None if address.strip().lower() in _OFF else address.strip()
        if record_path is None:
            record_path = os.environ.get("TRAINGUARD_RECORD") or None
        self.record_path = record_path
        if spill_path is None:
            spill_path = os.environ.get("TRAINGUARD_SPILL") or None
        if spill_path is not None and spill_path.strip().lower() in _OFF:
            spill_path = None
        # A directory: each sender writes its own file there, and adopts the files of senders that have gone.
        self.spill_path: str | None = spill_path
        self.spill_max_bytes = max(0, int(spill_max_bytes))
        self.max_queue = max(1, int(max_queue))
        self.batch_size = max(1, int(batch_size))
        self.flush_interval = flush_interval
        self.heartbeat_interval = heartbeat_interval
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.device_wait = device_wait
        # A monitor.client.security.ClientSecurity: the token and TLS settings; default from the environment
        # (TRAINGUARD_TOKEN, TRAINGUARD_TLS_CA, ...), read when the sender first connects.
        self.security = security
        self._init_state()
        _live.add(self)
        self._register_fork_hook()
        if start:
            self.start()

    # -- state ---------------------------------------------------------------------------------

    def _init_state(self) -> None:
        self.incarnation = uuid.uuid4().hex[:16]
        self._q: collections.deque[tuple] = collections.deque()
        self._backlog: collections.deque[Record] = collections.deque()
        # Records taken off the queue whose device values are not copied yet, in order.
        self._held: collections.deque[tuple] = collections.deque()
        # The batch on its way: (sequence, records, payload, source) where source is None for a batch cut from the
        # backlog, or the spill file it was read from (it stays there until acknowledged).
        self._inflight: tuple[int, int, bytes, Any] | None = None
        self._spill: Any = None  # monitor.client.spill.Spill, made by the sender thread
        self._seq = 0
        self._lock = threading.Lock()  # guards the rare-path counters only
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._sender: threading.Thread | None = None
        self._heart: threading.Thread | None = None
        self._channel: Any = None
        self._call: Any = None
        self._writer: TraceWriter | None = None
        self._started = False
        self._closed = False
        self._restart_needed = False
        self._last_step: int | None = None
        self._taken = 0
        self._sent = 0
        self._dropped = 0
        self._dropped_unread = 0  # the part of _dropped that never left the log queue
        self._queued_seen = 0
        self._rejected = 0
        self._retries = 0
        self._invalid_values = 0
        self._batches = 0
        self._recovered = 0
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_error: str | None = None
        self._warned_at = 0.0

    def _register_fork_hook(self) -> None:
        ref = weakref.ref(self)

        def after_fork() -> None:
            rep = ref()
            if rep is not None:
                rep._after_fork_in_child()

        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=after_fork)

    def _after_fork_in_child(self) -> None:
        # The child inherits the parent's queue but not its threads. Those records belong to the
        # parent, so the child starts empty with a new incarnation, and starts its own sender the
        # first time it logs (DataLoader workers fork and never log: they cost nothing).
        was_started = self._started and not self._closed
        record_path = self.record_path
        if self._spill is not None:
            # The parent's spill files stay the parent's: close the copies of their descriptors, touch nothing.
            try:
                self._spill.forget()
            except Exception:  # noqa: BLE001
                pass
        writer = self._writer
        if writer is not None:
            # The parent's buffered trace lines are copied into this process too; dropping the
            # writer below closes it, which would append them to the parent's file a second time.
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(devnull, writer._f.fileno())
                finally:
                    os.close(devnull)
            except (OSError, ValueError, AttributeError):
                pass
        self._init_state()
        if record_path:
            root, ext = os.path.splitext(record_path)
            if ext == ".gz":
                root, ext2 = os.path.splitext(root)
                ext = ext2 + ext
            self.record_path = f"{root}.pid{os.getpid()}{ext}"
        self._restart_needed = was_started

    # -- public API ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender and heartbeat threads (done by the constructor unless start=False)."""
        if self._started or self._closed:
            return
        self._started = True
        if self.record_path:
            try:
                self._writer = TraceWriter(self.record_path)
            except OSError as e:
                log.warning("trainguard: cannot record to %s: %s", self.record_path, e)
        self._sender = threading.Thread(target=self._sender_loop, name="trainguard-sender", daemon=True)
        self._sender.start()
        if self.heartbeat_interval and self.heartbeat_interval > 0:
            self._heart = threading.Thread(target=self._heartbeat_loop, name="trainguard-heartbeat", daemon=True)
            self._heart.start()

    def log(self, kind: str, step: int | None = None, values: Mapping[str, Any] | None = None,
            t: float | None = None, **fields: Any) -> None:
        """Queue one record and return at once. Never blocks, never raises.

        `values` may hold floats, ints, numpy scalars or 0-d tensors; they are converted on the
        sender thread. `fields` carries the kind-specific fields (world_size, meta, suite, items, status).
        """
        try:
            if self._restart_needed:
                self._restart_needed = False
                self.start()
            q = self._q
            if len(q) >= self.max_queue:
                try:
                    q.popleft()
                except IndexError:
                    pass
                else:
                    with self._lock:
                        self._dropped += 1
                        self._dropped_unread += 1
            q.append((kind, step, values, t or time.time(), fields))
            if kind == "train":
                self._last_step = step
            if len(q) == self.batch_size:
                self._wake.set()
        except Exception:  # noqa: BLE001 - the training loop must never see our errors
            pass

    def run_started(self, world_size: int = 1, meta: Mapping[str, Any] | None = None) -> None:
        """Announce the run (its world size and free-form metadata)."""
        self.log("run", None, None, world_size=world_size, meta=dict(meta or {}))

    def end(self, status: str = "completed", step: int | None = None) -> None:
        """Report that this rank finished (completed, failed or stopped)."""
        self.log("end", step if step is not None else self._last_step, None, status=status)

    def stats(self) -> ReporterStats:
        """A snapshot of the reporter's counters."""
        inflight = self._inflight
        spill = self._spill
        depth = (len(self._q) + len(self._held) + len(self._backlog)
                 + (inflight[1] if inflight is not None and inflight[3] is None else 0))
        dropped = self._dropped
        spilled = spill_bytes = spill_torn = 0
        if spill is not None:
            try:
                depth += spill.own_records
                dropped += spill.own_lost
                spilled, spill_bytes, spill_torn = spill.spilled, spill.pending_bytes, spill.torn_total
            except Exception:  # noqa: BLE001 - read while the sender swaps files: the next snapshot is exact
                pass
        # Read while the sender drains, a record can sit between the queue and the taken count for
        # a moment; the high-water mark keeps the exported counter from ever going backwards.
        queued = max(self._queued_seen, self._taken + self._dropped_unread + len(self._q))
        self._queued_seen = queued
        return ReporterStats(
            queued=queued, sent=self._sent, dropped=dropped,
            rejected=self._rejected, retries=self._retries, invalid_values=self._invalid_values,
            queue_depth=depth, batches_sent=self._batches,
            last_error=self._last_error, spilled=spilled, spill_bytes=spill_bytes, spill_torn=spill_torn,
            recovered=self._recovered,
        )

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far was acknowledged (or recorded); False on timeout."""
        if not self._started or self._closed:
            return not self._pending()
        deadline = time.monotonic() + timeout
        while self._pending():
            if not (self._sender and self._sender.is_alive()):
                return False
            self._idle.clear()
            self._wake.set()
            if time.monotonic() >= deadline:
                return False
            self._idle.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        if self._writer:
            try:
                self._writer.flush()
            except OSError:
                pass
        return True

    def close(self, timeout: float = 10.0) -> bool:
        """Flush (up to `timeout` seconds), stop the threads and release the connection."""
        if self._closed:
            return True
        ok = self.flush(timeout) if self._started else not self._pending()
        self._closed = True
        self._stop.set()
        self._wake.set()
        for th in (self._sender, self._heart):
            if th and th.is_alive() and th is not threading.current_thread():
                th.join(timeout=2.0)
        if self._channel is not None:
            try:
                self._channel.close()
            except Exception:  # noqa: BLE001
                pass
        if self._writer:
            try:
                self._writer.close()
            except OSError:
                pass
        _live.discard(self)
        return ok

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- sender thread ---------------------------------------------------------------------------

    def _pending(self) -> bool:
        if self.address is None:
            return bool(self._q or self._held)
        spill = self._spill
        return bool(self._q or self._held or self._backlog or self._inflight or (spill is not None and spill.pending))

    def _sender_loop(self) -> None:
        if self.spill_path and self.address is not None:
            self._open_spill()
        while True:
            try:
                wait = self.flush_interval
                if self._inflight is not None:
                    wait = min(wait, max(0.0, self._retry_at - time.monotonic()))
                if self._held:
                    wait = min(wait, 0.005)  # a device value is on its way: look again soon
                self._wake.wait(wait)
                self._wake.clear()
                self._drain()
                if self.address is not None:
                    self._send_ready()
                if not self._pending():
                    self._idle.set()
                if self._stop.is_set():
                    self._close_spill()
                    return
            except Exception as e:  # noqa: BLE001 - a bug here must not kill telemetry for good
                self._last_error = f"sender: {e!r}"
                self._warn(self._last_error)
                time.sleep(0.1)

    def _unready(self, item: tuple) -> tuple | None:
        """None when every value of a queued record can be read now; else the record, its device values wrapped."""
        values = item[2]
        if not values or item[0] not in _ORDERED_KINDS:
            return None
        try:
            waiting = False
            out = None
            for k, v in values.items():
                if type(v) in _PLAIN:
                    continue
                if isinstance(v, Deferred):
                    if not v.ready() and time.monotonic() - v.created < self.device_wait:
                        waiting = True
                elif _device_tensor(v):
                    # A device tensor handed to log() directly: start its copy here rather than let
                    # float() wait on the device.
                    from monitor.client.collect import read_later

                    if out is None:
                        out = dict(values)
                    out[k] = d = read_later(v)
                    if isinstance(d, Deferred) and not d.ready():
                        waiting = True
            if out is not None:
                item = (item[0], item[1], out, item[3], item[4])
            return item if waiting or out is not None else None
        except Exception:  # noqa: BLE001 - a value that cannot be inspected is read (and counted) later
            return None

    def _drain(self) -> None:
        q = self._q
        held = self._held
        if not q and not held:
            return
        recs: list[Record] = []
        run, rank = self.run, self.rank
        to_record = self._to_record
        while held and self._ready_now(held[0]):
            kind, step, values, t, fields = held.popleft()
            rec = to_record(kind, run, t, rank, step, values, fields)
            if rec is not None:
                recs.append(rec)
        popleft = q.popleft
        taken = 0
        while True:
            try:
                item = popleft()
            except IndexError:
                break
            taken += 1
            kind = item[0]
            if held and kind in _ORDERED_KINDS:
                held.append(self._unready(item) or item)
                continue
            wait = self._unready(item)
            if wait is not None:
                if not self._ready_now(wait):
                    held.append(wait)
                    continue
                item = wait
            kind, step, values, t, fields = item
            rec = to_record(kind, run, t, rank, step, values, fields)
            if rec is not None:
                recs.append(rec)
        self._taken += taken
        if len(held) > self.max_queue:
            over = len(held) - self.max_queue
            for _ in range(over):
                held.popleft()
            with self._lock:
                self._dropped += over
        if self._writer:
            try:
                self._writer.write(recs)
            except (OSError, ValueError, TypeError) as e:
                self._last_error = f"record file: {e}"
        if self.address is None:
            self._sent += len(recs)
            return
        backlog = self._backlog
        backlog.extend(recs)
        # The batch awaiting its acknowledgement counts too: max_queue bounds all that is held in memory.
        inflight = self._inflight
        held = inflight[1] if inflight is not None and inflight[3] is None else 0
        over = min(len(backlog), len(backlog) + held - self.max_queue)
        if over > 0 and self._spill is not None:
            over = self._spill_out(over)
        if over > 0:
            for _ in range(over):
                backlog.popleft()
            with self._lock:
                self._dropped += over

    # -- spill -----------------------------------------------------------------------------------

    def _open_spill(self) -> None:
        """Set up the spill directory and adopt the files that senders which have gone left there."""
        from monitor.client import spill

        try:
            name = spill.file_name(self.run, self.rank, self.incarnation)
            self._spill = sp = spill.Spill(self.spill_path or "", name, self.spill_max_bytes)
            found = sp.adopt_orphans()
            if found:
                log.info("trainguard: %d record(s) left in %s by an earlier process will be sent first",
                         found, self.spill_path)
        except Exception as e:  # noqa: BLE001 - without a spill the reporter still works as before
            self._last_error = f"spill: {e!r}"
            self._warn(self._last_error)

    def _spill_out(self, over: int) -> int:
        """Move the oldest records held in memory to the spill file; return how many still have to be dropped.

        The batch on its way goes first, then whole batches from the backlog's front, each under the next
        sequence number: the file holds everything older than the backlog, in the order it must be sent.
        """
        sp = self._spill
        inflight = self._inflight
        if inflight is not None and inflight[3] is None:
            seq, n, payload, _ = inflight
            if not sp.write(payload, n):
                return over
            self._inflight = None
            over -= n
        backlog = self._backlog
        while over > 0 and backlog:
            if sp.room() <= 0:
                break
            batch = self._next_batch()
            if batch is None:
                break
            seq, n, payload, _ = batch
            if not sp.write(payload, n):
                # Cut already (its sequence number is spent, which the daemon does not mind): it is dropped here.
                with self._lock:
                    self._dropped += n
                self._warn(f"{n} record(s) dropped: {sp.last_error}")
                over -= n
                break
            over -= n
        return max(0, min(over, len(backlog)))

    def _close_spill(self) -> None:
        """At stop: what memory still holds goes to the spill file, and the files are released for a later process."""
        sp = self._spill
        if sp is None:
            return
        try:
            if self._backlog or (self._inflight is not None and self._inflight[3] is None):
                held = len(self._backlog) + (self._inflight[1] if self._inflight and self._inflight[3] is None else 0)
                left = self._spill_out(held)
                if left:
                    for _ in range(left):
                        self._backlog.popleft()
                    with self._lock:
                        self._dropped += left
            sp.close()
        except Exception as e:  # noqa: BLE001
            self._last_error = f"spill: {e!r}"

    def _ready_now(self, item: tuple) -> bool:
        """Whether every deferred value of a record can be read now (or has waited past device_wait)."""
        if not item[2]:
            return True
        now = time.monotonic()
        try:
            for v in item[2].values():
                if isinstance(v, Deferred) and not v.ready() and now - v.created < self.device_wait:
                    return False
        except Exception:  # noqa: BLE001 - not a mapping, or ready() failed: _to_record counts it
            pass
        return True

    def _to_record(self, kind: Any, run: str, t: Any, rank: int, step: Any, values: Any,
                   fields: dict[str, Any] | None) -> Record | None:
        # Values are read here, on the sender thread: a device tensor's copy to the host waits
        # here, not in the training loop. Whatever cannot be read is dropped and counted.
        vals: dict[str, float] = {}
        if values:
            try:
                vals = {k: float(v) for k, v in values.items()}
                if not all(type(k) is str for k in vals):
                    raise TypeError("value names must be strings")
            except Exception:  # noqa: BLE001 - anything a caller passed must not stop the sender
                vals = {}
                try:
                    pairs = list(dict(values).items())
                except Exception:  # noqa: BLE001 - not a mapping at all: it counts as one bad value
                    pairs = []
                    self._invalid_values += 1
                for k, v in pairs:
                    try:
                        if type(k) is not str:
                            raise TypeError
                        vals[k] = float(v)
                    except Exception:  # noqa: BLE001
                        self._invalid_values += 1
        try:
            if type(kind) is not str:
                raise TypeError("kind must be a string")
            if step is not None and type(step) is not int:
                step = int(step)
            rec = Record(kind, run, float(t), rank, step, vals)
        except Exception:  # noqa: BLE001
            with self._lock:
                self._rejected += 1
            return None
        if fields:
            try:
                for k, v in fields.items():
                    if k in ("world_size", "meta", "suite", "items", "status"):
                        setattr(rec, k, _read_field(k, v))
            except Exception:  # noqa: BLE001 - a field the wire cannot carry would wedge the sender
                with self._lock:
                    self._rejected += 1
                return None
        return rec

    def _next_batch(self) -> tuple[int, int, bytes, Any] | None:
        from monitor import wire

        backlog = self._backlog
        if not backlog:
            return None
        n = min(self.batch_size, len(backlog))
        while True:
            recs = [backlog[i] for i in range(n)]
            req = wire.ReportRequest(run=self.run, rank=self.rank, incarnation=self.incarnation,
                                     sequence=self._seq + 1, client=_CLIENT_NAME)
            try:
                wire.encode_records(req, recs, self.rank)
            except Exception:  # noqa: BLE001 - e.g. a step beyond int64: left in place it would wedge the sender
                if not self._drop_unencodable(n):
                    raise
                return self._next_batch()
            payload = req.SerializeToString()
            if len(payload) <= wire.MAX_BATCH_BYTES or n == 1:
                break
            n = max(1, n // 2)
        for _ in range(n):
            backlog.popleft()
        if len(payload) > wire.MAX_BATCH_BYTES:
            # One record alone is over the contract's limit: the daemon would refuse it.
            with self._lock:
                self._rejected += 1
            self._warn(f"record of kind {recs[0].kind!r} is {len(payload)} bytes, over the 4 MiB limit; dropped")
            return self._next_batch()
        self._seq += 1
        return (self._seq, n, payload, None)

    def _drop_unencodable(self, n: int) -> int:
        """Remove (and count) the records among the first `n` of the backlog that cannot be encoded."""
        from monitor import wire

        backlog = self._backlog
        keep = []
        bad = 0
        for _ in range(min(n, len(backlog))):
            rec = backlog.popleft()
            try:
                wire.encode_records(wire.ReportRequest(), [rec], self.rank)
            except Exception:  # noqa: BLE001
                bad += 1
            else:
                keep.append(rec)
        backlog.extendleft(reversed(keep))
        if bad:
            with self._lock:
                self._rejected += bad
            self._warn(f"{bad} record(s) could not be encoded; dropped")
        return bad

    def _ensure_channel(self) -> None:
        if self._call is not None:
            return
        from monitor import wire

        if self.security is None:
            from monitor.client.security import ClientSecurity

            self.security = ClientSecurity.resolve()  # a ValueError names the setting; the sender warns
        self._channel = open_channel(self.address or DEFAULT_ADDRESS, self.max_backoff, self.security)
        self._call = self._channel.unary_unary(wire.REPORT_METHOD)

    def _take_next(self) -> tuple[int, int, bytes, Any] | None:
        """The next batch to send: spilled ones (all older) first, then one cut from the backlog."""
        sp = self._spill
        if sp is not None and sp.pending:
            try:
                got = sp.next()
            except OSError as e:
                self._last_error = f"spill: {e}"
                self._warn(self._last_error)
                got = None
            if got is not None:
                f, n, payload = got
                return (0, n, payload, f)
            if sp.pending:
                return None  # unreadable for now: sending newer records first would reorder them
        return self._next_batch()

    def _send_ready(self) -> None:
        import grpc

        from monitor import wire

        while True:
            if self._inflight is None:
                if self._q and self._spill is not None:
                    # Draining a spill takes a while: keep taking the training thread's records meanwhile,
                    # so its queue does not overflow and drop them (the backlog spills again if need be).
                    self._drain()
                self._inflight = self._take_next()
                if self._inflight is None:
                    return
            if time.monotonic() < self._retry_at:
                return
            seq, n, payload, source = self._inflight
            self._ensure_channel()
            try:
                resp = wire.decode_response(self._call(payload, timeout=self.timeout))
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                name = code.name if code is not None else "UNKNOWN"
                self._last_error = f"{name}: {e.details() if hasattr(e, 'details') else e}"
                if name in RETRYABLE_CODES:
                    self._retries += 1
                    delay = retry_after(e) if name == "RESOURCE_EXHAUSTED" else None
                    if delay is not None:
                        # The daemon said how long to wait; a little extra jitter keeps the clients it told
                        # the same thing from all coming back in the same millisecond.
                        self._retry_at = time.monotonic() + delay * random.uniform(1.0, 1.1)
                    else:
                        self._backoff = min(self.max_backoff, max(0.1, self._backoff * 2))
                        self._retry_at = time.monotonic() + self._backoff * random.uniform(0.5, 1.0)
                    return
                # The daemon refused the batch as a whole (a bug or a contract mismatch): retrying
                # cannot help, so it is dropped and counted.
                self._warn(f"daemon refused a batch of {n} record(s): {self._last_error}")
                self._inflight = None
                if source is None or source is self._own_spill():
                    with self._lock:
                        self._rejected += n
                self._consumed(source, n)
                continue
            self._backoff = 0.0
            self._retry_at = 0.0
            self._inflight = None
            self._batches += 1
            if resp.rejected:
                first = resp.rejections[0] if resp.rejections else None
                if first is not None:
                    self._warn(f"daemon rejected {resp.rejected} record(s); first: {first.field}: {first.reason}")
            if source is None or source is self._own_spill():
                if resp.rejected:
                    with self._lock:
                        self._rejected += resp.rejected
                self._sent += n - resp.rejected
            else:
                # An earlier process's records: not part of this reporter's queued/sent accounting.
                self._recovered += n - resp.rejected
            self._consumed(source, n)

    def _own_spill(self) -> Any:
        return self._spill.own if self._spill is not None else None

    def _consumed(self, source: Any, n: int) -> None:
        """A spilled batch was answered for good: move its file past it."""
        if source is None:
            return
        try:
            source.consume(n)
            if source.frames == 0:
                self._spill.tidy()
        except OSError as e:
            self._last_error = f"spill: {e}"

    def _warn(self, msg: str) -> None:
        now = time.monotonic()
        if now - self._warned_at > 30.0:
            self._warned_at = now
            log.warning("trainguard: %s", msg)

    # -- heartbeat thread ------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                s = self.stats()
                values = {
                    "client_queued_total": s.queued,
                    "client_sent_total": s.sent,
                    "client_dropped_total": s.dropped,
                    "client_rejected_total": s.rejected,
                    "client_retries_total": s.retries,
                    "client_invalid_values_total": s.invalid_values,
                    "client_queue_depth": s.queue_depth,
                }
                if self.spill_path:
                    # Only with a spill directory: the same names on every heartbeat keep them in one block.
                    values.update({
                        "client_spilled_total": s.spilled,
                        "client_spill_bytes": s.spill_bytes,
                        "client_spill_torn_total": s.spill_torn,
                        "client_spill_recovered_total": s.recovered,
                    })
                self.log("heartbeat", self._last_step, values)
            except Exception:  # noqa: BLE001
                pass


def open_channel(address: str, max_backoff: float = 5.0, security: Any = None) -> Any:
    """The gRPC channel to a daemon: the one place that decides how the client connects.

    `security` (a ClientSecurity) gives the token and TLS settings; by default they are read from the
    environment (TRAINGUARD_TOKEN, TRAINGUARD_TLS_CA, ...; see monitor.client.security).
    """
    from monitor import wire
    from monitor.client.security import ClientSecurity

    sec = security if security is not None else ClientSecurity.resolve()
    return sec.channel(address, [
        # Reconnect quickly after a daemon restart instead of grpc's default of up to 2 minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", int(max_backoff * 1000)),
        ("grpc.max_send_message_length", 2 * wire.MAX_BATCH_BYTES),
        ("grpc.enable_retries", 0),
    ])


def retry_after(err: Any) -> float | None:
    """Seconds a RESOURCE_EXHAUSTED answer asks the client to wait (its `retry-after-ms` trailer), or None."""
    try:
        for key, value in err.trailing_metadata() or ():
            if key == RETRY_AFTER_KEY:
                ms = int(value.decode() if isinstance(value, bytes) else value)
                return min(max(ms, 0) / 1000.0, MAX_RETRY_AFTER)
    except Exception:  # noqa: BLE001 - a malformed trailer means the ordinary backoff
        return None
    return None


def _read_field(name: str, v: Any) -> Any:
    """A kind-specific field as the trace and the wire carry it; raises on one they cannot."""
    if v is None:
        return None
    if name == "world_size":
        n = int(v)
        if type(v) is str or n != v:  # "2" or 2.5 is a caller's mistake, 2.0 or a 0-d tensor is fine
            raise ValueError(f"world_size must be an integer, got {v!r}")
        return n
    if name == "items":
        return [float(x) for x in v]
    if name == "meta":
        # Through JSON once, so that a dtype or a path in meta cannot break the trace writer later.
        return json.loads(json.dumps(dict(v), default=str, allow_nan=True))
    if type(v) is not str:
        raise TypeError(f"{name} must be a string, got {type(v).__name__}")
    return v


def _client_name() -> str:
    try:
        from importlib.metadata import version

        return f"trainguard-python/{version('trainguard')}"
    except Exception:  # noqa: BLE001
        return "trainguard-python"


_CLIENT_NAME = _client_name()
_live: "weakref.WeakSet[Reporter]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for rep in list(_live):
        try:
            rep.close(timeout=5.0)
        except Exception:  # noqa: BLE001
            pass
