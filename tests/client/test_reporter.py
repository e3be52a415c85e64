"""Reporter against real daemons: delivery, bounded queue, never raising, heartbeats, traces, fork, exit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.client.reporter import Reporter
from monitor.daemon.store import Store
from monitor.records import Record, TraceError, read_trace
from monitor.wire import MAX_BATCH_BYTES, decode_batch
from tests.helpers import ROOT, free_port, http_json, http_text, wait_for


# ---------------------------------------------------------------------------------------------
# helpers


def stored(store: Store, run: str) -> list[tuple[str, int, Record]]:
    """Every record the daemon committed for `run`: (incarnation, batch sequence, record), in arrival order."""
    out = []
    for _bid, _rank, inc, seq, data in store.batches(run):
        out.extend((inc, seq, rec) for rec in decode_batch(data).records)
    return out


def stored_records(store: Store, run: str, kind: str | None = None) -> list[Record]:
    return [rec for _, _, rec in stored(store, run) if kind is None or rec.kind == kind]


def metric_samples(url: str) -> dict[tuple[str, frozenset], float]:
    """/metrics as {(sample name, frozenset(labels)): value}."""
    out = {}
    for fam in text_string_to_metric_families(http_text(url + "/metrics")):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def absent_address() -> tuple[int, str]:
    """A loopback port nobody listens on (yet)."""
    port = free_port()
    return port, f"127.0.0.1:{port}"



def make(reporters: list[Reporter], **kw: Any) -> Reporter:
    rep = Reporter(**kw)
    reporters.append(rep)
    return rep


def run_script(source: str, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    for var in ("TRAINGUARD_ADDRESS", "TRAINGUARD_RUN", "TRAINGUARD_RECORD", "RANK"):
        full_env.pop(var, None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# delivery


def test_logged_records_appear_in_runs_api_and_metrics(daemon: Any, reporters: list[Reporter]) -> None:
    run = "rep-api"
    rep = make(reporters, run=run, rank=0, address=daemon.grpc_address, heartbeat_interval=0)
    rep.run_started(world_size=1, meta={"framework": "torch 2.x", "model": "tiny"})
    losses = {}
    for step in range(1, 21):
        losses[step] = 3.0 - 0.1 * step
        rep.log("train", step, {"loss": losses[step], "grad_norm": 1.0 + step / 100, "lr": 1e-3 * step,
                                "step_time_seconds": 0.05 + step / 1000})
    rep.log("eval", 20, {"loss": 2.25, "accuracy": 0.5})
    rep.log("system", 20, {"host_rss_bytes": 123456789.0})
    assert rep.flush(10) is True

    runs = {r["run"]: r for r in http_json(daemon.http_url + "/api/v1/runs")["runs"]}
    assert runs[run]["last_step"] == 20
    assert runs[run]["world_size"] == 1
    assert runs[run]["ranks_reporting"] == 1
    assert runs[run]["status"] == "running"
    assert runs[run]["health"] == "ok"
    detail = http_json(f"{daemon.http_url}/api/v1/runs/{run}")
    assert detail["meta"] == {"framework": "torch 2.x", "model": "tiny"}
    assert detail["values"]["train"]["loss"] == losses[20]
    assert detail["values"]["eval"] == {"loss": 2.25, "accuracy": 0.5}
    assert detail["records"] == 23
    assert [r["rank"] for r in detail["ranks"]] == [0]

    m = metric_samples(daemon.http_url)
    assert metric(m, "trainguard_train_loss", run=run) == losses[20]
    assert metric(m, "trainguard_grad_norm", run=run) == 1.2
    assert metric(m, "trainguard_learning_rate", run=run) == pytest.approx(0.02, rel=1e-12)
    assert metric(m, "trainguard_eval_loss", run=run) == 2.25
    assert metric(m, "trainguard_step", run=run) == 20
    assert metric(m, "trainguard_step_duration_seconds", run=run, rank="0") == pytest.approx(0.07)
    assert metric(m, "trainguard_host_memory_rss_bytes", run=run, rank="0") == 123456789.0
    assert metric(m, "trainguard_run_info", run=run, status="running", framework="torch 2.x") == 1

    rep.end("completed")
    assert rep.close(10) is True
    runs = {r["run"]: r for r in http_json(daemon.http_url + "/api/v1/runs")["runs"]}
    assert runs[run]["status"] == "completed"


def test_flush_true_means_committed(daemon: Any, reporters: list[Reporter]) -> None:
    rep = make(reporters, run="rep-flush", address=daemon.grpc_address, heartbeat_interval=0)
    for step in range(1, 101):
        rep.log("train", step, {"loss": float(step)})
    assert rep.flush(10) is True
    # No waiting: an acknowledged batch is already in the store.
    assert [r.step for r in stored_records(daemon.store, "rep-flush", "train")] == list(range(1, 101))
    s = rep.stats()
    assert (s.queued, s.sent, s.dropped, s.rejected, s.queue_depth) == (100, 100, 0, 0, 0)
    assert rep.close(10) is True


def test_flush_and_close_return_false_when_daemon_is_absent(reporters: list[Reporter]) -> None:
    _, addr = absent_address()
    rep = make(reporters, run="rep-absent", address=addr, heartbeat_interval=0)
    for step in range(1, 6):
        rep.log("train", step, {"loss": 1.0})
    t0 = time.monotonic()
    assert rep.flush(timeout=0.5) is False
    assert 0.45 <= time.monotonic() - t0 < 2.0
    assert rep.stats().queue_depth == 5
    assert rep.stats().retries >= 1
    t0 = time.monotonic()
    assert rep.close(timeout=0.5) is False
    assert time.monotonic() - t0 < 3.5


def test_close_of_a_reporter_never_started_reports_undelivered_records(reporters: list[Reporter]) -> None:
    _, addr = absent_address()
    rep = make(reporters, run="rep-unstarted", address=addr, heartbeat_interval=0, start=False)
    assert rep.flush(0.1) is True  # nothing queued
    rep.log("train", 1, {"loss": 1.0})
    assert rep.flush(0.1) is False
    assert rep.close(0.1) is False


# ---------------------------------------------------------------------------------------------
# bounded queue


def test_full_queue_drops_the_oldest_and_counts_each_drop(daemon_factory: Any, reporters: list[Reporter]) -> None:
    port, addr = absent_address()
    rep = make(reporters, run="rep-drop", address=addr, max_queue=10, heartbeat_interval=0, start=False)
    for step in range(1, 26):
        rep.log("train", step, {"loss": float(step)})
        s = rep.stats()
        assert s.dropped == max(0, step - 10)
        assert s.queue_depth == min(step, 10)
        assert s.queued == step
    d = daemon_factory(grpc_port=port)
    rep.start()
    assert rep.flush(10) is True
    assert [r.step for r in stored_records(d.store, "rep-drop", "train")] == list(range(16, 26))
    s = rep.stats()
    assert (s.queued, s.sent, s.dropped, s.queue_depth) == (25, 10, 15, 0)


def test_queue_stays_bounded_while_the_sender_retries(daemon_factory: Any, reporters: list[Reporter]) -> None:
    port, addr = absent_address()
    max_queue, batch_size, n = 50, 20, 2000
    rep = make(reporters, run="rep-bound", address=addr, max_queue=max_queue, batch_size=batch_size,
               heartbeat_interval=0, flush_interval=0.05)
    for step in range(1, n + 1):
        rep.log("train", step, {"loss": float(step)})
        if step % 100 == 0:
            time.sleep(0.02)  # let the sender take turns, as a training step would
    # Once the sender has had a pass, everything it holds (the unacknowledged batch included)
    # fits in max_queue, and every record is accounted for.
    wait_for(lambda: rep.stats().queue_depth <= max_queue and rep.stats().retries >= 1, timeout=5,
             what="the sender to trim its backlog")
    s = rep.stats()
    assert s.sent == 0
    assert s.queued == n
    assert s.dropped == n - s.queue_depth
    assert s.dropped >= n - max_queue

    d = daemon_factory(grpc_port=port)
    assert rep.flush(15) is True
    steps = [r.step for r in stored_records(d.store, "rep-bound", "train")]
    s = rep.stats()
    assert len(steps) == len(set(steps)) == s.sent == n - s.dropped
    assert s.queue_depth == 0
    # What survives is the batch that was already on its way (the oldest, kept to be resent under
    # its sequence number) and the newest records; everything in between was dropped.
    first = 1
    while first < len(steps) and steps[first] == steps[first - 1] + 1:
        first += 1
    if first < len(steps):
        assert first <= batch_size
        assert steps[first:] == list(range(n - (len(steps) - first) + 1, n + 1))
    assert steps[-1] == n
    assert len(steps) <= max_queue


# ---------------------------------------------------------------------------------------------
# never raising


def test_log_never_raises_and_bad_values_are_counted_not_sent(daemon: Any, reporters: list[Reporter],
                                                              tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    run = "rep-bad"
    rep = make(reporters, run=run, address=daemon.grpc_address, heartbeat_interval=0,
               record_path=str(blocker / "trace.jsonl"))  # cannot be created: recording is skipped
    rep.log("train", 1, {"loss": "abc", "ok": 1.0})
    rep.log("train", 2, {"loss": object(), "ok": 2.0})
    rep.log("train", 3, {5: 1.0, "ok": 3.0})
    rep.log("train", 4, {"loss": [1.0, 2.0], "ok": 4.0})
    rep.log("train", 5, 5)  # not a mapping at all
    rep.log("train", 6, ["loss", "grad_norm"])
    rep.log("train", "seven", {"loss": 7.0})  # a step that is no integer
    rep.log(None, 8, {"loss": 8.0})  # type: ignore[arg-type]
    rep.log("train", 9, {"loss": 9.0}, t="later")  # type: ignore[arg-type]
    rep.log("probe", 10, {"accuracy": 1.0}, suite="arith", items=["right", "wrong"])
    rep.log("end", 11, status=object())
    rep.log("run", None, world_size="two")
    rep.log("train", 2**70, {"loss": 1.0})  # beyond what the wire's int64 holds
    rep.log("run", None, world_size=-2)
    rep.log("train", 12, {"loss": 12.0, "ok": 12.0})
    assert rep.flush(10) is True

    got = {r.step: r.values for r in stored_records(daemon.store, run, "train")}
    assert got[1] == {"ok": 1.0}
    assert got[2] == {"ok": 2.0}
    assert got[3] == {"ok": 3.0}
    assert got[4] == {"ok": 4.0}
    assert got[12] == {"loss": 12.0, "ok": 12.0}
    assert "seven" not in got and 7 not in got
    s = rep.stats()
    assert s.invalid_values == 4 + 1 + 1  # four bad values, and two `values` that were no mapping
    assert s.dropped == 0
    assert s.queue_depth == 0
    assert s.queued == 15
    # Every record is either delivered or refused, none silently lost.
    assert (s.sent, s.rejected) == (7, 8)
    assert s.sent == len(stored_records(daemon.store, run))

    # The sender keeps working after all of that.
    rep.log("train", 13, {"loss": 13.0})
    assert rep.flush(10) is True
    assert 13 in {r.step for r in stored_records(daemon.store, run, "train")}

    assert rep.close(10) is True
    rep.log("train", 14, {"loss": 14.0})  # after close: ignored, no error
    rep.end()
    assert rep.close() is True


# ---------------------------------------------------------------------------------------------
# heartbeats and client counters


def test_heartbeats_continue_while_the_training_thread_is_blocked(daemon: Any, reporters: list[Reporter]) -> None:
    run, interval = "rep-heart", 0.25
    rep = make(reporters, run=run, rank=2, address=daemon.grpc_address, heartbeat_interval=interval,
               flush_interval=0.05)
    for step in range(1, 8):
        rep.log("train", step, {"loss": 1.0 / step})
    blocked_from = time.time()
    time.sleep(1.6)  # the training thread is stuck in a collective, say
    blocked_to = time.time()
    assert rep.flush(10) is True

    recs = stored_records(daemon.store, run)
    beats = [r for r in recs if r.kind == "heartbeat"]
    during = [b for b in beats if blocked_from <= b.t <= blocked_to]
    assert 4 <= len(during) <= 8
    assert all(b.step == 7 for b in during)
    assert all(b.rank == 2 for b in beats)
    gaps = sorted(b.t - a.t for a, b in zip(beats, beats[1:]))
    assert interval * 0.7 <= gaps[len(gaps) // 2] <= interval * 1.5

    # Each heartbeat carries the client's counters as they stood when it was logged.
    position = {id(r): i for i, r in enumerate(recs)}
    for b in beats:
        v = b.values
        assert set(v) >= {"client_queued_total", "client_sent_total", "client_dropped_total",
                          "client_rejected_total", "client_retries_total", "client_queue_depth"}
        assert position[id(b)] - 3 <= v["client_queued_total"] <= position[id(b)]
        assert v["client_sent_total"] <= v["client_queued_total"]
        assert v["client_dropped_total"] == 0
        assert v["client_rejected_total"] == 0
    assert [b.values["client_queued_total"] for b in beats] == sorted(b.values["client_queued_total"] for b in beats)

    last = beats[-1].values
    m = metric_samples(daemon.http_url)
    labels = {"run": run, "rank": "2"}
    assert metric(m, "trainguard_client_queued_records_total", **labels) == last["client_queued_total"]
    assert metric(m, "trainguard_client_sent_records_total", **labels) == last["client_sent_total"]
    assert metric(m, "trainguard_client_dropped_records_total", **labels) == 0
    assert metric(m, "trainguard_client_rejected_records_total", **labels) == 0
    assert metric(m, "trainguard_client_retries_total", **labels) == last["client_retries_total"]
    assert metric(m, "trainguard_client_queue_depth", **labels) == last["client_queue_depth"]
    assert last["client_sent_total"] >= 7
    detail = http_json(f"{daemon.http_url}/api/v1/runs/{run}")
    assert detail["ranks"][0]["heartbeat_step"] == 7
    assert detail["ranks"][0]["last_step"] == 7
    assert detail["ranks"][0]["client"]["client_queued_total"] == last["client_queued_total"]


def test_dropped_records_show_up_in_client_metrics(daemon_factory: Any, reporters: list[Reporter]) -> None:
    port, addr = absent_address()
    run = "rep-dropmetric"
    rep = make(reporters, run=run, address=addr, max_queue=5, heartbeat_interval=0.2, start=False)
    for step in range(1, 21):
        rep.log("train", step, {"loss": 1.0})
    d = daemon_factory(grpc_port=port)
    rep.start()
    assert rep.flush(10) is True

    def dropped_metric() -> float | None:
        return metric(metric_samples(d.http_url), "trainguard_client_dropped_records_total", run=run, rank="0")

    assert wait_for(lambda: dropped_metric() == 15, timeout=5, what="the dropped counter") is True
    m = metric_samples(d.http_url)
    assert metric(m, "trainguard_client_queued_records_total", run=run, rank="0") >= 20


# ---------------------------------------------------------------------------------------------
# recording a trace


def _log_sample(rep: Reporter, run: str, torch_value: Any) -> list[Record]:
    """Log one of each kind with fixed event times; return the records the trace must hold."""
    t0 = 1_700_000_000.0
    # meta may hold anything; what JSON cannot carry is recorded as its str().
    rep.run_started(world_size=2, meta={"framework": "torch", "lr": 0.001, "where": Path("/data/x")})
    expected = [Record("run", run, 0.0, rep.rank, None, {}, world_size=2,
                       meta={"framework": "torch", "lr": 0.001, "where": "/data/x"})]
    for step in range(1, 6):
        vals = {"loss": 2.0 / step, "grad_norm": torch_value if step == 3 else 0.5, "tokens": 4096}
        rep.log("train", step, vals, t=t0 + step)
        expected.append(Record("train", run, t0 + step, rep.rank, step,
                               {"loss": 2.0 / step, "grad_norm": 0.25 if step == 3 else 0.5, "tokens": 4096.0}))
    rep.log("train", 6, {"loss": math.nan}, t=t0 + 6)
    expected.append(Record("train", run, t0 + 6, rep.rank, 6, {"loss": math.nan}))
    rep.log("eval", 5, {"loss": 1.5, "accuracy": 0.75}, t=t0 + 6.5)
    expected.append(Record("eval", run, t0 + 6.5, rep.rank, 5, {"loss": 1.5, "accuracy": 0.75}))
    rep.log("probe", 5, {"accuracy": 0.5}, t=t0 + 7, suite="arithmetic", items=[1.0, 0.0, 1.0, 0.0])
    expected.append(Record("probe", run, t0 + 7, rep.rank, 5, {"accuracy": 0.5}, suite="arithmetic",
                           items=[1.0, 0.0, 1.0, 0.0]))
    rep.log("system", 6, {"host_rss_bytes": 1e9}, t=t0 + 8)
    expected.append(Record("system", run, t0 + 8, rep.rank, 6, {"host_rss_bytes": 1e9}))
    rep.end("completed", 6)
    expected.append(Record("end", run, 0.0, rep.rank, 6, status="completed"))
    return expected


def _read_back(path: Path) -> list[Record]:
    items = list(read_trace(str(path)))
    assert not [i for i in items if isinstance(i, TraceError)], items
    return items  # type: ignore[return-value]


def _same(got: list[Record], expected: list[Record]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if e.kind in ("run", "end"):  # stamped with the time of the call
            assert abs(g.t - time.time()) < 60
            e.t = g.t
        assert g == e


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_record_path_writes_a_trace_equal_to_what_was_logged(daemon: Any, reporters: list[Reporter],
                                                             tmp_path: Path, suffix: str) -> None:
    import torch
    path = tmp_path / f"rec{suffix}"
    run = "rep-trace"
    rep = make(reporters, run=run, rank=1, address=daemon.grpc_address, heartbeat_interval=0,
               record_path=str(path))
    expected = _log_sample(rep, run, torch.tensor(0.25))
    assert rep.close(10) is True
    _same(_read_back(path), expected)
    # The daemon got the same records.
    _same(stored_records(daemon.store, run), [Record(**e.to_json()) for e in expected])


def test_trace_env_var_records_while_the_daemon_is_absent(reporters: list[Reporter], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    path = tmp_path / "nested" / "env-trace.jsonl"
    monkeypatch.setenv("TRAINGUARD_RECORD", str(path))
    _, addr = absent_address()
    run = "rep-trace-env"
    rep = make(reporters, run=run, address=addr, heartbeat_interval=0)
    assert rep.record_path == str(path)
    expected = _log_sample(rep, run, torch.tensor(0.25))
    assert rep.close(timeout=0.5) is False  # nothing could be delivered...
    _same(_read_back(path), expected)  # ...but all of it was recorded


def test_address_off_only_records(reporters: list[Reporter], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINGUARD_ADDRESS", "off")
    path = tmp_path / "off.jsonl"
    rep = make(reporters, run="rep-off", heartbeat_interval=0, record_path=str(path))
    assert rep.address is None
    for step in range(1, 11):
        rep.log("train", step, {"loss": float(step)}, t=1_700_000_000.0 + step)
    assert rep.flush(5) is True
    assert [r.step for r in _read_back(path)] == list(range(1, 11))
    assert rep.close(5) is True


# ---------------------------------------------------------------------------------------------
# environment


def test_env_vars_choose_address_run_and_rank(daemon: Any, reporters: list[Reporter],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINGUARD_ADDRESS", daemon.grpc_address)
    monkeypatch.setenv("TRAINGUARD_RUN", "env-run")
    monkeypatch.setenv("RANK", "3")
    rep = make(reporters, heartbeat_interval=0)
    assert (rep.run, rep.rank, rep.address) == ("env-run", 3, daemon.grpc_address)
    rep.log("train", 1, {"loss": 1.0})
    # An explicit argument wins over the environment.
    other = make(reporters, run="explicit-run", rank=0, heartbeat_interval=0)
    other.log("train", 1, {"loss": 2.0})
    assert rep.flush(10) is True and other.flush(10) is True
    detail = http_json(f"{daemon.http_url}/api/v1/runs/env-run")
    assert [r["rank"] for r in detail["ranks"]] == [3]
    assert [(r.rank, r.step) for r in stored_records(daemon.store, "env-run")] == [(3, 1)]
    assert [r.values["loss"] for r in stored_records(daemon.store, "explicit-run")] == [2.0]

    monkeypatch.setenv("TRAINGUARD_RUN", "has spaces & symbols!")
    fixed = make(reporters, heartbeat_interval=0)
    assert fixed.run == "has-spaces---symbols-"
    fixed.log("train", 1, {"loss": 3.0})
    assert fixed.flush(10) is True
    assert len(stored_records(daemon.store, "has-spaces---symbols-")) == 1


# ---------------------------------------------------------------------------------------------
# large batches


def test_batches_over_4_mib_are_split_and_all_arrive(daemon: Any, reporters: list[Reporter]) -> None:
    names = [f"layer_{i:03d}_" + "g" * 110 for i in range(256)]
    run = "rep-big"
    rep = make(reporters, run=run, address=daemon.grpc_address, heartbeat_interval=0, start=False)
    n = 0
    from monitor import wire

    # Records with the same names travel as blocks: each costs its values (and a step and a time).
    four = len(wire.encode_batch(run, 0, "x" * 16, 1, [Record("train", run, 1.0, 0, s, {k: 1.0 for k in names})
                                                       for s in range(1, 5)]))
    one = (len(wire.encode_batch(run, 0, "x" * 16, 1, [Record("train", run, 1.0, 0, s, {k: 1.0 for k in names})
                                                       for s in range(1, 9)])) - four) / 4
    while n * one <= 2 * MAX_BATCH_BYTES:  # enough for more than two full batches
        n += 1
        rep.log("train", n, {k: float(n) + j / 1000 for j, k in enumerate(names)})
    rep.start()
    assert rep.flush(60) is True
    s = rep.stats()
    assert (s.sent, s.rejected, s.dropped) == (n, 0, 0)
    sizes = [len(data) for *_, data in daemon.store.batches(run)]
    assert len(sizes) >= 3
    assert max(sizes) <= MAX_BATCH_BYTES
    recs = stored_records(daemon.store, run, "train")
    assert [r.step for r in recs] == list(range(1, n + 1))
    assert all(len(r.values) == 256 for r in recs)
    assert recs[-1].values[names[255]] == float(n) + 0.255
    m = metric_samples(daemon.http_url)
    assert not [k for k, v in m.items() if k[0] == "trainguard_ingest_rejected_batches_total" and v]


# ---------------------------------------------------------------------------------------------
# processes: fork and interpreter exit


FORK_SCRIPT = """
import json, os, sys, time
from monitor import Reporter

