"""A real trainguard stack for the dashboard and rule tests: a daemon fed with incident traces and a live job, and a
real Prometheus scraping it every second with the project's rule files loaded."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor import wire
from monitor.client.reporter import Reporter
from monitor.daemon.app import Daemon, DaemonConfig
from monitor.replay import replay
from tests.helpers import ROOT, TRACES, free_port, http_json, http_text, wait_for

PROMETHEUS = shutil.which("prometheus")
RULES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
SCRAPE_SECONDS = 1
# Incidents whose alerts fire through the daemon (NonFinite, ProbeRegression, GradientExplosion, StragglerRank,
# ThroughputDrop, RankLost, TrainingStalled, MemoryLeak) and whose records cover every exported series: probes
# (forgetting), two ranks (straggler, rank_lost, stall), a healthy run for contrast.
TRACE_FILES = [TRACES / "cpu" / f"cpu-{name}-01.jsonl.gz" for name in
               ("forgetting", "straggler", "rank_lost", "stall", "nonfinite", "leak", "slowdown", "healthy")]
LIVE_RUN = "deploy-live"  # eight ranks reporting now, rank 5 slow, with GPU memory, probes and drift probes
LOSSY_RUN = "deploy-lossy"  # one client whose tiny queue overflows
LIVE_RANKS = 8
SLOW_RANK = 5


class PrometheusProcess:
    """`prometheus` on a free loopback port with its own config and data directory."""

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path]):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "trainguard", "static_configs": [{"targets": targets}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> "PrometheusProcess":
        assert PROMETHEUS is not None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT)
        self.started_at = time.time()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    return r.status == 200
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for(ready, timeout=30, interval=0.1, what="prometheus to be ready")
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: Any) -> dict[str, Any]:
        """GET an /api/v1 endpoint; a 4xx answer (a query that does not parse) comes back as its JSON body."""
        qs = urllib.parse.urlencode(params, doseq=True)
        try:
            return http_json(f"{self.url}/api/v1/{path}?{qs}")
        except urllib.error.HTTPError as e:
            return json.loads(e.read().decode() or "{}") or {"status": "error", "error": str(e)}

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr, time=f"{time.time():.3f}")

    def query_range(self, expr: str, seconds: float) -> dict[str, Any]:
        end = time.time()
        return self.api("query_range", query=expr, start=f"{end - seconds:.3f}", end=f"{end:.3f}",
                        step=f"{SCRAPE_SECONDS}s")

    def label_values(self, label: str, match: str) -> list[str]:
        body = self.api(f"label/{label}/values", **{"match[]": match, "start": f"{self.started_at:.3f}"})
        return list(body.get("data") or [])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class LiveJob:
    """A job reporting right now through real Reporters, beside two misbehaving clients.

    Replayed traces stop before Prometheus' first scrape, so their counters never move between scrapes; this job
    keeps ingest, drops, rejections and notifications moving, and brings what the CPU traces lack: GPU memory,
    eight ranks with a straggler, and drift probes.
    """

    def __init__(self, address: str):
        self.address = address
        self.stop_event = threading.Event()
        self.ranks = [Reporter(run=LIVE_RUN, rank=r, address=address, heartbeat_interval=0.5, flush_interval=0.05)
                      for r in range(LIVE_RANKS)]
        # max_queue 4 with bursts of 30 records: the client drops most of each burst and says so in its heartbeats.
        self.lossy = Reporter(run=LOSSY_RUN, rank=0, address=address, max_queue=4, batch_size=4,
                              flush_interval=0.05, heartbeat_interval=0.2)
        self.channel = grpc.insecure_channel(address)
        self.call = self.channel.unary_unary(wire.REPORT_METHOD)
        self.sequence = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._loop, name="live-job", daemon=True)

    def start(self) -> "LiveJob":
        for rep in self.ranks:
            rep.run_started(world_size=LIVE_RANKS, meta={"framework": "loop", "vocab_size": 50_000})
        self.lossy.run_started(world_size=1)
        self.thread.start()
        return self

    def _loop(self) -> None:
        step = 0
        try:
            while not self.stop_event.wait(0.1):
                step += 1
                self._step(step)
                if step % 10 == 0:
                    self._misbehave()
        except BaseException as e:  # noqa: BLE001 - reported by the fixture, not lost in a thread
            self.errors.append(e)

    def _step(self, step: int) -> None:
        loss = 2.0 + 3.0 * math.exp(-step / 100)
        for r, rep in enumerate(self.ranks):
            compute = 0.02 * (3.0 if r == SLOW_RANK else 1.0 + 0.01 * r)
            rep.log("train", step, {"loss": loss, "grad_norm": 1.0 + 0.01 * (step % 7), "lr": 3e-4,
                                    "step_time_seconds": compute + 0.03, "compute_time_seconds": compute,
                                    "data_time_seconds": 0.001 * (1 + r % 3), "tokens": 8192})
            if step % 5 == 0:
                rep.log("system", step, {"host_rss_bytes": 2.0e9 + 1e7 * r,
                                         "gpu_memory_allocated_bytes": 3.0e10 + 1e8 * r,
                                         "gpu_memory_reserved_bytes": 4.0e10 + 1e8 * r,
                                         "gpu_memory_total_bytes": 8.0e10})
        lead = self.ranks[0]
        if step % 20 == 0:
            lead.log("eval", step, {"loss": loss + 0.1})
        if step % 10 == 0:
            k = step // 10 - 1  # the first drift probe is the baseline itself: KL 0, full agreement
            # On trend (KL growing linearly in steps) for the fit's 6 probes, then ten times the trend.
            kl = 0.0 if k == 0 else 0.01 * k * (10.0 if k > 8 else 1.0)
            lead.log("probe", step, {"kl": kl, "kl_max": 2 * kl, "top1_agreement": 1.0 - min(0.5, kl),
                                     "prompts": 16}, suite="drift")
            lead.log("probe", step, {"accuracy": 0.8, "items_total": 20}, suite="arithmetic",
                     items=[1.0] * 16 + [0.0] * 4)
        for i in range(30):
            self.lossy.log("train", step, {"loss": 1.0, "step_time_seconds": 0.1, "note": "not a number"})

    def _misbehave(self) -> None:
        # A client speaking another protocol (a whole batch refused) and one sending an unknown kind of record.
        try:
            self.call(b"\xff" * 16, timeout=5)
        except grpc.RpcError:
            pass
        self.sequence += 1
        bad = wire.ReportRequest(run="deploy-bogus", rank=0, incarnation="bogus", sequence=self.sequence)
        bad.records.add(kind="bogus", t=time.time())
        self.call(bad.SerializeToString(), timeout=5)

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        for rep in [*self.ranks, self.lossy]:
            rep.close(timeout=1.0)
        self.channel.close()


class Stack:
    """What the tests query: the daemon, the live job, Prometheus, and the runs they should see."""

    def __init__(self, daemon: Daemon, job: LiveJob, prom: PrometheusProcess, runs: set[str], metric_names: set[str]):
        self.daemon = daemon
        self.job = job
        self.prom = prom
        self.runs = runs
        self.metric_names = metric_names


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Daemon + replayed incidents + live job + Prometheus with the rule files, started once per session."""
    if PROMETHEUS is None:
        pytest.fail("prometheus is not installed; `make test` installs it (Debian package prometheus: "
                    "sudo apt-get install prometheus)", pytrace=False)
    work = tmp_path_factory.mktemp("deploy-stack")
    dead_alertmanager = f"http://127.0.0.1:{free_port()}"  # nothing listens: every notification fails
    daemon = Daemon(DaemonConfig(
        grpc_port=0, http_port=0, db=str(work / "trainguard.db"), alertmanager_urls=[dead_alertmanager],
        notify_max_attempts=1, notify_timeout=0.5, notify_resend_interval=1.0, shutdown_notify_timeout=0.5,
        shutdown_grace=1.0)).start()
    job = prom = None
    try:
        result = replay([str(p) for p in TRACE_FILES], daemon.grpc_address)
        assert result.rejected == 0, result.record_errors
        job = LiveJob(daemon.grpc_address).start()
        prom = PrometheusProcess(work, [daemon.http_url.removeprefix("http://")], RULES).start()
        # The daemon's own view first: the incidents fired.
        wait_for(lambda: {a["run"] for a in daemon.list_alerts(state="firing")} >= {
            "cpu-nonfinite-01", "cpu-forgetting-01", "cpu-rank_lost-01"}, timeout=10, what="replayed alerts")
        # Prometheus 2.42 applies new targets on a 5 s tick: wait for the first scrape once, here.
        wait_for(lambda: prom.query('up{job="trainguard"} == 1')["data"]["result"], timeout=30,
                 interval=0.2, what="prometheus' first scrape of the daemon")
        text = http_text(daemon.http_url + "/metrics")
        names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
        runs = result.runs | {LIVE_RUN, LOSSY_RUN}
        yield Stack(daemon, job, prom, runs, names)
    finally:
        if prom is not None:
            prom.stop()
        if job is not None:
            job.close()
        daemon.close(timeout=2.0)
        if job is not None and job.errors:
            raise job.errors[0]
