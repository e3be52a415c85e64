"""Builds the daemon from one validated config and wires its parts together."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from monitor import wire
from monitor.daemon.alerts import DEFAULT_RUNBOOK_URL, Alert, AlertManager, AlertRules, Silences, check_runbook_url
from monitor.daemon.auth import Auth, AuthConfigError, TlsFiles, Tokens, exposure
from monitor.daemon.collector import DaemonCollector
from monitor.daemon.detectors import ALERT_SEVERITIES, check_config
from monitor.daemon.http import HttpServer, make_registry
from monitor.daemon.ingest import Ingest
from monitor.daemon.limits import Limits
from monitor.daemon.notifiers import AlertmanagerNotifier, LogNotifier, QueuedNotifier, WebhookNotifier, check_url
from monitor.daemon.server import TelemetryServicer
from monitor.daemon.state import Registry, RunState
from monitor.daemon.store import Store, StoreCorrupt, StoreError, is_corruption

log = logging.getLogger("trainguard.daemon")


class ConfigError(ValueError):
    """A setting is wrong; the message names it."""


@dataclass
class DaemonConfig:
    """Everything the daemon needs; see `trainguard serve --help` and the README for each setting."""

    host: str = "127.0.0.1"
    grpc_port: int = 9751
    http_port: int = 9750
    db: str = "./trainguard.db"
    grpc_workers: int = 64  # enough that a small batch never queues behind busy workers
    window: int = 256  # points kept per series per rank
    rank_silent_after: float = 30.0  # event seconds without a record before a rank stops counting as reporting
    expire_finished_after: float = 3600.0  # daemon seconds a finished run stays live
    expire_silent_after: float = 6 * 3600.0  # daemon seconds a run with no records stays live
    janitor_interval: float = 5.0
    restore_batches: int = 200
    shutdown_grace: float = 5.0
    # {alert} and {run} are filled in; "" turns the link off.
    runbook_url: str | None = DEFAULT_RUNBOOK_URL
    # Where links back to this daemon point (Alertmanager's generatorURL); default: the HTTP address.
    external_url: str | None = None
    alertmanager_urls: list[str] = field(default_factory=list)
    webhook_urls: list[str] = field(default_factory=list)
    # Alertmanager forgets an alert that is not sent again; Prometheus re-sends every minute too.
    notify_resend_interval: float = 60.0
    notify_queue_size: int = 1000  # notifications waiting per receiver before the oldest are dropped
    notify_timeout: float = 5.0  # seconds per HTTP request to a receiver
    notify_max_attempts: int = 8  # about a minute of retries with the backoff doubling from notify_backoff
    notify_backoff: float = 0.5
    alert_eval_interval: float = 1.0  # seconds between checks of pending alerts, held resolves and silences
    shutdown_notify_timeout: float = 5.0  # seconds to deliver queued notifications at shutdown
    alerts: dict[str, Any] = field(default_factory=dict)  # [alerts] lifecycle settings, see alerts.AlertRules
    detectors: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Limits on what clients may cost the daemon (limits.Limits; docs/limits.md gives each default and why).
    max_message_bytes: int = Limits.max_message_bytes
    max_records_per_batch: int = Limits.max_records_per_batch
    max_values_per_record: int = Limits.max_values_per_record
    max_name_chars: int = Limits.max_name_chars
    max_run_id_chars: int = Limits.max_run_id_chars
    max_suite_chars: int = Limits.max_suite_chars
    max_live_runs: int = Limits.max_live_runs
    max_ranks_per_run: int = Limits.max_ranks_per_run
    max_live_ranks: int = Limits.max_live_ranks
    max_series_per_rank: int = Limits.max_series_per_rank
    max_future_skew_seconds: float = Limits.max_future_skew_seconds
    max_step_jump: int = Limits.max_step_jump
    max_steps_per_second: float = Limits.max_steps_per_second
    rate_limit_records_per_second: float = Limits.rate_limit_records_per_second
    rate_limit_burst_records: int = Limits.rate_limit_burst_records
    max_silences: int = 1000  # silences in force or waiting to start
    # HTTP: connections waiting to be accepted, seconds a client has to send its request (and for each
    # write to it), and connections served at once (one thread each; more wait in the backlog).
    http_backlog: int = 1024
    http_timeout_seconds: float = 10.0
    http_max_connections: int = 64
    # Seconds one store transaction may take before health reports the store stuck (a lock, a stalled disk).
    store_stall_seconds: float = 10.0
    commit_timeout: float = 30.0  # seconds a batch waits for its commit before the client is told to resend
    # Security (SECURITY.md): TLS for both listeners, mutual TLS with a client CA, bearer tokens scoped to
    # run-id prefixes (a TOML file; or $TRAINGUARD_AUTH_TOKENS), and whether /metrics and /healthz need one.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    auth_tokens_file: str | None = None
    metrics_open: bool = True
    healthz_open: bool = True
    # Listen on a non-loopback address with no client authentication (--insecure); refused otherwise.
    insecure: bool = False

    def validate(self) -> "DaemonConfig":
        """Check every setting; raise ConfigError naming the first bad one."""
        for name in ("host", "db"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise ConfigError(f"{name}: expected a string, got {v!r}")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"{name}: expected a file path, got {v!r}")
        for name in ("metrics_open", "healthz_open", "insecure"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        for name in ("grpc_port", "http_port"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v <= 65535:
                raise ConfigError(f"{name}: must be a port number 0-65535 (0 picks a free one), got {v!r}")
        for name in ("grpc_workers", "window", "restore_batches", "notify_queue_size", "notify_max_attempts",
                     "max_silences", "http_backlog", "http_max_connections"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {v!r}")
        for name in ("rank_silent_after", "expire_finished_after", "expire_silent_after", "janitor_interval",
                     "shutdown_grace", "notify_resend_interval", "notify_timeout", "notify_backoff",
                     "alert_eval_interval", "shutdown_notify_timeout", "http_timeout_seconds",
                     "store_stall_seconds", "commit_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ConfigError(f"{name}: must be a positive number of seconds, got {v!r}")
        problem = Limits.check({name: getattr(self, name) for name in Limits.names()})
        if problem is not None:
            raise ConfigError(problem)
        for name in ("alertmanager_urls", "webhook_urls"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)):
                raise ConfigError(f"{name}: expected a list of URLs, got {v!r}")
            for i, url in enumerate(v):
                try:
                    check_url(url, f"{name}[{i}]")
                except ValueError as e:
                    raise ConfigError(str(e)) from None
        if self.external_url is not None:
            try:
                check_url(self.external_url, "external_url")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.runbook_url is not None and not isinstance(self.runbook_url, str):
            raise ConfigError(f"runbook_url: expected a URL pattern such as \"https://wiki/{{alert}}\", "
                              f"got {self.runbook_url!r}")
        try:
            check_runbook_url(self.runbook_url)
            self.alert_rules()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.db:
            raise ConfigError("db: must be a file path (or :memory: is not supported; use a temporary file)")
        if not isinstance(self.detectors, Mapping):
            raise ConfigError(f"detectors: expected a table of detector tables ([detectors.<Name>]), "
                              f"got {self.detectors!r}")
        try:
            check_config(self.detectors)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def limits(self) -> Limits:
        """The limits on what clients may cost the daemon, from their [daemon] settings."""
        return Limits(**{name: getattr(self, name) for name in Limits.names()})

    def alert_rules(self) -> AlertRules:
        """The lifecycle settings of every alert, from the [alerts] table."""
        if not isinstance(self.alerts, Mapping):
            raise ConfigError(f"alerts: expected a table, got {self.alerts!r}")
        return AlertRules.from_config(self.alerts, ALERT_SEVERITIES)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> "DaemonConfig":
        """Build from a parsed config file; unknown keys are an error, not a silent typo."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a table of settings, got {type(data).__name__}")
        if "daemon" in data and not isinstance(data["daemon"], Mapping):
            raise ConfigError(f"{source}: daemon: expected a table ([daemon]), got {data['daemon']!r}")
        section = data.get("daemon", data) if isinstance(data.get("daemon"), Mapping) else data
        extra = set(section) - known - {"daemon"}
        if section is not data:  # beside [daemon], only [alerts] and [detectors] belong at the top level
            extra |= set(data) - {"daemon", "alerts", "detectors"}
        if extra:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(sorted(map(str, extra)))}; "
                              f"known: {', '.join(sorted(known))}")
        kwargs = {k: v for k, v in section.items() if k in known}
        for table in ("alerts", "detectors"):
            if table in data and table not in kwargs:
                kwargs[table] = data[table]
        return cls(**kwargs)


