"""Shared fixtures: real daemons on free ports, in this process or as a separate `trainguard serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from monitor.daemon.app import Daemon, DaemonConfig
from tests.helpers import DaemonProcess, Pki


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    """Start in-process daemons on free ports: daemon_factory(**config) -> started Daemon."""
    started: list[Daemon] = []

    def make(**kw: Any) -> Daemon:
        kw.setdefault("grpc_port", 0)
        kw.setdefault("http_port", 0)
        kw.setdefault("db", str(tmp_path / f"trainguard-{len(started)}.db"))
        d = Daemon(DaemonConfig(**kw)).start()
        started.append(d)
        return d

    yield make
    for d in started:
        if d.serving:
            d.close(timeout=1.0)


@pytest.fixture
def daemon(daemon_factory: Any) -> Daemon:
    """One in-process daemon on free ports with a fresh database."""
    return daemon_factory()


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A `trainguard serve` child process (not started: call .start())."""
    dp = DaemonProcess(tmp_path / "trainguard.db", tmp_path)
    yield dp
    dp.stop()


@pytest.fixture(autouse=True)
def _no_env_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set their own addresses; a developer's environment must not steer them."""
    for var in ("TRAINGUARD_ADDRESS", "TRAINGUARD_RUN", "TRAINGUARD_RUN_GENERATED", "TRAINGUARD_RECORD",
                "TRAINGUARD_SPILL", "TRAINGUARD_TOKEN", "TRAINGUARD_TOKEN_FILE", "TRAINGUARD_TLS", "TRAINGUARD_TLS_CA",
                "TRAINGUARD_TLS_CERT", "TRAINGUARD_TLS_KEY", "TRAINGUARD_AUTH_TOKENS", "TORCHELASTIC_RUN_ID", "RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a stranger's (openssl)."""
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def reporters() -> Iterator[list[Any]]:
    """Reporters a test made; closed quickly afterwards, so that a failed test leaves none to wait at exit."""
    made: list[Any] = []
    yield made
    for rep in made:
        rep.close(timeout=0.5)
