"""monitor.watch on a real tiny torch model, reporting to a real daemon."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

import monitor
from monitor.records import Record, TraceError, read_trace
from monitor.wire import decode_batch
from tests.helpers import http_json, http_text, sample, wait_for

import torch
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
    assert run_rec.meta["optimizer"] == {"name": "SGD", "lr": 0.05, "momentum": 0.9, "weight_decay": 0}
    assert run_rec.meta["framework"] == "torch"
    assert run_rec.meta["versions"]["torch"] == torch.__version__
    assert run_rec.meta["launcher"] == "python" and run_rec.meta["restart_count"] == 0
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


# -- collectors ----------------------------------------------------------------------------------


class TokenLM(nn.Module):
    """Embedding -> body -> head: three top-level groups, fed input_ids [B, T]."""

    def __init__(self, vocab: int = 50, dim: int = 16, delay: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.head = nn.Linear(dim, vocab)
        self.delay = delay

    def forward(self, input_ids: Any) -> Any:
        if self.delay:
            time.sleep(self.delay)
        return self.head(self.body(self.embed(input_ids)))


def lm_batches(n: int, b: int = 4, t: int = 12, vocab: int = 50) -> list[Any]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (b, t + 1), generator=gen) for _ in range(n)]


def lm_loss(model: Any, seq: Any) -> Any:
    logits = model(seq[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))


def metrics_at(url: str) -> dict:
    """Every sample of a daemon's /metrics (by URL), keyed by (sample name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(http_text(url + "/metrics")) for s in fam.samples}


def train_values(daemon: Any, run: str) -> list[dict[str, float]]:
    return [r.values for r in stored_records(daemon, run, "train")]


def test_grad_norm_is_taken_before_clipping_and_across_accumulation(daemon: Any) -> None:
    run = "loop-clip"
    torch.manual_seed(0)
    model = TokenLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = monitor.watch(model, opt, run=run, address=daemon.grpc_address, heartbeat_interval=0, system_interval=0)
    batches = lm_batches(24)
    returned, clipped = [], []
    for i in range(0, len(batches), 3):
        opt.zero_grad()
        for seq in batches[i:i + 3]:  # three micro-batches accumulate into one optimizer step
            (lm_loss(model, seq) / 3).backward()
        returned.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
        clipped.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        opt.step()
        mon.step()
    assert mon.close() is True
    got = [v["grad_norm"] for v in train_values(daemon, run)]
    assert got == pytest.approx(returned, rel=1e-6)
    assert min(returned) > 0.1 and max(clipped) < 0.051  # clipping really changed the gradients
    # Three forwards of [4, 12] input_ids per step.
    assert {(v["samples"], v["tokens"]) for v in train_values(daemon, run)} == {(12, 144)}


def test_optimizer_hook_mode_sees_the_clipped_gradients(daemon: Any) -> None:
    run = "loop-clip-opt"
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = monitor.watch(model, opt, run=run, address=daemon.grpc_address, heartbeat_interval=0, system_interval=0,
                        grad_norm_at="optimizer")
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), x[:, :1]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        mon.step()
    assert mon.close() is True
    assert [v["grad_norm"] for v in train_values(daemon, run)] == pytest.approx([0.01] * 5, rel=1e-4)


def test_grad_scaler_norm_is_unscaled_and_loss_scale_reported(daemon: Any) -> None:
    run = "loop-scaler"
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    mon = monitor.watch(model, opt, run=run, address=daemon.grpc_address, heartbeat_interval=0, system_interval=0,
                        scaler=scaler)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    refs = []
    for _ in range(6):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), x[:, :1])).backward()
        scaler.unscale_(opt)
        refs.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        scaler.step(opt)
        scaler.update()
        mon.step()
    assert mon.close() is True
    vals = train_values(daemon, run)
    assert [v["grad_norm"] for v in vals] == pytest.approx(refs, rel=1e-5)
    assert [v["loss_scale"] for v in vals] == [1024.0] * 6


