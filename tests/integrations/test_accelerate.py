"""monitor.integrations.accelerate: a real Accelerate run (tiny GPT-2, 1 or 2 processes) against a real daemon."""

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
from tests.helpers import free_port, http_json, metrics, sample, wait_for

import accelerate  # noqa: F401 - in the dev extra: missing means a broken install
import transformers  # noqa: F401 - in the dev extra: missing means a broken install

SCRIPT = Path(__file__).parent / "scripts" / "acc_train.py"
ROOT = Path(__file__).resolve().parents[2]


def stored(daemon: Any, run: str, kind: str | None = None) -> list[Record]:
    """Every record of `run` the daemon committed, in arrival order."""
    out = []
    for *_, data in daemon.store.batches(run):
        out.extend(r for r in decode_batch(data).records if kind is None or r.kind == kind)
    return out


def launch(daemon: Any, run: str, out: Path, nproc: int, *args: str, ok: bool = True) -> str:
    """Run the training script (torchrun for more than one process) and fail with its output if it fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "ACCELERATE_"))}
    env.update(TRAINGUARD_ADDRESS=daemon.grpc_address, TRAINGUARD_RUN=run, OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(SCRIPT)]
    else:
        cmd = [sys.executable, str(SCRIPT)]
    proc = subprocess.run(cmd + ["--out", str(out), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stderr


def refs(out: Path, nproc: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_two_processes_every_rank_reports_and_the_tracker_sends_the_logged_loss(daemon: Any, tmp_path: Path) -> None:
    run = "acc-ddp"
    launch(daemon, run, tmp_path, 2)
    ref = refs(tmp_path, 2)
    steps = ref[0]["steps"]
    assert steps == 6 and all(r["world_size"] == 2 for r in ref)

    train = stored(daemon, run, "train")
    # The per-rank path: one record per optimizer step from each rank, with timings, never a loss.
    for rank in (0, 1):
        per_step = [r for r in train if r.rank == rank and "step_time_seconds" in r.values]
        assert [r.step for r in per_step] == list(range(1, steps + 1))
        for i, rec in enumerate(per_step):
            v = rec.values
            assert "loss" not in v
            assert v["step_time_seconds"] > 0
            assert 0 < v["compute_time_seconds"] < v["step_time_seconds"]
            if i > 0:  # the first step has no previous step to wait after
                assert 0 <= v["data_time_seconds"] < v["step_time_seconds"]
            # The global norm before clipping (0.5), as accelerator.clip_grad_norm_ returned it to the script.
            assert v["grad_norm"] == pytest.approx(ref[rank]["norms"][i], rel=1e-6)
            assert v["grad_norm"] > 0.5
            assert v["lr"] == 1e-3
            assert v["tokens"] == ref[rank]["tokens"] and v["samples"] == ref[rank]["samples"]
    # After the all-reduce every rank steps with the same gradients.
    assert ref[0]["norms"] == ref[1]["norms"]

    # The tracker path: the main process only, the loss the script logged, each step exactly once.
    logged = [r for r in train if "loss" in r.values]
    assert {r.rank for r in logged} == {0}
    assert [r.step for r in logged] == list(range(1, steps + 1))
    assert [r.values["loss"] for r in logged] == ref[0]["logged"]
    assert all(r.values["epoch"] == 0 for r in logged)
    assert not any("note" in r.values or "lr" in r.values for r in logged)  # text dropped; lr comes from the watch
    assert ref[0]["logged"][-1] < ref[0]["logged"][0]

    (ev,) = stored(daemon, run, "eval")
    assert (ev.rank, ev.step) == (0, steps)
    assert ev.values == {"loss": ref[0]["eval_loss"], "perplexity": pytest.approx(math.exp(ref[0]["eval_loss"]))}

    runs = stored(daemon, run, "run")
    assert {r.rank for r in runs} == {0, 1}
    assert all(r.world_size == 2 and r.meta["framework"] == "accelerate" for r in runs)
    assert all(r.meta["accelerate"]["num_processes"] == 2 for r in runs)
    assert any(r.meta.get("config") == {"lr": 1e-3, "accum": 2, "clip": 0.5} for r in runs if r.rank == 0)
    assert {r.rank: r.status for r in stored(daemon, run, "end")} == {0: "completed", 1: "completed"}
    assert {r.rank for r in stored(daemon, run, "system") if r.values.get("host_rss_bytes", 0) > 0} == {0, 1}

    detail = wait_for(lambda: (d := http_json(f"{daemon.http_url}/api/v1/runs/{run}"))["status"] == "completed"
                      and d, timeout=10, what="the run to complete")
    assert detail["world_size"] == 2 and detail["last_step"] == steps
    assert [r["rank"] for r in detail["ranks"]] == [0, 1]
    for r in detail["ranks"]:
        assert r["last_step"] == steps and r["status"] == "completed"
        assert r["step_time_seconds"] > 0 and r["compute_time_seconds"] > 0 and r["host_rss_bytes"] > 0
    assert detail["values"]["train"]["loss"] == ref[0]["logged"][-1]
    assert detail["values"]["eval"]["loss"] == ref[0]["eval_loss"]
    m = metrics(daemon)
    for rank in ("0", "1"):
        assert sample(m, "trainguard_step_duration_seconds", run=run, rank=rank) > 0
        assert sample(m, "trainguard_compute_duration_seconds", run=run, rank=rank) > 0
    assert sample(m, "trainguard_train_loss", run=run) == ref[0]["logged"][-1]
    assert sample(m, "trainguard_eval_loss", run=run) == ref[0]["eval_loss"]


def test_one_process_with_the_loss_handed_to_the_watch_reports_it_once(daemon: Any, tmp_path: Path) -> None:
    run = "acc-manual"
    launch(daemon, run, tmp_path, 1, "--manual", "--clip", "0", "--steps", "4", "--trackers-first")
    (ref,) = refs(tmp_path, 1)
    steps = ref["steps"]
    assert steps == 4 and ref["world_size"] == 1

    train = stored(daemon, run, "train")
    assert {r.rank for r in train} == {0}
    # The watch reports the mean micro-batch loss; the tracker leaves the logged train_loss out.
    with_loss = [r for r in train if "loss" in r.values]
    assert [r.step for r in with_loss] == list(range(1, steps + 1))
    for rec, loss, norm in zip(with_loss, ref["own"], ref["norms"]):
        assert rec.values["loss"] == pytest.approx(loss, rel=1e-6)
        # Without clipping: the global norm as the optimizer saw it, taken in its step pre-hook.
        assert rec.values["grad_norm"] == pytest.approx(norm, rel=1e-6)
        assert rec.values["step_time_seconds"] > 0
    # Only the tracker's non-loss values (epoch) arrive as extra records.
    assert all(set(r.values) == {"epoch"} for r in train if "loss" not in r.values)
    (ev,) = stored(daemon, run, "eval")
    assert (ev.step, ev.values["loss"]) == (steps, ref["eval_loss"])
    (end,) = stored(daemon, run, "end")
    assert (end.step, end.status) == (steps, "completed")
    # init_trackers came first, yet the run is announced once, by the watch: with the model, the
    # optimizer and the config that init_trackers gave the tracker.
    (announced,) = stored(daemon, run, "run")
    assert announced.meta["config"] == {"lr": 1e-3, "accum": 2, "clip": 0.0}
    assert announced.meta["model"]["type"] == "GPT2LMHeadModel"
    assert announced.meta["optimizer"]["name"] == "AdamW"


def test_an_exception_in_the_script_ends_the_run_as_failed(daemon: Any, tmp_path: Path) -> None:
    run = "acc-fail"
    stderr = launch(daemon, run, tmp_path, 1, "--fail-at", "3", ok=False)
    assert "injected failure" in stderr
    per_step = [r for r in stored(daemon, run, "train") if "step_time_seconds" in r.values]
    assert [r.step for r in per_step] == [1, 2]
    # Sent at interpreter exit: end_training() never ran, and the exception escaped the script.
    (end,) = stored(daemon, run, "end")
    assert (end.step, end.status) == (2, "failed")


def test_the_tracker_alone_maps_logged_keys_onto_train_and_eval_records(daemon: Any,
                                                                        request: pytest.FixtureRequest) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from monitor.integrations.accelerate import TrainGuardTracker

    run = "acc-tracker"
    tracker = TrainGuardTracker(run=run, address=daemon.grpc_address, heartbeat_interval=0)
    accelerator = Accelerator(log_with=[tracker], cpu=True)
    # Accelerate's state is process-wide: leave none behind for other tests in this process.
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    accelerator.init_trackers("p", config={"lr": 0.1, "schedule": "cosine", "betas": (0.9, 0.95)})
    accelerator.log({"loss": 1.5, "lr": 0.1})  # no step: the tracker counts steps itself
    accelerator.log({"train/loss": torch.tensor(1.25), "learning_rate": 0.05, "epoch": 1})
    accelerator.log({"eval_loss": 2.0, "val/acc": 0.5, "perplexity": 7.25, "note": "text", "flag": True})
    accelerator.log({"train_loss": 1.0, "validation_loss": 1.75}, step=10)
    assert accelerator.get_tracker("trainguard").tracker is tracker.tracker
    accelerator.end_training()

    assert [(r.step, r.values) for r in stored(daemon, run, "train")] == [
        (1, {"loss": 1.5, "lr": 0.1}), (2, {"loss": 1.25, "lr": 0.05, "epoch": 1}), (10, {"loss": 1.0})]
    assert [(r.step, r.values) for r in stored(daemon, run, "eval")] == [
        (2, {"loss": 2.0, "accuracy": 0.5, "perplexity": 7.25}), (10, {"loss": 1.75})]
    (announced,) = stored(daemon, run, "run")
    assert announced.world_size == 1 and announced.meta["framework"] == "accelerate"
    assert announced.meta["config"] == {"lr": 0.1, "schedule": "cosine", "betas": [0.9, 0.95]}
    (end,) = stored(daemon, run, "end")
    assert (end.rank, end.step, end.status) == (0, 10, "completed")


def test_two_processes_shard_a_probe_and_rank0_reports_every_item(daemon: Any, tmp_path: Path) -> None:
    run = "acc-probe"
    launch(daemon, run, tmp_path, 2, "--steps", "6", "--probe-every", "3", "--shard")
    ref = refs(tmp_path, 2)
    assert [r["steps"] for r in ref] == [6, 6]  # probing took no step from either rank
    probes = [r for r in stored(daemon, run, "probe") if r.suite == "reading"]
    assert [r.step for r in probes] == [0, 3, 6] and {r.rank for r in probes} == {0}
    for r in probes:
        # Six items split over two ranks and gathered: all of them scored, in the suite's order.
        assert r.values["items_scored"] == 6 and r.values["items_total"] == 6
        assert len(r.items) == 6 and all(x in (0.0, 1.0) for x in r.items)
    gold = [r for r in stored(daemon, run, "probe") if r.suite == "reading/gold_logprob"]
    assert [r.step for r in gold] == [0, 3, 6] and all(math.isfinite(x) and x < 0 for x in gold[0].items)
