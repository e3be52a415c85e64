"""Faults between real clients and a real `trainguard serve` process: SIGKILL (once, and three times under two
ranks), a long absence with and without a spill, SIGTERM, and a freeze with SIGSTOP."""

from __future__ import annotations

import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from monitor import wire
from monitor.client.reporter import Reporter
from monitor.daemon.store import Store
from monitor.records import Record
from tests.helpers import ROOT, DaemonProcess, http_json, http_text, wait_for


def stored_records(db: Any, run: str) -> list[Record]:
    """Every record committed for `run`, decoded from the store a daemon wrote."""
    out = []
    for *_, data in Store(str(db)).batches(run):
        out.extend(wire.decode_batch(data).records)
    return out


def train_steps(db: Any, run: str) -> list[int]:
    return [r.step for r in stored_records(db, run) if r.kind == "train"]  # type: ignore[misc]


def runs_by_name(url: str) -> dict[str, Any]:
    return {r["run"]: r for r in http_json(url + "/api/v1/runs")["runs"]}



def invariant_holds(rep: Reporter) -> bool:
    s = rep.stats()
    return s.queued == s.sent + s.dropped + s.rejected + s.queue_depth


# ---------------------------------------------------------------------------------------------
# (1) SIGKILL mid-stream


def test_sigkill_mid_stream_stores_every_record_exactly_once(daemon_process: DaemonProcess,
                                                            reporters: list[Reporter]) -> None:
    dp = daemon_process.start()
    run, n = "fault-kill", 3000
    # Small batches sent often, so that the kills land while batches are on the wire.
    rep = Reporter(run=run, address=dp.address, batch_size=50, flush_interval=0.01, heartbeat_interval=0.2,
                   timeout=2.0, max_backoff=0.3)
    reporters.append(rep)
    try:
        kills = {700: "kill", 1300: "start", 2000: "kill", 2400: "start"}
        for step in range(1, n + 1):
            rep.log("train", step, {"loss": 1.0 / step})
            if step % 10 == 0:
                time.sleep(0.004)
            action = kills.get(step)
            if action == "kill":
                dp.kill()
            elif action == "start":
                dp.start()
        assert rep.flush(30) is True
        assert rep.stats().retries >= 2
    finally:
        rep.close(1.0)
    s = rep.stats()
    assert (s.dropped, s.rejected) == (0, 0)
    assert s.queue_depth <= 1  # a heartbeat can come between close()'s last flush and its stop
    assert s.queued == s.sent + s.queue_depth

    steps = train_steps(dp.db, run)
    counts = collections.Counter(steps)
    assert [st for st, c in counts.items() if c > 1] == []  # no duplicates
    assert sorted(counts) == list(range(1, n + 1))  # no gaps
    assert len(stored_records(dp.db, run)) == s.sent
    summary = runs_by_name(dp.url)[run]
    assert summary["last_step"] == n
    assert summary["status"] == "running"


def test_resend_after_sigkill_is_recognised_as_a_duplicate(daemon_process: DaemonProcess) -> None:
    # A batch that was committed just before a crash, whose acknowledgement never reached the
    # client, comes again after the restart with the same sequence number. The crash came before
    # the daemon saved any run summary, so only the stored batches can tell it was seen.
    dp = daemon_process.start()
    run = "fault-resend"
    recs = [Record("train", run, time.time(), 0, step, {"loss": 1.0}) for step in range(1, 11)]
    payload = wire.encode_batch(run, 0, "inc-resend", 1, recs, client="test")

    def send() -> Any:
        with grpc.insecure_channel(dp.address) as ch:
            return wire.decode_response(ch.unary_unary(wire.REPORT_METHOD)(payload, timeout=10))

    first = send()
    assert (first.ack_sequence, first.accepted, first.duplicate) == (1, 10, False)
    dp.kill()
    dp.start()
    again = send()
    assert (again.ack_sequence, again.duplicate) == (1, True)
    assert train_steps(dp.db, run) == list(range(1, 11))
    # The resend was not applied to the run's state a second time either.
    metrics = http_text(dp.url + "/metrics")
    assert 'trainguard_ingest_duplicate_batches_total 1.0' in metrics
    assert 'trainguard_ingest_batches_total 0.0' in metrics