def test_group_norms_param_norm_and_update_ratio_every_n_steps(daemon: Any) -> None:
    run = "loop-norms"
    torch.manual_seed(0)
    model = TokenLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = monitor.watch(model, opt, run=run, address=daemon.grpc_address, heartbeat_interval=0, system_interval=0,
                        norms_every=4, group_norms_every=3)
    ref_groups: dict[int, dict[str, float]] = {}
    ref_update: dict[int, tuple[float, float]] = {}
    for step, seq in enumerate(lm_batches(12), start=1):
        opt.zero_grad()
        lm_loss(model, seq).backward()
        ref_groups[step] = {
            g: float(torch.nn.utils.get_total_norm([p.grad for n, p in model.named_parameters()
                                                    if n.startswith(g + ".")]))
            for g in ("embed", "body", "head")}
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        after = [p.detach() for p in model.parameters()]
        pn = float(torch.nn.utils.get_total_norm(after))
        un = float(torch.nn.utils.get_total_norm([a - b for a, b in zip(after, before)]))
        ref_update[step] = (pn, un / pn)
        mon.step(lm_loss(model, seq).detach())
    assert mon.close() is True
    for step, v in enumerate(train_values(daemon, run), start=1):
        groups = {k.split("/", 1)[1]: x for k, x in v.items() if k.startswith("grad_norm/")}
        if step % 3 == 0:
            assert groups == pytest.approx(ref_groups[step], rel=1e-6)
        else:
            assert groups == {}
        if step % 4 == 0:
            assert (v["param_norm"], v["update_ratio"]) == pytest.approx(ref_update[step], rel=1e-5)
            assert 1e-4 < v["update_ratio"] < 0.5
        else:
            assert "param_norm" not in v and "update_ratio" not in v


def test_data_time_and_compute_time_are_what_the_loop_spent(daemon_process: Any, tmp_path: Path) -> None:
    # The daemon runs in its own process, as in production: its threads do not compete for this one's GIL.
    daemon = daemon_process.start()
    run = "loop-timing"
    data_wait, forward_delay, after = 0.03, 0.02, 0.01
    torch.manual_seed(0)
    model = TokenLM(delay=forward_delay)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trace = tmp_path / "timing.jsonl"
    mon = monitor.watch(model, opt, run=run, address=daemon.address, heartbeat_interval=0, system_interval=0,
                        record_path=str(trace))
    waited, computed = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # an intra-op thread pool waiting for a core on a loaded machine adds noise
    step_end = time.perf_counter()
    for seq in lm_batches(8):
        time.sleep(data_wait)  # waiting for the batch
        opt.zero_grad()
        t0 = time.perf_counter()
        loss = lm_loss(model, seq)
        t1 = time.perf_counter()
        loss.backward()
        opt.step()
        with torch.no_grad():  # an evaluation forward in between is not training compute
            model.eval()
            model(seq[:, :-1])
            model.train()
        time.sleep(after)  # logging, say
        mon.step()
        waited.append(t0 - step_end)
        computed.append(t1 - t0)
        step_end = time.perf_counter()
    torch.set_num_threads(threads)
    assert mon.reporter.flush(10) is True
    vals = [r.values for r in read_trace(str(trace)) if r.kind == "train"]
    assert len(vals) == 8
    # Compared with what the loop measured around the same spans, so a loaded machine moves both alike.
    # compute time ends when backward reaches the model's output, which on a CPU needs the GIL back
    # from whatever other thread holds it: a few switch intervals at worst.
    for v, w, c in list(zip(vals, waited, computed))[1:]:
        assert data_wait <= v["data_time_seconds"] <= w + 0.002
        assert forward_delay <= v["compute_time_seconds"] <= c + 0.05
        assert v["step_time_seconds"] >= v["data_time_seconds"] + v["compute_time_seconds"] + after
        assert (v["samples"], v["tokens"]) == (4, 48)
    assert statistics.median(v["data_time_seconds"] - w for v, w in zip(vals[1:], waited[1:])) > -0.005
    assert statistics.median(v["compute_time_seconds"] - c for v, c in zip(vals[1:], computed[1:])) < 0.015
    m = metrics_at(daemon.url)
    assert sample(m, "trainguard_data_wait_seconds", run=run, rank="0") == vals[-1]["data_time_seconds"]
    assert sample(m, "trainguard_compute_duration_seconds", run=run, rank="0") == vals[-1]["compute_time_seconds"]
    assert mon.close() is True


