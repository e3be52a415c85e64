"""Notifiers against a real local HTTP receiver: delivery, retries, give-ups, drops, resends, shutdown."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import grpc
import pytest

from monitor import wire
from monitor.daemon.alerts import Alert
from monitor.daemon.notifiers import AlertmanagerNotifier, WebhookNotifier, alertmanager_alert
from monitor.records import Record
from tests.helpers import free_port, metrics, sample, wait_for

T0 = 1_700_000_000.0


class Receiver:
    """A real HTTP server on a free port that records JSON bodies; it can fail or hold requests."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.requests = 0
        self.fail_first = 0  # answer this many requests with `fail_status`
        self.fail_status = 503
        self.release = threading.Event()
        self.release.set()  # cleared: requests wait until it is set again
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.release.wait(10)
                with outer.lock:
                    outer.requests += 1
                    failing = outer.requests <= outer.fail_first
                    if not failing:
                        outer.bodies.append(body)
                self.send_response(outer.fail_status if failing else 200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/hook"
        threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def notifiers() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for n in made:
        n.close(0.5)


def alert(i: int = 1, state: str = "firing", **kw: Any) -> Alert:
    return Alert(i, "run-1", kw.pop("name", "LossSpike"), "warning", state, kw.pop("rank", None), 100 + i, T0 + i,
                 summary=f"loss 9.5 at step {100 + i}", description="why", value=9.5,
                 labels={"baseline": "2.1", "threshold": "4.0", "runbook_url": "https://wiki/LossSpike"}, **kw)


def webhook(receiver: Receiver, made: list[Any], **kw: Any) -> WebhookNotifier:
    kw.setdefault("backoff", 0.02)
    n = WebhookNotifier("webhook-1", receiver.url, **kw)
    n.start()
    made.append(n)
    return n


def test_webhook_posts_the_api_shape_plus_the_event(receiver: Receiver, notifiers: list[Any]) -> None:
    n = webhook(receiver, notifiers)
    a = alert()
    n.notify(a, "firing")
    a.state, a.resolved_at = "resolved", T0 + 50
    n.notify(a, "resolved")
    assert n.flush(5)
    first, second = receiver.bodies
    assert first == {**alert().to_api(), "event": "firing"}
    assert (second["event"], second["state"], second["resolved_at"]) == ("resolved", "resolved", T0 + 50)
    assert (n.sent, n.failed, n.dropped, n.retries, n.queue_depth) == (2, 0, 0, 0, 0)


def test_retries_with_backoff_until_the_receiver_recovers(receiver: Receiver, notifiers: list[Any]) -> None:
    receiver.fail_first = 3
    n = webhook(receiver, notifiers)
    n.notify(alert(), "firing")
    assert n.flush(5)
    assert receiver.requests == 4 and len(receiver.bodies) == 1
    assert (n.sent, n.failed, n.retries) == (1, 0, 3)


def test_gives_up_after_max_attempts_and_counts_it(receiver: Receiver, notifiers: list[Any],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    receiver.fail_first = 100
    n = webhook(receiver, notifiers, max_attempts=3)
    n.notify(alert(), "firing")
    assert n.flush(5) is False  # drained, but not delivered
    assert (receiver.requests, n.sent, n.failed, n.retries) == (3, 0, 1, 2)
    assert "gave up on 1 notification(s) after 3 attempt(s): HTTP 503" in caplog.text


def test_a_refusal_is_not_retried(receiver: Receiver, notifiers: list[Any]) -> None:
    receiver.fail_first, receiver.fail_status = 1, 400
    n = webhook(receiver, notifiers)
    n.notify(alert(1), "firing")
    n.notify(alert(2), "firing")
    assert n.flush(5) is False
    assert (receiver.requests, n.sent, n.failed, n.retries) == (2, 1, 1, 0)


def test_full_queue_drops_the_oldest_counts_it_and_never_blocks(receiver: Receiver, notifiers: list[Any]) -> None:
    receiver.release.clear()  # the receiver hangs: the first notification is stuck in flight
    n = webhook(receiver, notifiers, queue_size=3, timeout=10)
    n.notify(alert(1), "firing")
    wait_for(lambda: n.queue_depth == 0, what="the first notification to be in flight")
    t = time.perf_counter()
    for i in range(2, 502):
        n.notify(alert(i), "firing")
    took = time.perf_counter() - t
    assert took < 0.5, f"notify() took {took / 500 * 1e6:.0f} µs per call with a hung receiver"
    assert (n.queue_depth, n.dropped) == (3, 497)
    receiver.release.set()
    assert n.flush(5)  # what was queued when the flush began was delivered
    assert [b["id"] for b in receiver.bodies] == [1, 499, 500, 501]
    assert (n.sent, n.failed, n.dropped) == (4, 0, 497)


def test_close_gives_up_within_its_timeout_and_counts_what_is_left(notifiers: list[Any]) -> None:
    n = WebhookNotifier("webhook-1", f"http://127.0.0.1:{free_port()}/nobody", backoff=0.05, max_attempts=1000)
    n.start()
    for i in range(5):
        n.notify(alert(i), "firing")
    t = time.monotonic()
    assert n.close(0.5) is False
    assert time.monotonic() - t < 2.0
    assert n.sent == 0 and n.failed + n.dropped == 5 and n.failed >= 1
    n.notify(alert(9), "firing")  # after close: counted, not lost silently
    assert n.dropped + n.failed == 6


def test_alertmanager_payload() -> None:
    now = time.time()
    a = alert(rank=3).to_api()
    p = alertmanager_alert(a, "firing", now, 240.0, "http://tg:9750/api/v1/alerts?run=run-1")
    assert p["labels"] == {"alertname": "LossSpike", "run": "run-1", "severity": "warning", "rank": "3"}
    assert p["annotations"] == {"summary": "loss 9.5 at step 101", "description": "why", "step": "101", "value": "9.5",
                                "baseline": "2.1", "threshold": "4.0", "runbook_url": "https://wiki/LossSpike"}
    assert p["startsAt"] == "2023-11-14T22:13:21.000Z"
    assert p["generatorURL"] == "http://tg:9750/api/v1/alerts?run=run-1"
    ends = time.mktime(time.strptime(p["endsAt"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert 230 < ends - now < 250
    r = alertmanager_alert({**a, "rank": None, "value": "nan", "started_at": now + 60}, "resolved", now, 240.0, "x")
    assert "rank" not in r["labels"] and r["annotations"]["value"] == "nan"
    assert r["startsAt"] == r["endsAt"]  # a clock running ahead is clamped; resolved ends now


def test_alertmanager_notifier_resends_what_fires_and_sends_resolves_once(receiver: Receiver,
                                                                          notifiers: list[Any]) -> None:
    n = AlertmanagerNotifier("alertmanager-1", receiver.url.removesuffix("/hook"), resend_interval=0.2,
                             external_url="http://tg.example:9750", backoff=0.02)
    n.start()
    notifiers.append(n)
    assert n.url.endswith("/api/v2/alerts")
    receiver.url = n.url
    n.notify(alert(1), "firing")
    wait_for(lambda: len(receiver.bodies) >= 3, timeout=5, what="two resends")
    assert all(b[0]["labels"]["alertname"] == "LossSpike" for b in receiver.bodies)
    assert receiver.bodies[0][0]["generatorURL"] == "http://tg.example:9750/api/v1/alerts?run=run-1"
    a = alert(1)
    a.state = "resolved"
    n.notify(a, "resolved")
    assert n.flush(5)
    last = receiver.bodies[-1][0]
    assert last["startsAt"] < last["endsAt"] <= time.strftime("%Y-%m-%dT%H:%M:%S.999Z", time.gmtime())
    count = len(receiver.bodies)
    time.sleep(0.5)
    assert len(receiver.bodies) == count  # nothing fires: nothing is resent
    # sync() replaces the resend set (the alert manager leaves silenced alerts out of it)
    n.sync([alert(2)])
    wait_for(lambda: len(receiver.bodies) > count, timeout=5, what="a resend after sync")
    assert receiver.bodies[-1][0]["annotations"]["step"] == "102"


def test_daemon_wires_webhooks_exports_counters_and_flushes_at_shutdown(daemon_factory: Any,
                                                                        receiver: Receiver) -> None:
    d = daemon_factory(webhook_urls=[receiver.url], notify_backoff=0.02)
    recs = [Record("train", "w", T0 + s, 0, s, {"loss": math.nan if s == 3 else 1.0}) for s in range(1, 5)]
    receiver.fail_first = 1
    with grpc.insecure_channel(d.grpc_address) as ch:
        ch.unary_unary(wire.REPORT_METHOD)(wire.encode_batch("w", 0, "inc", 1, recs), timeout=10)
    assert d.flush(5)
    assert [(b["event"], b["run"], b["name"], b["step"], b["value"]) for b in receiver.bodies] == \
        [("firing", "w", "NonFinite", 3, "nan")]
    m = metrics(d)
    assert sample(m, "trainguard_notifications_total", notifier="webhook-1", outcome="sent") == 1
    assert sample(m, "trainguard_notifications_total", notifier="webhook-1", outcome="failed") == 0
    assert sample(m, "trainguard_notifications_total", notifier="webhook-1", outcome="dropped") == 0
    assert sample(m, "trainguard_notification_retries_total", notifier="webhook-1") == 1
    assert sample(m, "trainguard_notifier_queue_depth", notifier="webhook-1") == 0
    # A transition queued just before shutdown is still delivered: close() flushes first.
    receiver.release.clear()
    d.alerts.resolve_run("w", T0 + 10, "run expired")
    threading.Timer(0.2, receiver.release.set).start()
    d.close()
    assert [b["event"] for b in receiver.bodies] == ["firing", "resolved"]
