"""Check the GPU-only collector paths on a machine with a CUDA GPU (and that they degrade on a CPU).

    python bench/gpu_check.py

On a GPU it checks that the allocator figures trainguard reports match torch's own, and that
reading them (and logging a step whose loss is still a device tensor) causes no host-device
synchronisation on the calling thread: torch.cuda.set_sync_debug_mode("error") turns any such
synchronisation into an exception. Without a GPU it checks that the collectors return nothing and
raise nothing. Exit status 0 when every check holds.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    import torch

    from monitor import Reporter
    from monitor.client.collect import gpu_memory, system_values

    if not torch.cuda.is_available():
        vals = gpu_memory()
        sysv = system_values()
        ok = vals == {} and "host_rss_bytes" in sysv and not any(k.startswith("gpu_") for k in sysv)
        print(f"no CUDA device: gpu_memory() -> {vals}, system_values() keys -> {sorted(sysv)}")
        print("PASS: GPU collectors degrade to nothing on a CPU" if ok else "FAIL")
        return 0 if ok else 1

    dev = torch.device("cuda")
    x = torch.randn(4096, 4096, device=dev)
    torch.cuda.synchronize()
    failures = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        t0 = time.perf_counter()
        vals = gpu_memory()
        read_us = (time.perf_counter() - t0) * 1e6
        rep = Reporter(run="gpu-check", address="off")  # record nothing, send nothing: only the caller's cost
        loss = (x @ x).mean()  # stays on the device
        t0 = time.perf_counter()
        rep.log("train", 1, {"loss": loss.detach()})
        log_us = (time.perf_counter() - t0) * 1e6
    except RuntimeError as e:
        failures.append(f"a collector synchronised with the device: {e}")
        vals, read_us, log_us = {}, float("nan"), float("nan")
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
    print(f"device: {torch.cuda.get_device_name(dev)}")
    print(f"gpu_memory(): {len(vals)} values in {read_us:.1f} us, no synchronisation")
    print(f"Reporter.log() with a device-tensor loss: {log_us:.1f} us, no synchronisation")
    for k, v in sorted(vals.items()):
        print(f"  {k:32s} {v:,.0f}")
    for f in failures:
        print("FAIL:", f)
    if not failures:
        print("PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
