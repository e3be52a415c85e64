"""HTTP on one port: /metrics, /healthz and the JSON API under /api/v1."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from monitor.daemon.alerts import SilenceError, json_number

log = logging.getLogger("trainguard.http")
_SEVERITY = {"info": 1, "warning": 2, "critical": 3}
# "all" is every alert that fired; pending ones (waiting for their `for`) are listed on their own.
ALERT_STATES = ("firing", "resolved", "all", "pending")
SILENCE_STATES = ("active", "expired", "all")
MAX_BODY = 64 * 1024


class ApiError(Exception):
    """An HTTP error with a JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def run_health(alerts: list[Any]) -> str:
    """ok, or the highest severity among a run's firing alerts."""
    worst = max((_SEVERITY.get(a.severity, 0) for a in alerts), default=0)
    return {0: "ok", 1: "info", 2: "warning", 3: "critical"}[worst]


def run_summary(d: Any, st: Any) -> dict[str, Any]:
    """A run as listed by GET /api/v1/runs (caller holds st.lock)."""
    active = [a for a in d.alerts.active() if a.run == st.run]
    return {
        "run": st.run, "world_size": st.effective_world_size,
        "ranks_reporting": st.ranks_reporting(d.config.rank_silent_after), "last_step": st.last_step(),
        "last_seen": st.clock or None, "status": st.status, "health": run_health(active),
    }


def run_detail(d: Any, st: Any) -> dict[str, Any]:
    """A run with per-rank detail and its recent alerts."""
    with st.lock:
        out = run_summary(d, st)
        lead = st.lead_rank("train")
        eval_lead = st.lead_rank("eval")
        out["first_seen"] = st.first_t
        out["records"] = st.records
        out["meta"] = st.meta
        out["values"] = {
            "train": {k: json_number(v) for k, v in (lead.latest.get("train", {}) if lead else {}).items()},
            "eval": {k: json_number(v) for k, v in (eval_lead.latest.get("eval", {}) if eval_lead else {}).items()},
        }
        ranks = []
        for r in sorted(st.ranks):
            rs = st.ranks[r]
            ranks.append({
                "rank": r, "last_step": rs.last_step, "heartbeat_step": rs.heartbeat_step,
                "last_seen": rs.last_t or None, "status": rs.status or "running", "records": rs.records,
                "step_time_seconds": json_number(rs.value("train", "step_time_seconds")),
                "compute_time_seconds": json_number(rs.value("train", "compute_time_seconds")),
                "tokens_per_second": json_number(rs.tokens_per_second()),
                "host_rss_bytes": json_number(rs.value("system", "host_rss_bytes")),
                "gpu_memory_allocated_bytes": json_number(rs.value("system", "gpu_memory_allocated_bytes")),
                "client": {k: json_number(v) for k, v in rs.client.items()},
            })
        out["ranks"] = ranks
    out["alerts"] = [d.alerts.to_api(a) for a in d.alerts.alerts(run=st.run)[:50]]
    return out


