"""Cheap collectors that add no host-device synchronisation: host memory, GPU allocator stats."""

from __future__ import annotations

import os
import sys
from typing import Any


def host_rss_bytes() -> float | None:
    """Resident set size of this process, or None when psutil cannot tell."""
    try:
        import psutil

        return float(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # noqa: BLE001
        return None


def gpu_memory() -> dict[str, float]:
    """CUDA caching-allocator figures for the current device (empty without a GPU).

    These read host-side counters of the allocator; none of them waits for the GPU.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return {}
        dev = torch.cuda.current_device()
        stats: dict[str, Any] = torch.cuda.memory_stats(dev)
        out = {
            "gpu_memory_allocated_bytes": float(stats.get("allocated_bytes.all.current", 0)),
            "gpu_memory_reserved_bytes": float(stats.get("reserved_bytes.all.current", 0)),
            "gpu_memory_peak_bytes": float(stats.get("allocated_bytes.all.peak", 0)),
            "num_alloc_retries": float(stats.get("num_alloc_retries", 0)),
            "num_ooms": float(stats.get("num_ooms", 0)),
        }
        out["gpu_memory_total_bytes"] = float(torch.cuda.get_device_properties(dev).total_memory)
        return out
    except Exception:  # noqa: BLE001
        return {}


def system_values() -> dict[str, float]:
    """Everything the system sampler reports."""
    vals = gpu_memory()
    rss = host_rss_bytes()
    if rss is not None:
        vals["host_rss_bytes"] = rss
    return vals
