"""Shared pieces of the benchmarks: percentiles, tables, verdicts and `trainguard serve` as a child process."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
TRAIN_NAMES = ("loss", "grad_norm", "lr", "step_time_seconds", "compute_time_seconds", "data_time_seconds",
               "tokens", "samples", "loss_scale")


def train_values(step: int) -> dict[str, float]:
    """A realistic train record's values (nine of them, as a mixed-precision loop reports)."""
    return {"loss": 2.5 - step * 1e-6, "grad_norm": 0.9 + (step % 7) * 0.01, "lr": 3e-4,
            "step_time_seconds": 0.105, "compute_time_seconds": 0.09, "data_time_seconds": 0.004,
            "tokens": 8192.0, "samples": 16.0, "loss_scale": 65536.0}


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table with right-aligned figures."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for r in cells:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def verdict(name: str, ok: bool, detail: str) -> str:
    """One target line: PASS or FAIL, the target and the figure that decided it."""
    return f"{'PASS' if ok else 'FAIL'}  {name}: {detail}"


def machine() -> str:
    """A one-line description of where the figures came from."""
    try:
        import psutil

        cores = f"{psutil.cpu_count(logical=True)} CPUs"
        load = "load %.2f" % os.getloadavg()[0]
    except Exception:  # noqa: BLE001
        cores, load = f"{os.cpu_count()} CPUs", ""
    return f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}, {cores}, {load}"


class ServeProcess:
    """`python -m monitor serve` on free ports in a child process, found through its ready file."""

    def __init__(self, extra: Sequence[str] = (), env: dict[str, str] | None = None):
        self.tmp = tempfile.TemporaryDirectory(prefix="trainguard-bench-")
        self.db = os.path.join(self.tmp.name, "bench.db")
        self.extra = list(extra)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.pid = 0

    def start(self, timeout: float = 30.0) -> "ServeProcess":
        """Start the daemon and wait until it serves."""
        ready = os.path.join(self.tmp.name, "ready.json")
        self._log = open(os.path.join(self.tmp.name, "daemon.log"), "wb")
        cmd = [sys.executable, "-m", "monitor", "--log-level", "WARNING", "serve", "--grpc-port", "0",
               "--http-port", "0", "--db", self.db, "--ready-file", ready] + self.extra
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + timeout
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start in {timeout}s: {self.log_text()}")
            time.sleep(0.05)
        with open(ready) as f:
            info = json.load(f)
        self.grpc_port, self.http_port, self.pid = info["grpc_port"], info["http_port"], info["pid"]
        return self

    @property
    def address(self) -> str:
        """host:port of its gRPC endpoint."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        """Base URL of its HTTP endpoint."""
        return f"http://127.0.0.1:{self.http_port}"

    def log_text(self) -> str:
        """What the daemon printed."""
        try:
            return Path(self.tmp.name, "daemon.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time; remove its files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self._log.close()
        self.tmp.cleanup()

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def closed_port_address() -> str:
    """A loopback address where nothing listens (bound a moment ago, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"
