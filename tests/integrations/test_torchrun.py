"""A plain DDP loop under torchrun with 2 ranks (gloo), reporting to a real daemon from every rank."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from monitor.wire import decode_batch
from tests.helpers import ROOT, free_port, http_json, metrics, sample

import torch  # noqa: F401 - in the dev extra: missing means a broken install

SCRIPTS = Path(__file__).parent / "scripts"


def torchrun(script: str, out: Path, env: dict[str, str], *args: str, timeout: float = 120) -> None:
    """Run `script` under torchrun with 2 local ranks; fail with its output when it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(SCRIPTS / script), "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRAINGUARD_", "TORCHELASTIC_", "SLURM_", "OMPI_", "PMI_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def records_by_rank(daemon: Any, run: str, kind: str) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for *_, data in daemon.store.batches(run):
        for r in decode_batch(data).records:
            if r.kind == kind:
                out.setdefault(r.rank, []).append(r)
    for recs in out.values():
        recs.sort(key=lambda r: (r.step if r.step is not None else -1, r.t))
    return out


def test_ddp_straggler_shows_in_compute_time_not_step_time(daemon: Any, tmp_path: Path) -> None:
    steps, delay = 24, 0.06
    torchrun("loop_ddp.py", tmp_path, clean_env(TRAINGUARD_ADDRESS=daemon.grpc_address),
             "--steps", str(steps), "--slow-rank", "1", "--delay", str(delay))
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s["delivered"] for s in seen)

    # No run id was given and torchrun's is the placeholder "none": the ranks generated one and agreed on rank 0's.
    run = seen[0]["run"]
    assert seen[1]["run"] == run and run != "none"
    assert [s["identity"]["rank"] for s in seen] == [0, 1]
    assert {s["identity"]["launcher"] for s in seen} == {"torchrun"}
    runs = [r for r in http_json(daemon.http_url + "/api/v1/runs")["runs"]]
    assert [r["run"] for r in runs] == [run]
    assert runs[0]["world_size"] == 2 and runs[0]["status"] == "completed"

    train = records_by_rank(daemon, run, "train")
    assert sorted(train) == [0, 1]
    for r in (0, 1):
        recs = train[r]
        assert [x.step for x in recs] == list(range(1, steps + 1))
        # Every rank reports its own loss; the gradient norm is the all-reduced one, taken before clipping.
        assert [x.values["loss"] for x in recs] == seen[r]["losses"]
        assert [x.values["grad_norm"] for x in recs] == pytest.approx(seen[r]["norms"], rel=1e-6)
        assert max(seen[r]["norms"]) > 0.5  # so clipping really changed the gradients
        assert all(x.values["samples"] == 32 for x in recs)
        assert all("param_norm" in x.values and "update_ratio" in x.values for x in recs if x.step % 10 == 0)
        assert all("grad_norm/body" in x.values and "grad_norm/head" in x.values
                   for x in recs if x.step % 10 == 0)
    assert [x.values["grad_norm"] for x in train[0]] == pytest.approx([x.values["grad_norm"] for x in train[1]],
                                                                       rel=1e-6)

    def med(r: int, name: str) -> float:
        return statistics.median(x.values[name] for x in train[r][2:])

    c0, c1 = med(0, "compute_time_seconds"), med(1, "compute_time_seconds")
    s0, s1 = med(0, "step_time_seconds"), med(1, "step_time_seconds")
    print(f"compute_time median: rank0 {c0 * 1e3:.1f} ms, rank1 {c1 * 1e3:.1f} ms; "
          f"step_time median: rank0 {s0 * 1e3:.1f} ms, rank1 {s1 * 1e3:.1f} ms")
    assert c1 > c0 + 0.8 * delay  # the slow rank's own forward shows it
    assert c0 < 0.5 * delay
    assert s0 > delay and s1 > delay  # the fast rank waited for the slow one in the all-reduce ...
    assert abs(s0 - s1) < 0.25 * max(s0, s1)  # ... so their step times are about equal

    m = metrics(daemon)
    last0 = sample(m, "trainguard_compute_duration_seconds", run=run, rank="0")
    last1 = sample(m, "trainguard_compute_duration_seconds", run=run, rank="1")
    assert last0 is not None and last1 is not None and last1 > last0 + 0.5 * delay
    assert sample(m, "trainguard_run_ranks_reporting", run=run) is not None

    (meta0,) = [r.meta for r in records_by_rank(daemon, run, "run")[0]]
    assert meta0["launcher"] == "torchrun" and meta0["restart_count"] == 0
    assert meta0["framework"] == "torch" and "torch" in meta0["versions"]
    assert meta0["optimizer"]["name"] == "AdamW" and meta0["optimizer"]["weight_decay"] == 0.01
    assert meta0["batch_size"] == 32 and meta0["max_steps"] == steps
    assert meta0["model"]["type"] == "Net" and meta0["model"]["wrapper"] == "DistributedDataParallel"
    assert records_by_rank(daemon, run, "system").keys() == {0, 1}


def test_torchrun_run_id_is_used_when_given(daemon: Any, tmp_path: Path) -> None:
    torchrun("loop_ddp.py", tmp_path, clean_env(TRAINGUARD_ADDRESS=daemon.grpc_address, TRAINGUARD_RUN="ddp-named"),
             "--steps", "3")
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["run"] for s in seen] == ["ddp-named", "ddp-named"]
    detail = http_json(daemon.http_url + "/api/v1/runs/ddp-named")
    assert sorted(r["rank"] for r in detail["ranks"]) == [0, 1]
