"""The daemon's HTTP side: the runs and alerts API, /healthz and /metrics, fed over real gRPC."""

from __future__ import annotations

import json
import math
import platform
import urllib.error
import urllib.request
from typing import Any, Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor import __version__, wire
from monitor.records import Record
from tests.helpers import http_json, http_text, metrics, sample

T0 = 1_700_000_000.0
RUN_KEYS = {"run", "world_size", "ranks_reporting", "last_step", "last_seen", "status", "health"}
ALERT_KEYS = {"silenced", "id", "run", "name", "severity", "state", "rank", "step", "started_at", "resolved_at",
              "summary", "description", "value", "labels"}
RANK_KEYS = {"rank", "last_step", "heartbeat_step", "last_seen", "status", "records", "step_time_seconds",
             "compute_time_seconds", "tokens_per_second", "host_rss_bytes", "gpu_memory_allocated_bytes", "client"}
CLIENT_COUNTERS = {"client_queued_total": 100.0, "client_sent_total": 90.0, "client_dropped_total": 7.0,
                   "client_rejected_total": 1.0, "client_retries_total": 2.0, "client_queue_depth": 3.0}


def _strict_json(url: str) -> Any:
    """GET and parse, refusing the NaN/Infinity tokens that are not JSON."""
    def no_constants(tok: str) -> Any:
        raise AssertionError(f"non-standard JSON token {tok} from {url}")
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"] == "application/json"
        return json.loads(r.read(), parse_constant=no_constants)


def _http_error(url: str) -> tuple[int, Any]:
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.headers["Content-Type"] == "application/json"
    return e.value.code, json.load(e.value)




def _two_rank_run(run: str) -> list[Record]:
    recs = [Record("run", run, T0, 0, world_size=2, meta={"framework": "pytorch-test", "model": "tiny"})]
    for step in range(1, 11):
        for rank in (0, 1):
            recs.append(Record("train", run, T0 + step + rank * 0.01, rank, step, {
                "loss": 3.0 - 0.1 * step + 0.01 * rank, "grad_norm": 1.5 + rank, "lr": 1e-3,
                "step_time_seconds": 0.5 + 0.1 * rank, "compute_time_seconds": 0.3 + 0.1 * rank,
                "data_time_seconds": 0.01, "tokens": 1000.0}))
    recs.append(Record("eval", run, T0 + 10.1, 0, 10, {"loss": 2.4, "accuracy": 0.5}))
    recs.append(Record("system", run, T0 + 10.2, 0, 10, {"host_rss_bytes": 1e9, "gpu_memory_allocated_bytes": 2e9}))
    recs.append(Record("system", run, T0 + 10.3, 1, 10, {"host_rss_bytes": 1.1e9,
                                                         "gpu_memory_allocated_bytes": 2.1e9}))
    recs.append(Record("heartbeat", run, T0 + 10.5, 0, 10, dict(CLIENT_COUNTERS)))
    return recs


def _flappy_run(run: str) -> list[Record]:
    """NonFinite fires at step 5, resolves after 20 finite steps (at 25), fires again at 30."""
    recs = [Record("run", run, T0 + 100, 0, world_size=1, meta={"framework": "other"})]
    for step in range(1, 31):
        loss = math.nan if step in (5, 30) else 2.0
        recs.append(Record("train", run, T0 + 100 + step, 0, step, {"loss": loss}))
    return recs


def _finished_run(run: str) -> list[Record]:
    return [Record("run", run, T0 - 50, 0, world_size=1), Record("train", run, T0 - 49, 0, 1, {"loss": 1.0}),
            Record("end", run, T0 - 48, 0, 1, status="completed")]


