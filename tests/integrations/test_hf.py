"""monitor.integrations.hf on a real Trainer (tiny GPT-2, CPU), reporting to a real daemon."""

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

import transformers  # noqa: F401 - in the dev extra: missing means a broken install
import torch

from transformers import Trainer, TrainingArguments  # noqa: E402

from monitor.integrations.hf import TrainGuardCallback, attach  # noqa: E402
from tests.integrations.tiny import tiny_gpt2, tiny_text_dataset, tiny_tokenizer  # noqa: E402

SCRIPTS = Path(__file__).parent / "scripts"
SEQ = 32


def stored_records(daemon: Any, run: str, kind: str | None = None) -> list[Record]:
    out = []
    for *_, data in daemon.store.batches(run):
        out.extend(r for r in decode_batch(data).records if kind is None or r.kind == kind)
    return out


def make_trainer(tmp_path: Path, *, steps: int, logging_steps: int, gas: int = 1, eval_steps: int | None = None,
                 trainer_cls: type = Trainer, callbacks: list[Any] | None = None) -> Any:
    torch.set_num_threads(1)  # the same numbers in every run of the test, whatever the machine's load
    tok = tiny_tokenizer()
    train = tiny_text_dataset(tok, 96, SEQ)
    val = tiny_text_dataset(tok, 16, SEQ, seed=1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=gas, learning_rate=3e-3, warmup_steps=5, weight_decay=0.01, max_grad_norm=1.0,
        logging_steps=logging_steps, eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps,
        per_device_eval_batch_size=8, use_cpu=True, report_to="none", save_strategy="no", seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    return trainer_cls(model=tiny_gpt2(), args=args, train_dataset=train, eval_dataset=val if eval_steps else None,
                       callbacks=callbacks)


def train_logs(trainer: Any) -> dict[int, dict[str, Any]]:
    """The Trainer's own training logs (loss, grad_norm, learning_rate), by step."""
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h}


