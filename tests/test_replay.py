"""`trainguard replay` as a real subprocess against a real daemon: every trace, alerts, bad lines, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.records import MAX_META_BYTES, Record, TraceError, read_trace
from tests.helpers import ROOT, SAMPLE_TRACES, TRACES, free_port, http_json, http_text

TRACE_FILES = SAMPLE_TRACES
NONFINITE = TRACES / "cpu" / "cpu-nonfinite-01.jsonl.gz"
T0 = 1_700_000_000.0


def run_replay(address: str, *paths: Any, extra: tuple[str, ...] = (), timeout: float = 120) -> Any:
    cmd = [sys.executable, "-m", "monitor", "replay", "--quiet", "--address", address, *extra, *map(str, paths)]
    return subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def labels_of(path: Path) -> dict[str, Any]:
    return json.loads((path.parent / "scenarios.json").read_text())["traces"][path.name]


def records_of(path: Path) -> list[Record]:
    recs = [r for r in read_trace(str(path)) if not isinstance(r, TraceError)]
    assert recs
    return recs


def onset_time(recs: list[Record], labels: dict[str, Any]) -> float:
    """Event time at which the labelled fault began (the end of time when there is none)."""
    if "onset_t" in labels:
        return float(labels["onset_t"])
    if "onset_step" in labels:
        return min(r.t for r in recs if r.step is not None and r.step >= labels["onset_step"])
    return math.inf


def alerts_of(daemon: Any, run: str) -> list[dict[str, Any]]:
    return http_json(f"{daemon.http_url}/api/v1/alerts?run={run}&state=all")["alerts"]


@pytest.mark.parametrize("path", TRACE_FILES, ids=lambda p: p.name)
def test_replay_every_trace(daemon: Any, path: Path) -> None:
    recs = records_of(path)
    run = recs[0].run
    out = run_replay(daemon.grpc_address, path)
    assert out.returncode == 0, out.stderr
    assert f"replayed {len(recs):,} records from 1 file(s)" in out.stdout
    assert f"runs: {run}" in out.stdout
    assert "rejected" not in out.stderr

    # Replay returns only once the daemon applied every batch: no waiting needed here.
    detail = http_json(f"{daemon.http_url}/api/v1/runs/{run}")
    assert detail["records"] == len(recs)
    assert detail["last_step"] == max(r.step for r in recs if r.step is not None)
    assert detail["last_seen"] == max(r.t for r in recs)
    assert detail["world_size"] == recs[0].world_size
    assert sorted(r["rank"] for r in detail["ranks"]) == sorted({r.rank for r in recs})
    assert daemon.store.count_records(run) == len(recs)

    # No page before the labelled onset, and none at all in a healthy trace (TRACE_FORMAT.md labels).
    labels = labels_of(path)
    onset = onset_time(recs, labels) if labels["expect"] else math.inf
    alerts = alerts_of(daemon, run)
    assert [a for a in alerts if a["severity"] in ("warning", "critical") and a["started_at"] < onset] == []
    # And every labelled incident is caught in its window, at any severity (one is enough with any_of).
    hits = [_first_in_window(alerts, exp, onset, recs) for exp in labels["expect"]]
    if hits:
        assert (any if labels.get("any_of") else all)(hits), (labels["expect"], alerts)


def _first_in_window(alerts: list[dict[str, Any]], exp: dict[str, Any], onset: float, recs: list[Record]) -> bool:
    """Whether the expected alert first fired inside its labelled window (TRACE_FORMAT.md)."""
    mine = [a for a in alerts if a["name"] == exp["alert"] and exp.get("rank") in (None, a["rank"])]
    if not mine:
        return False
    first = min(mine, key=lambda a: a["started_at"])
    if "from_step" in exp:
        step = first["step"]
        if step is None:  # a time-based alert: the step the lead rank had reached by then
            step = max((r.step for r in recs if r.kind == "train" and r.t <= first["started_at"]), default=-1)
        return exp["from_step"] <= step <= exp["to_step"]
    return exp["from_t_offset"] <= first["started_at"] - onset <= exp["to_t_offset"]


@pytest.mark.parametrize("path", [p for p in TRACE_FILES if labels_of(p)["expect"] == []], ids=lambda p: p.name)
def test_healthy_traces_page_nobody(daemon: Any, path: Path) -> None:
    # A healthy run may have an odd batch worth a note (severity info), never a page.
    run = records_of(path)[0].run
    assert run_replay(daemon.grpc_address, path).returncode == 0
    assert [a for a in alerts_of(daemon, run) if a["severity"] != "info"] == []
    assert http_json(f"{daemon.http_url}/api/v1/runs/{run}")["health"] in ("ok", "info")
    active = [line for line in http_text(daemon.http_url + "/metrics").splitlines()
              if line.startswith("trainguard_alert_active{") and f'run="{run}"' in line and line.endswith(" 1.0")]
    assert [line for line in active if 'severity="info"' not in line] == []


def _check_single_nonfinite(daemon: Any) -> dict[str, Any]:
    expect = labels_of(NONFINITE)["expect"]
    assert [e["alert"] for e in expect] == ["NonFinite"]
    window = (expect[0]["from_step"], expect[0]["to_step"])
    alerts = http_json(daemon.http_url + "/api/v1/alerts")["alerts"]  # immediately: no polling, no sleep
    assert len(alerts) == 1
    a = alerts[0]
    assert (a["run"], a["name"], a["severity"], a["state"]) == ("cpu-nonfinite-01", "NonFinite", "critical", "firing")
    assert a["step"] == 610 and window[0] <= a["step"] <= window[1]
    assert a["value"] == "nan" and a["rank"] is None
    first_bad = next(r for r in records_of(NONFINITE) if r.kind == "train" and r.step == 610)
    assert a["started_at"] == first_bad.t  # event time, not the daemon's clock
    return a


def test_nonfinite_trace_fires_one_alert_at_the_injected_step(daemon: Any) -> None:
    out = run_replay(daemon.grpc_address, NONFINITE)
    assert out.returncode == 0, out.stderr
    _check_single_nonfinite(daemon)
    assert http_json(daemon.http_url + "/api/v1/runs/cpu-nonfinite-01")["health"] == "critical"
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(http_text(daemon.http_url + "/metrics"))
               for s in fam.samples}
    key = (("alert", "NonFinite"), ("run", "cpu-nonfinite-01"))
    assert metrics[("trainguard_alerts_fired_total", key)] == 1
    assert metrics[("trainguard_alert_active", key[:1] + key[1:] + (("severity", "critical"),))] == 1


def test_small_batches_give_the_same_alert(daemon: Any) -> None:
    out = run_replay(daemon.grpc_address, NONFINITE, extra=("--batch-size", "7"))
    assert out.returncode == 0, out.stderr
    _check_single_nonfinite(daemon)
    assert daemon.ingest.batches == math.ceil(749 / 7)
    assert http_json(daemon.http_url + "/api/v1/runs/cpu-nonfinite-01")["records"] == 749


def test_replay_all_traces_in_one_call(daemon: Any) -> None:
    expected = {}
    for p in TRACE_FILES:
        recs = records_of(p)
        expected[recs[0].run] = len(recs)
    out = run_replay(daemon.grpc_address, *TRACE_FILES)
    assert out.returncode == 0, out.stderr
    assert f"replayed {sum(expected.values()):,} records from {len(TRACE_FILES)} file(s)" in out.stdout
    runs = {r["run"]: r for r in http_json(daemon.http_url + "/api/v1/runs")["runs"]}
    assert set(runs) == set(expected)
    for run, n in expected.items():
        assert http_json(f"{daemon.http_url}/api/v1/runs/{run}")["records"] == n
    alerts = http_json(daemon.http_url + "/api/v1/alerts")["alerts"]
    assert [(a["run"], a["step"]) for a in alerts if a["name"] == "NonFinite"] == [("cpu-nonfinite-01", 610)]


def test_interleaved_runs_in_one_file(daemon: Any, tmp_path: Path) -> None:
    path = tmp_path / "two-runs.jsonl"
    lines = []
    for run in ("run-a", "run-b"):
        lines.append({"kind": "run", "run": run, "t": T0, "world_size": 1})
    for step in range(1, 26):
        for run in ("run-a", "run-b"):
            lines.append({"kind": "train", "run": run, "t": T0 + step, "step": step,
                          "values": {"loss": 1.0 if run == "run-a" else 2.0}})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = run_replay(daemon.grpc_address, path)
    assert out.returncode == 0, out.stderr
    assert "runs: run-a, run-b" in out.stdout
    for run, loss in (("run-a", 1.0), ("run-b", 2.0)):
        d = http_json(f"{daemon.http_url}/api/v1/runs/{run}")
        assert d["records"] == 26 and d["last_step"] == 25 and d["values"]["train"]["loss"] == loss


def test_bad_lines_are_reported_and_good_lines_arrive(daemon: Any, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    huge_meta = {"blob": "x" * (MAX_META_BYTES + 10)}
    lines = [
        json.dumps({"kind": "train", "run": "bad-replay", "t": T0 + 1, "step": 1, "values": {"loss": 2.0}}).encode(),
        b'{"kind":"train","run":"bad-replay","t":1700000001.5,"step":1,"values":{"lo\xffss":1.0}}',
        json.dumps({"kind": "train", "run": "bad-replay", "t": T0 + 2, "step": 2, "values": {"loss": 1.9}}).encode(),
        b'{"kind": "train", "run": ',
        b'{"kind":"train","run":"bad-replay","t":1700000002.5,"step":"abc"}',
        json.dumps({"kind": "train", "run": "bad-replay", "t": T0 + 3, "step": 3, "values": {"loss": 1.8}}).encode(),
        b'{"kind":"train","run":"bad-replay","t":1700000003.5,"step":3,"values":{"loss":"x"}}',
        b'{"kind":"train","run":"bad-replay","t":1700000003.6,"step":3,"values":[1]}',
        # the reader accepts this line; the daemon refuses its meta (64 KiB limit) and replay names the line
        json.dumps({"kind": "run", "run": "bad-replay", "t": T0 + 3.7, "world_size": 1, "meta": huge_meta}).encode(),
        json.dumps({"kind": "train", "run": "bad-replay", "t": T0 + 4, "step": 4, "values": {"loss": 1.7}}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = run_replay(daemon.grpc_address, path)
    assert out.returncode == 1
    err = out.stderr
    assert "6 line(s) or record(s) rejected; the good ones were delivered" in err
    assert f"{path}:2: not valid UTF-8" in err
    assert f"{path}:4: not valid JSON" in err
    assert f"{path}:5: field 'step': expected an integer" in err
    assert f"{path}:7: field 'values.loss': expected a number" in err
    assert f"{path}:8: field 'values': expected an object" in err
    assert f"{path}:9: field 'meta_json':" in err and str(MAX_META_BYTES) in err
    for good in (1, 3, 6, 10):
        assert f"{path}:{good}:" not in err
    assert "replayed 4 records from 1 file(s)" in out.stdout
    d = http_json(daemon.http_url + "/api/v1/runs/bad-replay")
    assert d["records"] == 4 and d["last_step"] == 4 and d["values"]["train"]["loss"] == 1.7


def test_many_bad_lines_are_summarised(daemon: Any, tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    good = json.dumps({"kind": "train", "run": "many-bad", "t": T0, "step": 1, "values": {"loss": 1.0}})
    path.write_text("not json\n" * 30 + good + "\n")
    out = run_replay(daemon.grpc_address, path)
    assert out.returncode == 1
    shown = [ln for ln in out.stderr.splitlines() if ln.strip().startswith(f"{path}:")]
    assert len(shown) == 20
    assert "... and 10 more" in out.stderr
    assert http_json(daemon.http_url + "/api/v1/runs/many-bad")["records"] == 1


def test_records_too_big_for_one_batch_are_split(daemon: Any, tmp_path: Path) -> None:
    # 100,000 probe items per record is within the format's limits; eight of them exceed one 4 MiB batch.
    path = tmp_path / "big-probes.jsonl"
    lines = [{"kind": "run", "run": "big-probes", "t": T0, "world_size": 1}]
    lines += [{"kind": "probe", "run": "big-probes", "t": T0 + i, "step": i, "suite": "s",
               "values": {"accuracy": 0.5}, "items": [i % 2] * 100_000} for i in range(1, 9)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = run_replay(daemon.grpc_address, path)
    assert out.returncode == 0, out.stderr
    assert "replayed 9 records" in out.stdout
    assert http_json(daemon.http_url + "/api/v1/runs/big-probes")["records"] == 9
    assert daemon.ingest.batches > 1


def test_replay_to_a_closed_port_exits_2(tmp_path: Path) -> None:
    port = free_port()
    out = run_replay(f"127.0.0.1:{port}", NONFINITE, timeout=60)
    assert out.returncode == 2
    assert f"trainguard replay: error: cannot reach a trainguard daemon at 127.0.0.1:{port}" in out.stderr
    assert "trainguard serve" in out.stderr
    assert "Traceback" not in out.stderr


def test_replay_of_a_missing_file_exits_2(daemon: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl.gz"
    out = run_replay(daemon.grpc_address, NONFINITE, missing)
    assert out.returncode == 2
    assert f"no such file: {missing}" in out.stderr
    assert http_json(daemon.http_url + "/api/v1/runs")["runs"] == []  # nothing was sent


def test_progress_bar_only_on_a_terminal(daemon: Any) -> None:
    cmd = [sys.executable, "-m", "monitor", "replay", "--address", daemon.grpc_address, str(NONFINITE)]
    out = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "[#" not in out.stderr and "\r" not in out.stderr


def test_the_straggler_trace_exports_each_ranks_score(daemon: Any) -> None:
    from tests.helpers import metrics, sample

    path = TRACES / "cpu" / "cpu-straggler-01.jsonl.gz"
    run = records_of(path)[0].run
    assert run_replay(daemon.grpc_address, path).returncode == 0
    m = metrics(daemon)
    slow, fast = sample(m, "trainguard_straggler_score", run=run, rank="1"), \
        sample(m, "trainguard_straggler_score", run=run, rank="0")
    assert slow is not None and fast is not None
    assert slow < 0.75 <= 0.95 <= fast  # rank 1 runs 2.2x slower from step 520 on
    assert sample(m, "trainguard_detector_statistic", run=run, detector="StragglerRank") == slow
