"""Finished and silent runs are forgotten after their time; the store keeps them."""

from __future__ import annotations

import math
import time

from monitor.daemon.store import Store
from monitor.records import Record
from monitor import wire
from tests.helpers import http_json, http_text


def send(d, run: str, recs: list[Record], seq: int = 1) -> None:
    import grpc

    with grpc.insecure_channel(d.grpc_address) as ch:
        ch.unary_unary(wire.REPORT_METHOD)(wire.encode_batch(run, 0, "inc", seq, recs), timeout=10)


def test_finished_and_silent_runs_expire(daemon_factory) -> None:
    d = daemon_factory(expire_finished_after=100.0, expire_silent_after=1000.0)
    t = time.time()
    send(d, "done", [Record("train", "done", t, 0, 1, {"loss": math.nan}), Record("end", "done", t + 1, 0, 1,
                                                                                  status="failed")])
    send(d, "quiet", [Record("train", "quiet", t, 0, 1, {"loss": 1.0})])
    assert {r["run"]: r["status"] for r in http_json(d.http_url + "/api/v1/runs")["runs"]} == \
        {"done": "failed", "quiet": "running"}
    now = time.monotonic()
    assert d.expire(now + 50) == []
    assert d.expire(now + 150) == ["done"]
    assert [r["run"] for r in http_json(d.http_url + "/api/v1/runs")["runs"]] == ["quiet"]
    assert d.expire(now + 1500) == ["quiet"]
    assert http_json(d.http_url + "/api/v1/runs")["runs"] == []
    assert "trainguard_runs_expired_total 2.0" in http_text(d.http_url + "/metrics")
    # The alert of the expired run was resolved, and the API still finds it in the store.
    alerts = http_json(d.http_url + "/api/v1/alerts?run=done")["alerts"]
    assert [(a["name"], a["state"], a["step"]) for a in alerts] == [("NonFinite", "resolved", 1)]
    d.flush()
    rows = {r["run"]: r for r in Store(d.config.db).load_runs(include_expired=True)}
    assert rows["done"]["expired"] and rows["done"]["status"] == "failed"
    assert rows["quiet"]["expired"]
