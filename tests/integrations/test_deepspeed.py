"""monitor.integrations.deepspeed on a real DeepSpeed engine (tiny GPT-2, CPU, gloo), reporting to a real daemon."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from monitor.records import Record
from monitor.wire import decode_batch
from tests.helpers import ROOT, free_port, http_json, wait_for

import deepspeed  # noqa: F401 - in the dev extra: missing means a broken install
import transformers  # noqa: F401 - in the dev extra: missing means a broken install

SCRIPT = Path(__file__).parent / "scripts" / "ds_train.py"


def stored_records(daemon: Any, run: str, kind: str | None = None) -> list[Record]:
    out = []
    for *_, data in daemon.store.batches(run):
        out.extend(r for r in decode_batch(data).records if kind is None or r.kind == kind)
    return out


def run_engine(daemon: Any, tmp_path: Path, run: str, *args: str) -> dict[str, Any]:
    """ds_train.py in one process (the launcher's environment set by hand); returns its reference values."""
    out = tmp_path / f"{run}.json"
    env = dict(os.environ, TRAINGUARD_ADDRESS=daemon.grpc_address, TRAINGUARD_RUN=run, HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(out.read_text())
    assert res["closed"] is True and res["run"] == run
    return res


def nonfinite_alert(daemon: Any, run: str) -> dict[str, Any]:
    def fired() -> list[dict[str, Any]]:
        alerts = http_json(f"{daemon.http_url}/api/v1/alerts?run={run}&state=all")["alerts"]
        return [a for a in alerts if a["name"] == "NonFinite"]

    (alert,) = wait_for(fired, timeout=5, what="the NonFinite alert")
    # The meta names the scheduler's base lr, so the warm-up is no learning-rate anomaly.
    alerts = http_json(f"{daemon.http_url}/api/v1/alerts?run={run}&state=all")["alerts"]
    assert "LearningRateAnomaly" not in {a["name"] for a in alerts}
    return alert


def test_zero1_reports_the_engine_s_grad_norm_and_a_skipped_step(daemon: Any, tmp_path: Path) -> None:
    run, steps, gas, nan_at = "ds-zero1", 8, 2, 6
    ref = run_engine(daemon, tmp_path, run, "--stage", "1", "--gas", str(gas), "--steps", str(steps),
                     "--nan-grad-at", str(nan_at))
    recs = stored_records(daemon, run, "train")
    assert [r.step for r in recs] == list(range(1, steps + 1))  # one record per optimizer step
    for r, want in zip(recs, ref["steps"]):
        assert want["micro_batches"] == gas
        assert r.values["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert r.values["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert r.values["skipped_steps"] == want["skipped_steps"] == (1 if r.step >= nan_at else 0)
        assert (r.values["samples"], r.values["tokens"]) == (gas * 4, gas * 4 * 32)
        assert r.values["step_time_seconds"] >= r.values["compute_time_seconds"] > 0
        assert r.values["data_time_seconds"] >= 0
        assert "loss_scale" not in r.values and "overflow" not in r.values  # fp32: no loss scaler
        if r.step == nan_at:
            # ZeRO found the non-finite norm and skipped the step; in fp32 that is a fault, so it is reported.
            assert want["engine_grad_norm"] == math.inf and r.values["grad_norm"] == math.inf
        else:
            assert r.values["grad_norm"] == pytest.approx(want["engine_grad_norm"], rel=1e-6)
    lrs = [r.values["lr"] for r in recs]
    assert lrs[nan_at] == lrs[nan_at - 1]  # the scheduler did not move on after the skipped step

    a = nonfinite_alert(daemon, run)
    assert (a["name"], a["step"], a["value"], a["labels"]["metric"]) == ("NonFinite", nan_at, "inf", "grad_norm")

    (run_rec,) = stored_records(daemon, run, "run")
    meta = run_rec.meta
    assert (run_rec.world_size, meta["framework"], meta["model"]["type"]) == (1, "deepspeed", "GPT2LMHeadModel")
    assert meta["versions"]["deepspeed"]
    assert meta["deepspeed"]["zero_stage"] == 1
    assert meta["deepspeed"]["gradient_accumulation_steps"] == gas
    assert (meta["optimizer"]["name"], meta["optimizer"]["lr"]) == ("AdamW", 1e-3)
    (ev,) = stored_records(daemon, run, "eval")
    assert (ev.step, ev.values) == (steps, {"loss": 1.5, "accuracy": 0.25})
    assert [r.values["host_rss_bytes"] > 0 for r in stored_records(daemon, run, "system")][:1] == [True]
    (end,) = stored_records(daemon, run, "end")
    assert (end.step, end.status) == (steps, "completed")


def test_without_zero_the_pre_clip_norm_is_trainguard_s_own(daemon: Any, tmp_path: Path) -> None:
    # fp32 without ZeRO: the engine keeps no norm (get_global_grad_norm() is None) and clips in place.
    run, steps, nan_at = "ds-stage0", 6, 4
    ref = run_engine(daemon, tmp_path, run, "--stage", "0", "--gas", "1", "--steps", str(steps), "--clip", "0.5",
                     "--nan-grad-at", str(nan_at))
    recs = stored_records(daemon, run, "train")
    assert [r.step for r in recs] == list(range(1, steps + 1))
    for r, want in zip(recs, ref["steps"]):
        assert want["engine_grad_norm"] is None
        if r.step < nan_at:
            assert want["own_grad_norm"] > 0.5  # so these steps really were clipped
            assert r.values["grad_norm"] == pytest.approx(want["own_grad_norm"], rel=1e-5)
            assert r.values["loss"] == pytest.approx(want["loss"], rel=1e-6)
        elif r.step == nan_at:
            assert math.isnan(r.values["grad_norm"])
        assert r.values["skipped_steps"] == 0  # nothing checks for overflow without ZeRO or fp16
    a = nonfinite_alert(daemon, run)
    assert (a["name"], a["step"], a["labels"]["metric"]) == ("NonFinite", nan_at, "grad_norm")


def test_a_probe_runs_on_the_engine_s_module_at_start_and_every_n_steps(daemon: Any, tmp_path: Path) -> None:
    run = "ds-probe"
    res = run_engine(daemon, tmp_path, run, "--stage", "1", "--steps", "8", "--probe-every", "4")
    assert [s["step"] for s in res["steps"]] == list(range(1, 9))
    probes = stored_records(daemon, run, "probe")
    assert [(r.suite, r.step) for r in probes] == [
        ("arithmetic", 0), ("arithmetic/gold_logprob", 0), ("arithmetic", 4), ("arithmetic/gold_logprob", 4),
        ("arithmetic", 8), ("arithmetic/gold_logprob", 8)]
    assert all(len(r.items) == 6 for r in probes)
    assert all(r.values["items_scored"] == 6 for r in probes if r.suite == "arithmetic")
    # The model trains between probes: the gold answers' log-probabilities move.
    assert probes[1].items != probes[5].items
    train = [r for r in stored_records(daemon, run, "train") if "loss" in r.values]
    assert [r.step for r in train] == list(range(1, 9))