# ---------------------------------------------------------------------------------------------
# (2) the daemon is absent for 30 s


def _busy(k: int) -> int:
    """A training step stand-in: fixed work that holds the GIL, the worst case for a sender thread."""
    acc = 0
    for i in range(k):
        acc += i * i
    return acc


def _calibrate(target: float = 0.002) -> int:
    k = 20_000
    for _ in range(3):
        t0 = time.perf_counter()
        _busy(k)
        k = max(1000, int(k * target / (time.perf_counter() - t0)))
    return k


NAMES = [f"metric_{i:02d}" for i in range(32)]


def _step(k: int, step: int, rep: Reporter | None) -> float:
    """One step of the stand-in loop (work, then its metrics); returns its duration."""
    t0 = time.perf_counter()
    _busy(k)
    values = {name: float(step) for name in NAMES}
    if rep is not None:
        rep.log("train", step, values)
    return time.perf_counter() - t0


def _baseline(k: int, steps: int = 400) -> float:
    """Median time of the same steps with no reporter at all."""
    return statistics.median(_step(k, i, None) for i in range(1, steps + 1))


def test_thirty_seconds_without_a_daemon(daemon_process: DaemonProcess, reporters: list[Reporter]) -> None:
    dp = daemon_process  # not started: its port is closed for now
    run, max_queue, absent_for = "fault-absent", 1000, 30.0
    k = _calibrate()
    baseline_before = _baseline(k)

    proc = psutil.Process()
    rep = Reporter(run=run, address=dp.address, max_queue=max_queue, max_backoff=1.0)
    reporters.append(rep)
    try:
        rss0 = proc.memory_info().rss
        times, max_depth, step = [], 0, 0
        end = time.monotonic() + absent_for
        # At least absent_for seconds and ten queues' worth of records (a loaded machine steps slower).
        while time.monotonic() < end or (step <= 10 * max_queue and time.monotonic() < end + absent_for):
            step += 1
            times.append(_step(k, step, rep))
            if step % 25 == 0:
                max_depth = max(max_depth, rep.stats().queue_depth)
        rss1 = proc.memory_info().rss
        logged = step
        during = statistics.median(times)
        # Memory stayed bounded: everything the reporter held stayed near max_queue (records logged
        # since the sender's last pass wait in the deque for at most one flush interval) ...
        per_interval = int(rep.flush_interval / min(times)) + 1
        assert max_depth <= max_queue + 2 * per_interval, (max_depth, per_interval)
        # ... and the process did not grow with the ~15k records of 32 values it was handed.
        assert logged > 10 * max_queue
        assert rss1 - rss0 < 16 * 2**20, (rss1 - rss0) / 2**20
        # Every record is accounted for: delivered, dropped (counted) or still held.
        # Once the sender has had a pass over what was logged last, it holds at most max_queue.
        wait_for(lambda: invariant_holds(rep) and rep.stats().queue_depth <= max_queue, timeout=5,
                 what="queued == sent + dropped + rejected + depth, and depth <= max_queue")
        s = rep.stats()
        assert s.sent == 0
        assert s.dropped >= logged - max_queue
        assert s.retries >= 3
        held = s.queue_depth

        dp.start()
        assert rep.flush(30) is True
        # What the queue held when the daemon came back was all delivered.
        assert rep.stats().sent >= held
    finally:
        rep.close(1.0)
    s = rep.stats()
    assert s.rejected == 0
    assert s.queue_depth <= 1  # a heartbeat can come between close()'s last flush and its stop
    assert s.sent == s.queued - s.dropped - s.queue_depth

    # The training loop did not notice: its step time stayed within noise of the baseline. The
    # baseline is taken before and after, so that a change in the machine's load does not count.
    baseline = max(baseline_before, _baseline(k))
    print(f"median step: {baseline * 1e3:.3f} ms without a reporter, {during * 1e3:.3f} ms with the daemon "
          f"absent; {logged} steps; max depth {max_depth}; RSS +{(rss1 - rss0) / 2**20:.1f} MiB")
    assert during <= 1.5 * baseline, (during, baseline)

    recs = stored_records(dp.db, run)
    assert len(recs) == s.sent
    steps = [r.step for r in recs if r.kind == "train"]
    assert len(steps) == len(set(steps))
    assert set(steps) <= set(range(1, logged + 1))
    assert steps[-1] == logged  # the newest records were kept, the oldest dropped
    assert all(len(r.values) == 32 for r in recs if r.kind == "train")
    # The heartbeats told the daemon about the drops.
    beats = [r for r in recs if r.kind == "heartbeat"]
    assert beats and max(b.values["client_dropped_total"] for b in beats) > 0


