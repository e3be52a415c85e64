"""LossScaleCollapse: repeated back-offs of the fp16 loss scale, or a scale at its floor."""

from __future__ import annotations

from monitor.daemon.detectors.loss_scale import LossScaleCollapse
from tests.daemon.detectors.streams import HEALTHY_SAMPLE, fires, replay, trace, train_series


def healthy_scaler(n: int, start: float = 2.0 ** 32, growth_interval: int = 1000) -> list[float]:
    """A dynamic scaler: halves from a high start to 2^16, then doubles every interval, backing off now and then."""
    s, out, quiet = start, [], 0
    for i in range(n):
        if s > 2.0 ** 16:
            s /= 2  # settling down in the first steps
        elif i % 1700 == 850:
            s /= 2  # an occasional overflow
            quiet = 0
        else:
            quiet += 1
            if quiet >= growth_interval:
                s *= 2
                quiet = 0
        out.append(s)
    return out


def test_silent_on_a_healthy_scaler_and_on_bf16() -> None:
    assert fires(replay(LossScaleCollapse(), train_series(loss_scale=healthy_scaler(10_000)))) == []
    assert fires(replay(LossScaleCollapse(), train_series(loss_scale=[1.0] * 1000))) == []


def test_repeated_backoffs_fire_and_resolve() -> None:
    scale = healthy_scaler(1000)
    s = scale[499]
    collapsing = [s / 2 ** (1 + i // 5) for i in range(50)]  # a halving every 5 steps
    tail = [collapsing[-1]] * 400
    out = replay(LossScaleCollapse(), train_series(loss_scale=scale[:500] + collapsing + tail))
    assert [f.action for f in out] == ["fire", "resolve"]
    assert 540 <= out[0].step <= 550 and "back-offs" in out[0].summary


def test_floor_fires() -> None:
    scale = [65536.0] * 100 + [2.0 ** -i for i in range(0, 5)]
    out = fires(replay(LossScaleCollapse(), train_series(loss_scale=scale)))
    assert [f.step for f in out] == [101] and "floor" in out[0].summary


def test_skipped_iterations_are_counted() -> None:
    recs = train_series(loss_scale=[4096.0] * 300, skipped_iterations=[0.0] * 200 + [3.0] * 100)
    out = fires(replay(LossScaleCollapse(), recs))
    assert [f.step for f in out] == [204]


def test_silent_on_healthy_traces() -> None:
    for rel in HEALTHY_SAMPLE[-4:]:
        assert fires(replay(LossScaleCollapse(), trace(rel))) == []
