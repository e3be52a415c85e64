"""VanishingGradient: a grad norm collapsed to (near) zero for many steps; gradual decline is normal."""

from __future__ import annotations

import pytest

from monitor.daemon.detectors.vanishing_gradient import VanishingGradient
from tests.daemon.detectors.streams import (HEALTHY_SAMPLE, ar1, fires, noisy_norm, replay, trace, train_series,
                                            with_outliers)


def test_silent_on_noise_dips_and_gradual_decline() -> None:
    for seed in range(4):
        gn = with_outliers(noisy_norm(2000, seed=seed, growth=-0.002), [300, 301, 302], 0.01)  # 55x decline
        assert fires(replay(VanishingGradient(), train_series(grad_norm=gn))) == []


@pytest.mark.parametrize("phi", [0.5, 0.9])
def test_silent_on_autocorrelated_noise(phi: float) -> None:
    for seed in range(4):
        gn = ar1(3000, seed=seed, level=1.0, phi=phi, sigma=0.5)
        assert fires(replay(VanishingGradient(), train_series(grad_norm=gn))) == []


def test_fires_after_patience_collapsed_steps_and_resolves() -> None:
    gn = noisy_norm(800, seed=1)
    gn = gn[:400] + [x * 1e-4 for x in gn[400:600]] + gn[600:]
    out = replay(VanishingGradient(), train_series(grad_norm=gn))
    assert [(f.action, f.step) for f in out] == [("fire", 425), ("resolve", 610)]
    assert "collapsed for 25 steps since step 401" in out[0].summary


def test_exact_zero_needs_no_baseline() -> None:
    out = fires(replay(VanishingGradient(), train_series(grad_norm=[0.0] * 40)))
    assert [f.step for f in out] == [25]


@pytest.mark.parametrize("rel", HEALTHY_SAMPLE)
def test_silent_on_healthy_traces(rel: str) -> None:
    assert fires(replay(VanishingGradient(), trace(rel))) == []