def load_config_file(path: str) -> dict[str, Any]:
    """Read a TOML config file."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config: {path} is not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise ConfigError(f"--config: {path} nests tables or arrays too deeply") from None


class Daemon:
    """The trainguard daemon: gRPC ingest, state, detectors, alerts, store and HTTP."""

    def __init__(self, config: DaemonConfig):
        self.config = config.validate()
        db_dir = os.path.dirname(os.path.abspath(config.db))
        try:
            os.makedirs(db_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"db: cannot create the directory {db_dir} ({e.strerror})") from None
        try:
            tokens = Tokens.load(config.auth_tokens_file)
            self.tls = TlsFiles.load(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
        except AuthConfigError as e:
            raise ConfigError(str(e)) from None
        mutual = self.tls is not None and self.tls.client_ca is not None
        problem = exposure(config.host, tokens is not None or mutual)
        if problem and not config.insecure:
            raise ConfigError(problem)
        if problem:
            log.warning("listening on %s with no client authentication (--insecure): anyone who can reach the "
                        "ports can write into and read every run", config.host or "every interface")
        self.auth = Auth(tokens, metrics_open=config.metrics_open, healthz_open=config.healthz_open)
        self.store = Store(config.db, stall_after=config.store_stall_seconds)
        self.registry = Registry(window_cap=config.window)
        self.notifiers: list[QueuedNotifier] = self._build_notifiers()
        with _reading_store(config.db):
            self.silences = Silences(self.store, ALERT_SEVERITIES, max_silences=config.max_silences)
        self.alerts = AlertManager(self.store, [LogNotifier(), *self.notifiers], runbook_url=config.runbook_url,
                                   rules=config.alert_rules(), silences=self.silences)
        self.limits = config.limits()
        self.ingest = Ingest(self.registry, self.store, self.alerts, config.detectors, config.commit_timeout,
                             limits=self.limits, make_room=self._make_room)
        self.runs_expired = 0
        self.serving = False
        self._healthy: tuple[bool, str] = (True, "ok")
        self._health_thread: threading.Thread | None = None
        self.metrics_registry = make_registry(DaemonCollector(self))
        self._grpc: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._http: HttpServer | None = None
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None
        self._evaluator: threading.Thread | None = None
        self.grpc_port = 0
        self.http_port = 0

    def _build_notifiers(self) -> list[QueuedNotifier]:
        c = self.config
        kw: dict[str, Any] = {"queue_size": c.notify_queue_size, "timeout": c.notify_timeout,
                              "max_attempts": c.notify_max_attempts, "backoff": c.notify_backoff}
        out: list[QueuedNotifier] = []
        for i, url in enumerate(c.alertmanager_urls, 1):
            out.append(AlertmanagerNotifier(f"alertmanager-{i}", url, resend_interval=c.notify_resend_interval, **kw))
        for i, url in enumerate(c.webhook_urls, 1):
            out.append(WebhookNotifier(f"webhook-{i}", url, **kw))
        return out

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "Daemon":
        """Restore state from the store, then open the ports."""
        c = self.config
        self.store.start()
        t0 = time.monotonic()
        try:
            with _reading_store(c.db):
                n = self.ingest.restore(c.restore_batches)
        except BaseException:
            self.store.close(1.0)
            raise
        if n:
            log.info("restored %d live run(s) from %s in %.2fs", n, c.db, time.monotonic() - t0)
        self._grpc = grpc.server(
            ThreadPoolExecutor(max_workers=c.grpc_workers, thread_name_prefix="trainguard-grpc"),
            options=[
                # Read messages up to twice max_message_bytes, so that a batch over the limit gets our
                # refusal naming it (and is counted); gRPC refuses larger ones itself, which the
                # servicer still counts.
                ("grpc.max_receive_message_length", self.limits.grpc_receive_bytes),
                # Never share the port with another daemon that happens to be bound there.
                ("grpc.so_reuseport", 0),
            ],
        )
        self._grpc.add_generic_rpc_handlers((TelemetryServicer(self.ingest, self.limits, self.auth).handler(),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        try:
            if self.tls is not None:
                self.grpc_port = self._grpc.add_secure_port(f"{c.host}:{c.grpc_port}", self.tls.grpc_credentials())
            else:
                self.grpc_port = self._grpc.add_insecure_port(f"{c.host}:{c.grpc_port}")
        except RuntimeError as e:
            raise ConfigError(f"grpc_port: cannot listen on {c.host}:{c.grpc_port} ({e})") from None
        try:
            self._http = HttpServer(self, c.host, c.http_port, backlog=c.http_backlog,
                                    timeout=c.http_timeout_seconds, max_connections=c.http_max_connections,
                                    ssl_context=self.tls.ssl_context() if self.tls is not None else None)
        except OSError as e:
            self._grpc.stop(0)
            raise ConfigError(f"http_port: cannot listen on {c.host}:{c.http_port} ({e.strerror})") from None
        self.http_port = self._http.port
        for n in self.notifiers:
            if isinstance(n, AlertmanagerNotifier):
                n.external_url = self.external_url
            n.start()
            log.info("notifier %s: %s", n.name, n.url)
        self._grpc.start()
        self._http.start()
        for svc in ("", wire.SERVICE):
            self._health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        self._janitor = threading.Thread(target=self._janitor_loop, name="trainguard-janitor", daemon=True)
        self._janitor.start()
        self._evaluator = threading.Thread(target=self._evaluate_loop, name="trainguard-alerts", daemon=True)
        self._evaluator.start()
        self._health_thread = threading.Thread(target=self._health_loop, name="trainguard-health", daemon=True)
        self._health_thread.start()
        return self

    # -- health ------------------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """(healthy, why not): serving, and the store takes writes (what is acknowledged must be stored)."""
        if not self.serving:
            return False, "shutting down"
        return self.store.health()

    def _health_loop(self) -> None:
        # gRPC health is a table others read (and Watch streams follow), so it is kept up to date here;
        # /healthz asks health() itself.
        while not self._stop.wait(0.25):
            try:
                self._update_health()
            except Exception:  # noqa: BLE001
                log.exception("health check failed")

    def _update_health(self) -> None:
        ok, why = self.health()
        was_ok = self._healthy[0]
        self._healthy = (ok, why)
        if ok == was_ok or not self.serving:
            return
        if ok:
            log.warning("healthy again: the store takes writes")
        else:
            log.error("unhealthy: %s", why)
        if self._health is not None:
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for svc in ("", wire.SERVICE):
                self._health.set(svc, status)

    @property
    def grpc_address(self) -> str:
        """host:port of the gRPC endpoint."""
        return f"{self.config.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP endpoint."""
        return f"{self.http_scheme}://{self.config.host}:{self.http_port}"

    @property
    def http_scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def external_url(self) -> str:
        """The daemon's URL as others should use it (external_url, or the HTTP address with a real host name)."""
        if self.config.external_url:
            return self.config.external_url.rstrip("/")
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        return f"{self.http_scheme}://{host}:{self.http_port}"

    def flush(self, timeout: float = 10.0) -> bool:
        """Persist run summaries, wait for the store to commit and for notifiers to deliver what is queued."""
        self._save_runs()
        deadline = time.monotonic() + timeout
        ok = self.store.flush(timeout)
        for n in self.notifiers:
            ok = n.flush(max(0.0, deadline - time.monotonic())) and ok
        return ok

    def close(self, timeout: float | None = None) -> None:
        """Graceful shutdown: report NOT_SERVING, drain in-flight calls, flush the store."""
        grace = self.config.shutdown_grace if timeout is None else timeout
        self.serving = False
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            self._grpc.stop(grace).wait(grace + 1.0)
        self._stop.set()
        for t in (self._janitor, self._evaluator, self._health_thread):
            if t is not None:
                t.join(2.0)
        self._save_runs()
        # A final sweep announces what a silence that just ended was holding back, then each
        # notifier gets one flush and shutdown_notify_timeout in all to deliver its queue.
        try:
            self.alerts.sweep()
        except Exception:  # noqa: BLE001
            log.exception("final alert sweep failed")
        deadline = time.monotonic() + self.config.shutdown_notify_timeout
        for n in self.notifiers:
            n.flush(max(0.0, deadline - time.monotonic()))
        for n in self.notifiers:
            n.close(max(0.0, deadline - time.monotonic()))
        self.store.close(max(grace, 5.0))
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- queries -----------------------------------------------------------------------------------

    def list_alerts(self, run: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """Alerts as the API returns them: live runs from memory, others from the store.

        `state` None means every alert that fired; pending ones are listed only with state "pending".
        """
        now = time.time()
        if run is not None and self.registry.get(run) is None:
            rows = [a for a in self.store.load_alerts(run=run, state=state) if state or a["state"] != "pending"]
            return [self.alerts.to_api(Alert.from_dict(a), now) for a in rows]
        return [self.alerts.to_api(a, now) for a in self.alerts.alerts(run, state)]

    def evaluate_alerts(self, positions: dict[str, tuple[float, int | None]]) -> dict[str, tuple[float, int | None]]:
        """Advance each run's alerts to the event time and step in `positions`; return the positions now.

        The loop passes what it read one round earlier: ingest hands a batch's findings to the alert
        manager just after it releases the run, and a position read in that gap could otherwise fire
        or resolve an alert before the findings of the records that moved the clock were seen.
        """
        for run, (t, step) in positions.items():
            if self.registry.get(run) is not None:
                self.alerts.advance(run, t, step)
        self.alerts.sweep()
        now: dict[str, tuple[float, int | None]] = {}
        for st in self.registry.snapshot():
            with st.lock:
                now[st.run] = (st.clock, st.last_step())
        return now

    # -- housekeeping ------------------------------------------------------------------------------

    def _save_runs(self) -> None:
        for st in self.registry.snapshot():
            self.store.put_run(self.ingest.snapshot_run(st))

    def _evaluate_loop(self) -> None:
        positions: dict[str, tuple[float, int | None]] = {}
        while not self._stop.wait(self.config.alert_eval_interval):
            try:
                positions = self.evaluate_alerts(positions)
            except Exception:  # noqa: BLE001
                log.exception("alert evaluation failed")

    def _janitor_loop(self) -> None:
        while not self._stop.wait(self.config.janitor_interval):
            try:
                self._save_runs()
                self.expire(time.monotonic())
            except Exception:  # noqa: BLE001
                log.exception("janitor failed")

    def expire(self, now: float) -> list[str]:
        """Forget runs that finished or fell silent long enough ago; return their ids."""
        c = self.config
        gone = []
        for st in self.registry.snapshot():
            with st.lock:
                idle = now - st.last_recv
                ttl = c.expire_finished_after if st.run_status else c.expire_silent_after
                if idle < ttl:
                    continue
            self._forget(st)
            gone.append(st.run)
            log.info("run %s expired after %.0fs without records", st.run, idle)
        return gone

    def _forget(self, st: RunState) -> None:
        """Resolve a run's alerts, store its summary as expired and drop it from memory."""
        summary = self.ingest.snapshot_run(st)
        summary["expired"] = True
        self.alerts.resolve_run(st.run, st.clock, "run expired")
        self.store.put_run(summary)
        self.registry.remove(st.run)
        self.alerts.forget_run(st.run)
        self.runs_expired += 1

    def _make_room(self) -> bool:
        """At max_live_runs: forget the finished run that has been quiet longest, early; True if there was one.

        A finished run stays live only so that its last values and alerts can still be read; a new
        run that is sending now matters more, and the store keeps the finished one.
        """
        finished = [st for st in self.registry.snapshot() if st.run_status]
        if not finished:
            return False
        st = min(finished, key=lambda s: s.last_recv)
        self._forget(st)
        log.info("run %s forgotten early to make room for a new run (max_live_runs %d)", st.run,
                 self.config.max_live_runs)
        return True


@contextlib.contextmanager
def _reading_store(path: str) -> Iterator[None]:
    """Turn an sqlite3 error while reading the store at start-up into a one-line StoreError naming the file."""
    try:
        yield
    except sqlite3.DatabaseError as e:
        if is_corruption(e):
            raise StoreCorrupt(path, str(e)) from None
        raise StoreError(f"{path}: cannot read the database ({e})") from None


def move_aside(path: str, now: float | None = None) -> str:
    """Rename a database (and its -wal and -shm files) to <path>.corrupt-<timestamp>; return the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now))
    dest = f"{path}.corrupt-{stamp}"
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = f"{path}.corrupt-{stamp}-{n}"
    os.replace(path, dest)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, dest + suffix)
    return dest