def test_every_step_arrives_with_the_trainer_s_own_loss_grad_norm_and_lr(daemon: Any, tmp_path: Path) -> None:
    steps, gas = 60, 2
    # Reference: the same run logging every step, without trainguard.
    ref = make_trainer(tmp_path / "ref", steps=steps, logging_steps=1, gas=gas, eval_steps=30)
    ref.train()
    ref_logs = train_logs(ref)
    assert sorted(ref_logs) == list(range(1, steps + 1))

    run = "hf-steps"
    trainer = make_trainer(tmp_path / "mon", steps=steps, logging_steps=50, gas=gas, eval_steps=30)
    cb = attach(trainer, run=run, address=daemon.grpc_address, heartbeat_interval=0)
    trainer.train()
    final = trainer.evaluate()  # after train(): its record still reaches the daemon
    assert cb.close() is True

    recs = stored_records(daemon, run, "train")
    assert [r.step for r in recs] == list(range(1, steps + 1))  # every step, not only the logging steps
    for r in recs:
        want = ref_logs[r.step]
        assert r.values["loss"] == pytest.approx(want["loss"], rel=1e-6), r.step
        assert r.values["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), r.step
        assert r.values["lr"] == pytest.approx(want["learning_rate"], rel=1e-9, abs=1e-12), r.step
        assert r.values["tokens"] == gas * 4 * SEQ
        assert r.values["samples"] == gas * 4
        assert r.values["step_time_seconds"] >= r.values["compute_time_seconds"] > 0
        assert r.values["data_time_seconds"] >= 0
    assert recs[-1].values["loss"] < recs[0].values["loss"]  # it really trained

    # Within the monitored run: its one log at step 50 is the mean of the 50 reported losses, and
    # the grad norm at that step is the one the Trainer logged.
    (log50,) = [h for s, h in train_logs(trainer).items() if s == 50]
    assert log50["loss"] == pytest.approx(sum(r.values["loss"] for r in recs[:50]) / 50, rel=1e-6)
    assert recs[49].values["grad_norm"] == pytest.approx(log50["grad_norm"], rel=1e-6)

    evals = stored_records(daemon, run, "eval")
    trainer_evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [e.step for e in evals] == [h["step"] for h in trainer_evals] == [30, 60, 60]
    assert trainer_evals[-1]["eval_loss"] == final["eval_loss"]
    for e, h in zip(evals, trainer_evals):
        assert e.values["loss"] == pytest.approx(h["eval_loss"], rel=1e-9)
        assert e.values["runtime_seconds"] == pytest.approx(h["eval_runtime"])
        assert not any(k.startswith("eval_") for k in e.values)

    (run_rec,) = stored_records(daemon, run, "run")
    assert run_rec.world_size == 1
    meta = run_rec.meta
    assert meta["framework"] == "transformers"
    assert meta["versions"]["transformers"]
    assert meta["model"] == {"type": "GPT2LMHeadModel", "params": sum(p.numel() for p in trainer.model.parameters())}
    ta = meta["training_args"]
    assert (ta["learning_rate"], ta["per_device_train_batch_size"], ta["gradient_accumulation_steps"],
            ta["max_steps"], ta["warmup_steps"], ta["weight_decay"], ta["max_grad_norm"], ta["fp16"], ta["bf16"]) == \
        (3e-3, 4, gas, steps, 5, 0.01, 1.0, False, False)
    assert meta["schedule"] == {"max_lr": 3e-3, "warmup_steps": 5}
    assert meta["optimizer"]["lr"] == 3e-3  # the schedule's base, not the warm-up's first 0
    (end,) = stored_records(daemon, run, "end")
    assert (end.step, end.status) == (steps, "completed")
    summary = http_json(f"{daemon.http_url}/api/v1/runs/{run}")
    assert (summary["status"], summary["last_step"], summary["health"]) == ("completed", steps, "ok")


class NanAtStep(Trainer):
    """Adds a NaN to the loss of one optimizer step: the gradients stay finite, so training goes on."""

    nan_step = 0

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if model.training and self.state.global_step + 1 == self.nan_step:
            loss = loss + float("nan")
        return loss


def test_a_nan_loss_the_trainer_filters_out_reaches_the_daemon(daemon: Any, tmp_path: Path) -> None:
    run, nan_at, steps = "hf-nan", 7, 20
    # Given as a callback (not attach): it finds its Trainer by itself.
    cb = TrainGuardCallback(run=run, address=daemon.grpc_address, heartbeat_interval=0)
    NanAtStep.nan_step = nan_at
    trainer = make_trainer(tmp_path, steps=steps, logging_steps=5, trainer_cls=NanAtStep, callbacks=[cb])
    assert trainer.args.logging_nan_inf_filter is True
    trainer.train()

    # The Trainer's own logs never show it (logging_nan_inf_filter=True replaces the NaN).
    logs = train_logs(trainer)
    assert sorted(logs) == [5, 10, 15, 20]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in logs.values())
    assert cb.reporter.flush(10) is True

    recs = stored_records(daemon, run, "train")
    assert [r.step for r in recs] == list(range(1, steps + 1))
    for r in recs:
        assert math.isnan(r.values["loss"]) == (r.step == nan_at), r.step
        assert math.isfinite(r.values["grad_norm"])
    def nonfinite() -> list[dict[str, Any]]:
        alerts = http_json(f"{daemon.http_url}/api/v1/alerts?run={run}&state=all")["alerts"]
        return [a for a in alerts if a["name"] == "NonFinite"]

    (a,) = wait_for(nonfinite, timeout=5, what="the NonFinite alert")
    assert (a["name"], a["step"], a["value"], a["labels"]["metric"]) == ("NonFinite", nan_at, "nan", "loss")
    assert cb.close() is True


def test_an_exception_in_train_ends_the_run_as_failed(daemon: Any, tmp_path: Path) -> None:
    run = "hf-crash"

    class Crash(Trainer):
        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            if self.state.global_step == 3:
                raise RuntimeError("out of memory, say")
            return super().training_step(*args, **kwargs)

    trainer = make_trainer(tmp_path, steps=10, logging_steps=50, trainer_cls=Crash)
    cb = attach(trainer, run=run, address=daemon.grpc_address, heartbeat_interval=0)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        trainer.train()
    assert cb.close() is True
    assert [r.step for r in stored_records(daemon, run, "train")] == [1, 2, 3]
    (end,) = stored_records(daemon, run, "end")
    assert (end.step, end.status) == (3, "failed")


