"""DataLoaderBottleneck: reports (info) a loop that waits for data a large share of each step."""

from __future__ import annotations

import json
import random

import pytest

from monitor.daemon.detectors.dataloader_bottleneck import DataLoaderBottleneck
from tests.daemon.detectors.streams import HEALTHY_SAMPLE, fires, replay, trace, train_series


def timings(n: int = 1000, seed: int = 0, share: float = 0.02, slow: tuple[int, int, float] | None = None,
            spikes: tuple[int, ...] = ()) -> dict[str, list[float]]:
    """Step and data times: 0.2 s of compute plus a data wait of `share` (noisy).

    `slow` = (from, to, share) sets the wait share meanwhile; at each index in `spikes` the wait
    is 30 s (a new epoch's first batch, a shard download).
    """
    rng = random.Random(seed)
    st, dt = [], []
    for i in range(n):
        s = slow[2] if slow and slow[0] <= i < slow[1] else share
        compute = 0.2 * rng.uniform(0.95, 1.05)
        wait = compute * s / (1 - s) * rng.uniform(0.5, 1.5)
        if i in spikes:
            wait = 30.0
        st.append(compute + wait)
        dt.append(wait)
    return {"step_time_seconds": st, "data_time_seconds": dt}


def test_reports_a_sustained_wait_at_info_and_resolves() -> None:
    out = replay(DataLoaderBottleneck(), train_series(**timings(slow=(400, 800, 0.45))))
    fired = fires(out)
    assert len(fired) == 1
    f = fired[0]
    assert f.severity == "info" and 430 <= f.step <= 560
    assert "% of each step waits for data" in f.summary
    resolved = [x for x in out if x.action == "resolve"]
    assert len(resolved) == 1 and 800 <= resolved[0].step <= 920


def test_silent_on_occasional_long_waits_and_a_moderate_share() -> None:
    assert fires(replay(DataLoaderBottleneck(), train_series(**timings(spikes=tuple(range(100, 1000, 97)))))) == []
    assert fires(replay(DataLoaderBottleneck(), train_series(**timings(share=0.12, seed=1)))) == []


def test_data_time_outside_the_step_is_handled() -> None:
    # Loops that time the wait outside the step: data 0.3 s, step 0.2 s -> 60 % of the wall time.
    out = fires(replay(DataLoaderBottleneck(), train_series(step_time_seconds=[0.2] * 400,
                                                            data_time_seconds=[0.3] * 400)))
    assert len(out) == 1 and "60 %" in out[0].summary


def test_state_round_trip() -> None:
    det = DataLoaderBottleneck()
    replay(det, train_series(**timings(n=300)))
    det2 = DataLoaderBottleneck()
    det2.restore(json.loads(json.dumps(det.state(), allow_nan=False)))
    assert det2.state() == det.state()


@pytest.mark.parametrize("rel", HEALTHY_SAMPLE)
def test_silent_on_healthy_traces(rel: str) -> None:
    assert fires(replay(DataLoaderBottleneck(), trace(rel))) == []
