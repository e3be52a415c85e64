"""Properties of the system detectors: any sequence of records, finite or not, never raises, never grows
without bound, and state() survives a JSON round trip into restore()."""

from __future__ import annotations

import json
import math
import random
from collections import deque
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.daemon.detectors.dataloader_bottleneck import DataLoaderBottleneck
from monitor.daemon.detectors.memory_leak import MemoryLeak
from monitor.daemon.detectors.memory_pressure import MemoryPressure
from monitor.daemon.detectors.rank_lost import RankLost
from monitor.daemon.detectors.straggler_rank import StragglerRank
from monitor.daemon.detectors.throughput_drop import ThroughputDrop
from monitor.daemon.detectors.training_stalled import TrainingStalled
from monitor.daemon.state import RunState
from monitor.records import Record

DETECTORS = (ThroughputDrop, StragglerRank, TrainingStalled, RankLost, MemoryLeak, MemoryPressure,
             DataLoaderBottleneck)
NAMES = ("loss", "step_time_seconds", "compute_time_seconds", "data_time_seconds", "tokens", "host_rss_bytes",
         "gpu_memory_allocated_bytes", "gpu_memory_reserved_bytes", "gpu_memory_total_bytes", "num_ooms",
         "num_alloc_retries")
KINDS = ("train", "train", "train", "system", "system", "heartbeat", "eval", "run", "end")
T0 = 1_700_000_000.0

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=1e12, allow_nan=False),
    st.sampled_from([0.0, -1.0, 1e-300, 1e300, math.nan, math.inf, -math.inf]),
    st.integers(min_value=-10, max_value=10 ** 12),
)


@st.composite
def records(draw: Any) -> list[Record]:
    """A run's records: any kinds, ranks 0-3, event time mostly forward, values finite or not."""
    n = draw(st.integers(min_value=1, max_value=120))
    t = T0
    out = []
    for _ in range(n):
        t += draw(st.one_of(st.floats(min_value=0.0, max_value=3.0), st.sampled_from([-1.0, 0.0, 40.0, 400.0])))
        kind = draw(st.sampled_from(KINDS))
        step = draw(st.one_of(st.integers(min_value=0, max_value=10 ** 6), st.none())) if kind not in (
            "train", "eval") else draw(st.integers(min_value=0, max_value=10 ** 6))
        vals = draw(st.dictionaries(st.sampled_from(NAMES), numbers, max_size=6))
        rec = Record(kind, "prop", t, draw(st.integers(min_value=0, max_value=3)), step, vals,
                     world_size=4 if kind == "run" else None, status="completed" if kind == "end" else None)
        out.append(rec)
    return out


def feed(dets: list[Any], recs: list[Record], batch: int, st_: RunState | None = None) -> RunState:
    """Apply records to a run with these detectors, `batch` at a time; detector errors propagate."""
    run = st_ or RunState("prop", 64)
    run.set_detectors(dets)
    for i in range(0, len(recs), batch):
        run.apply(recs[i:i + batch], 0.0, True, _raise)
    return run


def _raise(det: Any, e: Exception) -> None:
    raise e


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records(), st.integers(min_value=1, max_value=50), st.integers(min_value=0, max_value=119))
def test_any_records_never_raise_and_state_round_trips(recs: list[Record], batch: int, cut: int) -> None:
    dets = [cls() for cls in DETECTORS]
    cut = min(cut, len(recs))
    run = feed(dets, recs[:cut], batch)
    for det in dets:
        det.statistic()
        saved = json.loads(json.dumps(det.state(), allow_nan=False))
        again = type(det)()
        again.restore(saved)
        assert again.state() == saved, det.name
    # A restored set of detectors takes the rest of the run without raising.
    fresh = []
    for det in dets:
        d = type(det)()
        d.restore(json.loads(json.dumps(det.state())))
        fresh.append(d)
    feed(fresh, recs[cut:], batch, run)
    for d in fresh:
        d.tick(run.clock + 1000.0, run)
        json.dumps(d.state(), allow_nan=False)


junk = st.recursive(st.none() | st.booleans() | numbers | st.text(max_size=4),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=4),
                    max_leaves=12)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(DETECTORS), st.data())
