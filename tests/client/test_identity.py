"""Run id, rank and launcher resolution, and the `run` record's meta."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from monitor.client import identity
from monitor.client.identity import detect_launcher, framework_meta, resolve_identity
from monitor.records import check_run_id
from tests.helpers import ROOT

LAUNCHER_VARS = ("TRAINGUARD_RUN", "TRAINGUARD_RUN_GENERATED", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "RANK", "WORLD_SIZE",
                 "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "OMPI_COMM_WORLD_RANK",
                 "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "CROSS_RANK",
                 "LOCAL_SIZE", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """No launcher around, and no id generated earlier in this process."""
    for var in LAUNCHER_VARS:
        # Set then delete, so that whatever a test writes (resolve_identity writes TRAINGUARD_RUN) is undone.
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setattr(identity, "_generated", None)
    monkeypatch.setattr(identity, "_agreed", False)


def test_run_id_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "elastic-7")
    assert resolve_identity().run == "elastic-7"
    monkeypatch.setenv("TRAINGUARD_RUN", "from-env")
    assert resolve_identity().run == "from-env"
    assert resolve_identity("explicit").run == "explicit"
    assert resolve_identity("has spaces & more").run == "has-spaces---more"


@pytest.mark.parametrize("placeholder", ["none", "", "None"])
def test_torchrun_placeholder_run_id_is_replaced_by_a_generated_one(monkeypatch: pytest.MonkeyPatch,
                                                                    placeholder: str) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", placeholder)
    ident = resolve_identity()
    check_run_id(ident.run)
    assert ident.run.lower() != placeholder.lower() and ident.run.startswith("run-")
    # Written where a process started later by a launcher finds it, and stable within this process.
    assert os.environ["TRAINGUARD_RUN"] == ident.run
    assert resolve_identity().run == ident.run


def test_a_generated_run_id_is_inherited_by_child_processes() -> None:
    parent = resolve_identity().run
    code = "from monitor.client.identity import resolve_identity; print(resolve_identity().run)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout.strip()
    assert out == parent


def test_rank_world_and_restart_from_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "job-1",
                 "TORCHELASTIC_RESTART_COUNT": "2"}.items():
        monkeypatch.setenv(k, v)
    ident = resolve_identity()
    assert (ident.run, ident.rank, ident.world_size, ident.local_rank, ident.restart_count, ident.launcher) == \
        ("job-1", 5, 8, 1, 2, "torchrun")
    assert ident.host == os.uname().nodename


@pytest.mark.parametrize("env, expect", [
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}, (3, 4, 1, "slurm")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "2"},
     (2, 16, 2, "mpirun")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "CROSS_RANK": "0", "LOCAL_SIZE": "2"}, (1, 2, 1, "deepspeed")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x",
      "ACCELERATE_MIXED_PRECISION": "no"}, (1, 2, 1, "accelerate")),
    ({}, (0, 1, 0, "python")),
])
def test_other_launchers(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expect: tuple[Any, ...]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ident = resolve_identity("r")
    assert (ident.rank, ident.world_size, ident.local_rank, ident.launcher) == expect
    assert detect_launcher() == expect[3]


def test_initialised_process_group_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import torch
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ident = resolve_identity()
        assert (ident.rank, ident.world_size) == (0, 1)
        check_run_id(ident.run)
    finally:
        dist.destroy_process_group()
    assert torch.distributed.is_initialized() is False


def test_framework_meta_names_versions_model_and_hyper_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    model[1].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.1,
                            betas=(0.9, 0.95))
    meta = framework_meta("torch", identity=resolve_identity("m"), model=model, optimizer=opt, batch_size=16,
                          max_steps=1000, extra={"note": "x"})
    assert meta["framework"] == "torch"
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert meta["host"] == os.uname().nodename and meta["pid"] == os.getpid()
    assert (meta["launcher"], meta["restart_count"]) == ("torchrun", 1)
    assert meta["model"] == {"type": "Sequential", "params": 19, "trainable_params": 15}
    assert meta["optimizer"] == {"name": "AdamW", "lr": 3e-4, "weight_decay": 0.1, "betas": [0.9, 0.95],
                                 "eps": 1e-8}
    assert (meta["batch_size"], meta["max_steps"], meta["note"]) == (16, 1000, "x")


def test_an_inherited_generated_id_is_kept_but_still_agreed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # A launcher that starts ranks after the parent generated an id hands it down in the
    # environment: the child keeps it, and treats it as generated (so it joins the agreement
    # broadcast like rank 0 does) rather than as the user's own choice.
    monkeypatch.setenv("TRAINGUARD_RUN", "run-abc123")
    monkeypatch.setenv("TRAINGUARD_RUN_GENERATED", "run-abc123")
    assert identity._explicit_run(None) is None
    assert identity.resolve_identity().run == "run-abc123"
    monkeypatch.setenv("TRAINGUARD_RUN", "users-own")
    assert identity._explicit_run(None) == "users-own"
