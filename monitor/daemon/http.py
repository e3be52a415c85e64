"""HTTP on one port: /metrics, /healthz and the JSON API under /api/v1."""

from __future__ import annotations

import json
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from monitor.daemon.alerts import SilenceError, json_number
from monitor.daemon.auth import Principal, Refused, readable

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

    @classmethod
    def refused(cls, e: Refused) -> "ApiError":
        """401 for no (or no known) token, 403 for one that may not do this."""
        return cls(401 if e.unauthenticated else 403, e.message)


class RunFiltered:
    """The metrics of the runs a reader may see: samples with another run's `run` label are left out."""

    def __init__(self, registry: Any, allow: Any):
        self.registry = registry
        self.allow = allow

    def collect(self) -> Any:
        for fam in self.registry.collect():
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            out.samples = [smp for smp in fam.samples if "run" not in smp.labels or self.allow(smp.labels["run"])]
            yield out


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
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="trainguard"')
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode() + b"\n", "application/json")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    # A client has http_timeout_seconds to send each request, however slowly its bytes trickle in
    # (the socket timeout alone restarts with every byte); the server's reaper cuts it off after that.
    def handle_one_request(self) -> None:
        self.server.reading(self.connection, True)
        try:
            super().handle_one_request()
        finally:
            self.server.reading(self.connection, False)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.reading(self.connection, False)
        return ok

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
        self.server.reading(self.connection, True)
        try:
            raw = self.rfile.read(n) if n > 0 else b""
        finally:
            self.server.reading(self.connection, False)
        if not raw:
            raise ApiError(400, "body: expected a JSON object")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"body: not valid JSON ({e})") from None
        except RecursionError:
            raise ApiError(400, "body: JSON nested too deeply; expected a flat object") from None

    def _who(self) -> Principal | None:
        """The caller's principal (None when authentication is off); ApiError 401 without a known token."""
        try:
            return self.daemon.auth.authenticate(self.headers.get("Authorization"), "http")
        except Refused as e:
            raise ApiError.refused(e) from None

    def _may(self, who: Principal | None, run: str, write: bool = False) -> None:
        """ApiError 403 unless `who` may read (or write) `run`."""
        try:
            self.daemon.auth.require(who, run, write, "http")
        except Refused as e:
            raise ApiError.refused(e) from None

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
            who = self._who()
            body = self._body()
            if who is not None and isinstance(body, dict):
                run = body.get("run", "*")
                if isinstance(run, str):  # anything else is refused by create(), naming the field
                    self._may(who, run, write=True)
                if "created_by" not in body:
                    body = {**body, "created_by": who.name}
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
            who = self._who()
            sid = self._silence_id(path)
            if who is not None:
                found = d.silences.get(sid)
                if found is not None:
                    self._may(who, found.run, write=True)
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
            open_path = (path == "/metrics" and d.auth.metrics_open) or (path == "/healthz" and d.auth.healthz_open)
            who = None if open_path else self._who()
            allow = readable(who)
            if path == "/metrics":
                registry = d.metrics_registry if who is None or who.every_run else RunFiltered(d.metrics_registry,
                                                                                              allow)
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, why = d.health()
                if ok:
                    self._json(200, {"status": "ok", "runs": len(d.registry.runs)})
                elif not d.serving:
                    self._json(503, {"status": "shutting down"})
                else:
                    # Metrics and alerts still work; what fails is storing, so nothing new is acknowledged.
                    self._json(503, {"status": "unhealthy", "reason": why, "runs": len(d.registry.runs)})
            elif path == "/api/v1/runs":
                runs = []
                for st in d.registry.snapshot():
                    if not allow(st.run):
                        continue
                    with st.lock:
                        runs.append(run_summary(d, st))
                runs.sort(key=lambda r: r["last_seen"] or 0, reverse=True)
                self._json(200, {"runs": runs})
            elif path.startswith("/api/v1/runs/"):
                run = unquote(path[len("/api/v1/runs/"):])
                self._may(who, run)
                st = d.registry.get(run)
                if st is None:
                    raise ApiError(404, f"run {run!r} is not live on this daemon")
                self._json(200, run_detail(d, st))
            elif path == "/api/v1/alerts":
                state = query.get("state", "all")
                if state not in ALERT_STATES:
                    raise ApiError(400, f"state: {state!r} is not one of {', '.join(ALERT_STATES)}")
                if query.get("run") is not None:
                    self._may(who, query["run"])
                alerts = d.list_alerts(query.get("run"), None if state == "all" else state)
                self._json(200, {"alerts": [a for a in alerts if allow(a["run"])]})
            elif path == "/api/v1/silences":
                state = query.get("state", "active")
                if state not in SILENCE_STATES:
                    raise ApiError(400, f"state: {state!r} is not one of {', '.join(SILENCE_STATES)}")
                now = time.time()
                self._json(200, {"silences": [s.to_api(now) for s in d.silences.list(state, now)
                                              if s.run == "*" or allow(s.run)]})
            elif path.startswith("/api/v1/silences/"):
                s = d.silences.get(self._silence_id(path))
                if s is None:
                    raise ApiError(404, f"silence {path.rsplit('/', 1)[-1]} does not exist")
                if s.run != "*":
                    self._may(who, s.run)
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


