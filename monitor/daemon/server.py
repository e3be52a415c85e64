"""The gRPC servicer: validate, hand over to ingest, acknowledge. Nothing slow happens here."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from monitor import wire
from monitor.daemon.ingest import BULK_BYTES, BULK_RECORDS, Ingest, field_label
from monitor.daemon.store import StoreError

log = logging.getLogger("trainguard.server")


class TelemetryServicer:
    """Implements trainguard.v1.Telemetry/Report over raw bytes, so that a batch that is not even a
    valid protobuf still gets a clear INVALID_ARGUMENT instead of grpc's generic deserialization error."""

    def __init__(self, ingest: Ingest):
        self.ingest = ingest

    def report(self, request: bytes, context: Any) -> bytes:
        """Handle one Report call."""
        try:
            with self.ingest.lane(BULK_RECORDS if len(request) >= BULK_BYTES else 0):
                batch = wire.decode_batch(request)
        except wire.InvalidBatch as e:
            self.ingest.rejected_batches[field_label(e.field)] += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e.field}: {e.reason}")
            raise  # abort raises; this keeps type checkers happy
        try:
            duplicate = self.ingest.handle(batch, request)
        except StoreError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"store unavailable, retry later: {e}")
            raise
        return wire.encode_response(batch.sequence, batch.n_records, batch.rejections, duplicate)

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a grpc server."""
        return grpc.method_handlers_generic_handler(
            wire.SERVICE, {"Report": grpc.unary_unary_rpc_method_handler(self.report)})
