"""LossPlateau (info): no progress for several blocks while the lr is high or zero; converged runs are quiet."""

from __future__ import annotations

from monitor.daemon.detectors.loss_plateau import LossPlateau
from tests.daemon.detectors.streams import ar1, clean_loss, fires, label, replay, trace, train_series


def test_silent_while_the_loss_improves() -> None:
    loss = clean_loss(3000, seed=0, start=4.0, end=1.0, noise=0.03)
    lrs = [1e-3] * 3000
    assert fires(replay(LossPlateau(), train_series(loss=loss[:1500], lr=lrs[:1500]))) == []


def test_fires_at_info_on_a_flat_loss_with_a_high_lr() -> None:
    loss = clean_loss(600, seed=1, noise=0.03) + ar1(600, seed=1, level=2.2, phi=0.5, sigma=0.03)
    out = replay(LossPlateau(), train_series(loss=loss, lr=[1e-3] * 1200))
    f = fires(out)
    assert len(f) == 1 and f[0].severity == "info" and 900 <= f[0].step <= 1100
    assert "no progress" in f[0].summary


def test_quiet_when_the_lr_has_decayed() -> None:
    loss = clean_loss(600, seed=2, noise=0.03) + ar1(600, seed=2, level=2.2, phi=0.5, sigma=0.03)
    lrs = [1e-3] * 600 + [1e-4] * 600
    assert fires(replay(LossPlateau(), train_series(loss=loss, lr=lrs))) == []


def test_fires_when_the_lr_is_zero_and_resolves_on_progress() -> None:
    loss = clean_loss(600, seed=3, noise=0.03) + ar1(600, seed=3, level=2.2, phi=0.5, sigma=0.03)
    loss += [1.5 * x / 2.2 for x in ar1(600, seed=4, level=2.2, phi=0.5, sigma=0.03)]
    lrs = [1e-3] * 600 + [0.0] * 600 + [1e-3] * 600
    out = replay(LossPlateau(), train_series(loss=loss, lr=lrs))
    assert [f.action for f in out][:2] == ["fire", "resolve"] and "lr is zero" in out[0].summary
    assert out[1].step > 1200


def test_cpu_lr_zero_in_its_window() -> None:
    rel = "cpu/cpu-lr_zero-01.jsonl.gz"
    exp = [e for e in label(rel)["expect"] if e["alert"] == "LossPlateau"][0]
    out = fires(replay(LossPlateau(), trace(rel)))
    assert out and exp["from_step"] <= out[0].step <= exp["to_step"]


def test_never_pages_on_healthy_traces() -> None:
    for rel in ("cpu/cpu-healthy-01.jsonl.gz", "healthy-nanogpt/2024-10-20-ScaleUp1B-ad8d7ae5.jsonl.gz"):
        assert fires(replay(LossPlateau(), trace(rel)), paging=True) == []