class _Server(HTTPServer):
    """An HTTPServer with a deep backlog, a fixed pool of handler threads and deadlines for slow clients.

    A connection gets a thread only once its first bytes arrive: until then it waits in a selector,
    costing a file descriptor, and is closed after `request_timeout`. So idle or silent clients
    never take a thread (800 of them once made 815 threads), and a thread that starts on a request
    has `request_timeout` to receive all of it, however slowly its bytes trickle in (a plain
    socket timeout restarts with every byte); the reaper cuts off the late ones.
    """

    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: Any, backlog: int, timeout: float, max_connections: int,
                 ssl_context: ssl.SSLContext | None = None, on_handshake_failure: Any = None):
        self.ssl_context = ssl_context
        self.on_handshake_failure = on_handshake_failure
        # The listen backlog is read when the socket starts listening, inside __init__. The default
        # of 5 made a burst of scrapers wait for SYN retries; a deep one lets them queue.
        self.request_queue_size = backlog
        self.request_timeout = timeout
        self.max_waiting = backlog
        self._sel = selectors.DefaultSelector()
        self._waiting: dict[socket.socket, tuple[float, Any]] = {}  # waiting for a first byte: deadline, address
        self._reading: dict[socket.socket, float] = {}  # a thread is receiving its request: deadline
        self._lock = threading.Lock()
        self._ready: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue()
        self.closing = False
        self.timeouts = 0  # connections cut off for sending nothing, or their request too slowly, in time
        super().__init__(address, handler)
        self._threads = [threading.Thread(target=self._work, name=f"trainguard-http-{i}", daemon=True)
                         for i in range(max_connections)]
        self._threads.append(threading.Thread(target=self._wait_loop, name="trainguard-http-wait", daemon=True))

    def start_threads(self) -> None:
        """Start the handler threads and the waiter."""
        for t in self._threads:
            t.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        # Called on the accepting thread: hand the connection to the waiter, never block here.
        now = time.monotonic()
        with self._lock:
            if len(self._waiting) >= self.max_waiting:  # the oldest idle connection makes room
                oldest = min(self._waiting, key=lambda c: self._waiting[c][0])
                self._drop(oldest)
            self._waiting[request] = (now + self.request_timeout, client_address)
            self._sel.register(request, selectors.EVENT_READ)

    def _drop(self, conn: socket.socket) -> None:
        """Close a waiting connection (caller holds the lock)."""
        del self._waiting[conn]
        try:
            self._sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        self.shutdown_request(conn)
        self.timeouts += 1

    def _wait_loop(self) -> None:
        while not self.closing:
            try:
                events = self._sel.select(timeout=0.05)
            except OSError:  # a socket closed under the selector; the next round does without it
                continue
            now = time.monotonic()
            with self._lock:
                for key, _ in events:
                    conn = key.fileobj
                    got = self._waiting.pop(conn, None)  # type: ignore[call-overload]
                    if got is None:
                        continue
                    self._sel.unregister(conn)
                    self._ready.put((conn, got[1]))  # type: ignore[arg-type]
                for conn in [c for c, (deadline, _) in self._waiting.items() if deadline < now]:
                    self._drop(conn)
        with self._lock:
            for conn in list(self._waiting):
                self._drop(conn)

    def _work(self) -> None:
        while True:
            item = self._ready.get()
            if item is None:
                return
            conn, address = item
            if self.ssl_context is not None:
                tls = self._handshake(conn, address)
                if tls is None:
                    continue
                conn = tls
            try:
                self.finish_request(conn, address)
            except Exception:  # noqa: BLE001 - one connection's failure is that connection's
                self.handle_error(conn, address)
            finally:
                with self._lock:
                    self._reading.pop(conn, None)
                self.shutdown_request(conn)

    def _handshake(self, conn: socket.socket, address: Any) -> ssl.SSLSocket | None:
        """The TLS side of a connection (on a handler thread, within request_timeout); None if it failed."""
        assert self.ssl_context is not None
        try:
            conn.settimeout(self.request_timeout)
            return self.ssl_context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.debug("TLS handshake with %s failed: %s", address, e)
            if self.on_handshake_failure is not None:
                self.on_handshake_failure()
            self.shutdown_request(conn)
            return None

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("HTTP connection from %s failed", client_address, exc_info=True)

    def reading(self, conn: socket.socket, on: bool) -> None:
        """Mark that `conn` is (or no longer is) sending a request, which must arrive within request_timeout."""
        with self._lock:
            if on:
                self._reading[conn] = time.monotonic() + self.request_timeout
            else:
                self._reading.pop(conn, None)

    def reap(self, now: float) -> int:
        """Cut off connections still sending a request past their deadline; return how many."""
        with self._lock:
            late = [c for c, deadline in self._reading.items() if deadline < now]
            for c in late:
                del self._reading[c]
            self.timeouts += len(late)
        for c in late:
            try:
                c.shutdown(socket.SHUT_RDWR)  # the handler's blocked read returns, and it ends
            except OSError:
                pass
        return len(late)

    def stop_threads(self) -> None:
        """Stop the waiter and the handler threads (after serve_forever has returned)."""
        self.closing = True
        for _ in self._threads:
            self._ready.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join(2.0)
        self._sel.close()


