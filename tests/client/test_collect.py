"""The collectors: batched norms, update ratio, forward probe, deferred device values, system sampling."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from monitor import Reporter
from monitor.client.collect import (MAX_GROUPS, ForwardProbe, Nvml, SystemSampler, UpdateRatio, gpu_memory,
                                    grad_norms, read_later, system_values, top_level_groups)
from monitor.client.reporter import Deferred
from monitor.wire import decode_batch
from tests.helpers import wait_for

import torch
nn = torch.nn


def stored(daemon: Any, run: str, kind: str) -> list[Any]:
    return [r for *_, data in daemon.store.batches(run) for r in decode_batch(data).records if r.kind == kind]


def test_grad_norms_match_a_float64_reference_across_dtypes() -> None:
    torch.manual_seed(0)
    a = nn.Linear(64, 64)
    b = nn.Linear(64, 8).to(torch.bfloat16)
    params = list(a.parameters()) + list(b.parameters())
    for p in params:
        p.grad = (torch.randn_like(p, dtype=torch.float32) * 300).to(p.dtype)
    ref = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in params]))
    groups = {id(p): "a" for p in a.parameters()} | {id(p): "b" for p in b.parameters()}
    total, per = grad_norms(params, groups)
    assert total.dtype == torch.float32
    assert float(total) == pytest.approx(float(ref), rel=1e-5)
    assert float(per["b"]) == pytest.approx(float(torch.linalg.vector_norm(
        torch.cat([p.grad.double().flatten() for p in b.parameters()]))), rel=1e-5)
    scaled, _ = grad_norms(params, None, torch.tensor(4.0))
    assert float(scaled) == pytest.approx(float(ref) / 4, rel=1e-5)
    for p in params:
        p.grad = None
    assert grad_norms(params) == (None, {})


def test_top_level_groups_are_capped() -> None:
    model = nn.ModuleDict({f"layer{i}": nn.Linear(2, 2) for i in range(100)})
    groups = top_level_groups(model)
    assert len(set(groups.values())) == MAX_GROUPS
    assert groups[id(model["layer0"].weight)] == "layer0"
    assert groups[id(model["layer99"].bias)] == "other"
    ddp_like = top_level_groups(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
    assert sorted(set(ddp_like.values())) == ["0", "2"]


def test_update_ratio_over_a_budgeted_subset() -> None:
    torch.manual_seed(0)
    big, small = nn.Parameter(torch.randn(1000)), nn.Parameter(torch.randn(10))
    params = [big, small]
    ur = UpdateRatio(max_bytes=small.numel() * 4)  # room for the first parameter only (always taken)
    ur.before(params)
    with torch.no_grad():
        big.add_(0.01)
        small.mul_(2.0)
    vals = ur.after(params)
    assert float(vals["param_norm"]) == pytest.approx(float(torch.linalg.vector_norm(torch.cat([big, small]).detach())))
    assert float(vals["update_ratio"]) == pytest.approx(0.01 * 1000 ** 0.5 / float(big.detach().norm()), rel=1e-4)
    assert UpdateRatio().after(params).keys() == {"param_norm"}  # no snapshot, no ratio


def test_read_later_on_a_cpu() -> None:
    assert read_later(1.5) == 1.5 and read_later(3) == 3
    t = torch.tensor(2.0, requires_grad=True) * 1
    out = read_later(t)
    assert out.requires_grad is False and float(out) == 2.0
    scale = torch.tensor(1024.0)
    kept = read_later(scale, clone=True)
    scale.mul_(0.5)  # a GradScaler updates its scale in place
    assert float(kept) == 1024.0


def test_forward_probe_counts_training_forwards_once() -> None:
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 20))
    ends = []
    probe = ForwardProbe(model, on_backward_end=lambda: ends.append(time.perf_counter()))
    ids = torch.randint(0, 20, (3, 7))
    # Recomputed inside backward by activation checkpointing: not a second forward.
    out = torch.utils.checkpoint.checkpoint(model, ids, use_reentrant=False)
    out.sum().backward()
    with torch.no_grad():
        model(ids)
    model.eval()
    model(ids)
    vals = probe.take()
    assert (vals["samples"], vals["tokens"]) == (3, 21)
    assert vals["compute_time_seconds"] > 0 and vals["data_time_seconds"] >= 0
    assert len(ends) == 1
    probe.remove()
    assert not model._forward_hooks and not model._forward_pre_hooks


class Gate(Deferred):
    """A value that becomes readable when its event is set: how a device copy behaves."""

    __slots__ = ("opened", "value")

    def __init__(self, value: float):
        super().__init__()
        self.opened = threading.Event()
        self.value = value

    def ready(self) -> bool:
        return self.opened.is_set()

    def __float__(self) -> float:
        if not self.opened.is_set():
            raise RuntimeError("not yet")
        return self.value


def test_a_record_waiting_for_a_device_value_holds_back_only_the_records_behind_it(daemon: Any) -> None:
    run = "deferred"
    rep = Reporter(run=run, address=daemon.grpc_address, heartbeat_interval=0.05)
    gate = Gate(7.5)
    rep.log("train", 1, {"loss": gate, "lr": 0.1})
    rep.log("train", 2, {"loss": 1.0})
    rep.log("eval", 2, {"loss": 2.0})
    rep.log("system", 2, {"host_rss_bytes": 1.0})
    # Heartbeats and system records are not held back; train and eval keep their order behind the wait.
    wait_for(lambda: len(stored(daemon, run, "heartbeat")) >= 2, timeout=10, what="heartbeats")
    assert stored(daemon, run, "system") and not stored(daemon, run, "train") and not stored(daemon, run, "eval")
    assert rep.flush(0.3) is False and rep.stats().queue_depth >= 3
    gate.opened.set()
    assert rep.flush(10) is True
    assert [(r.step, r.values) for r in stored(daemon, run, "train")] == [(1, {"loss": 7.5, "lr": 0.1}),
                                                                          (2, {"loss": 1.0})]
    assert len(stored(daemon, run, "eval")) == 1
    assert rep.close() is True


def test_a_device_value_that_never_arrives_is_dropped_after_device_wait(daemon: Any) -> None:
    run = "deferred-late"
    rep = Reporter(run=run, address=daemon.grpc_address, heartbeat_interval=0, device_wait=0.2)
    rep.log("train", 1, {"loss": Gate(1.0), "lr": 0.1})
    assert rep.flush(10) is True
    assert [r.values for r in stored(daemon, run, "train")] == [{"lr": 0.1}]
    assert rep.stats().invalid_values == 1
    assert rep.close() is True


def test_system_collectors_degrade_to_nothing_without_a_gpu(daemon: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallbacks")
    assert gpu_memory() == {} and gpu_memory(0) == {}
    nv = Nvml()
    t0 = time.perf_counter()
    assert nv.values() == {} and nv.values() == {}
    assert nv.available is False and time.perf_counter() - t0 < 1.0
    vals = system_values()
    assert vals["host_rss_bytes"] > 10e6 and not any(k.startswith("gpu_") for k in vals)
    rep = Reporter(run="sys", address=daemon.grpc_address, heartbeat_interval=0)
    sampler = SystemSampler(rep, 0.05, step=lambda: 4).start()
    wait_for(lambda: rep.flush(1) and len(stored(daemon, "sys", "system")) >= 3, timeout=10, what="system records")
    assert sampler.close(2.0) is True
    recs = stored(daemon, "sys", "system")
    assert {r.step for r in recs} == {4}
    assert all(0 <= r.values["process_cpu_ratio"] for r in recs if "process_cpu_ratio" in r.values)
    assert rep.close() is True