addr, run, out, trace = sys.argv[1:5]
rep = Reporter(run=run, address=addr, heartbeat_interval=0.1, flush_interval=0.05, record_path=trace)
for s in range(1, 11):
    rep.log("train", s, {"loss": float(s)})
assert rep.flush(10)
# Records still queued or buffered at the fork belong to the parent; the children must not send
# or record them again.
for s in range(11, 21):
    rep.log("train", s, {"loss": float(s)})
time.sleep(0.2)

def report(name, r):
    st = r.stats()
    with open(out + "." + name, "w") as f:
        json.dump({"incarnation": r.incarnation, "sent": st.sent, "queued": st.queued,
                   "record_path": r.record_path, "pid": os.getpid()}, f)

pid_a = os.fork()
if pid_a == 0:
    code = 1
    try:
        for s in range(1001, 1011):
            rep.log("train", s, {"loss": -float(s)})
        time.sleep(0.5)  # long enough for a few heartbeats of its own
        ok = rep.close(10)
        report("child", rep)
        code = 0 if ok else 3
    finally:
        os._exit(code)

pid_b = os.fork()
if pid_b == 0:
    # A DataLoader worker, say: it never logs, and leaves through the normal exit path.
    report("idle", rep)
    time.sleep(1.0)
    sys.exit(0)