class HttpServer:
    """The daemon's HTTP endpoint on its own thread."""

    def __init__(self, daemon: Any, host: str, port: int, backlog: int = 1024, timeout: float = 10.0,
                 max_connections: int = 64, ssl_context: ssl.SSLContext | None = None):
        # The handler's `timeout` is set on each connection's socket: an idle or silent client (and
        # each write to a client that does not read) gives up after that long.
        handler = type("Handler", (_Handler,), {"daemon": daemon, "timeout": timeout})
        auth = getattr(daemon, "auth", None)
        failed = (lambda: auth.count("http", "tls_handshake")) if auth is not None else None
        self._srv = _Server((host, port), handler, backlog, timeout, max_connections, ssl_context, failed)
        self.port = self._srv.server_address[1]
        # A short poll keeps close() quick; serve_forever's default 0.5 s wait is pure shutdown latency.
        self._thread = threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="trainguard-http", daemon=True)
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="trainguard-http-reaper", daemon=True)

    @property
    def timeouts(self) -> int:
        """Connections cut off because their request did not arrive in time."""
        return self._srv.timeouts

    def start(self) -> None:
        """Serve on a background thread."""
        self._srv.start_threads()
        self._thread.start()
        self._reaper.start()

    def _reap_loop(self) -> None:
        interval = min(1.0, self._srv.request_timeout / 4)
        while not self._stop.wait(interval):
            try:
                self._srv.reap(time.monotonic())
            except Exception:  # noqa: BLE001
                log.exception("http reaper failed")

    def close(self) -> None:
        """Stop serving."""
        self._stop.set()
        self._srv.shutdown()
        self._srv.stop_threads()
        self._srv.server_close()


def make_registry(collector: Any) -> CollectorRegistry:
    """A registry holding only trainguard's collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg
