"""The gRPC Telemetry service against a real in-process daemon: partial success, whole-batch errors, resends."""

from __future__ import annotations

import math
import threading
from typing import Any, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monitor import wire
from monitor.records import Record
from tests.helpers import http_json, metrics, sample

T0 = 1_700_000_000.0




class Client:
    """Raw-bytes calls to Report, as any client in any language would make them."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.report = self.channel.unary_unary(wire.REPORT_METHOD)

    def send(self, data: bytes) -> Any:
        return wire.decode_response(self.report(data, timeout=30))

    def error(self, data: bytes) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as e:
            self.report(data, timeout=30)
        return e.value

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


@pytest.fixture
def client(daemon: Any) -> Iterator[Client]:
    c = Client(daemon.grpc_address)
    yield c
    c.channel.close()


def train(run: str, step: int, loss: float = 2.0, rank: int = 0) -> Record:
    return Record("train", run, T0 + step, rank, step, {"loss": loss})


def mixed_batch(run: str) -> tuple[bytes, dict[int, str]]:
    """A batch of good and bad records; returns its bytes and the expected rejection field per index."""
    req = wire.ReportRequest(run=run, rank=0, incarnation="inc-a", sequence=1, client="tests")

    def add(**fields: Any) -> None:
        r = req.records.add()
        for k, v in fields.items():
            if isinstance(v, list):
                getattr(r, k).extend(v)
            else:
                setattr(r, k, v)

    add(kind="train", step=1, t=T0 + 1, names=["loss", "grad_norm"], values=[2.0, 0.5])      # 0 good
    add(kind="bogus", step=1, t=T0 + 1)                                                      # 1
    add(kind="train", t=T0 + 1, names=["loss"], values=[1.0])                                # 2 no step
    add(kind="eval", step=1, t=T0 + 2, names=["loss"], values=[2.5])                         # 3 good
    add(kind="train", step=2, t=T0 + 2, names=[f"v{i}" for i in range(300)], values=[1.0] * 300)  # 4
    add(kind="train", step=2, t=T0 + 2, names=["n" * 200], values=[1.0])                     # 5
    add(kind="train", step=2, t=T0 + 2, names=["loss", "lr"], values=[1.0])                  # 6 mismatch
    add(kind="train", step=2, t=math.nan, names=["loss"], values=[1.0])                      # 7
    add(kind="train", step=2, t=T0 + 2, names=["BADNAMEX"], values=[1.0])                    # 8 non-UTF-8
    add(kind="system", t=T0 + 3, names=["host_rss_bytes"], values=[123456789.0])             # 9 good
    # Patch bytes after serializing: the same length keeps every length prefix valid.
    data = req.SerializeToString().replace(b"BADNAMEX", b"BAD\xffAMEX")
    expected = {1: "records[1].kind", 2: "records[2].step", 4: "records[4].values", 5: "records[5].names[0]",
                6: "records[6].values", 7: "records[7].t", 8: "records[8].names[0]"}
    return data, expected


def test_mixed_batch_keeps_good_records_and_names_each_bad_one(daemon: Any, client: Client) -> None:
    data, expected = mixed_batch("mixed-run")
    resp = client.send(data)
    assert resp.ack_sequence == 1
    assert resp.accepted == 3
    assert resp.rejected == len(expected)
    assert not resp.duplicate
    got = {rj.index: rj.field for rj in resp.rejections}
    assert got == expected
    reasons = {rj.index: rj.reason for rj in resp.rejections}
    assert "bogus" in reasons[1] and "256" in reasons[4] and "128" in reasons[5] and "UTF-8" in reasons[8]

    # the good records are live in the API ...
    detail = http_json(daemon.http_url + "/api/v1/runs/mixed-run")
    assert detail["records"] == 3
    assert detail["values"]["train"] == {"loss": 2.0, "grad_norm": 0.5}
    assert detail["values"]["eval"] == {"loss": 2.5}
    assert detail["ranks"][0]["host_rss_bytes"] == 123456789.0
    assert detail["last_step"] == 1 and detail["last_seen"] == T0 + 3
    # ... and in /metrics, with the rejections counted by field
    m = metrics(daemon)
    assert sample(m, "trainguard_train_loss", run="mixed-run") == 2.0
    assert sample(m, "trainguard_eval_loss", run="mixed-run") == 2.5
    assert sample(m, "trainguard_host_memory_rss_bytes", run="mixed-run", rank="0") == 123456789.0
    assert sample(m, "trainguard_ingest_records_total", kind="train") == 1
    assert sample(m, "trainguard_ingest_records_total", kind="eval") == 1
    assert sample(m, "trainguard_ingest_records_total", kind="system") == 1
    rejected = {dict(k[1])["field"]: v for k, v in m.items() if k[0] == "trainguard_ingest_rejected_records_total"}
    assert rejected == {"kind": 1, "step": 1, "values": 2, "names": 2, "t": 1}
    # only the kept records went to the store
    assert daemon.store.count_records("mixed-run") == 3
    stored = [wire.decode_batch(b[4]) for b in daemon.store.batches("mixed-run")]
    assert len(stored) == 1 and [r.kind for r in stored[0].records] == ["train", "eval", "system"]


def test_garbage_is_invalid_argument_naming_the_batch(daemon: Any, client: Client) -> None:
    err = client.error(b"\x0a\xff\xff\xff\xff\xff not a protobuf at all")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("batch: ")
    assert "trainguard.v1.ReportRequest" in err.details()


@pytest.mark.parametrize("run", ["bad run id!", "", "x" * 129])
def test_bad_run_id_is_invalid_argument_naming_run(daemon: Any, client: Client, run: str) -> None:
    err = client.error(wire.encode_batch(run, 0, "inc", 1, [train("ok", 1)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("run: ")
    assert http_json(daemon.http_url + "/api/v1/runs")["runs"] == []


def test_bad_header_fields_are_named(daemon: Any, client: Client) -> None:
    err = client.error(wire.encode_batch("hdr-run", 0, "", 1, [train("hdr-run", 1)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("incarnation: ")
    err = client.error(wire.encode_batch("hdr-run", 0, "inc", 0, [train("hdr-run", 1)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("sequence: ")


def test_oversized_batch_is_invalid_argument_naming_the_limit(daemon: Any, client: Client) -> None:
    big = [Record("probe", "big-run", T0 + i, 0, i, suite="s", items=[0.5] * 90_000) for i in range(7)]
    data = wire.encode_batch("big-run", 0, "inc", 1, big)
    assert len(data) > 4 * 1024 * 1024
    err = client.error(data)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("batch: ")
    assert "4194304" in err.details() and "4 MiB" in err.details()
    assert daemon.registry.get("big-run") is None


def test_daemon_keeps_serving_after_bad_batches(daemon: Any, client: Client) -> None:
    client.error(b"garbage" * 10)
    client.error(wire.encode_batch("bad run", 0, "inc", 1, []))
    big = [Record("probe", "big", T0, 0, i, suite="s", items=[0.5] * 90_000) for i in range(7)]
    client.error(wire.encode_batch("big", 0, "inc", 1, big))

    resp = client.send(wire.encode_batch("after-run", 0, "inc", 1, [train("after-run", 1), train("after-run", 2)]))
    assert resp.accepted == 2 and resp.rejected == 0 and not resp.duplicate
    assert http_json(daemon.http_url + "/api/v1/runs/after-run")["last_step"] == 2
    assert client.health() == health_pb2.HealthCheckResponse.SERVING
    assert client.health(wire.SERVICE) == health_pb2.HealthCheckResponse.SERVING
    m = metrics(daemon)
    batches = {dict(k[1])["field"]: v for k, v in m.items() if k[0] == "trainguard_ingest_rejected_batches_total"}
    assert batches == {"batch": 2, "run": 1}
    assert sample(m, "trainguard_ingest_batches_total") == 1


def test_resent_batch_is_acknowledged_as_duplicate_and_counted_once(daemon: Any, client: Client) -> None:
    run = "resend-run"
    recs = [train(run, s) for s in (1, 2, 3)]
    data = wire.encode_batch(run, 0, "inc-1", 1, recs)
    first = client.send(data)
    assert (first.ack_sequence, first.accepted, first.duplicate) == (1, 3, False)
    again = client.send(data)
    assert again.ack_sequence == 1 and again.duplicate

    assert http_json(daemon.http_url + f"/api/v1/runs/{run}")["records"] == 3
    m = metrics(daemon)
    assert sample(m, "trainguard_ingest_duplicate_batches_total") == 1
    assert sample(m, "trainguard_ingest_batches_total") == 1
    assert sample(m, "trainguard_ingest_records_total", kind="train") == 3
    assert daemon.store.count_records(run) == 3

    # the next sequence number applies; an older one is a duplicate too
    nxt = client.send(wire.encode_batch(run, 0, "inc-1", 2, [train(run, 4)]))
    assert not nxt.duplicate and nxt.accepted == 1
    old = client.send(wire.encode_batch(run, 0, "inc-1", 1, [train(run, 99)]))
    assert old.duplicate
    # a restarted sender (new incarnation) starts again at 1, and so does another rank
    assert not client.send(wire.encode_batch(run, 0, "inc-2", 1, [train(run, 5)])).duplicate
    assert not client.send(wire.encode_batch(run, 1, "inc-1", 1, [train(run, 5, rank=1)])).duplicate
    detail = http_json(daemon.http_url + f"/api/v1/runs/{run}")
    assert detail["records"] == 6 and detail["last_step"] == 5
    assert sample(metrics(daemon), "trainguard_ingest_duplicate_batches_total") == 2


def test_concurrent_resends_apply_once(daemon: Any, client: Client) -> None:
    run = "race-run"
    data = wire.encode_batch(run, 0, "inc", 1, [train(run, s) for s in range(1, 51)])
    results: list[Any] = []
    barrier = threading.Barrier(8)

    def send() -> None:
        barrier.wait()
        results.append(client.send(data))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8
    assert sum(not r.duplicate for r in results) == 1
    assert all(r.ack_sequence == 1 for r in results)
    assert http_json(daemon.http_url + f"/api/v1/runs/{run}")["records"] == 50
    assert daemon.store.count_records(run) == 50
    assert sample(metrics(daemon), "trainguard_ingest_duplicate_batches_total") == 7


def test_resent_batch_with_bad_records_counts_its_rejections_once(daemon: Any, client: Client) -> None:
    data, expected = mixed_batch("resend-mixed")
    assert not client.send(data).duplicate
    again = client.send(data)
    assert again.duplicate
    # the resend still tells the client which records were refused
    assert {rj.index: rj.field for rj in again.rejections} == expected
    m = metrics(daemon)
    rejected = {dict(k[1])["field"]: v for k, v in m.items() if k[0] == "trainguard_ingest_rejected_records_total"}
    assert rejected == {"kind": 1, "step": 1, "values": 2, "names": 2, "t": 1}


def test_record_rank_overrides_the_batch_rank(daemon: Any, client: Client) -> None:
    run = "ranks-run"
    recs = [Record("run", run, T0, 0, world_size=2), train(run, 1, 3.0, rank=0), train(run, 1, 4.0, rank=1)]
    assert client.send(wire.encode_batch(run, 0, "replay", 1, recs)).accepted == 3
    detail = http_json(daemon.http_url + f"/api/v1/runs/{run}")
    assert [r["rank"] for r in detail["ranks"]] == [0, 1]
    assert [r["records"] for r in detail["ranks"]] == [2, 1]
    assert detail["values"]["train"]["loss"] == 3.0  # run-level values come from the lowest rank