for pid in (pid_a, pid_b):
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (pid, status)
for s in range(21, 31):
    rep.log("train", s, {"loss": float(s)})
ok = rep.close(10)
report("parent", rep)
sys.exit(0 if ok else 4)
"""


def test_fork_child_that_logs_gets_its_own_identity_and_an_idle_child_sends_nothing(
        daemon: Any, tmp_path: Path) -> None:
    run = "rep-fork"
    out = tmp_path / "fork"
    trace = tmp_path / "fork-trace.jsonl"
    res = run_script(FORK_SCRIPT, daemon.grpc_address, run, str(out), str(trace))
    assert res.returncode == 0, res.stderr
    parent = json.loads(Path(f"{out}.parent").read_text())
    child = json.loads(Path(f"{out}.child").read_text())
    idle = json.loads(Path(f"{out}.idle").read_text())
    assert child["incarnation"] != parent["incarnation"]
    assert idle["incarnation"] != parent["incarnation"]
    assert idle["queued"] == 0  # the idle child did not inherit the parent's queue

    by_inc: dict[str, list[tuple[int, Record]]] = {}
    for inc, seq, rec in stored(daemon.store, run):
        by_inc.setdefault(inc, []).append((seq, rec))
    # Two senders only: the parent and the child that logged. Nothing, not even a heartbeat,
    # came from the idle child, under its own identity or the parent's.
    assert set(by_inc) == {parent["incarnation"], child["incarnation"]}
    parent_steps = [r.step for _, r in by_inc[parent["incarnation"]] if r.kind == "train"]
    child_steps = [r.step for _, r in by_inc[child["incarnation"]] if r.kind == "train"]
    assert parent_steps == list(range(1, 31))
    assert child_steps == list(range(1001, 1011))
    # (A heartbeat can slip in between close()'s last flush and the threads' stop: at most one.)
    for who in (parent, child):
        assert len(by_inc[who["incarnation"]]) == who["sent"]
        assert who["sent"] <= who["queued"] <= who["sent"] + 1
    assert any(r.kind == "heartbeat" for _, r in by_inc[child["incarnation"]])
    for recs in by_inc.values():
        seqs = sorted({seq for seq, _ in recs})
        assert seqs == list(range(1, len(seqs) + 1))

    # The child recorded to its own file beside the parent's.
    assert child["record_path"] == str(tmp_path / f"fork-trace.pid{child['pid']}.jsonl")
    assert parent["record_path"] == str(trace)
    assert [r.step for r in _read_back(trace) if r.kind == "train"] == list(range(1, 31))
    assert [r.step for r in _read_back(Path(child["record_path"])) if r.kind == "train"] == list(range(1001, 1011))
    assert not (tmp_path / f"fork-trace.pid{idle['pid']}.jsonl").exists()


EXIT_SCRIPT = """
import sys
from monitor import Reporter

rep = Reporter(run=sys.argv[2], address=sys.argv[1], heartbeat_interval=0)
for s in range(1, 501):
    rep.log("train", s, {"loss": 1.0 / s})
rep.log("end", 500, status="completed")
# No close(): leaving the interpreter must deliver what is queued.
"""


def test_interpreter_exit_delivers_queued_records(daemon: Any) -> None:
    run = "rep-exit"
    t0 = time.monotonic()
    res = run_script(EXIT_SCRIPT, daemon.grpc_address, run)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 30
    recs = stored_records(daemon.store, run)
    assert [r.step for r in recs if r.kind == "train"] == list(range(1, 501))
    assert recs[-1].kind == "end"
    runs = {r["run"]: r for r in http_json(daemon.http_url + "/api/v1/runs")["runs"]}
    assert runs[run]["status"] == "completed"
    assert runs[run]["last_step"] == 500


def test_interpreter_exit_with_daemon_absent_is_bounded() -> None:
    _, addr = absent_address()
    t0 = time.monotonic()
    res = run_script(EXIT_SCRIPT, addr, "rep-exit-absent")
    assert res.returncode == 0, res.stderr
    # The exit hook waits a few seconds at most; a training job must not hang at its end.
    assert time.monotonic() - t0 < 15
