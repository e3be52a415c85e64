"""LearningRateAnomaly: zero, jumps and out-of-range learning rates; ordinary schedules are silent."""

from __future__ import annotations

import math

import pytest

from monitor.daemon.detectors.learning_rate import LearningRateAnomaly
from tests.daemon.detectors.streams import HEALTHY_SAMPLE, fires, label, replay, trace, train_series


def cosine(n: int, peak: float = 1e-3, warmup: int = 100, floor: float = 0.0) -> list[float]:
    """Linear warm-up from peak/warmup, then cosine decay to `floor` at step n."""
    out = []
    for i in range(1, n + 1):
        if i <= warmup:
            out.append(peak * i / warmup)
        else:
            p = (i - warmup) / (n - warmup)
            out.append(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p)))
    return out


@pytest.mark.parametrize("lrs", [
    cosine(2000), cosine(2000, floor=1e-4), [1e-3] * 2000,
    [0.0] + cosine(500)[1:],                                        # warm-up that starts at zero
    [1e-3] * 500 + [1e-4] * 500 + [1e-5] * 500,                     # step schedule, 10x milestones
    [1e-3 * (1 - i / 1000) for i in range(1001)],                   # linear decay to exactly zero
])
def test_silent_on_ordinary_schedules(lrs: list[float]) -> None:
    assert fires(replay(LearningRateAnomaly(), train_series(lr=lrs), meta={"lr": 1e-3})) == []


def test_abrupt_zero_fires_at_once_and_resolves() -> None:
    lrs = cosine(1000)[:400] + [0.0] * 200 + cosine(1000)[600:]
    out = replay(LearningRateAnomaly(), train_series(lr=lrs))
    assert [(f.action, f.step) for f in out] == [("fire", 401), ("resolve", 650)]
    assert out[0].labels["kind"] == "zero" and "to zero" in out[0].summary


def test_zero_from_the_start_fires_after_warmup() -> None:
    out = fires(replay(LearningRateAnomaly(), train_series(lr=[0.0] * 300), meta={"schedule": {"warmup": 50}}))
    assert [f.step for f in out] == [100]


def test_jump_fires() -> None:
    lrs = [1e-3] * 300 + [3e-2] * 100
    out = fires(replay(LearningRateAnomaly(), train_series(lr=lrs)))
    assert [(f.step, f.labels["kind"]) for f in out] == [(301, "jump")]


def test_above_configured_peak_fires() -> None:
    lrs = [1e-3 * 1.03 ** max(0, i - 200) for i in range(400)]
    out = fires(replay(LearningRateAnomaly(), train_series(lr=lrs), meta={"optimizer": {"lr": 1e-3}}))
    assert len(out) == 1 and out[0].labels["kind"] == "above_configured" and 220 <= out[0].step <= 226


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1e-3])
def test_invalid_values_fire(bad: float) -> None:
    out = fires(replay(LearningRateAnomaly(), train_series(lr=[1e-3] * 10 + [bad] + [1e-3] * 10)))
    assert [f.step for f in out] == [11]


def test_cpu_lr_zero_in_its_window() -> None:
    rel = "cpu/cpu-lr_zero-01.jsonl.gz"
    exp = [e for e in label(rel)["expect"] if e["alert"] == "LearningRateAnomaly"][0]
    out = fires(replay(LearningRateAnomaly(), trace(rel)))
    assert out and exp["from_step"] <= out[0].step <= exp["to_step"]


@pytest.mark.parametrize("rel", HEALTHY_SAMPLE)
def test_silent_on_healthy_traces(rel: str) -> None:
    assert fires(replay(LearningRateAnomaly(), trace(rel))) == []