class _Handler(BaseHTTPRequestHandler):
    server_version = "trainguard"
    daemon: Any = None  # set on the subclass built per server

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: scrapes every few seconds
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode() + b"\n", "application/json")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _body(self) -> Any:
        """The request's JSON body (ApiError 400/413 when it is missing, too big or not JSON)."""
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "Content-Length: not a number") from None
        if n > MAX_BODY:
            # Read a moderately big body so the client sees our answer rather than a reset connection.
            if n <= 16 * MAX_BODY:
                self.rfile.read(n)
            else:
                self.close_connection = True
            raise ApiError(413, f"body: at most {MAX_BODY} bytes, got {n}")
        raw = self.rfile.read(n) if n > 0 else b""
        if not raw:
            raise ApiError(400, "body: expected a JSON object")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"body: not valid JSON ({e})") from None

    def _silence_id(self, path: str) -> int:
        raw = unquote(path[len("/api/v1/silences/"):])
        try:
            return int(raw)
        except ValueError:
            raise ApiError(400, f"silence id: {raw!r} is not a number") from None

    def _guard(self, path: str, fn: Any) -> None:
        try:
            fn()
        except ApiError as e:
            self._json(e.status, {"error": e.message})
        except BrokenPipeError:
            pass
        except Exception as e:  # noqa: BLE001
            log.exception("HTTP %s %s failed", self.command, path)
            try:
                self._json(500, {"error": f"internal error: {e}"})
            except OSError:
                pass

    def do_POST(self) -> None:  # noqa: N802
        d = self.daemon
        path = urlsplit(self.path).path

        def handle() -> None:
            if path != "/api/v1/silences":
                raise ApiError(404 if not path.startswith("/api/v1/silences/") else 405,
                               f"no such endpoint for POST: {path}")
            body = self._body()
            try:
                s = d.silences.create(body)
            except SilenceError as e:
                raise ApiError(400, str(e)) from None
            log.info("silence %d created by %s: run %s, alert %s, until %.0f: %s", s.id, s.created_by or "-",
                     s.run, s.alert, s.ends_at, s.comment)
            self._json(200, {"id": s.id, "silence": s.to_api(s.created_at)})

        self._guard(path, handle)

    def do_DELETE(self) -> None:  # noqa: N802
        d = self.daemon
        path = urlsplit(self.path).path

        def handle() -> None:
            if not path.startswith("/api/v1/silences/"):
                raise ApiError(404, f"no such endpoint for DELETE: {path}")
            sid = self._silence_id(path)
            s = d.silences.expire(sid)
            if s is None:
                raise ApiError(404, f"silence {sid} does not exist")
            log.info("silence %d expired", sid)
            # Whatever it held back and still fires is announced now, not at the next evaluation.
            d.alerts.sweep()
            self._json(200, {"silence": s.to_api(time.time())})

        self._guard(path, handle)

    def do_GET(self) -> None:  # noqa: N802
        d = self.daemon
        parts = urlsplit(self.path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            if path == "/metrics":
                self._send(200, generate_latest(d.metrics_registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                if d.serving:
                    self._json(200, {"status": "ok", "runs": len(d.registry.runs)})
                else:
                    self._json(503, {"status": "shutting down"})
            elif path == "/api/v1/runs":
                runs = []
                for st in d.registry.snapshot():
                    with st.lock:
                        runs.append(run_summary(d, st))
                runs.sort(key=lambda r: r["last_seen"] or 0, reverse=True)
                self._json(200, {"runs": runs})
            elif path.startswith("/api/v1/runs/"):
                run = unquote(path[len("/api/v1/runs/"):])
                st = d.registry.get(run)
                if st is None:
                    raise ApiError(404, f"run {run!r} is not live on this daemon")
                self._json(200, run_detail(d, st))
            elif path == "/api/v1/alerts":
                state = query.get("state", "all")
                if state not in ALERT_STATES:
                    raise ApiError(400, f"state: {state!r} is not one of {', '.join(ALERT_STATES)}")
                self._json(200, {"alerts": d.list_alerts(query.get("run"), None if state == "all" else state)})
            elif path == "/api/v1/silences":
                state = query.get("state", "active")
                if state not in SILENCE_STATES:
                    raise ApiError(400, f"state: {state!r} is not one of {', '.join(SILENCE_STATES)}")
                now = time.time()
                self._json(200, {"silences": [s.to_api(now) for s in d.silences.list(state, now)]})
            elif path.startswith("/api/v1/silences/"):
                s = d.silences.get(self._silence_id(path))
                if s is None:
                    raise ApiError(404, f"silence {path.rsplit('/', 1)[-1]} does not exist")
                self._json(200, {"silence": s.to_api(time.time())})
            elif path in ("/", "/api/v1"):
                self._json(200, {"endpoints": ["/metrics", "/healthz", "/api/v1/runs", "/api/v1/runs/{run}",
                                               "/api/v1/alerts?run=RUN&state=firing|resolved|all|pending",
                                               "/api/v1/silences?state=active|expired|all",
                                               "POST /api/v1/silences", "DELETE /api/v1/silences/{id}"]})
            else:
                raise ApiError(404, f"no such endpoint: {path}")
        except ApiError as e:
            self._json(e.status, {"error": e.message})
        except BrokenPipeError:
            pass
        except Exception as e:  # noqa: BLE001
            log.exception("HTTP %s failed", path)
            try:
                self._json(500, {"error": f"internal error: {e}"})
            except OSError:
                pass


class HttpServer:
    """The daemon's HTTP endpoint on its own thread."""

    def __init__(self, daemon: Any, host: str, port: int):
        handler = type("Handler", (_Handler,), {"daemon": daemon})
        ThreadingHTTPServer.allow_reuse_address = True
        self._srv = ThreadingHTTPServer((host, port), handler)
        self._srv.daemon_threads = True
        self.port = self._srv.server_address[1]
        # A short poll keeps close() quick; serve_forever's default 0.5 s wait is pure shutdown latency.
        self._thread = threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="trainguard-http", daemon=True)

    def start(self) -> None:
        """Serve on a background thread."""
        self._thread.start()

    def close(self) -> None:
        """Stop serving."""
        self._srv.shutdown()
        self._srv.server_close()


def make_registry(collector: Any) -> CollectorRegistry:
    """A registry holding only trainguard's collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg
