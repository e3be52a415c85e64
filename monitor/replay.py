"""Stream v1 trace files to a daemon as fast as it acknowledges them."""

from __future__ import annotations

import json
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TextIO

from monitor.records import Record, TraceError, read_trace_numbered


class ReplayError(RuntimeError):
    """The daemon could not be reached or refused a whole batch."""


@dataclass
class ReplayResult:
    """What a replay did."""

    files: int = 0
    records_sent: int = 0
    records_accepted: int = 0
    batches: int = 0
    line_errors: list[TraceError] = field(default_factory=list)
    record_errors: list[str] = field(default_factory=list)  # rejections reported by the daemon
    line_errors_total: int = 0
    record_errors_total: int = 0
    runs: set[str] = field(default_factory=set)
    seconds: float = 0.0

    @property
    def rejected(self) -> int:
        """Lines or records that did not make it."""
        return self.line_errors_total + self.record_errors_total


class Progress:
    """A one-line progress bar on a terminal; silent elsewhere."""

    def __init__(self, stream: TextIO, total_bytes: int, enabled: bool):
        self.stream = stream
        self.total = max(1, total_bytes)
        self.enabled = enabled
        self.done_files = 0
        self.current = 0
        self.records = 0
        self.t0 = time.monotonic()
        self._last = 0.0

    def update(self, file_bytes_done: int, force: bool = False) -> None:
        """Redraw (at most 10 times a second)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        frac = min(1.0, (self.done_files + file_bytes_done) / self.total)
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        rate = self.records / max(1e-9, now - self.t0)
        self.stream.write(f"\r[{bar}] {frac * 100:5.1f}%  {self.records:,} records  {rate:,.0f}/s ")
        self.stream.flush()

    def finish(self) -> None:
        """End the bar's line."""
        if self.enabled:
            self.update(0, force=True)
            self.stream.write("\n")
            self.stream.flush()


class _Sender:
    """Sends batches for one (file, run) with its own incarnation and sequence numbers."""

    def __init__(self, call: Callable[..., bytes], run: str, timeout: float, retry_for: float):
        self.call = call
        self.run = run
        self.incarnation = "replay-" + uuid.uuid4().hex[:12]
        self.seq = 0
        self.timeout = timeout
        self.retry_for = retry_for

    def send(self, records: list[Record]) -> Any:
        import grpc

        from monitor import wire

        self.seq += 1
        payload = wire.encode_batch(self.run, 0, self.incarnation, self.seq, records, client="trainguard-replay")
        deadline = time.monotonic() + self.retry_for
        backoff = 0.1
        while True:
            try:
                return wire.decode_response(self.call(payload, timeout=self.timeout))
            except grpc.RpcError as e:
                code = e.code()
                if code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED") and \
                        time.monotonic() < deadline:
                    time.sleep(backoff * random.uniform(0.5, 1.0))
                    backoff = min(2.0, backoff * 2)
                    continue
                raise ReplayError(f"sending run {self.run!r} failed: {code.name}: {e.details()}") from None


def _size_bound(rec: Record) -> int:
    """An upper bound on a record's encoded size, to keep each batch under the daemon's 4 MiB limit."""
    n = 64 + sum(4 * len(k) + 11 for k in rec.values) + 9 * len(rec.items or ())
    if rec.meta is not None:
        n += len(json.dumps(rec.meta, default=str))
    return n + 4 * (len(rec.suite or "") + len(rec.status or ""))


def replay(paths: Iterable[str], address: str, batch_size: int = 1000, timeout: float = 30.0,
           retry_for: float = 30.0, progress: bool | None = None, stream: TextIO = sys.stderr,
           keep_errors: int = 20, security: Any = None) -> ReplayResult:
    """Replay trace files in order; return after the daemon acknowledged (and so applied) every batch.

    `security`: a monitor.client.security.ClientSecurity (default: TRAINGUARD_TOKEN, TRAINGUARD_TLS_CA, ...).
    """
    import os

    import grpc

    from monitor import wire

    paths = list(paths)
    res = ReplayResult()
    total_bytes = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    bar = Progress(stream, total_bytes, stream.isatty() if progress is None else progress)
    from monitor.client.security import ClientSecurity

    try:
        sec = security if security is not None else ClientSecurity.resolve()
    except ValueError as e:
        raise ReplayError(str(e)) from None
    channel = sec.channel(address, [("grpc.max_send_message_length", 2 * wire.MAX_BATCH_BYTES)])
    call = channel.unary_unary(wire.REPORT_METHOD)
    t0 = time.monotonic()
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=min(10.0, retry_for))
        except grpc.FutureTimeoutError:
            raise ReplayError(f"cannot reach a trainguard daemon at {address} "
                              "(start one with `trainguard serve`, or pass --address)") from None
        for path in paths:
            res.files += 1
            senders: dict[str, _Sender] = {}
            batch: list[Record] = []
            lines: list[int] = []
            batch_bytes = 0

            def flush() -> None:
                if not batch:
                    return
                run = batch[0].run
                sender = senders.get(run)
                if sender is None:
                    sender = senders[run] = _Sender(call, run, timeout, retry_for)
                resp = sender.send(batch)
                res.batches += 1
                res.records_sent += len(batch)
                res.records_accepted += resp.accepted
                res.record_errors_total += resp.rejected
                for rj in resp.rejections:
                    if len(res.record_errors) < keep_errors:
                        where = f"{path}:{lines[rj.index]}" if rj.index < len(lines) else path
                        res.record_errors.append(f"{where}: field '{rj.field.split('.', 1)[-1]}': {rj.reason}")
                bar.records += len(batch)
                batch.clear()
                lines.clear()

            def on_progress(done: int, _size: int) -> None:
                bar.update(done)

            for lineno, item in read_trace_numbered(path, on_progress):
                if isinstance(item, TraceError):
                    res.line_errors_total += 1
                    if len(res.line_errors) < keep_errors:
                        res.line_errors.append(item)
                    continue
                size = _size_bound(item)
                # Records of up to 100,000 probe items are legal, so a count alone can overflow 4 MiB.
                if batch and (item.run != batch[0].run or len(batch) >= batch_size
                              or batch_bytes + size > wire.MAX_BATCH_BYTES // 2):
                    flush()
                if not batch:
                    batch_bytes = 0
                batch_bytes += size
                res.runs.add(item.run)
                batch.append(item)
                lines.append(lineno)
            flush()
            bar.done_files += os.path.getsize(path) if os.path.isfile(path) else 0
            bar.update(0)
    finally:
        bar.finish()
        channel.close()
        res.seconds = time.monotonic() - t0
    return res
