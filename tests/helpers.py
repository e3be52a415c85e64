"""Test helpers: HTTP getters, free ports, polling, and `trainguard serve` as a child process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


DATA = Path(__file__).parent / "data"
# Labelled trace sets (copies of the public ones; scenarios.json beside each set).
TRACES = DATA / "bench"
# What the per-trace tests walk: every CPU run and log excerpt, and one of the 75 nanogpt runs (they
# differ only in their numbers; bench/detectors.py walks them all).
SAMPLE_TRACES = sorted(p for p in TRACES.glob("*/*.jsonl.gz") if p.parent.name != "healthy-nanogpt") + [
    TRACES / "healthy-nanogpt" / "2024-12-04-ValueEmbed-00008ea0.jsonl.gz"]
ROOT = Path(__file__).parent.parent
# In CI (CI=true) every server and tool the suite needs is installed by `make test`: a missing one is a
# failure there, never a skip.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def http_json(url: str, timeout: float = 10.0) -> Any:
    """GET a URL and decode its JSON body (raises urllib.error.HTTPError on 4xx/5xx)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def http_text(url: str, timeout: float = 10.0) -> str:
    """GET a URL and return its body as text."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Any, timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll `cond()` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class DaemonProcess:
    """`trainguard serve` in a child process, on a fixed gRPC port so that clients can reconnect to a restart."""

    def __init__(self, db: Path, workdir: Path, grpc_port: int | None = None, extra: list[str] | None = None):
        self.db = db
        self.workdir = workdir
        self.grpc_port = grpc_port or free_port()
        self.http_port = 0
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> "DaemonProcess":
        ready = self.workdir / f"ready-{self.starts}.json"
        self.starts += 1
        log = open(self.workdir / f"daemon-{self.starts}.log", "wb")
        cmd = [sys.executable, "-m", "monitor", "serve", "--grpc-port", str(self.grpc_port), "--http-port", "0",
               "--db", str(self.db), "--ready-file", str(ready)] + self.extra
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start in {timeout}s: {self.log_text()}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.http_port = info["http_port"]
        return self

    def log_text(self) -> str:
        return (self.workdir / f"daemon-{self.starts}.log").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the graceful exit; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


MetricSamples = dict  # (sample name, frozenset of label pairs) -> value


def metrics(d: Any) -> MetricSamples:
    """Every sample of a daemon's /metrics, keyed by (sample name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(http_text(d.http_url + "/metrics")):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(m: MetricSamples, name: str, **labels: str) -> float | None:
    """One sample's value from metrics(), or None."""
    return m.get((name, frozenset(labels.items())))


class Pki:
    """Certificates made with the openssl command for the TLS tests: a CA, the daemon's certificate for
    127.0.0.1 and localhost, a client certificate the CA signed, and one from a CA the daemon does not trust."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca, self.ca_key = self._ca("ca", "trainguard test CA")
        self.server, self.server_key = self._leaf("server", "localhost", self.ca, self.ca_key,
                                                  "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                                  "extendedKeyUsage=serverAuth\n")
        self.client, self.client_key = self._leaf("client", "team-a job", self.ca, self.ca_key,
                                                  "extendedKeyUsage=clientAuth\n")
        other_ca, other_key = self._ca("other-ca", "someone else's CA")
        self.stranger, self.stranger_key = self._leaf("stranger", "stranger", other_ca, other_key,
                                                      "extendedKeyUsage=clientAuth\n")

    def _run(self, *args: str) -> None:
        subprocess.run(["openssl", *args], cwd=self.root, check=True, capture_output=True)

    def _ca(self, name: str, cn: str) -> tuple[str, str]:
        self._run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={cn}")
        return str(self.root / f"{name}.crt"), str(self.root / f"{name}.key")

    def _leaf(self, name: str, cn: str, ca: str, ca_key: str, ext: str) -> tuple[str, str]:
        (self.root / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                                               "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n" + ext)
        self._run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                  f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        self._run("x509", "-req", "-in", f"{name}.csr", "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                  "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
        return str(self.root / f"{name}.crt"), str(self.root / f"{name}.key")
