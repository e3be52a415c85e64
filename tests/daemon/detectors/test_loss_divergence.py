"""LossDivergence: a loss that rises well above its best level and stays there pages at once (critical)."""

from __future__ import annotations

import pytest

from monitor.daemon.detectors.loss_divergence import LossDivergence
from tests.daemon.detectors.streams import (HEALTHY_SAMPLE, ar1, clean_loss, fires, label, replay, trace,
                                            train_series, with_outliers)


def test_silent_on_clean_noise_and_outliers() -> None:
    for seed in range(4):
        loss = with_outliers(clean_loss(2000, seed=seed, noise=0.05), [500, 900, 901, 1500], 3.0)
        assert fires(replay(LossDivergence(), train_series(loss=loss))) == []


@pytest.mark.parametrize("phi", [0.5, 0.8, 0.95])
def test_silent_on_autocorrelated_noise(phi: float) -> None:
    for seed in range(4):
        assert fires(replay(LossDivergence(), train_series(loss=ar1(3000, seed=seed, phi=phi, sigma=0.1)))) == []


def test_fires_on_a_sustained_rise_and_only_once() -> None:
    loss = clean_loss(1000, seed=1, noise=0.03)
    loss = loss[:600] + [x * 1.6 for x in loss[600:]]
    out = fires(replay(LossDivergence(), train_series(loss=loss)))
    assert len(out) == 1 and 600 < out[0].step <= 625 and out[0].severity == "critical"
    assert "above its best" in out[0].summary


def test_slow_creep_is_caught() -> None:
    loss = clean_loss(1500, seed=2, noise=0.03)
    loss = loss[:800] + [x * (1.0 + 0.002 * i) for i, x in enumerate(loss[800:])]  # +0.2 %/step
    out = fires(replay(LossDivergence(), train_series(loss=loss)))
    assert len(out) == 1 and 850 < out[0].step < 1000


def test_resolves_when_the_loss_comes_back() -> None:
    loss = clean_loss(1200, seed=3, noise=0.03)
    loss = loss[:500] + [x * 1.6 for x in loss[500:700]] + loss[700:]
    out = replay(LossDivergence(), train_series(loss=loss))
    assert [f.action for f in out] == ["fire", "resolve"] and out[1].step > 700


def test_vocabulary_backstop() -> None:
    loss = clean_loss(400, seed=4, start=6.0, end=3.0, noise=0.02) + [11.0] * 10
    out = fires(replay(LossDivergence(), train_series(loss=loss), meta={"vocab_size": 50257}))
    assert out and out[0].step <= 404 and "ln(vocabulary" in out[0].summary


def test_early_maximum_backstop() -> None:
    loss = clean_loss(300, seed=5, start=4.0, end=2.0) + [60.0] * 10
    out = fires(replay(LossDivergence(), train_series(loss=loss)))
    assert out and out[0].step <= 304 and "early maximum" in out[0].summary


def test_restart_keeps_the_best_level() -> None:
    loss = clean_loss(1000, seed=6, noise=0.03)
    loss = loss[:600] + [x * 1.6 for x in loss[600:]]
    recs = train_series(loss=loss)
    det = LossDivergence()
    replay(det, recs[:590])
    again = LossDivergence()
    again.restore(det.state())
    out = fires(replay(again, recs[590:]))
    assert len(out) == 1 and 600 < out[0].step <= 625


def test_cpu_divergence_in_its_window() -> None:
    rel = "cpu/cpu-divergence-01.jsonl.gz"
    exp = label(rel)["expect"][0]
    out = fires(replay(LossDivergence(), trace(rel)))
    assert out and exp["from_step"] <= out[0].step <= exp["to_step"]


@pytest.mark.parametrize("rel", HEALTHY_SAMPLE)
def test_silent_on_healthy_traces(rel: str) -> None:
    assert fires(replay(LossDivergence(), trace(rel))) == []