# ---------------------------------------------------------------------------------------------
# (3) SIGTERM


def test_sigterm_shuts_down_gracefully_and_a_restart_restores_runs_and_alerts(
        daemon_process: DaemonProcess, reporters: list[Reporter]) -> None:
    dp = daemon_process.start()
    nan_run, busy_run = "fault-term-nan", "fault-term-busy"

    # A run with a NonFinite alert firing, finished before the shutdown.
    rep_a = Reporter(run=nan_run, address=dp.address, heartbeat_interval=0)
    reporters.append(rep_a)
    for step in range(1, 51):
        rep_a.log("train", step, {"loss": float("nan") if step == 45 else 1.0, "grad_norm": 1.0})
    assert rep_a.close(10) is True
    alerts = wait_for(lambda: http_json(f"{dp.url}/api/v1/alerts?run={nan_run}")["alerts"], timeout=5,
                      what="NonFinite")
    assert [(a["name"], a["state"], a["step"]) for a in alerts] == [("NonFinite", "firing", 45)]

    # A client that keeps logging through the shutdown.
    rep_b = Reporter(run=busy_run, address=dp.address, heartbeat_interval=0, flush_interval=0.02,
                     batch_size=20, max_backoff=0.3)
    reporters.append(rep_b)
    stop = threading.Event()
    logged = [0]

    def busy() -> None:
        while not stop.is_set():
            logged[0] += 1
            rep_b.log("train", logged[0], {"loss": 1.0})
            time.sleep(0.002)

    th = threading.Thread(target=busy)
    th.start()
    try:
        wait_for(lambda: rep_b.stats().sent > 200, timeout=10, what="the busy client to get going")
        with grpc.insecure_channel(dp.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            check = health.Check(health_pb2.HealthCheckRequest(service=wire.SERVICE), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            assert dp.proc is not None
            dp.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Still draining: the HTTP side says so too.
            try:
                http_json(dp.url + "/healthz")
                raise AssertionError("/healthz answered 200 during shutdown")
            except Exception as e:  # noqa: BLE001
                assert getattr(e, "code", None) == 503, e
            watch.cancel()
        assert dp.proc.wait(20) == 0
        assert "trainguard daemon stopped" in dp.log_text()

        # Everything the busy client had delivered is in the store.
        wait_for(lambda: rep_b.stats().retries > 0, timeout=5, what="the client to notice")
        sent_before = rep_b.stats().sent
        before = train_steps(dp.db, busy_run)
        assert len(before) == sent_before
        assert before == list(range(1, sent_before + 1))
    finally:
        stop.set()
        th.join()

    # The restarted daemon has both runs back from the store before either client says anything.
    dp.start()
    runs = runs_by_name(dp.url)
    assert runs[nan_run]["last_step"] == 50
    assert runs[nan_run]["health"] == "critical"
    assert runs[busy_run]["last_step"] >= sent_before
    alerts = http_json(f"{dp.url}/api/v1/alerts?run={nan_run}")["alerts"]
    assert [(a["name"], a["state"], a["step"]) for a in alerts] == [("NonFinite", "firing", 45)]
    metrics = http_text(dp.url + "/metrics")
    assert f'trainguard_alerts_fired_total{{alert="NonFinite",run="{nan_run}"}} 1.0' in metrics
    assert f'trainguard_alert_active{{alert="NonFinite",run="{nan_run}",severity="critical"}} 1.0' in metrics

    # Another NaN in the same run: the alert is still the one that was firing, not a second one.
    rep_c = Reporter(run=nan_run, address=dp.address, heartbeat_interval=0)
    reporters.append(rep_c)
    rep_c.log("train", 51, {"loss": float("inf")})
    assert rep_c.close(10) is True
    alerts = http_json(f"{dp.url}/api/v1/alerts?run={nan_run}")["alerts"]
    assert len(alerts) == 1
    assert f'trainguard_alerts_fired_total{{alert="NonFinite",run="{nan_run}"}} 1.0' in http_text(dp.url + "/metrics")

    # The busy client's queue reaches the new daemon: every step stored exactly once.
    assert rep_b.close(30) is True
    assert train_steps(dp.db, busy_run) == list(range(1, logged[0] + 1))


# ---------------------------------------------------------------------------------------------
# (4) two ranks through three SIGKILLs


RANK_SCRIPT = """
import json, math, sys, time
from monitor import Reporter

address, run, rank, steps, rate, nan_step, out = sys.argv[1:8]
rank, steps, rate, nan_step = int(rank), int(steps), float(rate), int(nan_step)
rep = Reporter(run=run, rank=rank, address=address, batch_size=20, flush_interval=0.02, heartbeat_interval=0.2,
               timeout=2.0, max_backoff=0.3)
rep.run_started(world_size=2)
t0 = time.monotonic()
for step in range(1, steps + 1):
    loss = float("nan") if step == nan_step else 2.0 - step * 1e-4
    rep.log("train", step, {"loss": loss, "grad_norm": 1.0, "lr": 1e-3, "step_time_seconds": 1.0 / rate})
    # A steady pace, as a training loop has, whatever the daemon is doing.
    time.sleep(max(0.0, t0 + step / rate - time.monotonic()))
rep.end("completed", step=steps)
ok = rep.close(30)
s = rep.stats()
with open(out, "w") as f:
    json.dump({"ok": ok, "queued": s.queued, "sent": s.sent, "dropped": s.dropped, "rejected": s.rejected,
               "retries": s.retries, "depth": s.queue_depth}, f)
"""


def _rank_process(address: str, run: str, rank: int, steps: int, rate: float, nan_step: int,
                  out: Any) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINGUARD_") and k != "RANK"}
    return subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, address, run, str(rank), str(steps), str(rate),
                             str(nan_step), str(out)], cwd=ROOT, env=env, stderr=subprocess.PIPE)


