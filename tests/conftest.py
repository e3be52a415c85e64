"""Shared fixtures: real daemons on free ports, in this process or as a separate `trainguard serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from monitor.daemon.app import Daemon, DaemonConfig
from tests.helpers import DaemonProcess


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
                "TORCHELASTIC_RUN_ID", "RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def reporters() -> Iterator[list[Any]]:
    """Reporters a test made; closed quickly afterwards, so that a failed test leaves none to wait at exit."""
    made: list[Any] = []
    yield made
    for rep in made:
        rep.close(timeout=0.5)
