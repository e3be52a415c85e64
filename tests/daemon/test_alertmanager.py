"""A real Alertmanager on loopback: a NaN trace replayed through the daemon pages, and the page resolves.

The chain under test is daemon -> Alertmanager v2 API -> Alertmanager's routing -> its webhook
receiver (a local HTTP server here), exactly as in production. `make test` installs the Debian
package that provides the binary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from monitor.replay import replay
from tests.helpers import TRACES, free_port, http_json, wait_for

NONFINITE = TRACES / "cpu" / "cpu-nonfinite-01.jsonl.gz"
BINARY = "prometheus-alertmanager"


class Hook:
    """Alertmanager's webhook receiver: a real HTTP server that keeps every notification it gets."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                outer.notifications.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/alerts"
        threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def received(self, status: str, alertname: str) -> list[dict[str, Any]]:
        """Alerts named `alertname` in the notifications with this status (firing or resolved)."""
        return [a for n in list(self.notifications) if n["status"] == status for a in n["alerts"]
                if a["labels"]["alertname"] == alertname]

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


@pytest.fixture
def alertmanager(tmp_path: Path, hook: Hook) -> Iterator[str]:
    """A real Alertmanager on a free loopback port, routing everything to `hook` within about a second."""
    binary = shutil.which(BINARY) or (f"/usr/bin/{BINARY}" if Path(f"/usr/bin/{BINARY}").exists() else None)
    if binary is None:
        pytest.fail(f"{BINARY} is not installed; `make test` installs it (Debian package prometheus-alertmanager: "
                    "sudo apt-get install prometheus-alertmanager)", pytrace=False)
    cfg = tmp_path / "alertmanager.yml"
    cfg.write_text(f"""
route:
  receiver: hook
  group_by: [alertname, run]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: {hook.url}
        send_resolved: true
""")
    port = free_port()
    log = open(tmp_path / "alertmanager.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.path={tmp_path / 'am-data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"alertmanager exited: {(tmp_path / 'alertmanager.log').read_text()}")
        try:
            http_json(url + "/api/v2/status", timeout=1)
            return True
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_for(ready, timeout=15, interval=0.05, what="alertmanager to listen")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_nan_trace_pages_through_alertmanager_and_resolves(alertmanager: str, hook: Hook,
                                                           daemon_factory: Any) -> None:
    # The trace ends with the run's `end` record; a short expiry forgets the finished run soon after,
    # which resolves its alert.
    d = daemon_factory(alertmanager_urls=[alertmanager], expire_finished_after=1.5, janitor_interval=0.2,
                       alert_eval_interval=0.1, external_url="http://trainguard.example:9750",
                       runbook_url="https://runbooks.example/{alert}")
    res = replay([str(NONFINITE)], d.grpc_address, progress=False)
    assert res.rejected == 0

    firing = wait_for(lambda: hook.received("firing", "NonFinite"), timeout=15, interval=0.1,
                      what="the firing notification")
    a = firing[0]
    assert a["labels"] == {"alertname": "NonFinite", "run": "cpu-nonfinite-01", "severity": "critical"}
    assert "loss is nan at step 610" in a["annotations"]["summary"]
    assert a["annotations"]["step"] == "610" and a["annotations"]["value"] == "nan"
    assert a["annotations"]["runbook_url"] == "https://runbooks.example/NonFinite"
    assert a["generatorURL"] == "http://trainguard.example:9750/api/v1/alerts?run=cpu-nonfinite-01"
    # Alertmanager holds it as active, with the end we gave it still ahead
    held = http_json(alertmanager + "/api/v2/alerts?filter=alertname%3D%22NonFinite%22")
    assert [(x["status"]["state"], x["labels"]["run"]) for x in held] == [("active", "cpu-nonfinite-01")]
    assert held[0]["endsAt"] > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 60))

    resolved = wait_for(lambda: hook.received("resolved", "NonFinite"), timeout=15, interval=0.1,
                        what="the resolved notification after the run expired")
    assert resolved[0]["labels"]["alertname"] == "NonFinite" and resolved[0]["status"] == "resolved"
    alerts = http_json(d.http_url + "/api/v1/alerts?run=cpu-nonfinite-01")["alerts"]
    assert [(x["state"], x["step"]) for x in alerts if x["name"] == "NonFinite"] == [("resolved", 610)]
    n = d.notifiers[0]
    assert (n.name, n.failed, n.dropped) == ("alertmanager-1", 0, 0) and n.sent >= 2