class Fed:
    """A daemon with three runs sent over gRPC, plus one refused record and one refused batch."""

    def __init__(self, d: Any):
        self.d = d
        self.url = d.http_url
        ch = grpc.insecure_channel(d.grpc_address)
        call = ch.unary_unary(wire.REPORT_METHOD)
        try:
            self.responses = []
            for i, (run, recs) in enumerate((("http-run", _two_rank_run("http-run")),
                                              ("flappy-run", _flappy_run("flappy-run")),
                                              ("done-run", _finished_run("done-run")))):
                data = wire.encode_batch(run, 0, "inc", 1, recs)
                self.responses.append(wire.decode_response(call(data, timeout=30)))
            # one bad record among good ones, and its resend
            bad = wire.ReportRequest(run="http-run", rank=0, incarnation="inc", sequence=2)
            bad.records.add(kind="bogus", t=T0 + 10.6)
            data = bad.SerializeToString()
            self.responses.append(wire.decode_response(call(data, timeout=30)))
            self.responses.append(wire.decode_response(call(data, timeout=30)))
            with pytest.raises(grpc.RpcError):
                call(b"\xff" * 16, timeout=30)
        finally:
            ch.close()


@pytest.fixture
def fed(daemon: Any) -> Iterator[Fed]:
    yield Fed(daemon)


def test_responses_of_the_feed(fed: Fed) -> None:
    assert [r.accepted for r in fed.responses] == [len(_two_rank_run("x")), 31, 3, 0, 0]
    assert [r.rejected for r in fed.responses] == [0, 0, 0, 1, 1]
    assert [r.duplicate for r in fed.responses] == [False, False, False, False, True]


def test_runs_api_shape_and_values(fed: Fed) -> None:
    body = _strict_json(fed.url + "/api/v1/runs")
    assert set(body) == {"runs"}
    runs = body["runs"]
    for r in runs:
        assert set(r) == RUN_KEYS
    # newest event time first
    assert [r["run"] for r in runs] == ["flappy-run", "http-run", "done-run"]
    by = {r["run"]: r for r in runs}
    # the refused record (t +10.6) moved nothing
    assert by["http-run"] == {"run": "http-run", "world_size": 2, "ranks_reporting": 2, "last_step": 10,
                              "last_seen": T0 + 10.5, "status": "running", "health": "ok"}
    assert by["flappy-run"] == {"run": "flappy-run", "world_size": 1, "ranks_reporting": 1, "last_step": 30,
                                "last_seen": T0 + 130, "status": "running", "health": "critical"}
    assert by["done-run"] == {"run": "done-run", "world_size": 1, "ranks_reporting": 0, "last_step": 1,
                              "last_seen": T0 - 48, "status": "completed", "health": "ok"}


