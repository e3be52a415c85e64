"""Daemon configuration: a TOML file, flags over it, and errors that name the setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from monitor.daemon.app import ConfigError, DaemonConfig
from tests.helpers import ROOT, free_port, http_json


def test_bad_values_name_the_setting() -> None:
    with pytest.raises(ConfigError, match="grpc_port: must be a port number"):
        DaemonConfig(grpc_port=70000).validate()
    with pytest.raises(ConfigError, match="expire_silent_after: must be a positive number"):
        DaemonConfig(expire_silent_after=0).validate()
    with pytest.raises(ConfigError, match="window: must be an integer >= 1"):
        DaemonConfig(window=0).validate()
    with pytest.raises(ConfigError, match=r"cfg.toml: unknown setting\(s\) grpc_prot"):
        DaemonConfig.from_mapping({"daemon": {"grpc_prot": 1}}, "cfg.toml")


def test_serve_reads_config_and_flags_override(tmp_path: Path) -> None:
    http_port = free_port()
    cfg = tmp_path / "tg.toml"
    cfg.write_text(f'[daemon]\nhttp_port = {http_port}\ngrpc_port = 1\ndb = "{tmp_path / "x.db"}"\n'
                   '[detectors.NonFinite]\nresolve_after_steps = 5\n')
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "serve", "--config", str(cfg), "--grpc-port", "0",
                             "--ready-file", str(ready)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            if ready.exists() or proc.poll() is not None:
                break
            import time

            time.sleep(0.05)
        assert ready.exists(), proc.stdout.read().decode() if proc.poll() is not None else "not ready"
        import json

        info = json.loads(ready.read_text())
        assert info["http_port"] == http_port  # from the file
        assert info["grpc_port"] not in (0, 1)  # the flag won
        assert http_json(f"http://127.0.0.1:{http_port}/healthz")["status"] == "ok"
        assert (tmp_path / "x.db").exists()
    finally:
        proc.terminate()
        proc.wait(20)
    assert proc.returncode == 0


def test_serve_refuses_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "monitor", "serve", "--http-port", str(port), "--grpc-port", "0",
                              "--db", str(tmp_path / "y.db")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"http_port: cannot listen on 127.0.0.1:{port}" in out.stderr