def test_two_ranks_through_three_sigkills_store_each_record_once_and_fire_each_alert_once(
        daemon_process: DaemonProcess, tmp_path: Any) -> None:
    dp = daemon_process.start()
    run, steps, rate, nan_step = "fault-2rank", 2000, 200.0, 260
    procs = [_rank_process(dp.address, run, r, steps, rate, nan_step if r == 0 else 0, tmp_path / f"rank{r}.json")
             for r in (0, 1)]
    try:
        # The first kill comes right after the NaN's alert fired: the alert and the detectors' state race
        # the crash, and the restart restores both from what was committed. Two more follow, while both
        # ranks keep logging.
        wait_for(lambda: http_json(f"{dp.url}/api/v1/alerts?run={run}")["alerts"], timeout=20, what="NonFinite")
        for pause in (0.05, 1.2, 1.2):
            time.sleep(pause)
            dp.kill()
            time.sleep(0.3)  # down for a moment, then back on the same db and port
            dp.start()
        assert all(p.poll() is None for p in procs), "the ranks finished before the last kill"
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode(errors="replace")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r in (0, 1):
        s = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert s["ok"] is True, s
        assert (s["dropped"], s["rejected"]) == (0, 0), s
        assert s["retries"] >= 3, s  # each kill was felt
        assert s["queued"] - s["depth"] == s["sent"], s

    # Every train record of both ranks is in the store exactly once.
    recs = stored_records(dp.db, run)
    counts = collections.Counter((r.rank, r.step) for r in recs if r.kind == "train")
    assert [k for k, c in counts.items() if c != 1] == []
    assert sorted(counts) == [(r, st) for r in (0, 1) for st in range(1, steps + 1)]
    assert collections.Counter(r.rank for r in recs if r.kind == "end") == {0: 1, 1: 1}
    summary = runs_by_name(dp.url)[run]
    assert summary["last_step"] == steps
    assert summary["status"] == "completed"

    # One NaN, one alert, through every restart; and no alert of any name fired twice.
    alerts = http_json(f"{dp.url}/api/v1/alerts?run={run}&state=all")["alerts"]
    names = collections.Counter(a["name"] for a in alerts)
    assert names["NonFinite"] == 1, json.dumps(alerts, indent=1)
    assert [n for n, c in names.items() if c > 1] == [], alerts
    nf = next(a for a in alerts if a["name"] == "NonFinite")
    assert nf["step"] == nan_step
    assert f'trainguard_alerts_fired_total{{alert="NonFinite",run="{run}"}} 1.0' in http_text(dp.url + "/metrics")


