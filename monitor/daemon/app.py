"""Builds the daemon from one validated config and wires its parts together."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from monitor import wire
from monitor.daemon.alerts import AlertManager
from monitor.daemon.collector import DaemonCollector
from monitor.daemon.detectors import check_config
from monitor.daemon.http import HttpServer, make_registry
from monitor.daemon.ingest import Ingest
from monitor.daemon.notifiers import LogNotifier
from monitor.daemon.server import TelemetryServicer
from monitor.daemon.state import Registry
from monitor.daemon.store import Store

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
    runbook_url: str | None = None
    detectors: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> "DaemonConfig":
        """Check every setting; raise ConfigError naming the first bad one."""
        for name in ("grpc_port", "http_port"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v <= 65535:
                raise ConfigError(f"{name}: must be a port number 0-65535 (0 picks a free one), got {v!r}")
        for name in ("grpc_workers", "window", "restore_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {v!r}")
        for name in ("rank_silent_after", "expire_finished_after", "expire_silent_after", "janitor_interval",
                     "shutdown_grace"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"{name}: must be a positive number of seconds, got {v!r}")
        if not self.db:
            raise ConfigError("db: must be a file path (or :memory: is not supported; use a temporary file)")
        try:
            check_config(self.detectors)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> "DaemonConfig":
        """Build from a parsed config file; unknown keys are an error, not a silent typo."""
        known = {f.name for f in dataclasses.fields(cls)}
        section = data.get("daemon", data) if isinstance(data.get("daemon"), Mapping) else data
        extra = set(section) - known - {"daemon"}
        if section is not data:  # beside [daemon], only [detectors] belongs at the top level
            extra |= set(data) - {"daemon", "detectors"}
        if extra:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(sorted(extra))}; known: {', '.join(sorted(known))}")
        kwargs = {k: v for k, v in section.items() if k in known}
        if "detectors" in data and "detectors" not in kwargs:
            kwargs["detectors"] = data["detectors"]
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


class Daemon:
    """The trainguard daemon: gRPC ingest, state, detectors, alerts, store and HTTP."""

    def __init__(self, config: DaemonConfig):
        self.config = config.validate()
        db_dir = os.path.dirname(os.path.abspath(config.db))
        os.makedirs(db_dir, exist_ok=True)
        self.store = Store(config.db)
        self.registry = Registry(window_cap=config.window)
        self.alerts = AlertManager(self.store, [LogNotifier()], runbook_url=config.runbook_url)
        self.ingest = Ingest(self.registry, self.store, self.alerts, config.detectors)
        self.runs_expired = 0
        self.serving = False
        self.metrics_registry = make_registry(DaemonCollector(self))
        self._grpc: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._http: HttpServer | None = None
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None
        self.grpc_port = 0
        self.http_port = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "Daemon":
        """Restore state from the store, then open the ports."""
        c = self.config
        self.store.start()
        t0 = time.monotonic()
        n = self.ingest.restore(c.restore_batches)
        if n:
            log.info("restored %d live run(s) from %s in %.2fs", n, c.db, time.monotonic() - t0)
        self._grpc = grpc.server(
            ThreadPoolExecutor(max_workers=c.grpc_workers, thread_name_prefix="trainguard-grpc"),
            options=[
                # Accept up to 4x the contract's 4 MiB so an oversized batch gets a clear error from us.
                ("grpc.max_receive_message_length", 4 * wire.MAX_BATCH_BYTES),
                # Never share the port with another daemon that happens to be bound there.
                ("grpc.so_reuseport", 0),
            ],
        )
        self._grpc.add_generic_rpc_handlers((TelemetryServicer(self.ingest).handler(),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        try:
            self.grpc_port = self._grpc.add_insecure_port(f"{c.host}:{c.grpc_port}")
        except RuntimeError as e:
            raise ConfigError(f"grpc_port: cannot listen on {c.host}:{c.grpc_port} ({e})") from None
        try:
            self._http = HttpServer(self, c.host, c.http_port)
        except OSError as e:
            self._grpc.stop(0)
            raise ConfigError(f"http_port: cannot listen on {c.host}:{c.http_port} ({e.strerror})") from None
        self.http_port = self._http.port
        self._grpc.start()
        self._http.start()
        for svc in ("", wire.SERVICE):
            self._health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        self._janitor = threading.Thread(target=self._janitor_loop, name="trainguard-janitor", daemon=True)
        self._janitor.start()
        return self

    @property
    def grpc_address(self) -> str:
        """host:port of the gRPC endpoint."""
        return f"{self.config.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP endpoint."""
        return f"http://{self.config.host}:{self.http_port}"

    def flush(self, timeout: float = 10.0) -> bool:
        """Persist run summaries and wait for the store to commit."""
        self._save_runs()
        return self.store.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Graceful shutdown: report NOT_SERVING, drain in-flight calls, flush the store."""
        grace = self.config.shutdown_grace if timeout is None else timeout
        self.serving = False
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            self._grpc.stop(grace).wait(grace + 1.0)
        self._stop.set()
        if self._janitor is not None:
            self._janitor.join(2.0)
        self._save_runs()
        self.store.close(max(grace, 5.0))
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- queries -----------------------------------------------------------------------------------

    def list_alerts(self, run: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """Alerts as the API returns them: live runs from memory, others from the store."""
        out = [a.to_api() for a in self.alerts.alerts(run, state)]
        if run is not None and self.registry.get(run) is None:
            from monitor.daemon.alerts import Alert

            out = [Alert.from_dict(a).to_api() for a in self.store.load_alerts(run=run, state=state)]
        return out

    # -- housekeeping ------------------------------------------------------------------------------

    def _save_runs(self) -> None:
        for st in self.registry.snapshot():
            self.store.put_run(self.ingest.snapshot_run(st))

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
                summary = self.ingest.snapshot_run(st)
            summary["expired"] = True
            self.alerts.resolve_run(st.run, st.clock, "run expired")
            self.store.put_run(summary)
            self.registry.remove(st.run)
            self.alerts.forget_run(st.run)
            self.runs_expired += 1
            gone.append(st.run)
            log.info("run %s expired after %.0fs without records", st.run, idle)
        return gone
