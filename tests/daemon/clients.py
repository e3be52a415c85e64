"""Raw gRPC calls to a daemon's Report method, as any client in any language would make them."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monitor import wire
from monitor.records import Record

T0 = 1_700_000_000.0


class Client:
    """One channel to a daemon; send() returns the decoded response, call() the error too."""

    def __init__(self, address: str):
        # Clients may send more than the daemon reads: the daemon's refusal is what is tested.
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
        self.report = self.channel.unary_unary(wire.REPORT_METHOD)

    def send(self, data: bytes, timeout: float = 30.0) -> Any:
        """Report one batch and decode the response (raises grpc.RpcError on a refusal)."""
        return wire.decode_response(self.report(data, timeout=timeout))

    def error(self, data: bytes, timeout: float = 30.0) -> grpc.RpcError:
        """Report one batch that must be refused; return the error."""
        try:
            self.report(data, timeout=timeout)
        except grpc.RpcError as e:
            return e
        raise AssertionError("the batch was accepted")

    def health(self, service: str = "") -> int:
        """The gRPC health status of a service ("" is the server)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    def close(self) -> None:
        self.channel.close()


def train(run: str, step: int, loss: float = 2.0, rank: int = 0, t: float | None = None, **values: float) -> Record:
    """A train record at T0 + step (or `t`)."""
    return Record("train", run, T0 + step if t is None else t, rank, step, {"loss": loss, **values})


def batch(run: str, records: list[Record], seq: int = 1, rank: int = 0, inc: str = "inc", blocks: bool = True) -> bytes:
    """An encoded batch."""
    return wire.encode_batch(run, rank, inc, seq, records, client="tests", blocks=blocks)