def test_run_detail_has_ranks_and_alerts(fed: Fed) -> None:
    d = _strict_json(fed.url + "/api/v1/runs/http-run")
    assert RUN_KEYS | {"first_seen", "records", "meta", "values", "ranks", "alerts"} <= set(d)
    assert {k: d[k] for k in RUN_KEYS} == {"run": "http-run", "world_size": 2, "ranks_reporting": 2,
                                           "last_step": 10, "last_seen": T0 + 10.5, "status": "running",
                                           "health": "ok"}
    assert d["first_seen"] == T0
    assert d["records"] == len(_two_rank_run("x"))
    assert d["meta"] == {"framework": "pytorch-test", "model": "tiny"}
    assert d["values"]["train"] == pytest.approx({"loss": 2.0, "grad_norm": 1.5, "lr": 1e-3,
                                                  "step_time_seconds": 0.5, "compute_time_seconds": 0.3,
                                                  "data_time_seconds": 0.01, "tokens": 1000.0})
    assert d["values"]["eval"] == {"loss": 2.4, "accuracy": 0.5}
    assert d["alerts"] == []
    ranks = d["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert set(r) == RANK_KEYS
    r0, r1 = ranks
    assert (r0["last_step"], r0["heartbeat_step"], r0["status"], r0["records"]) == (10, 10, "running", 14)
    assert r0["last_seen"] == T0 + 10.5
    assert r0["step_time_seconds"] == 0.5 and r0["compute_time_seconds"] == 0.3
    assert r0["tokens_per_second"] == pytest.approx(2000.0)
    assert (r0["host_rss_bytes"], r0["gpu_memory_allocated_bytes"]) == (1e9, 2e9)
    assert r0["client"] == CLIENT_COUNTERS
    assert (r1["last_step"], r1["heartbeat_step"], r1["records"], r1["client"]) == (10, None, 11, {})
    assert r1["last_seen"] == T0 + 10.3
    assert r1["step_time_seconds"] == pytest.approx(0.6)
    assert r1["tokens_per_second"] == pytest.approx(1000 / 0.6)
    assert (r1["host_rss_bytes"], r1["gpu_memory_allocated_bytes"]) == (1.1e9, 2.1e9)


def test_run_detail_of_a_run_with_alerts(fed: Fed) -> None:
    d = _strict_json(fed.url + "/api/v1/runs/flappy-run")
    assert d["health"] == "critical"
    assert d["values"]["train"] == {"loss": "nan"}  # non-finite values as strings: the body stays JSON
    assert [(a["id"], a["state"], a["step"]) for a in d["alerts"]] == [(2, "firing", 30), (1, "resolved", 5)]
    for a in d["alerts"]:
        assert set(a) == ALERT_KEYS


def test_unknown_run_is_404_json(fed: Fed) -> None:
    code, body = _http_error(fed.url + "/api/v1/runs/no-such-run")
    assert code == 404
    assert set(body) == {"error"} and "no-such-run" in body["error"]
    code, body = _http_error(fed.url + "/api/v1/nothing-here")
    assert code == 404 and "/api/v1/nothing-here" in body["error"]


def test_run_ids_with_slashes_are_reachable(daemon: Any) -> None:
    run = "team/exp-1:v2"
    ch = grpc.insecure_channel(daemon.grpc_address)
    try:
        call = ch.unary_unary(wire.REPORT_METHOD)
        call(wire.encode_batch(run, 0, "i", 1, [Record("train", run, T0, 0, 4, {"loss": 1.0})]), timeout=30)
    finally:
        ch.close()
    assert http_json(daemon.http_url + "/api/v1/runs/team/exp-1:v2")["last_step"] == 4
    assert http_json(daemon.http_url + "/api/v1/runs/team%2Fexp-1%3Av2")["run"] == run


def test_alerts_api_filters_by_state_and_run(fed: Fed) -> None:
    everything = _strict_json(fed.url + "/api/v1/alerts")
    assert set(everything) == {"alerts"}
    assert everything == _strict_json(fed.url + "/api/v1/alerts?state=all")
    alerts = everything["alerts"]
    assert [a["id"] for a in alerts] == [2, 1]  # newest first
    for a in alerts:
        assert set(a) == ALERT_KEYS
    new, old = alerts
    assert old == {
        "id": 1, "run": "flappy-run", "name": "NonFinite", "severity": "critical", "state": "resolved",
        "rank": None, "step": 5, "started_at": T0 + 105, "resolved_at": T0 + 125,
        "summary": old["summary"], "description": old["description"], "value": "nan", "labels": old["labels"],
        "silenced": False,
    }
    assert "step 5" in old["summary"] and old["description"]
    assert old["labels"]["metric"] == "loss" and old["labels"]["first_rank"] == "0"
    assert "20 consecutive finite steps" in old["labels"]["resolution"]
    assert (new["state"], new["step"], new["started_at"], new["resolved_at"]) == ("firing", 30, T0 + 130, None)

    firing = _strict_json(fed.url + "/api/v1/alerts?state=firing")["alerts"]
    assert [a["id"] for a in firing] == [2]
    resolved = _strict_json(fed.url + "/api/v1/alerts?state=resolved")["alerts"]
    assert [a["id"] for a in resolved] == [1]
    assert _strict_json(fed.url + "/api/v1/alerts?run=flappy-run&state=firing")["alerts"] == firing
    assert _strict_json(fed.url + "/api/v1/alerts?run=http-run")["alerts"] == []
    assert _strict_json(fed.url + "/api/v1/alerts?run=never-seen")["alerts"] == []


@pytest.mark.parametrize("state", ["bogus", "FIRING", "open"])
def test_alerts_api_refuses_a_bad_state(daemon: Any, state: str) -> None:
    code, body = _http_error(daemon.http_url + f"/api/v1/alerts?state={state}")
    assert code == 400
    assert body["error"].startswith("state: ") and "firing, resolved, all" in body["error"]


def test_healthz(fed: Fed) -> None:
    assert _strict_json(fed.url + "/healthz") == {"status": "ok", "runs": 3}


def test_index_lists_endpoints(daemon: Any) -> None:
    eps = _strict_json(daemon.http_url + "/api/v1")["endpoints"]
    assert "/metrics" in eps and "/api/v1/runs" in eps


def test_head_request_has_no_body(daemon: Any) -> None:
    req = urllib.request.Request(daemon.http_url + "/healthz", method="HEAD")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) > 0
        assert r.read() == b""