# ---------------------------------------------------------------------------------------------
# (5) absent for longer than the memory queue covers: with a spill nothing is lost, without one every drop is counted


def _client_metric(url: str, name: str, run: str, rank: str = "0") -> float | None:
    """One trainguard_client_* sample of a run's rank from /metrics."""
    for fam in text_string_to_metric_families(http_text(url + "/metrics")):
        for smp in fam.samples:
            if smp.name == name and smp.labels == {"run": run, "rank": rank}:
                return smp.value
    return None


def _log_bursts(rep: Reporter, n: int) -> None:
    """n train records in bursts of 10 (well inside max_queue), a few milliseconds apart, as steps would come."""
    for step in range(1, n + 1):
        rep.log("train", step, {"loss": 1.0 / step, "grad_norm": 1.0})
        if step % 10 == 0:
            time.sleep(0.003)


def test_absent_longer_than_the_queue_spill_loses_nothing_and_without_it_drops_are_counted_exactly(
        daemon_process: DaemonProcess, reporters: list[Reporter], tmp_path: Any) -> None:
    dp = daemon_process  # not started yet
    n, max_queue = 3000, 100
    common = dict(address=dp.address, max_queue=max_queue, batch_size=25, flush_interval=0.02,
                  heartbeat_interval=0.2, timeout=2.0, max_backoff=0.3)
    spilling = Reporter(run="fault-spill", spill_path=str(tmp_path / "spill"), **common)  # type: ignore[arg-type]
    dropping = Reporter(run="fault-nospill", **common)  # type: ignore[arg-type]
    reporters.extend([spilling, dropping])
    both = [threading.Thread(target=_log_bursts, args=(rep, n)) for rep in (spilling, dropping)]
    for th in both:
        th.start()
    for th in both:
        th.join()
    wait_for(lambda: invariant_holds(dropping) and dropping.stats().queue_depth <= max_queue, timeout=5,
             what="the sender to trim its backlog")
    wait_for(lambda: spilling.stats().spilled >= n - max_queue, timeout=5, what="the spill to take the backlog")
    s, d = spilling.stats(), dropping.stats()
    assert (s.sent, s.dropped, d.sent) == (0, 0, 0)
    assert s.queue_depth == s.queued  # all held, most on disk
    assert d.dropped >= n - max_queue  # the queue covered max_queue records, no more

    dp.start()
    assert spilling.flush(30) is True and dropping.flush(30) is True
    s, d = spilling.stats(), dropping.stats()

    # With the spill: every train record, in the order logged, once.
    recs = stored_records(dp.db, "fault-spill")
    assert [r.step for r in recs if r.kind == "train"] == list(range(1, n + 1))
    assert (s.dropped, s.rejected, s.queue_depth, s.spill_bytes) == (0, 0, 0, 0)
    assert len(recs) == s.sent == s.queued
    assert list((tmp_path / "spill").iterdir()) == []

    # Without: what arrived plus what was counted as dropped is exactly what was logged, heartbeats included.
    recs = stored_records(dp.db, "fault-nospill")
    steps = [r.step for r in recs if r.kind == "train"]
    assert len(steps) == len(set(steps))
    assert (d.rejected, d.queue_depth) == (0, 0)
    assert len(recs) == d.sent == d.queued - d.dropped
    assert steps[-1] == n
    # ... and the daemon was told the exact figure.
    wait_for(lambda: _client_metric(dp.url, "trainguard_client_dropped_records_total", "fault-nospill") == d.dropped,
             timeout=5, what="the dropped count to reach /metrics")
    wait_for(lambda: _client_metric(dp.url, "trainguard_client_spilled_records_total", "fault-spill") == s.spilled,
             timeout=5, what="the spilled count to reach /metrics")
    assert _client_metric(dp.url, "trainguard_client_spill_bytes", "fault-spill") is not None
    assert _client_metric(dp.url, "trainguard_client_spilled_records_total", "fault-nospill") is None


