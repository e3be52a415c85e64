"""The gRPC servicer: validate, hand over to ingest, acknowledge. Nothing slow happens here."""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import grpc

from monitor import wire
from monitor.daemon.auth import Auth, Principal, Refused
from monitor.daemon.ingest import BULK_BYTES, BULK_RECORDS, Ingest
from monitor.daemon.limits import (
    GRPC_PUSHBACK_KEY,
    RETRY_AFTER_KEY,
    LimitExceeded,
    Limits,
    RateLimiter,
    human_bytes,
    peer_host,
)
from monitor.daemon.store import StoreError

log = logging.getLogger("trainguard.server")


def _ends_soon(context: Any, wait: float = 0.2) -> bool:
    """Whether the call ends within `wait` seconds without an answer from us (a client that sent no
    message and waits for one stays active)."""
    deadline = time.monotonic() + wait
    while context.is_active():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class TelemetryServicer:
    """Implements trainguard.v1.Telemetry/Report over raw bytes, so that a batch that is not even a
    valid protobuf still gets a clear INVALID_ARGUMENT instead of grpc's generic deserialization error.

    The method is registered as taking a stream of requests although clients make unary calls (the
    two are the same on the wire): a unary handler is never called when gRPC refuses the message
    (one over grpc.max_receive_message_length), while a streaming one sees that refusal as an error
    from its request iterator, so that it can be counted.
    """

    def __init__(self, ingest: Ingest, limits: Limits | None = None, auth: Auth | None = None):
        self.ingest = ingest
        self.limits = limits or ingest.limits
        self.auth = auth or Auth(None)
        self.rate = RateLimiter(self.limits.rate_limit_records_per_second, self.limits.rate_limit_burst_records)

    def report_stream(self, requests: Iterator[bytes], context: Any) -> bytes:
        """Handle one Report call: check its token, read its one message, then as report()."""
        principal = None
        if self.auth.enabled:
            # Before the message is read or decoded: a caller without a token costs no more than this.
            header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
            try:
                principal = self.auth.authenticate(header if isinstance(header, str) else None, "grpc")
            except Refused as e:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, e.message)
                raise
        try:
            request = next(requests)
        except StopIteration:
            if _ends_soon(context):
                # gRPC refused a message over its ceiling and is ending the call (RESOURCE_EXHAUSTED);
                # the iterator may see that as the end of the stream rather than as an error.
                self.ingest.count_batch_refused("batch", "max_message_bytes")
                raise
            self.ingest.count_batch_refused("batch", None)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "batch: the call carried no message")
            raise
        except grpc.RpcError:
            # gRPC ended the call before its message could be read. With time left on the client's
            # deadline that is a message over gRPC's own ceiling (the client was told
            # RESOURCE_EXHAUSTED by gRPC); otherwise the deadline ran out while it was sent.
            remaining = context.time_remaining()
            if remaining is None or remaining > 0:
                self.ingest.count_batch_refused("batch", "max_message_bytes")
            raise
        return self.report(request, context, principal)

    def report(self, request: bytes, context: Any, principal: Principal | None = None) -> bytes:
        """Handle one Report call (from a caller with this principal; None when authentication is off)."""
        limits = self.limits
        try:
            if len(request) > limits.max_message_bytes:
                raise wire.InvalidBatch("batch", f"{len(request)} bytes, the limit is {limits.max_message_bytes} "
                                                 f"bytes ({human_bytes(limits.max_message_bytes)}, max_message_bytes); "
                                                 "send smaller batches")
            with self.ingest.lane(BULK_RECORDS if len(request) >= BULK_BYTES else 0):
                batch = wire.decode_batch(request, max_bytes=limits.max_message_bytes,
                                          max_records=limits.max_records_per_batch)
            if len(batch.run) > limits.max_run_id_chars:
                raise wire.InvalidBatch("run", f"{len(batch.run)} characters, the limit is {limits.max_run_id_chars} "
                                               "(max_run_id_chars)")
        except wire.InvalidBatch as e:
            limit = None
            if "the limit is" in e.reason:  # as opposed to a malformed batch
                limit = {"batch": "max_message_bytes", "records": "max_records_per_batch",
                         "run": "max_run_id_chars"}.get(e.field)
            self.ingest.count_batch_refused(e.field, limit)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e.field}: {e.reason}")
            raise  # abort raises; this keeps type checkers happy
        if principal is not None:
            try:
                self.auth.require(principal, batch.run, True, "grpc")
            except Refused as e:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, e.message)
                raise
        wait_ms = self.rate.take((peer_host(context.peer() or ""), batch.run), batch.total)
        if wait_ms:
            self._too_much(context, LimitExceeded(
                "rate_limit_records_per_second",
                f"rate_limit_records_per_second: run {batch.run!r} from {peer_host(context.peer() or '')} sends more "
                f"than {limits.rate_limit_records_per_second:g} records/s (burst {limits.rate_limit_burst_records}); "
                f"send again in {wait_ms} ms (trailing metadata {RETRY_AFTER_KEY})", wait_ms))
        try:
            duplicate = self.ingest.handle(batch, request)
        except LimitExceeded as e:
            self._too_much(context, e)
            raise
        except StoreError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"store unavailable, send again later: {e}")
            raise
        return wire.encode_response(batch.sequence, batch.n_records, batch.rejections, duplicate)

    def _too_much(self, context: Any, e: LimitExceeded) -> None:
        """Answer RESOURCE_EXHAUSTED with how long to wait in the trailing metadata (aborts the call)."""
        self.ingest.count_limited(e.limit)
        ms = str(e.retry_after_ms)
        context.set_trailing_metadata(((RETRY_AFTER_KEY, ms), (GRPC_PUSHBACK_KEY, ms)))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message)

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a grpc server."""
        return grpc.method_handlers_generic_handler(
            wire.SERVICE, {"Report": grpc.stream_unary_rpc_method_handler(self.report_stream)})
