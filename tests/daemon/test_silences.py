"""Silences over the HTTP API: create, list, expire, validation, persistence, and what they hold back."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from monitor import wire
from monitor.records import Record
from tests.daemon.test_notifiers import Receiver, receiver  # noqa: F401 - the fixture
from tests.helpers import http_json, metrics, sample, wait_for

T0 = 1_700_000_000.0


def call(url: str, method: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["Content-Type"] == "application/json"
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        assert e.headers["Content-Type"] == "application/json"
        return e.code, json.load(e)


def test_create_list_expire(daemon: Any) -> None:
    url = daemon.http_url + "/api/v1/silences"
    before = time.time()
    code, body = call(url, "POST", {"run": "run-a", "alert": "LossSpike", "duration_seconds": 7200,
                                    "comment": "known bad shard", "created_by": "ana"})
    assert code == 200 and body["id"] == 1
    s = body["silence"]
    assert (s["run"], s["alert"], s["state"], s["comment"], s["created_by"]) == \
        ("run-a", "LossSpike", "active", "known bad shard", "ana")
    assert before <= s["starts_at"] <= time.time() and s["ends_at"] == pytest.approx(s["starts_at"] + 7200)
    code, body = call(url, "POST", {"alert": "MemoryLeak", "ends_at": time.time() + 60})
    assert code == 200 and body["silence"]["run"] == "*"
    assert [x["id"] for x in http_json(url)["silences"]] == [2, 1]
    assert http_json(url + "/1")["silence"]["comment"] == "known bad shard"
    assert sample(metrics(daemon), "trainguard_silences_active") == 2

    code, body = call(url + "/1", "DELETE")
    assert code == 200 and body["silence"]["state"] == "expired" and body["silence"]["ends_at"] <= time.time()
    assert call(url + "/1", "DELETE")[0] == 200  # ending an ended silence is fine
    assert [x["id"] for x in http_json(url)["silences"]] == [2]
    assert [x["id"] for x in http_json(url + "?state=expired")["silences"]] == [1]
    assert [x["id"] for x in http_json(url + "?state=all")["silences"]] == [2, 1]
    assert sample(metrics(daemon), "trainguard_silences_active") == 1
    assert call(url + "/99", "DELETE") == (404, {"error": "silence 99 does not exist"})
    assert call(url + "/abc", "DELETE")[0] == 400
    assert call(url + "?state=open", "GET")[0] == 400


@pytest.mark.parametrize("body,named", [
    ({"run": "r", "alert": "LosSpike", "duration_seconds": 60}, "alert: must be an alert name"),
    ({"run": "bad run!", "duration_seconds": 60}, "run: must be a run id"),
    ({"run": "r"}, "give either duration_seconds or ends_at"),
    ({"run": "r", "duration_seconds": 60, "ends_at": 2e9}, "give either duration_seconds or ends_at"),
    ({"run": "r", "duration_seconds": -5}, "duration_seconds: must be a positive number"),
    ({"run": "r", "duration_seconds": 1e9}, "duration_seconds: at most 90 days"),
    ({"run": "r", "ends_at": 1000.0}, "ends_at: 1000.0 is in the past"),
    ({"run": "r", "duration_seconds": 60, "comment": 5}, "comment: must be text"),
    ({"run": "r", "duration_seconds": 60, "matchers": []}, "matchers: unknown field"),
    ([1, 2], "body: expected a JSON object"),
])
def test_bad_requests_name_the_field(daemon: Any, body: Any, named: str) -> None:
    code, res = call(daemon.http_url + "/api/v1/silences", "POST", body)
    assert code == 400 and named in res["error"], res
    assert http_json(daemon.http_url + "/api/v1/silences?state=all")["silences"] == []


def test_bad_bodies_and_methods(daemon: Any) -> None:
    url = daemon.http_url + "/api/v1/silences"
    assert call(url, "POST", raw=b"{not json")[1]["error"].startswith("body: not valid JSON")
    assert call(url, "POST", raw=b"")[0] == 400
    assert call(url, "POST", raw=b"x" * 70000)[0] == 413
    assert call(daemon.http_url + "/api/v1/alerts", "POST", {})[0] == 404
    assert call(daemon.http_url + "/api/v1/runs", "DELETE")[0] == 404


def test_silences_survive_a_restart(daemon_factory: Any, tmp_path: Path) -> None:
    db = str(tmp_path / "keep.db")
    d = daemon_factory(db=db)
    call(d.http_url + "/api/v1/silences", "POST", {"run": "r", "duration_seconds": 3600, "comment": "c"})
    call(d.http_url + "/api/v1/silences", "POST", {"run": "r2", "duration_seconds": 3600})
    call(d.http_url + "/api/v1/silences/2", "DELETE")
    d.close(timeout=1.0)
    again = daemon_factory(db=db)
    got = http_json(again.http_url + "/api/v1/silences?state=all")["silences"]
    assert [(s["id"], s["run"], s["state"], s["comment"]) for s in got] == \
        [(2, "r2", "expired", ""), (1, "r", "active", "c")]
    _, body = call(again.http_url + "/api/v1/silences", "POST", {"run": "r3", "duration_seconds": 60})
    assert body["id"] == 3  # ids are never reused


def test_silenced_alert_shows_but_is_sent_only_when_the_silence_ends(daemon_factory: Any,
                                                                    receiver: Receiver) -> None:  # noqa: F811
    d = daemon_factory(webhook_urls=[receiver.url], notify_backoff=0.02, alert_eval_interval=0.05)
    _, body = call(d.http_url + "/api/v1/silences", "POST",
                   {"run": "quiet", "alert": "NonFinite", "duration_seconds": 600})
    for i, run in enumerate(("quiet", "loud"), 1):
        recs = [Record("train", run, T0 + s, 0, s, {"loss": math.nan if s == 2 else 1.0}) for s in range(1, 4)]
        with grpc.insecure_channel(d.grpc_address) as ch:
            ch.unary_unary(wire.REPORT_METHOD)(wire.encode_batch(run, 0, "inc", 1, recs), timeout=10)
    assert d.flush(5)
    time.sleep(0.2)  # a few evaluation rounds: the silence must keep holding it back
    assert d.flush(5)
    assert [(b["run"], b["event"]) for b in receiver.bodies] == [("loud", "firing")]
    quiet = http_json(d.http_url + "/api/v1/alerts?run=quiet")["alerts"]
    assert [(a["name"], a["state"], a["silenced"]) for a in quiet] == [("NonFinite", "firing", True)]
    loud = http_json(d.http_url + "/api/v1/alerts?run=loud&state=firing")["alerts"]
    assert loud[0]["silenced"] is False
    assert http_json(d.http_url + "/api/v1/runs/quiet")["health"] == "critical"
    assert sample(metrics(d), "trainguard_alert_active", run="quiet", alert="NonFinite", severity="critical") == 1

    call(d.http_url + f"/api/v1/silences/{body['id']}", "DELETE")
    wait_for(lambda: len(receiver.bodies) == 2, timeout=5, what="the held-back alert to be sent")
    assert (receiver.bodies[1]["run"], receiver.bodies[1]["event"], receiver.bodies[1]["silenced"]) == \
        ("quiet", "firing", False)
    assert http_json(d.http_url + "/api/v1/alerts?run=quiet")["alerts"][0]["silenced"] is False
