"""MemoryPressure: an OOM, recurring allocator retries or a full card page at once, naming the rank."""

from __future__ import annotations

import json

import pytest

from monitor.daemon.detectors.memory_pressure import MemoryPressure
from monitor.records import Record
from tests.daemon.detectors.streams import HEALTHY_SAMPLE, T0, fires, replay, run_state, trace

GIB = 1024.0 ** 3


def system(n: int = 100, ranks: int = 2, every: float = 5.0, **per_point) -> list[Record]:
    """System records every `every` s; each keyword maps a value name to f(point, rank) -> value or None."""
    out = []
    for i in range(n):
        for r in range(ranks):
            vals = {"gpu_memory_total_bytes": 80 * GIB, "gpu_memory_reserved_bytes": 60 * GIB,
                    "gpu_memory_allocated_bytes": 50 * GIB, "num_ooms": 0.0, "num_alloc_retries": 0.0}
            for name, f in per_point.items():
                v = f(i, r)
                if v is None:
                    vals.pop(name, None)
                else:
                    vals[name] = v
            out.append(Record("system", "syn", T0 + every * i + 0.01 * r, r, 10 * i, vals))
    return out


def test_an_oom_pages_at_once_naming_the_rank() -> None:
    out = replay(MemoryPressure(), system(n=200, num_ooms=lambda i, r: 1.0 if (r == 1 and i >= 40) else 0.0))
    fired = fires(out)
    assert len(fired) == 1
    f = fired[0]
    assert f.rank == 1 and f.step == 400 and f.severity == "critical"
    assert "1 CUDA out-of-memory error(s)" in f.summary and f.labels["cause"] == "oom"
    # Quiet for 10 minutes of event time: resolved.
    resolved = [x for x in out if x.action == "resolve"]
    assert len(resolved) == 1 and resolved[0].t - f.t >= 600


def test_errors_before_the_first_report_do_not_page() -> None:
    # An automatic batch-size search raised OOMs before the daemon saw the process.
    assert fires(replay(MemoryPressure(), system(num_ooms=lambda i, r: 3.0, num_alloc_retries=lambda i, r: 7.0))) == []


def test_recurring_allocator_retries_page_a_single_one_does_not() -> None:
    assert fires(replay(MemoryPressure(), system(num_alloc_retries=lambda i, r: 1.0 if i >= 30 else 0.0))) == []
    # One more retry every 2 points (10 s) from point 50: the third within 5 minutes pages.
    out = fires(replay(MemoryPressure(), system(num_alloc_retries=lambda i, r: float(max(0, (i - 48) // 2))
                                                if r == 0 else 0.0)))
    assert len(out) == 1 and out[0].rank == 0 and out[0].step == 540 and "3 allocator retries" in out[0].summary
    # Retries spread out over hours are not pressure.
    slow = system(n=400, num_alloc_retries=lambda i, r: float(i // 70))
    assert fires(replay(MemoryPressure(), slow)) == []


def test_a_full_card_pages_after_three_records() -> None:
    full = lambda i, r: 78.5 * GIB if (r == 0 and i in (20, 21, 40, 41, 42, 43)) else 60 * GIB  # noqa: E731
    out = fires(replay(MemoryPressure(), system(gpu_memory_reserved_bytes=full)))
    assert len(out) == 1 and out[0].step == 420 and "98.1 % of GPU memory reserved" in out[0].summary


def test_statistic_is_the_fullest_card() -> None:
    det = MemoryPressure()
    replay(det, system(n=5, gpu_memory_reserved_bytes=lambda i, r: (40 + 10 * r) * GIB))
    assert det.statistic() == pytest.approx(50 / 80)


def test_restart_keeps_the_episode() -> None:
    recs = system(n=200, num_ooms=lambda i, r: 1.0 if (r == 1 and i >= 40) else 0.0)
    det = MemoryPressure()
    st = run_state()
    st.set_detectors([det])
    assert len(fires(st.apply(recs[:100], 0.0))) == 1
    det2 = MemoryPressure()
    det2.restore(json.loads(json.dumps(det.state(), allow_nan=False)))
    st2 = run_state()
    st2.set_detectors([det2])
    rest = st2.apply(recs[100:], 0.0)
    assert [f.action for f in rest] == ["resolve"]


@pytest.mark.parametrize("rel", HEALTHY_SAMPLE + ("cpu/cpu-leak-01.jsonl.gz",))
def test_silent_on_real_traces(rel: str) -> None:
    assert fires(replay(MemoryPressure(), trace(rel))) == []
