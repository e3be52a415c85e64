"""Check the GPU-only collector paths on a machine with a CUDA GPU (and that they degrade on a CPU).

    python bench/gpu_check.py [--quick]

On a GPU:
1. the allocator figures trainguard reports match torch's own;
2. a ~100M-parameter transformer trains in bf16 with `monitor.watch` attached (forward hooks,
   end-of-backward gradient norm, per-group norms, update ratio, async value copies) while
   torch.cuda.set_sync_debug_mode("error") turns any host-device synchronisation into an
   exception: the loop alone first, then with the watch; every value must still arrive (read from
   a trace) and the gradient norm must equal what clip_grad_norm_ returned;
3. step time with vs without trainguard, in alternating blocks (A/B/A/B...), median per-step
   times and the overhead (target <= 1 %).

Without a GPU it says so, checks that the GPU collectors (allocator stats, NVML) return nothing and
raise nothing, runs a short watched CPU loop, and exits 0. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_model(torch: Any, vocab: int = 8192, dim: int = 768, layers: int = 12, heads: int = 12) -> Any:
    """A GPT-style decoder (about 100M parameters at the defaults) that never synchronises in forward."""
    nn = torch.nn
    F = nn.functional

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.ln2 = nn.LayerNorm(dim)
            self.up = nn.Linear(dim, 4 * dim)
            self.down = nn.Linear(4 * dim, dim)

        def forward(self, x: Any) -> Any:
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, dim))
            return x + self.down(F.gelu(self.up(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.blocks = nn.Sequential(*[Block() for _ in range(layers)])
            self.ln = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab, bias=False)

        def forward(self, ids: Any) -> Any:
            return self.head(self.ln(self.blocks(self.embed(ids))))

    return GPT()


def cpu_mode(torch: Any) -> int:
    """No GPU: the GPU collectors give nothing, cheaply, and a watched CPU loop still reports."""
    import monitor
    from monitor.client.collect import Nvml, gpu_memory, read_later, system_values
    from monitor.records import read_trace

    print("no CUDA device: checking the CPU fallbacks")
    failures = []
    vals = gpu_memory()
    t0 = time.perf_counter()
    nv = Nvml()
    nvml_vals = [nv.values() for _ in range(100)]
    nvml_us = (time.perf_counter() - t0) / 100 * 1e6
    sysv = system_values(nvml=nv)
    print(f"  gpu_memory() -> {vals}; NVML -> {nvml_vals[0]} (available={nv.available}, {nvml_us:.1f} us per call)")
    print(f"  system_values() keys -> {sorted(sysv)}")
    if vals != {} or any(nvml_vals) or nv.available is not False:
        failures.append("a GPU collector returned something without a GPU")
    if "host_rss_bytes" not in sysv or any(k.startswith("gpu_") for k in sysv):
        failures.append(f"system values without a GPU: {sorted(sysv)}")
    t = torch.tensor(3.0)
    if read_later(t) is not t and float(read_later(t)) != 3.0:
        failures.append("read_later changed a CPU tensor")

    model = build_model(torch, vocab=64, dim=32, layers=2, heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "cpu.jsonl")
        mon = monitor.watch(model, opt, run="gpu-check-cpu", address="off", record_path=trace,
                            heartbeat_interval=0, system_interval=0.05, norms_every=2, group_norms_every=2)
        ids = torch.randint(0, 64, (4, 17))
        for _ in range(4):
            opt.zero_grad()
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            mon.step(loss)
        mon.close()
        recs = [r for r in read_trace(trace) if getattr(r, "kind", None) == "train"]
    need = {"loss", "grad_norm", "lr", "step_time_seconds", "compute_time_seconds", "data_time_seconds",
            "samples", "tokens"}
    got = [set(r.values) for r in recs]
    print(f"  watched CPU loop: {len(recs)} train records; values of step 2: {sorted(got[1]) if got else []}")
    if len(recs) != 4 or any(not need <= g for g in got) or "update_ratio" not in got[1]:
        failures.append("the watched CPU loop did not report every value")
    for f in failures:
        print("FAIL:", f)
    if not failures:
        print("PASS: no GPU present; the GPU collectors degrade to nothing on a CPU")
    return 1 if failures else 0


def allocator_check(torch: Any, failures: list[str]) -> None:
    from monitor import Reporter
    from monitor.client.collect import gpu_memory

    dev = torch.device("cuda")
    x = torch.randn(4096, 4096, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t0 = time.perf_counter()
        vals = gpu_memory()
        read_us = (time.perf_counter() - t0) * 1e6
        rep = Reporter(run="gpu-check", address="off")
        loss = (x @ x).mean()
        t0 = time.perf_counter()
        rep.log("train", 1, {"loss": loss.detach()})
        log_us = (time.perf_counter() - t0) * 1e6
        rep.close(5)
    except RuntimeError as e:
        failures.append(f"a collector synchronised with the device: {e}")
        vals, read_us, log_us = {}, math.nan, math.nan
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    expect = torch.cuda.memory_allocated(dev)
    got = vals.get("gpu_memory_allocated_bytes")
    if got is None or abs(got - expect) > 64 * 1024 * 1024:
        failures.append(f"gpu_memory_allocated_bytes={got}, torch.cuda.memory_allocated={expect}")
    total = torch.cuda.get_device_properties(dev).total_memory
    if vals.get("gpu_memory_total_bytes") != float(total):
        failures.append(f"gpu_memory_total_bytes={vals.get('gpu_memory_total_bytes')}, device total={total}")
    print(f"gpu_memory(): {len(vals)} values in {read_us:.1f} us; Reporter.log() of a device loss: {log_us:.1f} us")
    del x


class Loop:
    """The training loop under test: bf16 GPT, AdamW, clipping; no synchronisation of its own."""

    def __init__(self, torch: Any, batch: int, seq: int):
        self.torch = torch
        torch.manual_seed(0)
        self.model = build_model(torch).cuda().to(torch.bfloat16)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
        self.ids = torch.randint(0, 8192, (batch, seq + 1), device="cuda")
        self.norms: list[Any] = []
        self.refs: list[Any] = []
        self.losses: list[Any] = []

    def step(self, mon: Any = None, keep: bool = False) -> None:
        torch = self.torch
        ids = self.ids
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        if keep:
            # An independent float32 reference, still on the device: clip_grad_norm_ itself sums bf16 norms in bf16.
            self.refs.append(torch.cat([p.grad.float().flatten() for p in self.model.parameters()]).norm())
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.opt.step()
        if mon is not None:
            mon.step(loss)
        if keep:
            self.norms.append(norm.detach())
            self.losses.append(loss.detach())


def sync_check(torch: Any, loop: Loop, steps: int, failures: list[str]) -> None:
    import monitor
    from monitor.records import read_trace

    for _ in range(3):
        loop.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loop.step()
    except RuntimeError as e:
        failures.append(f"the loop itself synchronises, so the check cannot judge trainguard: {e}")
        return
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "gpu.jsonl")
        mon = monitor.watch(loop.model, loop.opt, run="gpu-check", address="off", record_path=trace,
                            heartbeat_interval=0.5, system_interval=0.5, norms_every=5, group_norms_every=5,
                            device_wait=60.0)
        loop.step(mon)  # the first step allocates the pinned buffers and events
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        t0 = time.perf_counter()
        try:
            for _ in range(steps):
                loop.step(mon, keep=True)
            host_s = time.perf_counter() - t0
            ok_sync = True
        except RuntimeError as e:
            failures.append(f"trainguard synchronised with the device during a step: {e}")
            ok_sync, host_s = False, math.nan
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        delivered = mon.close(timeout=60)
        stats = mon.reporter.stats()
        recs = [r for r in read_trace(trace) if getattr(r, "kind", None) == "train"]
        system = [r for r in read_trace(trace) if getattr(r, "kind", None) == "system"]
    if not ok_sync:
        return
    print(f"{steps} watched steps under set_sync_debug_mode('error'): no synchronisation "
          f"(host time {host_s / steps * 1e3:.2f} ms/step)")
    recs = recs[1:]
    need = {"loss", "grad_norm", "lr", "step_time_seconds", "compute_time_seconds", "data_time_seconds",
            "samples", "tokens"}
    missing = [sorted(need - set(r.values)) for r in recs if not need <= set(r.values)]
    if not delivered or stats.invalid_values or len(recs) != steps or missing:
        failures.append(f"values lost: delivered={delivered} invalid={stats.invalid_values} "
                        f"records={len(recs)}/{steps} missing={missing[:3]}")
        return
    ref_norm = [float(n) for n in loop.refs]
    clip_norm = [float(n) for n in loop.norms]
    ref_loss = [float(x) for x in loop.losses]
    got_norm = [r.values["grad_norm"] for r in recs]
    got_loss = [r.values["loss"] for r in recs]
    if any(not math.isclose(a, b, rel_tol=1e-4) for a, b in zip(got_norm, ref_norm)):
        failures.append(f"grad_norm {got_norm[:3]} != float32 reference {ref_norm[:3]}")
    if any(not math.isclose(a, b, rel_tol=2e-2) for a, b in zip(got_norm, clip_norm)):
        failures.append(f"grad_norm {got_norm[:3]} far from what clip_grad_norm_ returned {clip_norm[:3]}")
    if got_loss != ref_loss:
        failures.append(f"loss {got_loss[:3]} != loop {ref_loss[:3]}")
    detail = [r for r in recs if r.step % 5 == 0]
    if not detail or any("update_ratio" not in r.values or "grad_norm/blocks" not in r.values for r in detail):
        failures.append("param_norm/update_ratio/grad_norm/<group> missing at their steps")
    compute = statistics.median(r.values["compute_time_seconds"] for r in recs)
    step_t = statistics.median(r.values["step_time_seconds"] for r in recs)
    gpu_keys = sorted({k for r in system for k in r.values if k.startswith("gpu_")})
    print(f"  values arrived: {len(recs)} records; grad_norm before clipping {got_norm[0]:.4f} "
          f"(float32 reference {ref_norm[0]:.4f}, clip_grad_norm_ in bf16 {clip_norm[0]:.4f}); "
          f"median compute_time {compute * 1e3:.2f} ms of step_time {step_t * 1e3:.2f} ms")
    print(f"  system values: {gpu_keys}")
    if "gpu_memory_allocated_bytes" not in gpu_keys:
        failures.append("no GPU memory figures in the system records")


def overhead(torch: Any, loop: Loop, pairs: int, steps: int) -> tuple[float, float, float]:
    """Alternating blocks without (A) and with (B) trainguard; median per-step seconds of each and the overhead."""
    import monitor

    def block(mon: Any) -> float:
        for _ in range(3):
            loop.step(mon)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            loop.step(mon)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    a, b = [], []
    for i in range(pairs):
        for which in ("AB" if i % 2 == 0 else "BA"):
            if which == "A":
                a.append(block(None))
            else:
                mon = monitor.watch(loop.model, loop.opt, run="gpu-check-ab", address="off", heartbeat_interval=1.0)
                b.append(block(mon))
                mon.close(timeout=30)
    ma, mb = statistics.median(a), statistics.median(b)
    return ma, mb, (mb - ma) / ma


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and blocks")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        return cpu_mode(torch)

    failures: list[str] = []
    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    allocator_check(torch, failures)
    loop = Loop(torch, args.batch, args.seq)
    print(f"model: {loop.params / 1e6:.0f}M parameters, bf16, batch {args.batch} x {args.seq} tokens")
    sync_check(torch, loop, 10 if args.quick else 30, failures)
    ma, mb, ov = overhead(torch, loop, 3 if args.quick else 6, 10 if args.quick else 25)
    print(f"step time, median of alternating blocks: without {ma * 1e3:.2f} ms, with trainguard {mb * 1e3:.2f} ms, "
          f"overhead {ov * 100:+.2f} % (target <= 1 %)")
    if ov > 0.01:
        failures.append(f"overhead {ov * 100:.2f} % is over the 1 % target")
    for f in failures:
        print("FAIL:", f)
    if not failures:
        print("PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