def test_metrics_carry_the_values_that_were_sent(fed: Fed) -> None:
    with urllib.request.urlopen(fed.url + "/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
    m = metrics(fed.d)
    run = {"run": "http-run"}
    r0 = {"run": "http-run", "rank": "0"}
    r1 = {"run": "http-run", "rank": "1"}
    # run-level values come from the lowest rank
    assert sample(m, "trainguard_train_loss", **run) == pytest.approx(2.0)
    assert sample(m, "trainguard_eval_loss", **run) == 2.4
    assert sample(m, "trainguard_grad_norm", **run) == 1.5
    assert sample(m, "trainguard_learning_rate", **run) == 1e-3
    assert sample(m, "trainguard_step", **run) == 10
    assert sample(m, "trainguard_tokens_per_second", **run) == pytest.approx(2000 + 1000 / 0.6)
    # per-rank series
    assert sample(m, "trainguard_step_duration_seconds", **r0) == 0.5
    assert sample(m, "trainguard_step_duration_seconds", **r1) == pytest.approx(0.6)
    assert sample(m, "trainguard_compute_duration_seconds", **r1) == pytest.approx(0.4)
    assert sample(m, "trainguard_data_wait_seconds", **r0) == 0.01
    assert sample(m, "trainguard_last_seen_timestamp_seconds", **r0) == T0 + 10.5
    assert sample(m, "trainguard_last_seen_timestamp_seconds", **r1) == T0 + 10.3
    assert sample(m, "trainguard_host_memory_rss_bytes", **r0) == 1e9
    assert sample(m, "trainguard_host_memory_rss_bytes", **r1) == 1.1e9
    assert sample(m, "trainguard_gpu_memory_allocated_bytes", **r0) == 2e9
    assert sample(m, "trainguard_gpu_memory_allocated_bytes", **r1) == 2.1e9
    # client counters ride on heartbeats
    assert sample(m, "trainguard_client_dropped_records_total", **r0) == 7
    assert sample(m, "trainguard_client_queued_records_total", **r0) == 100
    assert sample(m, "trainguard_client_sent_records_total", **r0) == 90
    assert sample(m, "trainguard_client_rejected_records_total", **r0) == 1
    assert sample(m, "trainguard_client_retries_total", **r0) == 2
    assert sample(m, "trainguard_client_queue_depth", **r0) == 3
    assert sample(m, "trainguard_client_dropped_records_total", **r1) is None
    # one info series per run
    assert sample(m, "trainguard_run_info", run="http-run", status="running", framework="pytorch-test") == 1
    assert sample(m, "trainguard_run_info", run="done-run", status="completed", framework="") == 1
    assert sample(m, "trainguard_run_world_size", **run) == 2
    assert sample(m, "trainguard_run_ranks_reporting", **run) == 2
    # alerts as metrics
    assert sample(m, "trainguard_alert_active", run="flappy-run", alert="NonFinite", severity="critical") == 1
    assert sample(m, "trainguard_alerts_fired_total", run="flappy-run", alert="NonFinite") == 2
    assert sample(m, "trainguard_train_loss", run="flappy-run") is not None
    assert math.isnan(sample(m, "trainguard_train_loss", run="flappy-run"))  # type: ignore[arg-type]
    assert not any(k[0] == "trainguard_alert_active" and dict(k[1])["run"] == "http-run" for k in m)
    # ingest, rejection and store counters
    n_records = len(_two_rank_run("x")) + 31 + 3
    assert sample(m, "trainguard_ingest_batches_total") == 4
    assert sample(m, "trainguard_ingest_duplicate_batches_total") == 1
    assert sample(m, "trainguard_ingest_records_total", kind="train") == 20 + 30 + 1
    assert sample(m, "trainguard_ingest_records_total", kind="run") == 3
    assert sample(m, "trainguard_ingest_records_total", kind="end") == 1
    assert sample(m, "trainguard_ingest_rejected_records_total", field="kind") == 1
    assert sample(m, "trainguard_ingest_rejected_batches_total", field="batch") == 1
    assert sample(m, "trainguard_ingest_errors_total") == 0
    assert sample(m, "trainguard_store_batches_written_total") == 4
    assert sample(m, "trainguard_store_records_written_total") == n_records
    assert sample(m, "trainguard_store_write_errors_total") == 0
    assert sample(m, "trainguard_store_bytes_written_total") > 0  # type: ignore[operator]
    assert sample(m, "trainguard_runs") == 3
    assert sample(m, "trainguard_build_info", version=__version__, python=platform.python_version()) == 1


def test_metric_names_follow_the_conventions(fed: Fed) -> None:
    fams = list(text_string_to_metric_families(http_text(fed.url + "/metrics")))
    seen = set()
    for fam in fams:
        assert fam.name.startswith("trainguard_")
        for s in fam.samples:
            seen.add(s.name)
            if s.name.endswith("_total"):
                assert fam.type == "counter", s.name
            # no steps, sample ids or free text in labels: only these label names exist
            assert set(s.labels) <= {"run", "rank", "kind", "field", "alert", "severity", "status", "framework",
                                     "detector", "version", "python", "limit"}, s
            if "rank" in s.labels:
                assert "run" in s.labels
    required = {
        "trainguard_train_loss", "trainguard_eval_loss", "trainguard_grad_norm", "trainguard_learning_rate",
        "trainguard_step", "trainguard_tokens_per_second", "trainguard_step_duration_seconds",
        "trainguard_last_seen_timestamp_seconds", "trainguard_host_memory_rss_bytes",
        "trainguard_gpu_memory_allocated_bytes", "trainguard_run_info", "trainguard_alert_active",
        "trainguard_alerts_fired_total", "trainguard_ingest_batches_total", "trainguard_ingest_records_total",
        "trainguard_ingest_duplicate_batches_total", "trainguard_ingest_rejected_records_total",
        "trainguard_ingest_rejected_batches_total", "trainguard_client_dropped_records_total",
        "trainguard_store_batches_written_total", "trainguard_store_records_written_total",
        "trainguard_build_info",
    }
    assert required <= seen, required - seen


def test_metrics_of_an_empty_daemon(daemon: Any) -> None:
    m = metrics(daemon)
    assert sample(m, "trainguard_runs") == 0
    assert sample(m, "trainguard_ingest_batches_total") == 0
    assert not any(k[0] == "trainguard_train_loss" for k in m)
    assert _strict_json(daemon.http_url + "/api/v1/runs") == {"runs": []}
    assert _strict_json(daemon.http_url + "/api/v1/alerts") == {"alerts": []}
