"""GradientExplosion: a grad norm far above its recent level for several steps; slow growth is normal."""

from __future__ import annotations

import math

import pytest

from monitor.daemon.detectors.gradient_explosion import GradientExplosion
from tests.daemon.detectors.streams import (HEALTHY_SAMPLE, ar1, fires, label, noisy_norm, replay, trace, train_series,
                                            with_outliers)


def test_silent_on_noise_outliers_and_slow_growth() -> None:
    for seed in range(4):
        gn = with_outliers(noisy_norm(2000, seed=seed, growth=0.001), [300, 700, 701], 20.0)  # 7x growth
        assert fires(replay(GradientExplosion(), train_series(grad_norm=gn))) == []


@pytest.mark.parametrize("phi", [0.5, 0.8, 0.95])
def test_silent_on_autocorrelated_noise(phi: float) -> None:
    for seed in range(4):
        gn = ar1(3000, seed=seed, level=1.0, phi=phi, sigma=0.3)
        assert fires(replay(GradientExplosion(), train_series(grad_norm=gn))) == []


def test_fires_on_exponential_growth() -> None:
    gn = noisy_norm(600, seed=1)
    gn = gn[:400] + [x * math.exp(0.08 * i) for i, x in enumerate(gn[400:])]
    out = replay(GradientExplosion(), train_series(grad_norm=gn))
    f = fires(out)
    assert len(f) == 1 and 420 <= f[0].step <= 440 and "x the median" in f[0].summary


def test_fires_on_a_step_change_and_resolves_against_the_old_baseline() -> None:
    gn = noisy_norm(1000, seed=2)
    gn = gn[:500] + [x * 50 for x in gn[500:700]] + gn[700:]
    out = replay(GradientExplosion(), train_series(grad_norm=gn))
    assert [(f.action, f.step) for f in out][0] == ("fire", 503)
    assert out[1].action == "resolve" and out[1].step > 700  # the 200 high steps never became the baseline


def test_clip_threshold_is_named() -> None:
    gn = noisy_norm(500, seed=3)
    gn = gn[:400] + [x * 30 for x in gn[400:]]
    f = fires(replay(GradientExplosion(), train_series(grad_norm=gn), meta={"max_grad_norm": 1.0}))[0]
    assert "clipping at 1" in f.summary


def test_cpu_grad_explosion_in_its_window() -> None:
    rel = "cpu/cpu-grad_explosion-01.jsonl.gz"
    exp = label(rel)["expect"][0]
    out = fires(replay(GradientExplosion(), trace(rel)))
    assert out and exp["from_step"] <= out[0].step <= exp["to_step"]


@pytest.mark.parametrize("rel", HEALTHY_SAMPLE)
def test_silent_on_healthy_traces(rel: str) -> None:
    assert fires(replay(GradientExplosion(), trace(rel))) == []
