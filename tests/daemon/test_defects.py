"""Regression tests, one per defect an attacker found, against a real daemon: each one's way in is shut,
and the daemon still serves everyone else."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from monitor import wire
from monitor.records import Record
from tests.daemon.clients import T0, Client, batch, train
from tests.helpers import http_json, http_text, metrics, sample, wait_for


def post(url: str, raw: bytes) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=raw, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- a sequence number past 2^63 killed the store's writer ----------------------------------------


def test_sequence_of_2_to_the_63_is_refused_at_decode_and_everyone_else_is_served(daemon: Any) -> None:
    c = Client(daemon.grpc_address)
    try:
        for seq in (2 ** 63, 2 ** 64 - 1):
            req = wire.ReportRequest(run="big-seq", rank=0, incarnation="i", sequence=seq)
            req.records.add(kind="train", step=1, t=T0, names=["loss"], values=[1.0])
            err = c.error(req.SerializeToString())
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.details() == f"sequence: must be < 2^63 (the store keeps signed 64-bit integers), got {seq}"
        t0 = time.monotonic()
        assert c.send(batch("other", [train("other", 1)], seq=2 ** 63 - 1)).accepted == 1  # the largest is fine
        assert time.monotonic() - t0 < 2
        assert daemon.store.writer_alive and http_json(daemon.http_url + "/healthz")["status"] == "ok"
        m = metrics(daemon)
        assert sample(m, "trainguard_store_write_errors_total") == 0
        assert sample(m, "trainguard_ingest_rejected_batches_total", field="sequence") == 2
    finally:
        c.close()


# -- junk run ids grew memory and /metrics without bound ------------------------------------------


def test_junk_run_ids_stop_at_max_live_runs_and_metrics_stay_small(daemon_factory: Any) -> None:
    d = daemon_factory(max_live_runs=100)
    c = Client(d.grpc_address)
    refused = 0
    try:
        for i in range(1000):
            run = f"junk-{i}"
            try:
                c.send(batch(run, [train(run, 1, rank=i % 7)]))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                refused += 1
    finally:
        c.close()
    assert len(d.registry.runs) == 100 and refused == 900
    t0 = time.monotonic()
    text = http_text(d.http_url + "/metrics")
    assert time.monotonic() - t0 < 2 and len(text) < 1_000_000
    assert text.count("trainguard_run_info{") == 100


# -- the HTTP backlog was 5 and idle sockets were never closed -------------------------------------


def test_300_concurrent_metrics_scrapes_all_answer(daemon: Any) -> None:
    c = Client(daemon.grpc_address)
    c.send(batch("scraped", [train("scraped", s, rank=r) for s in range(1, 5) for r in range(8)], blocks=False))
    c.close()
    url = daemon.http_url + "/metrics"
    start = threading.Barrier(300)

    def scrape(_: int) -> float:
        start.wait()
        t0 = time.monotonic()
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and b"trainguard_run_info" in r.read()
        return time.monotonic() - t0

    with ThreadPoolExecutor(300) as pool:
        took = list(pool.map(scrape, range(300)))
    assert len(took) == 300 and max(took) < 10


def _threads() -> int:
    return threading.active_count()


def test_slow_and_idle_clients_are_cut_off_and_cannot_multiply_threads(daemon_factory: Any) -> None:
    d = daemon_factory(http_timeout_seconds=1.0, http_max_connections=8)
    base = _threads()
    host, port = "127.0.0.1", d.http_port
    idle = [socket.create_connection((host, port)) for _ in range(100)]  # connect, send nothing
    trickle = socket.create_connection((host, port))
    try:
        time.sleep(0.3)
        assert _threads() <= base + 8 + 2  # one thread per connection being served, at most 8
        t0 = time.monotonic()
        for ch in b"GET /healthz":  # a byte every 0.2 s restarts a plain socket timeout; the deadline does not
            try:
                trickle.send(bytes([ch]))
            except OSError:
                break
            time.sleep(0.2)
        trickle.settimeout(5)
        assert trickle.recv(100) == b""  # cut off, with no answer
        assert time.monotonic() - t0 < 2.5
        # the idle ones are all closed, a few at a time, and a real request gets through
        for s in idle:
            s.settimeout(15)
            assert s.recv(10) == b""
        assert http_json(d.http_url + "/healthz", timeout=10)["status"] == "ok"
        assert sample(metrics(d), "trainguard_http_timeouts_total") >= 100
    finally:
        for s in idle + [trickle]:
            s.close()


# -- event times up to the year 5100 were accepted ------------------------------------------------


def test_far_future_event_times_are_refused_and_past_ones_kept(daemon: Any) -> None:
    c = Client(daemon.grpc_address)
    try:
        recs = [train("when", 1, t=T0), train("when", 2, t=99_999_999_999.0), train("when", 3, t=time.time())]
        resp = c.send(batch("when", recs, blocks=False))
    finally:
        c.close()
    assert resp.accepted == 2
    assert resp.rejections[0].field == "records[1].t" and "max_future_skew_seconds" in resp.rejections[0].reason
    assert http_json(daemon.http_url + "/api/v1/runs/when")["last_seen"] < time.time() + 60


# -- messages over 16 MiB were refused by gRPC and counted nowhere ---------------------------------


def test_a_message_far_over_the_limit_is_refused_and_counted(daemon: Any) -> None:
    c = Client(daemon.grpc_address)
    try:
        err = c.error(b"\x0a\x01r" + b"\x00" * (17 << 20))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.send(batch("ok", [train("ok", 1)])).accepted == 1
    finally:
        c.close()
    # gRPC answers the client before the handler thread sees the refusal; count it when it does.
    wait_for(lambda: sample(metrics(daemon), "trainguard_ingest_rejected_by_limit_total",
                            limit="max_message_bytes") is not None, what="the refusal counted")
    m = metrics(daemon)
    assert sample(m, "trainguard_ingest_rejected_by_limit_total", limit="max_message_bytes") == 1


# -- the silences API ------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400_not_a_500(daemon: Any) -> None:
    code, body = post(daemon.http_url + "/api/v1/silences", b"[" * 30_000 + b"]" * 30_000)
    assert code == 400 and body["error"].startswith("body: JSON nested too deeply")


def test_an_empty_silence_names_what_is_missing(daemon: Any) -> None:
    url = daemon.http_url + "/api/v1/silences"
    code, body = post(url, b"{}")
    assert code == 400 and body["error"].startswith("run: missing"), body
    code, body = post(url, json.dumps({"run": "r"}).encode())
    assert code == 400 and body["error"].startswith("duration_seconds: missing"), body


def test_silences_are_bounded_and_created_by_is_a_name(daemon_factory: Any) -> None:
    d = daemon_factory(max_silences=3)
    url = d.http_url + "/api/v1/silences"
    for bad in ("eve\nFAKE LOG LINE", "<script>", "x" * 129, "\x1b[2J"):
        code, body = post(url, json.dumps({"run": "r", "duration_seconds": 60, "created_by": bad}).encode())
        assert code == 400 and body["error"].startswith("created_by: must be a name of at most 128"), body
    for who in ("alice", "alice@gpu-7.example.com", "DOMAIN\\bob", "ci bot"):
        code, body = post(url, json.dumps({"run": "r", "duration_seconds": 60, "created_by": who}).encode())
        if who == "ci bot":
            assert code == 400 and "the limit is 3 (max_silences)" in body["error"], body
        else:
            assert code == 200, body
    # an ended silence frees its place
    urllib.request.urlopen(urllib.request.Request(url + "/1", method="DELETE"), timeout=10).read()
    assert post(url, json.dumps({"run": "r", "duration_seconds": 60}).encode())[0] == 200


# -- exported counters lost increments under concurrent calls --------------------------------------


def test_ingest_counters_are_exact_under_many_threads(daemon: Any) -> None:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads swap as often as they can: a lost update would show
    try:
        def client(k: int) -> None:
            c = Client(daemon.grpc_address)
            try:
                for seq in range(1, 41):
                    req = wire.ReportRequest(run=f"count-{k % 4}", rank=k, incarnation="i", sequence=seq)
                    req.records.add(kind="train", step=seq, t=T0 + seq, names=["loss"], values=[1.0])
                    req.records.add(kind="bogus", t=T0 + seq)
                    data = req.SerializeToString()
                    c.send(data)
                    assert c.send(data).duplicate
            finally:
                c.close()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(old)
    m = metrics(daemon)
    assert sample(m, "trainguard_ingest_batches_total") == 640
    assert sample(m, "trainguard_ingest_duplicate_batches_total") == 640
    assert sample(m, "trainguard_ingest_records_total", kind="train") == 640
    assert sample(m, "trainguard_ingest_rejected_records_total", field="kind") == 640


def test_a_record_with_deeply_nested_meta_is_refused_alone(daemon: Any) -> None:
    req = wire.ReportRequest(run="meta", rank=0, incarnation="i", sequence=1)
    req.records.add(kind="run", t=T0, world_size=1, meta_json="[" * 5000 + "]" * 5000)
    req.records.add(kind="train", step=1, t=T0 + 1, names=["loss"], values=[1.0])
    c = Client(daemon.grpc_address)
    try:
        resp = c.send(req.SerializeToString())
    finally:
        c.close()
    assert resp.accepted == 1 and resp.rejections[0].field == "records[0].meta_json"
    assert "nested too deeply" in resp.rejections[0].reason


def test_oversized_meta_is_refused_naming_the_limit(daemon: Any) -> None:
    recs = [Record("run", "m2", T0, 0, world_size=1, meta={"x": "y" * 70_000}), train("m2", 1)]
    c = Client(daemon.grpc_address)
    try:
        resp = c.send(batch("m2", recs))
    finally:
        c.close()
    assert resp.accepted == 1 and "the limit is 65536" in resp.rejections[0].reason


# -- a sender table that grew with every new incarnation ---------------------------------------------


def test_fresh_incarnations_are_remembered_within_a_bound_and_a_forgotten_one_is_still_a_resend(
        daemon: Any) -> None:
    from monitor.daemon.state import INCARNATIONS_PER_RANK

    c = Client(daemon.grpc_address)
    try:
        n = INCARNATIONS_PER_RANK + 40
        for i in range(n):
            resp = c.send(batch("incs", [train("incs", i + 1)], inc=f"inc-{i}", seq=1))
            assert resp.accepted == 1 and not resp.duplicate
        st = daemon.registry.get("incs")
        assert len(st.seqs) == INCARNATIONS_PER_RANK
        assert len(daemon.ingest.snapshot_run(st)["detector_state"]["seqs"]) == INCARNATIONS_PER_RANK
        # inc-0 was forgotten first; its resend (say from a spill file another process adopted) is
        # recognised from the store, applied nowhere, stored once.
        assert ((0, "inc-0") in st.seqs) is False
        again = c.send(batch("incs", [train("incs", 1)], inc="inc-0", seq=1))
        assert again.duplicate
        assert c.send(batch("incs", [train("incs", n + 1)], inc="inc-0", seq=2)).accepted == 1
    finally:
        c.close()
    assert http_json(daemon.http_url + "/api/v1/runs/incs")["records"] == n + 1
