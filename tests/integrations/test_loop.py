"""monitor.watch on a real tiny torch model, reporting to a real daemon."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

import monitor
from monitor.records import Record, TraceError, read_trace
from monitor.wire import decode_batch
from tests.helpers import http_json, http_text, wait_for

torch = pytest.importorskip("torch")
nn = torch.nn


def stored_records(daemon: Any, run: str, kind: str | None = None) -> list[Record]:
    out = []
    for *_, data in daemon.store.batches(run):
        out.extend(r for r in decode_batch(data).records if kind is None or r.kind == kind)
    return out


def same_float(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def tiny_model() -> Any:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def train(model: Any, opt: Any, mon: Any, steps: int, nan_at: int | None = None
          ) -> tuple[list[float], list[float]]:
    """A plain loop; returns the loss and the reference gradient norm of each step as the loop saw them."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen)
    y = x.sum(dim=1, keepdim=True).sin()
    losses, norms = [], []
    for step in range(1, steps + 1):
        if step == nan_at:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        ref = float(torch.nn.utils.get_total_norm(grads, 2.0))
        # clip_grad_norm_ with an infinite limit returns the same total norm and leaves the grads alone.
        clipped = float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
        assert same_float(ref, clipped)
        opt.step()
        mon.step(loss=loss, tokens=64 * 8)
        losses.append(float(loss.detach()))
        norms.append(ref)
    return losses, norms


def test_every_step_arrives_with_the_loop_s_loss_and_grad_norm(daemon: Any, tmp_path: Path) -> None:
    run = "loop-steps"
    trace = tmp_path / "loop.jsonl"
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mon = monitor.watch(model, opt, run=run, address=daemon.grpc_address, heartbeat_interval=0,
                        record_path=str(trace))
    steps = 40
    losses, norms = train(model, opt, mon, steps)
    mon.eval(loss=torch.tensor(0.125), accuracy=0.5)
    assert mon.close() is True

    train_recs = stored_records(daemon, run, "train")
    assert [r.step for r in train_recs] == list(range(1, steps + 1))
    for rec, loss, norm in zip(train_recs, losses, norms):
        assert rec.values["loss"] == loss
        assert rec.values["grad_norm"] == norm
        assert rec.values["lr"] == 0.05
        assert rec.values["tokens"] == 512
        assert rec.values["step_time_seconds"] > 0
    assert losses[-1] < losses[0]  # it really trained

    (run_rec,) = stored_records(daemon, run, "run")
    assert run_rec.world_size == 1
    assert run_rec.meta["model"] == {"type": "Sequential", "params": sum(p.numel() for p in model.parameters())}
    assert run_rec.meta["optimizer"] == {"name": "SGD", "lr": 0.05}
    assert run_rec.meta["framework"].startswith("torch ")
    (ev,) = stored_records(daemon, run, "eval")
    assert (ev.step, ev.values) == (steps, {"loss": 0.125, "accuracy": 0.5})
    (end,) = stored_records(daemon, run, "end")
    assert (end.step, end.status) == (steps, "completed")

    # The trace holds the same numbers, read from the tensors off the training thread.
    traced = [r for r in read_trace(str(trace))]
    assert not [r for r in traced if isinstance(r, TraceError)]
    assert [(r.step, r.values["loss"], r.values["grad_norm"]) for r in traced if r.kind == "train"] == \
        list(zip(range(1, steps + 1), losses, norms))

    summary = {r["run"]: r for r in http_json(daemon.http_url + "/api/v1/runs")["runs"]}[run]
    assert summary["status"] == "completed"
    assert summary["last_step"] == steps
    assert summary["health"] == "ok"
    assert http_json(f"{daemon.http_url}/api/v1/alerts?run={run}")["alerts"] == []


def test_nan_in_a_weight_fires_nonfinite_at_that_step(daemon: Any) -> None:
    run = "loop-nan"
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = monitor.watch(model, opt, run=run, address=daemon.grpc_address, heartbeat_interval=0)
    nan_at, steps = 27, 35
    losses, norms = train(model, opt, mon, steps, nan_at=nan_at)
    assert all(math.isfinite(v) for v in losses[:nan_at - 1])
    assert math.isnan(losses[nan_at - 1])
    assert mon.reporter.flush(10) is True

    alerts = wait_for(lambda: http_json(f"{daemon.http_url}/api/v1/alerts?run={run}")["alerts"], timeout=5,
                      what="the NonFinite alert")
    assert len(alerts) == 1
    a = alerts[0]
    assert (a["name"], a["severity"], a["state"], a["step"]) == ("NonFinite", "critical", "firing", nan_at)
    assert a["value"] == "nan"
    assert a["labels"]["metric"] == "loss"
    train_recs = stored_records(daemon, run, "train")
    assert a["started_at"] == train_recs[nan_at - 1].t
    for rec, loss, norm in zip(train_recs, losses, norms):
        assert same_float(rec.values["loss"], loss)
        assert same_float(rec.values["grad_norm"], norm)
    metrics = http_text(daemon.http_url + "/metrics")
    assert f'trainguard_alerts_fired_total{{alert="NonFinite",run="{run}"}} 1.0' in metrics
    assert f'trainguard_alert_active{{alert="NonFinite",run="{run}",severity="critical"}} 1.0' in metrics
    summary = {r["run"]: r for r in http_json(daemon.http_url + "/api/v1/runs")["runs"]}[run]
    assert summary["health"] == "critical"

    assert mon.close("failed") is True
    summary = {r["run"]: r for r in http_json(daemon.http_url + "/api/v1/runs")["runs"]}[run]
    assert summary["status"] == "failed"
    assert summary["last_step"] == steps


def test_an_exception_in_the_loop_ends_the_run_as_failed(daemon: Any) -> None:
    run = "loop-crash"
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        with monitor.watch(model, opt, run=run, address=daemon.grpc_address, heartbeat_interval=0) as mon:
            train(model, opt, mon, 5)
            raise RuntimeError("out of memory, say")
    (end,) = stored_records(daemon, run, "end")
    assert (end.step, end.status) == (5, "failed")
    summary = {r["run"]: r for r in http_json(daemon.http_url + "/api/v1/runs")["runs"]}[run]
    assert summary["status"] == "failed"