# ---------------------------------------------------------------------------------------------
# (6) a network cut: the daemon frozen with SIGSTOP, then SIGCONT


def test_a_frozen_daemon_delays_records_but_loses_none(daemon_process: DaemonProcess,
                                                       reporters: list[Reporter]) -> None:
    dp = daemon_process.start()
    run, rate, frozen_for = "fault-sigstop", 500.0, 3.0
    rep = Reporter(run=run, address=dp.address, batch_size=50, flush_interval=0.02, heartbeat_interval=0.2,
                   timeout=1.0, max_backoff=0.3)
    reporters.append(rep)
    stop = threading.Event()
    logged = [0]

    def train() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            logged[0] += 1
            rep.log("train", logged[0], {"loss": 1.0, "grad_norm": 1.0})
            time.sleep(max(0.0, t0 + logged[0] / rate - time.monotonic()))

    th = threading.Thread(target=train)
    th.start()
    try:
        wait_for(lambda: rep.stats().sent > 200, timeout=10, what="records to flow")
        assert dp.proc is not None
        dp.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(frozen_for)
            during = rep.stats()
        finally:
            dp.proc.send_signal(signal.SIGCONT)
        # Nothing was acknowledged while it was frozen beyond what was in flight as it stopped.
        assert during.retries >= 1
        time.sleep(1.0)
    finally:
        stop.set()
        th.join()
    assert rep.flush(30) is True
    s = rep.stats()
    assert (s.dropped, s.rejected, s.queue_depth) == (0, 0, 0)
    assert s.sent == s.queued
    # The batch on the wire when it froze ran past its deadline and went again, under its sequence
    # number: had the thawed daemon also handled the first copy, it would have been a duplicate.
    assert train_steps(dp.db, run) == list(range(1, logged[0] + 1))
    assert len(stored_records(dp.db, run)) == s.sent
    assert logged[0] >= rate * frozen_for
    dups = [ln for ln in http_text(dp.url + "/metrics").splitlines()
            if ln.startswith("trainguard_ingest_duplicate_batches_total")]
    print(f"frozen {frozen_for:.0f} s: {logged[0]} steps, {s.retries} retries, {dups}")
