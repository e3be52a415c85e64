"""A daemon killed right after it acknowledged a new run's first batch still knows the run after a restart."""

from __future__ import annotations

import math
import time

import grpc

from monitor import wire
from monitor.records import Record
from tests.helpers import http_json


def test_run_killed_before_any_summary_save_is_restored(daemon_process) -> None:
    dp = daemon_process.start()
    t = time.time()
    recs = [Record("train", "fresh-run", t + i, 0, i, {"loss": 1.0}) for i in range(1, 6)]
    recs.append(Record("train", "fresh-run", t + 6, 0, 6, {"loss": math.nan}))
    with grpc.insecure_channel(dp.address) as ch:
        resp = wire.decode_response(ch.unary_unary(wire.REPORT_METHOD)(
            wire.encode_batch("fresh-run", 0, "inc-1", 1, recs), timeout=10))
    assert resp.accepted == 6
    dp.kill()  # well within the janitor's 5 s: no periodic save has happened
    dp.start()
    runs = {r["run"]: r for r in http_json(dp.url + "/api/v1/runs")["runs"]}
    assert runs["fresh-run"]["last_step"] == 6
    alerts = http_json(dp.url + "/api/v1/alerts?run=fresh-run")["alerts"]
    assert [(a["name"], a["step"], a["state"]) for a in alerts] == [("NonFinite", 6, "firing")]
    # The resend of that batch is still recognised after the restart.
    with grpc.insecure_channel(dp.address) as ch:
        again = wire.decode_response(ch.unary_unary(wire.REPORT_METHOD)(
            wire.encode_batch("fresh-run", 0, "inc-1", 1, recs), timeout=10))
    assert again.duplicate
    assert http_json(dp.url + "/api/v1/runs/fresh-run")["records"] == 6