def test_restore_takes_any_junk(cls: type, data: Any) -> None:
    det = cls()
    keys = list(det.state()) + ["firing", "x"]
    state = data.draw(st.dictionaries(st.sampled_from(keys), junk, max_size=len(keys)))
    det.restore(state)
    json.dumps(det.state(), allow_nan=False)
    run = RunState("prop", 16)
    run.set_detectors([det])
    run.apply([Record("train", "prop", T0, 0, 1, {"step_time_seconds": 0.1, "compute_time_seconds": 0.05}),
               Record("system", "prop", T0 + 1, 1, 1, {"host_rss_bytes": 1e9, "num_ooms": 1.0}),
               Record("heartbeat", "prop", T0 + 100, 0, 1)], 0.0, True, _raise)


def size(obj: Any, seen: set[int] | None = None) -> int:
    """Elements held in containers reachable from obj (the detector's memory, roughly)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        return len(obj) + sum(size(k, seen) + size(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset, deque)):
        return len(obj) + sum(size(v, seen) for v in obj)
    if hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
        names = list(getattr(obj, "__dict__", {})) + [s for c in type(obj).__mro__ for s in getattr(c, "__slots__", ())]
        return sum(size(getattr(obj, n, None), seen) for n in names if n != "config")
    return 0


def long_run(n: int, seed: int) -> list[Record]:
    """n steps of a 4-rank job with heartbeats and system records, values drifting, some non-finite."""
    rng = random.Random(seed)
    out = []
    for step in range(1, n + 1):
        t = T0 + 0.5 * step
        for r in range(4):
            v = {"step_time_seconds": rng.choice([0.5, 0.5, 0.7, math.nan, math.inf]) * (1 + step / n),
                 "compute_time_seconds": 0.2 * rng.uniform(0.5, 3), "data_time_seconds": rng.uniform(0, 0.4),
                 "tokens": 4096.0, "loss": rng.uniform(1, 3)}
            out.append(Record("train", "prop", t + 0.01 * r, r, step, v))
            if step % 5 == 0:
                out.append(Record("system", "prop", t + 0.02, r, step, {
                    "host_rss_bytes": 1e9 * (1 + step / 50) * rng.uniform(0.9, 1.1),
                    "gpu_memory_allocated_bytes": rng.choice([2e10, 3e10, math.nan]) * (1 + step / 100),
                    "gpu_memory_reserved_bytes": 7.9e10, "gpu_memory_total_bytes": 8e10,
                    "num_ooms": float(step // 200), "num_alloc_retries": float(step // 20)}))
            if step % 2 == 0:
                out.append(Record("heartbeat", "prop", t + 0.03, r, step))
        if step % 100 == 0:
            out.append(Record("eval", "prop", t + 0.1, 0, step, {"loss": 2.0}))
    return out


@pytest.mark.parametrize("cls", [c for c in DETECTORS if c is not MemoryLeak], ids=lambda c: c.__name__)
def test_memory_stays_bounded_on_long_runs(cls: type) -> None:
    recs = long_run(6000, seed=1)
    det = cls()
    run = RunState("prop", 64)
    run.set_detectors([det])
    sizes = []
    for i in range(0, len(recs), 500):
        run.apply(recs[i:i + 500], 0.0, True, _raise)
        if i % 10000 == 0:
            sizes.append((size(det), len(json.dumps(det.state(), allow_nan=False))))
    # After the first quarter of the run (windows full) nothing grows with the run's length.
    assert len(sizes) == 5
    (mem1, js1), (mem2, js2) = sizes[1], sizes[-1]
    assert mem1 > 0 and mem2 <= mem1 + 64 and js2 <= js1 + 2048, (sizes, cls.__name__)


def test_memory_leak_windows_stay_bounded() -> None:
    # Its coarsest resolution takes 64 records a point and keeps 96 points: fill it past that.
    rng = random.Random(2)
    det = MemoryLeak()
    run = RunState("prop", 16)
    run.set_detectors([det])
    sizes = []
    for i in range(10000):
        v = 1e9 * rng.uniform(0.98, 1.02) if rng.random() < 0.9 else rng.choice([math.nan, math.inf, -1.0])
        run.apply([Record("system", "prop", T0 + 5.0 * i, 0, i, {"host_rss_bytes": v})], 0.0, True, _raise)
        if i in (8500, 9999):
            sizes.append(size(det))
    assert sizes[1] <= sizes[0] + 16 and sizes[0] < 1000, sizes
