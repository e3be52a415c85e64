"""Properties of the loss/gradient/lr/eval/probe detectors and of their robust statistics: no input makes a
detector raise or grow without bound, and the statistics are exact."""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.daemon.detectors._robust import Cusum, RollingMedian, meta_number, safe_log, theil_sen
from monitor.daemon.detectors.base import Detector
from monitor.daemon.detectors.gradient_explosion import GradientExplosion
from monitor.daemon.detectors.learning_rate import LearningRateAnomaly
from monitor.daemon.detectors.loss_divergence import LossDivergence
from monitor.daemon.detectors.loss_plateau import LossPlateau
from monitor.daemon.detectors.loss_scale import LossScaleCollapse
from monitor.daemon.detectors.loss_spike import LossSpike
from monitor.daemon.detectors.overfitting import Overfitting
from monitor.daemon.detectors.probe_regression import ProbeRegression
from monitor.daemon.detectors.vanishing_gradient import VanishingGradient
from monitor.records import Record
from tests.daemon.detectors.streams import run_state

CLASSES = [LossSpike, LossDivergence, GradientExplosion, VanishingGradient, Overfitting, LossPlateau,
           LearningRateAnomaly, LossScaleCollapse, ProbeRegression]
NAMES = ("loss", "grad_norm", "lr", "loss_scale", "skipped_iterations", "accuracy")

nasty = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e-300, 1e300, 1.7e308, -1.0, 1.0, 2.0]),
    st.floats(min_value=0.1, max_value=10.0),
)
values = st.dictionaries(st.sampled_from(NAMES), nasty, max_size=len(NAMES))
record = st.tuples(
    st.sampled_from(["train", "train", "train", "eval", "probe"]),
    st.integers(min_value=0, max_value=10**9),
    values,
    st.sampled_from(["a", "b", ""]),
    st.lists(nasty, max_size=12),
)
meta = st.dictionaries(st.sampled_from(["lr", "vocab_size", "grad_clip", "schedule", "optimizer", "max_grad_norm"]),
                       st.one_of(nasty, st.text(max_size=5), st.dictionaries(st.sampled_from(["lr", "warmup"]), nasty)),
                       max_size=4)


def to_record(kind: str, step: int, vals: dict[str, float], suite: str, items: list[float]) -> Record:
    return Record(kind, "prop", 1.7e9 + step * 1e-3, 0, step, vals,
                  suite=suite if kind == "probe" else None, items=items if kind == "probe" else None)


def drive(det: Detector, recs: list[Record], run: Any) -> None:
    for r in recs:
        if r.kind in det.kinds:
            for f in det.update(r, run):
                assert f.alert == det.name and f.action in ("fire", "resolve")
                assert f.severity in ("info", "warning", "critical")
        det.tick(r.t, run)
        s = det.statistic()
        assert s is None or isinstance(s, float)


def state_json(det: Detector) -> str:
    return json.dumps(det.state(), allow_nan=False, sort_keys=True)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recs=st.lists(record, max_size=120), m=meta)
def test_never_raises_and_round_trips(cls: type[Detector], recs: list[tuple], m: dict[str, Any]) -> None:
    run = run_state(m)
    det = cls()
    records = [to_record(*r) for r in recs]
    half = len(records) // 2
    drive(det, records[:half], run)
    saved = state_json(det)
    again = cls()
    again.restore(json.loads(saved))
    assert state_json(again) == saved  # restore(state()) loses nothing
    drive(again, records[half:], run)
    state_json(again)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name)
@settings(max_examples=40, deadline=None)
@given(garbage=st.dictionaries(st.text(max_size=8), st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12)))
def test_restore_accepts_any_json(cls: type[Detector], garbage: dict[str, Any]) -> None:
    det = cls()
    det.restore(garbage)
    drive(det, [to_record("train", i, {"loss": 2.0, "grad_norm": 1.0, "lr": 1e-3, "loss_scale": 1024.0}, "", [])
                for i in range(5)], run_state())
    state_json(det)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name)
def test_state_stays_bounded(cls: type[Detector]) -> None:
    run = run_state({"lr": 1e-3})
    det = cls()
    sizes = []
    step = 0
    for chunk in range(4):
        recs = []
        for i in range(3000):
            step += 1
            x = 1.0 + 0.5 * math.sin(step / 7.0) + (1e6 if step % 97 == 0 else 0.0)
            vals = {"loss": x, "grad_norm": x, "lr": 1e-3 * x, "loss_scale": 2.0 ** (step % 17)}
            recs.append(to_record("train", step, vals, "", []))
            if step % 50 == 0:
                recs.append(to_record("eval", step, {"loss": x}, "", []))
                recs.append(to_record("probe", step, {}, f"s{step % 40}", [float(step % 2)] * 300))
        drive(det, recs, run)
        sizes.append(len(state_json(det)))
    assert sizes[-1] < 256 * 1024
    assert sizes[-1] <= sizes[1] * 1.1 + 1024  # flat after the windows filled


@settings(max_examples=200, deadline=None)
@given(xs=st.lists(st.one_of(st.floats(-1e6, 1e6), st.integers(-3, 3).map(float)), min_size=1, max_size=60),
       size=st.integers(1, 25))
def test_rolling_median_and_mad_are_exact(xs: list[float], size: int) -> None:
    w = RollingMedian(size)
    for x in xs:
        w.push(x)
        vals = w.values()
        med = statistics.median(vals)
        assert w.median() == pytest.approx(med, abs=1e-9)
        assert w.exact_mad() == pytest.approx(statistics.median([abs(v - med) for v in vals]), abs=1e-6)
    assert len(w) == min(size, len(xs))
    assert not w.push(math.nan) and not w.push(math.inf) and len(w) == min(size, len(xs))


def test_robust_z_cusum_and_theil_sen() -> None:
    w = RollingMedian(100, mad_floor=0.5)
    for x in (1.0, 2.0, 3.0, 4.0, 5.0):
        w.push(x)
    assert w.z(3.0) == 0.0 and w.z(5.0) == pytest.approx(0.6745 * 2 / 1.0)
    w2 = RollingMedian(10, mad_floor=0.5)
    for _ in range(5):
        w2.push(7.0)
    assert w2.scale() == 0.5  # the floor keeps a constant series from dividing by zero
    c = Cusum(k=0.5, h=2.0)
    assert [round(c.update(x), 2) for x in (1.0, 1.0, -5.0, math.nan, 3.0)] == [0.5, 1.0, 0.0, 0.0, 2.5]
    assert c.alarm
    assert theil_sen([0, 1, 2, 3, 4], [1, 3, 5, 7, 100]) == pytest.approx(2.0)
    assert math.isnan(theil_sen([1, 1], [0, 5]))
    assert safe_log(0.0) != safe_log(0.0) and safe_log(math.e) == pytest.approx(1.0)
    assert meta_number({"optimizer": {"lr": 3e-4}}, "lr", "optimizer.lr") == 3e-4
    assert meta_number({"lr": "high", "x": True}, "lr", "x") is None
