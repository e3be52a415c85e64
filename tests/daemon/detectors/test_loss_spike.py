"""LossSpike: pages on a loss that stays high, reports lone outliers at info, silent on noise."""

from __future__ import annotations

import pytest

from monitor.daemon.detectors.loss_spike import LossSpike
from tests.daemon.detectors.streams import (HEALTHY_SAMPLE, ar1, clean_loss, fires, label, replay, trace,
                                            train_series, with_outliers)


def test_silent_on_clean_decaying_noise() -> None:
    for seed in range(5):
        assert fires(replay(LossSpike(), train_series(loss=clean_loss(2000, seed=seed)))) == []


@pytest.mark.parametrize("phi", [0.5, 0.8, 0.9])
def test_silent_on_autocorrelated_noise(phi: float) -> None:
    for seed in range(5):
        assert fires(replay(LossSpike(), train_series(loss=ar1(2000, seed=seed, phi=phi))), paging=True) == []


def test_single_and_double_outliers_are_info_only() -> None:
    loss = with_outliers(clean_loss(1000, seed=1), [300, 600, 601], 2.5)
    out = fires(replay(LossSpike(), train_series(loss=loss)))
    assert [(f.step, f.severity) for f in out] == [(301, "info"), (601, "info")]
    assert all(f.severity == "info" for f in out)


def test_pages_within_three_steps_on_a_sustained_spike() -> None:
    loss = clean_loss(800, seed=2)
    loss = with_outliers(loss, range(500, 520), 1.8)
    out = replay(LossSpike(), train_series(loss=loss))
    paging = fires(out, paging=True)
    assert len(paging) == 1 and 501 <= paging[0].step <= 503
    assert paging[0].severity == "warning"
    assert "median" in paging[0].summary and "z" in paging[0].summary
    # It resolves once the loss is back, then stays quiet.
    resolves = [f for f in out if f.action == "resolve"]
    assert resolves and resolves[-1].step > 520


def test_info_episode_escalates_to_a_page() -> None:
    loss = clean_loss(600, seed=3)
    loss = with_outliers(loss, range(400, 410), 3.0)
    out = replay(LossSpike(), train_series(loss=loss))
    seq = [(f.action, f.severity) for f in out if f.step is not None and f.step <= 405]
    assert seq[:3] == [("fire", "info"), ("resolve", "warning"), ("fire", "warning")]


def test_cusum_catches_a_moderate_sustained_rise() -> None:
    loss = ar1(800, seed=4, phi=0.0, sigma=0.02)
    loss = with_outliers(loss, range(500, 560), 1.05)  # ~2.5 sigma: below the z-4 persistence rule
    paging = fires(replay(LossSpike(), train_series(loss=loss)), paging=True)
    assert paging and 505 <= paging[0].step <= 530 and "CUSUM" in paging[0].summary


def test_grad_norm_co_spike_is_named() -> None:
    loss = with_outliers(clean_loss(400, seed=5), [300], 3.0)
    gn = with_outliers([1.0 + 0.01 * (i % 7) for i in range(400)], [300], 20.0)
    f = fires(replay(LossSpike(), train_series(loss=loss, grad_norm=gn)))[0]
    assert f.labels["co_spike"] == "true" and "co-spike" in f.summary


def test_restart_keeps_the_baseline() -> None:
    loss = with_outliers(clean_loss(400, seed=6), range(300, 310), 2.0)
    recs = train_series(loss=loss)
    det = LossSpike()
    first = replay(det, recs[:250])
    again = LossSpike()
    again.restore(det.state())
    out = replay(again, recs[250:])
    assert fires(first) == [] and [f.step for f in fires(out, paging=True)] == [303]


def test_cpu_spike_reported_in_its_window() -> None:
    rel = "cpu/cpu-spike-01.jsonl.gz"
    exp = label(rel)["expect"][0]
    out = fires(replay(LossSpike(), trace(rel)))
    assert out and exp["from_step"] <= out[0].step <= exp["to_step"]


@pytest.mark.parametrize("rel", ["incidents-bloom/tr11-176B-spike-31214.jsonl.gz",
                                 "incidents-bloom/tr8-104B-exp11-spike-11447.jsonl.gz"])
def test_short_incident_excerpts_reported_at_info(rel: str) -> None:
    exp = [e for e in label(rel)["expect"] if e["alert"] == "LossSpike"][0]
    out = fires(replay(LossSpike(), trace(rel)))
    assert out and exp["from_step"] <= out[0].step <= exp["to_step"] and out[0].severity == "info"


@pytest.mark.parametrize("rel", HEALTHY_SAMPLE)
def test_never_pages_on_healthy_traces(rel: str) -> None:
    assert fires(replay(LossSpike(), trace(rel)), paging=True) == []
