"""MemoryLeak: steady growth of host RSS or GPU memory on a rank; silent on noise, wander and one-off steps."""

from __future__ import annotations

import json
import math
import random

import pytest

from monitor.daemon.detectors.memory_leak import MemoryLeak
from monitor.records import Record
from tests.daemon.detectors.streams import HEALTHY_SAMPLE, T0, fires, label, replay, run_state, trace

GIB = 1024.0 ** 3


def memory(n: int = 600, ranks: int = 2, seed: int = 0, level: float = 20 * GIB, sigma: float = 0.01, phi: float = 0.0,
           leak: dict[int, tuple[int, float]] | None = None, steps: dict[int, tuple[int, float]] | None = None,
           key: str = "gpu_memory_allocated_bytes", total: float | None = 80 * GIB) -> list[Record]:
    """System records every 5 s per rank: `level` with AR(1) noise of stationary sd `sigma` (relative).

    `leak` maps a rank to (from point, growth per point as a fraction of `level`); `steps` maps a
    rank to (at point, jump as a fraction of `level`), a one-off allocation that stays.
    """
    rng = random.Random(seed)
    leak = leak or {}
    steps = steps or {}
    x = [0.0] * ranks
    innov = sigma * math.sqrt(1 - phi * phi)
    out = []
    for i in range(n):
        for r in range(ranks):
            x[r] = phi * x[r] + rng.gauss(0.0, innov)
            v = level * (1 + x[r])
            a, g = leak.get(r, (n, 0.0))
            if i >= a:
                v += level * g * (i - a)
            b, j = steps.get(r, (n, 0.0))
            if i >= b:
                v += level * j
            vals = {key: v}
            if total is not None:
                vals["gpu_memory_total_bytes"] = total
            out.append(Record("system", "syn", T0 + 5.0 * i + 0.01 * r, r, 10 * i, vals))
    return out


def test_names_the_leaking_rank_with_rate_and_time_to_exhaustion() -> None:
    out = fires(replay(MemoryLeak(), memory(leak={1: (200, 0.005)})))
    assert len(out) == 1
    f = out[0]
    assert f.rank == 1 and f.severity == "warning" and 2000 <= f.step <= 2400  # within 40 points (200 s)
    assert "GPU allocated memory of rank 1 grows" in f.summary and "/min" in f.summary
    assert "reaches the 80 GiB capacity in" in f.summary
    assert float(f.labels["seconds_to_exhaustion"]) > 0


def test_host_rss_leak_without_a_known_capacity() -> None:
    out = fires(replay(MemoryLeak(), memory(key="host_rss_bytes", total=None, leak={0: (100, 0.01)})))
    assert len(out) == 1 and out[0].rank == 0 and "capacity unknown" in out[0].summary


def test_a_slow_leak_is_found_at_a_coarser_resolution() -> None:
    # +0.1 % per 5 s point (+72 %/h): under 5 % in any 32 raw points, plain over 256.
    out = fires(replay(MemoryLeak(), memory(n=2000, ranks=1, leak={0: (100, 0.001)}, sigma=0.005)))
    assert len(out) == 1 and out[0].step < 10 * 1200


@pytest.mark.parametrize("sigma,phi", [(0.01, 0.0), (0.1, 0.0), (0.02, 0.8), (0.02, 0.9), (0.05, 0.8)])
def test_silent_on_noise_and_wander(sigma: float, phi: float) -> None:
    for seed in range(4):
        assert fires(replay(MemoryLeak(), memory(n=800, ranks=4, seed=seed, sigma=sigma, phi=phi))) == []


def test_silent_on_one_off_steps_up() -> None:
    # Each rank allocates a buffer once and keeps it: +10 % or +30 %, at different points.
    jumps = {0: (150, 0.1), 1: (300, 0.3), 2: (50, 0.2), 3: (420, 0.1)}
    for seed in range(3):
        assert fires(replay(MemoryLeak(), memory(n=600, ranks=4, seed=seed, steps=jumps))) == []


def test_resolves_when_growth_stops() -> None:
    recs = memory(n=900, ranks=1, leak={0: (200, 0.005)})
    # The leak stops at point 400: memory stays where it got to.
    top = next(r.values["gpu_memory_allocated_bytes"] for r in recs if r.step == 4000)
    for r in recs:
        if r.step > 4000:
            r.values["gpu_memory_allocated_bytes"] = top * (1 + 0.005 * math.sin(r.step))
    out = replay(MemoryLeak(), recs)
    assert [f.action for f in out] == ["fire", "resolve"]


def test_restart_keeps_the_episode() -> None:
    recs = memory(n=600, ranks=1, leak={0: (200, 0.005)})
    det = MemoryLeak()
    st = run_state()
    st.set_detectors([det])
    assert len(fires(st.apply(recs[:300], 0.0))) == 1
    det2 = MemoryLeak()
    det2.restore(json.loads(json.dumps(det.state(), allow_nan=False)))
    st2 = run_state()
    st2.set_detectors([det2])
    assert fires(st2.apply(recs[300:], 0.0)) == []


def test_real_leak_trace() -> None:
    rel = "cpu/cpu-leak-01.jsonl.gz"
    exp = label(rel)["expect"][0]
    out = fires(replay(MemoryLeak(), trace(rel)))
    assert len(out) == 1 and out[0].rank == 0 and exp["from_step"] <= out[0].step <= exp["to_step"]


@pytest.mark.parametrize("rel", HEALTHY_SAMPLE + ("cpu/cpu-straggler-01.jsonl.gz", "cpu/cpu-slowdown-01.jsonl.gz",
                                                  "cpu/cpu-stall-01.jsonl.gz", "cpu/cpu-rank_lost-01.jsonl.gz"))
def test_silent_on_real_traces_without_a_leak(rel: str) -> None:
    assert fires(replay(MemoryLeak(), trace(rel))) == []
