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


def test_an_alert_that_fired_and_resolved_before_a_kill_does_not_fire_again(daemon_process) -> None:
    # The NaN fires NonFinite and 30 finite steps resolve it, all before the first periodic save of the
    # detectors' state: the restart applies these batches through the detectors again, and finds the
    # same NaN a second time.
    dp = daemon_process.start()
    t = time.time()
    recs = [Record("train", "replayed", t + i, 0, i, {"loss": math.nan if i == 6 else 1.0}) for i in range(1, 40)]
    with grpc.insecure_channel(dp.address) as ch:
        send = ch.unary_unary(wire.REPORT_METHOD)
        for seq, lo in enumerate(range(0, len(recs), 3), start=1):
            assert wire.decode_response(send(wire.encode_batch("replayed", 0, "inc-1", seq, recs[lo:lo + 3]),
                                             timeout=10)).accepted == len(recs[lo:lo + 3])
    before = http_json(dp.url + "/api/v1/alerts?run=replayed&state=all")["alerts"]
    assert [(a["name"], a["step"], a["state"]) for a in before] == [("NonFinite", 6, "resolved")]
    dp.kill()
    dp.start()
    after = http_json(dp.url + "/api/v1/alerts?run=replayed&state=all")["alerts"]
    assert [(a["id"], a["name"], a["state"]) for a in after] == [(before[0]["id"], "NonFinite", "resolved")]
    # A new NaN after the restart is a new alert.
    with grpc.insecure_channel(dp.address) as ch:
        nan = [Record("train", "replayed", t + 41, 0, 41, {"loss": math.nan})]
        assert wire.decode_response(ch.unary_unary(wire.REPORT_METHOD)(
            wire.encode_batch("replayed", 0, "inc-1", 100, nan), timeout=10)).accepted == 1
    names = [(a["name"], a["step"], a["state"]) for a in http_json(dp.url + "/api/v1/alerts?run=replayed&state=all")["alerts"]]
    assert sorted(names, key=lambda x: x[1]) == [("NonFinite", 6, "resolved"), ("NonFinite", 41, "firing")]
