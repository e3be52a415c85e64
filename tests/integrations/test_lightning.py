"""monitor.integrations.lightning: real Lightning fits (DDP on 2 CPU processes, 1 device) against a real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from monitor.records import Record
from monitor.wire import decode_batch
from tests.helpers import http_json, metrics, sample, wait_for

import lightning  # noqa: F401 - in the dev extra: missing means a broken install

SCRIPT = Path(__file__).parent / "scripts" / "pl_train.py"
ROOT = Path(__file__).resolve().parents[2]


def stored(daemon: Any, run: str, kind: str | None = None) -> list[Record]:
    """Every record of `run` the daemon committed, in arrival order."""
    out = []
    for *_, data in daemon.store.batches(run):
        out.extend(r for r in decode_batch(data).records if kind is None or r.kind == kind)
    return out


def fit(daemon: Any, run: str, out: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the Lightning script (it launches its own DDP ranks) and check its exit status."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "LOCAL_RANK", "PL_"))}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(TRAINGUARD_ADDRESS=daemon.grpc_address, TRAINGUARD_RUN=run, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def refs(out: Path, nproc: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def step_losses(ref: dict[str, Any]) -> dict[int, list[float]]:
    """The losses training_step returned, grouped by the optimizer step they belong to."""
    out: dict[int, list[float]] = defaultdict(list)
    for step, loss in ref["losses"]:
        out[step].append(loss)
    return out


def test_ddp_two_devices_every_rank_reports_every_step(daemon: Any, tmp_path: Path) -> None:
    run = "pl-ddp"
    clip = 0.05
    fit(daemon, run, tmp_path, "--devices", "2", "--strategy", "ddp", "--steps", "6", "--clip", str(clip))
    ref = refs(tmp_path, 2)
    steps = 6
    assert all(r["world_size"] == 2 and r["global_step"] == steps for r in ref)

    train = stored(daemon, run, "train")
    evals = stored(daemon, run, "eval")
    for rank in (0, 1):
        recs = [r for r in train if r.rank == rank]
        assert [r.step for r in recs] == list(range(1, steps + 1))
        losses = step_losses(ref[rank])
        norms = {int(k): v for k, v in ref[rank]["norms"].items()}
        for rec in recs:
            v = rec.values
            # Each rank's own loss, exactly as its LightningModule returned it.
            assert [v["loss"]] == losses[rec.step]
            # The global norm before Lightning clipped it to 0.05, after the gradients were all-reduced.
            assert v["grad_norm"] == pytest.approx(norms[rec.step], rel=1e-6)
            assert v["grad_norm"] > clip
            assert v["lr"] == 0.1
            assert v["samples"] == 8
            assert v["step_time_seconds"] > 0
            assert 0 < v["compute_time_seconds"] < v["step_time_seconds"]
            assert 0 <= v["data_time_seconds"] < v["step_time_seconds"]
        # Two validations (one per epoch of 3 batches per rank); the sanity check sends nothing.
        ev = [r for r in evals if r.rank == rank]
        assert [(r.step, r.values) for r in ev] == [(s, {"loss": val}) for s, val in ref[rank]["vals"]]
        assert [r.step for r in ev] == [3, 6]
    assert ref[0]["losses"] != ref[1]["losses"]  # each rank saw its own shard

    runs = stored(daemon, run, "run")
    assert {r.rank for r in runs} == {0, 1}
    for r in runs:
        assert r.world_size == 2 and r.meta["framework"] == "lightning"
        assert r.meta["lightning"]["strategy"] == "DDPStrategy"
        assert r.meta["model"]["type"] == "Regressor"
        assert r.meta["optimizer"]["name"] == "SGD"
    assert {r.rank: (r.step, r.status) for r in stored(daemon, run, "end")} == \
        {0: (steps, "completed"), 1: (steps, "completed")}
    assert {r.rank for r in stored(daemon, run, "system") if r.values.get("host_rss_bytes", 0) > 0} == {0, 1}

    detail = wait_for(lambda: (d := http_json(f"{daemon.http_url}/api/v1/runs/{run}"))["status"] == "completed"
                      and d, timeout=10, what="the run to complete")
    assert detail["world_size"] == 2
    assert [(r["rank"], r["last_step"]) for r in detail["ranks"]] == [(0, steps), (1, steps)]
    assert all(r["step_time_seconds"] > 0 and r["compute_time_seconds"] > 0 for r in detail["ranks"])
    m = metrics(daemon)
    for rank in ("0", "1"):
        assert sample(m, "trainguard_step_duration_seconds", run=run, rank=rank) > 0
        assert sample(m, "trainguard_data_wait_seconds", run=run, rank=rank) is not None
    assert sample(m, "trainguard_train_loss", run=run) == step_losses(ref[0])[steps][0]
    assert sample(m, "trainguard_eval_loss", run=run) == ref[0]["vals"][-1][1]


def test_one_device_pytorch_lightning_with_gradient_accumulation(daemon: Any, tmp_path: Path) -> None:
    import pytorch_lightning  # noqa: F401 - in the dev extra: missing means a broken install
    run = "pl-accum"
    fit(daemon, run, tmp_path, "--package", "pytorch_lightning", "--accum", "2", "--steps", "4",
        "--samples", "64")
    (ref,) = refs(tmp_path, 1)
    assert ref["global_step"] == 4

    train = stored(daemon, run, "train")
    assert [r.step for r in train] == [1, 2, 3, 4]  # one record per optimizer step, not per batch
    losses = step_losses(ref)
    norms = {int(k): v for k, v in ref["norms"].items()}
    for rec in train:
        assert len(losses[rec.step]) == 2
        # The mean of the two batches' losses (Lightning hands the callback each one divided by 2).
        assert rec.values["loss"] == pytest.approx(sum(losses[rec.step]) / 2, rel=1e-6)
        assert rec.values["grad_norm"] == pytest.approx(norms[rec.step], rel=1e-6)
        assert rec.values["samples"] == 16
        assert rec.values["compute_time_seconds"] > 0
    (ev,) = stored(daemon, run, "eval")
    assert (ev.step, ev.values) == (4, {"loss": ref["vals"][0][1]})
    (end,) = stored(daemon, run, "end")
    assert (end.step, end.status) == (4, "completed")


def test_an_exception_in_training_step_ends_the_run_as_failed(daemon: Any, tmp_path: Path) -> None:
    run = "pl-fail"
    proc = fit(daemon, run, tmp_path, "--steps", "6", "--fail-at", "3", ok=False)
    assert "injected failure" in proc.stderr
    assert [r.step for r in stored(daemon, run, "train")] == [1, 2]
    (end,) = stored(daemon, run, "end")
    assert (end.step, end.status) == (2, "failed")
    summary = wait_for(lambda: {r["run"]: r for r in http_json(daemon.http_url + "/api/v1/runs")["runs"]}.get(run),
                       timeout=10, what="the run")
    assert summary["status"] == "failed"


LM_SCRIPT = Path(__file__).parent / "scripts" / "pl_lm.py"


def fit_lm(daemon: Any, run: str, out: Path, *args: str) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "LOCAL_RANK", "PL_"))}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(TRAINGUARD_ADDRESS=daemon.grpc_address, TRAINGUARD_RUN=run, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(LM_SCRIPT), "--out", str(out), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def test_ddp_sharded_probe_gathers_every_item_and_leaves_the_losses_alone(daemon: Any, tmp_path: Path) -> None:
    plain = fit_lm(daemon, "pl-lm-ref", tmp_path / "ref", "--devices", "2", "--strategy", "ddp",
                   "--probe-every", "0")
    probed = fit_lm(daemon, "pl-lm-probe", tmp_path / "probe", "--devices", "2", "--strategy", "ddp",
                    "--probe-every", "3", "--shard")
    assert [r["global_step"] for r in probed] == [6, 6]
    # Dropout is on and the loader shuffles: equal losses mean the probes moved no generator.
    assert [r["losses"] for r in probed] == [r["losses"] for r in plain]
    assert all(r["training"] for r in probed)
    recs = [r for r in stored(daemon, "pl-lm-probe", "probe") if r.suite == "arithmetic"]
    assert [r.step for r in recs] == [0, 3, 6] and {r.rank for r in recs} == {0}
    assert all(r.values["items_scored"] == 6 and len(r.items) == 6 for r in recs)
    assert not stored(daemon, "pl-lm-ref", "probe")