def test_trainer_with_deepspeed_zero1_on_two_ranks(daemon: Any, tmp_path: Path) -> None:
    run, steps = "hf-ds-zero1", 8
    env = dict(os.environ, TRAINGUARD_ADDRESS=daemon.grpc_address, TRAINGUARD_RUN=run, HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(SCRIPTS / "hf_ds_train.py"), "--stage", "1", "--steps", str(steps),
           "--out", str(tmp_path / "rank{rank}.json")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    recs = stored_records(daemon, run, "train")
    assert sorted({r.rank for r in recs}) == [0, 1]
    for out in outs:
        rank = out["rank"]
        mine = [r for r in recs if r.rank == rank]
        assert [r.step for r in mine] == list(range(1, steps + 1))
        for r in mine:
            assert math.isfinite(r.values["loss"]) and r.values["loss"] > 0
            assert r.values["skipped_steps"] == 0
        # The engine's global norm is the same on both ranks and equals what the Trainer logged.
        for step, logged in out["logged_grad_norm"].items():
            assert mine[int(step) - 1].values["grad_norm"] == pytest.approx(logged, rel=1e-6)
        for step, loss in out["step_loss"].items():
            assert mine[int(step) - 1].values["loss"] == pytest.approx(loss, rel=1e-6)
    by_rank = {rank: [r.values["grad_norm"] for r in recs if r.rank == rank] for rank in (0, 1)}
    assert by_rank[0] == pytest.approx(by_rank[1], rel=1e-6)

    run_recs = stored_records(daemon, run, "run")
    assert sorted(r.rank for r in run_recs) == [0, 1]
    for r in run_recs:
        assert r.world_size == 2
        assert r.meta["training_args"]["deepspeed_stage"] == 1
        assert r.meta["deepspeed"]["zero_stage"] == 1
    ends = stored_records(daemon, run, "end")
    assert sorted((e.rank, e.status) for e in ends) == [(0, "completed"), (1, "completed")]
    detail = http_json(f"{daemon.http_url}/api/v1/runs/{run}")
    assert [r["rank"] for r in detail["ranks"]] == [0, 1]
    assert detail["world_size"] == 2
    assert detail["last_step"] == steps


def test_detach_leaves_the_trainer_as_it_was(daemon: Any, tmp_path: Path) -> None:
    run = "hf-detach"
    trainer = make_trainer(tmp_path, steps=4, logging_steps=50)
    taps = {"training_step", "get_batch_samples", "_get_grad_norm", "train"}
    assert not taps & set(vars(trainer))
    cb = attach(trainer, run=run, address=daemon.grpc_address, heartbeat_interval=0)
    assert taps <= set(vars(trainer))  # on the instance: the class and other Trainers are untouched
    trainer.train()
    assert cb.detach() is True
    assert not taps & set(vars(trainer)) and cb not in trainer.callback_handler.callbacks
    trainer.train()  # trains on without reporting
    assert [r.step for r in stored_records(daemon, run, "train")] == [1, 2, 3, 4]
    assert [e.status for e in stored_records(daemon, run, "end")] == ["completed"]


def test_probes_use_the_trainer_s_tokenizer_and_leave_its_training_as_it_was(daemon: Any, tmp_path: Path) -> None:
    from probes import Probe

    steps = 12
    ref = make_trainer(tmp_path / "ref", steps=steps, logging_steps=1)
    ref.train()
    ref_logs = train_logs(ref)

    run = "hf-probes"
    trainer = make_trainer(tmp_path / "mon", steps=steps, logging_steps=1)
    trainer.processing_class = tiny_tokenizer()
    cb = attach(trainer, run=run, address=daemon.grpc_address, heartbeat_interval=0,
                probes=[Probe("reading", n=6, every_steps=5, max_share=None)])
    trainer.train()
    assert cb.close() is True
    assert trainer.model.training  # left in train mode
    logs = train_logs(trainer)
    assert sorted(logs) == sorted(ref_logs) == list(range(1, steps + 1))
    assert [logs[s]["loss"] for s in logs] == [ref_logs[s]["loss"] for s in logs]  # same curve, bit for bit
    probes = [r for r in stored_records(daemon, run, "probe") if r.suite == "reading"]
    assert [r.step for r in probes] == [0, 5, 10]
    assert all(r.values["items_scored"] == 6 and len(r.items) == 6 for r in probes)