def test_system_records_and_hooks_removed_on_close(daemon: Any) -> None:
    run = "loop-system"
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = monitor.watch(model, opt, run=run, address=daemon.grpc_address, heartbeat_interval=0, system_interval=0.1)
    train(model, opt, mon, 3)
    wait_for(lambda: mon.reporter.flush(1) and len(stored_records(daemon, run, "system")) >= 3,
             timeout=10, what="three system records")
    assert mon.close() is True
    sysrecs = stored_records(daemon, run, "system")
    assert all(r.values["host_rss_bytes"] > 10e6 for r in sysrecs)
    assert any("process_cpu_ratio" in r.values for r in sysrecs)
    assert not any(k.startswith("gpu_") for r in sysrecs for k in r.values)  # no GPU here: nothing, no error
    assert not model[0]._forward_hooks and not model._forward_pre_hooks and not model._forward_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_bad_values_never_raise_into_the_loop(daemon: Any) -> None:
    run = "loop-bad"
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = monitor.watch(model, opt, run=run, address=daemon.grpc_address, heartbeat_interval=0, system_interval=0)
    mon.step(loss=object(), note="text", vec=torch.ones(3))
    mon.step(loss=torch.tensor(float("inf")))
    mon.eval(loss=[1, 2])
    assert mon.close() is True
    vals = train_values(daemon, run)
    assert len(vals) == 2 and "loss" not in vals[0] and vals[1]["loss"] == math.inf
    assert mon.reporter.stats().invalid_values == 4


def test_a_loop_that_passes_its_own_norm_is_spared_ours_and_meta_has_the_configured_lr(daemon: Any) -> None:
    run = "loop-given-norm"
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))  # warm-up: lr starts at 0.005
    mon = monitor.watch(model, opt, run=run, address=daemon.grpc_address, heartbeat_interval=0, system_interval=0)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    given = []
    for step in range(4):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), x[:, :1]).backward()
        if step > 0:
            # From the first norm the loop hands over, the watch computes none of its own.
            assert mon._bwd_norm is None
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        given.append(float(norm))
        opt.step()
        sched.step()
        mon.step(grad_norm=norm)
    assert mon.close() is True
    assert [v["grad_norm"] for v in train_values(daemon, run)] == pytest.approx(given, rel=1e-6)
    run_rec = [r for r in stored_records(daemon, run, "run")][0]
    assert run_rec.meta["optimizer"]["lr"] == 0.05


def test_probes_run_at_start_and_every_n_steps_without_changing_the_loss_curve(daemon: Any) -> None:
    """A char GPT-2 with dropout and random batches: the losses with probes are those without, bit for bit."""
    import random

    from monitor.demo import CharTokenizer, lm_batch, task_texts
    from probes import Drift, Probe
    from tests.probes.conftest import char_gpt

    tok = CharTokenizer()
    pairs = task_texts("arithmetic", 300, seed=2)

    def fit(run: str, probes: list[Any] | None) -> tuple[list[float], int, Any]:
        model = char_gpt(seed=3)
        torch.manual_seed(5)
        rng = random.Random(5)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        mon = monitor.watch(model, opt, run=run, address=daemon.grpc_address, heartbeat_interval=0,
                            probes=probes, probe_tokenizer=tok)
        losses = []
        model.train()
        for _ in range(12):
            x, y = lm_batch(tok, pairs, rng, 8)
            loss = model(input_ids=x, labels=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss=loss)
            losses.append(float(loss.detach()))
            assert model.training
        assert mon.close()
        return losses, mon.step_count, mon

    plain, n_plain, _ = fit("loop-no-probes", None)
    probes = [Probe("arithmetic", n=6, every_steps=4, max_share=None), Drift(n_prompts=4, every_steps=6, max_share=None)]
    probed, n_probed, _ = fit("loop-probes", probes)
    assert plain == probed and n_plain == n_probed == 12
    recs = stored_records(daemon, "loop-probes", "probe")
    assert [r.step for r in recs if r.suite == "arithmetic"] == [0, 4, 8, 12]
    assert [r.step for r in recs if r.suite == "drift"] == [0, 6, 12]
    assert all(len(r.items) == 6 for r in recs if r.suite == "arithmetic")
    train = [r for r in stored_records(daemon, "loop-probes", "train") if "loss" in r.values]
    assert [r.step for r in train] == list(range(1, 13))
    assert [r.values["loss"] for r in train] == pytest.approx(probed)
    assert not stored_records(daemon, "loop-no-probes", "probe")
