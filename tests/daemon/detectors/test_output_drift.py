"""OutputDrift: drift probes judged against their own early trajectory."""

from __future__ import annotations

import json
import math
import random
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.daemon.detectors import DETECTORS
from monitor.daemon.detectors.output_drift import OutputDrift
from monitor.daemon.detectors.probe_regression import ProbeRegression
from monitor.records import Record
from tests.daemon.detectors.streams import T0, fires, replay

EVERY = 20  # steps between drift probes

# Measured drift of real fine-tunes, every 20 steps from the baseline (step 0) to step 800: mean
# KL(baseline || current) over 32 fixed prompts (nats, 4 digits) and how many of the 32 prompts
# kept their most likely next token. A 2-layer, d=96 character transformer pretrained on Python
# source was fine-tuned with AdamW on licence texts, on a CPU: six healthy runs (lr 1e-3, 3e-4,
# 3e-3, a 100-step warm-up, a 50/50 mix with the original data, lr 1e-3 with another data
# seed) and the lr-1e-3 run with a fault from step 400: a 30x learning rate, or every target
# replaced by one token. The defaults in monitor/daemon/detectors/output_drift.py come from these.
MEASURED = {  # name: (kl, prompts of 32 with the same top-1 token), steps 0, 20, ..., 800
    "ft_1e-3": (
        [0.0, 0.2454, 0.3517, 0.4291, 0.4946, 0.5481, 0.5785, 0.6141, 0.5957, 0.6967, 0.7693, 0.7668, 0.8185,
         0.7733, 0.9029, 1.008, 0.9195, 0.941, 1.03, 1.045, 1.0, 1.018, 1.08, 1.01, 1.032, 1.11, 1.054, 1.077,
         1.127, 1.066, 1.166, 1.082, 1.154, 1.139, 1.147, 1.26, 1.267, 1.157, 1.122, 1.241, 1.237],
        [32, 28, 27, 27, 25, 24, 26, 24, 24, 24, 23, 22, 21, 22, 23, 21, 23, 22, 22, 21, 20, 20, 22, 22, 21, 18,
         22, 21, 21, 22, 21, 22, 21, 22, 20, 21, 22, 20, 20, 18, 19]),
    "ft_3e-4": (
        [0.0, 0.1311, 0.1767, 0.2134, 0.2478, 0.2775, 0.3092, 0.3288, 0.3242, 0.3501, 0.3947, 0.3924, 0.4285,
         0.4315, 0.4434, 0.4783, 0.4735, 0.4909, 0.5082, 0.5389, 0.5302, 0.5499, 0.5814, 0.6163, 0.6108, 0.6165,
         0.6238, 0.6246, 0.6665, 0.6713, 0.6861, 0.7295, 0.7481, 0.7715, 0.7545, 0.7733, 0.7803, 0.7794, 0.7463,
         0.8122, 0.8187],
        [32, 31, 29, 29, 29, 29, 29, 28, 27, 27, 27, 27, 27, 26, 26, 25, 25, 25, 25, 25, 24, 24, 24, 23, 23, 24,
         24, 24, 23, 24, 22, 22, 23, 23, 23, 23, 22, 24, 22, 24, 23]),
    "ft_3e-3": (
        [0.0, 0.545, 0.6151, 0.7888, 0.8202, 0.8786, 1.167, 1.107, 0.9744, 1.104, 1.08, 1.258, 1.334, 1.391,
         1.436, 1.393, 1.279, 1.533, 1.527, 1.579, 1.505, 1.742, 1.759, 1.937, 1.728, 1.724, 1.752, 1.738,
         1.839, 1.404, 1.731, 1.733, 1.938, 1.66, 1.738, 1.566, 1.549, 1.599, 1.746, 1.793, 1.915],
        [32, 24, 25, 25, 24, 21, 20, 18, 20, 20, 21, 18, 17, 17, 18, 17, 20, 18, 19, 19, 17, 16, 17, 19, 16, 17,
         17, 18, 19, 21, 21, 20, 17, 18, 17, 17, 18, 17, 16, 18, 18]),
    "ft_warmup": (
        [0.0, 0.0442, 0.1689, 0.2217, 0.2917, 0.376, 0.4343, 0.4725, 0.4602, 0.5599, 0.6264, 0.64, 0.7021,
         0.6484, 0.7808, 0.8583, 0.8187, 0.8163, 0.9198, 0.9129, 0.8854, 0.8971, 0.9982, 0.946, 0.9893, 1.056,
         0.9983, 0.9974, 1.067, 1.052, 1.087, 1.015, 1.124, 1.117, 1.089, 1.211, 1.256, 1.113, 1.098, 1.225,
         1.243],
        [32, 31, 31, 28, 29, 26, 25, 25, 25, 24, 23, 24, 23, 25, 23, 22, 22, 23, 22, 22, 20, 20, 22, 22, 22, 19,
         22, 23, 22, 21, 20, 21, 21, 22, 20, 22, 20, 20, 19, 19, 19]),
    "mix": (
        [0.0, 0.09149, 0.1636, 0.1639, 0.1445, 0.158, 0.1645, 0.1579, 0.1579, 0.1478, 0.184, 0.2054, 0.206,
         0.1775, 0.184, 0.2075, 0.1983, 0.2051, 0.2361, 0.1867, 0.2398, 0.22, 0.2139, 0.1762, 0.1852, 0.2109,
         0.2038, 0.2093, 0.2214, 0.2141, 0.2049, 0.2485, 0.2588, 0.2506, 0.2634, 0.2885, 0.2649, 0.2421, 0.2262,
         0.2671, 0.2728],
        [32, 29, 28, 30, 30, 29, 30, 30, 30, 30, 30, 30, 31, 32, 30, 30, 29, 31, 29, 29, 28, 30, 29, 31, 30, 30,
         31, 29, 30, 29, 30, 29, 29, 28, 29, 28, 28, 29, 30, 27, 27]),
    "ft_seed2": (
        [0.0, 0.3384, 0.4081, 0.4131, 0.4486, 0.5431, 0.5948, 0.6463, 0.663, 0.685, 0.7816, 0.7956, 0.8786,
         0.9126, 0.9648, 1.017, 0.9584, 1.009, 1.065, 1.065, 1.08, 1.134, 1.221, 1.209, 1.113, 1.192, 1.265,
         1.259, 1.348, 1.217, 1.235, 1.299, 1.388, 1.329, 1.253, 1.282, 1.262, 1.38, 1.235, 1.216, 1.212],
        [32, 28, 28, 28, 27, 26, 24, 24, 22, 22, 24, 24, 21, 21, 22, 22, 23, 22, 20, 21, 22, 19, 20, 22, 19, 21,
         18, 21, 20, 21, 20, 20, 21, 19, 18, 20, 20, 20, 19, 19, 19]),
    "lr_blowup": (
        [0.0, 0.2454, 0.3517, 0.4291, 0.4946, 0.5481, 0.5785, 0.6141, 0.5957, 0.6967, 0.7693, 0.7668, 0.8185,
         0.7733, 0.9029, 1.008, 0.9195, 0.941, 1.03, 1.045, 1.0, 2.717, 2.289, 2.41, 2.368, 2.304, 2.18, 2.206,
         2.158, 2.052, 2.195, 2.122, 2.165, 2.271, 2.231, 1.987, 2.184, 2.067, 2.242, 2.222, 2.351],
        [32, 28, 27, 27, 25, 24, 26, 24, 24, 24, 23, 22, 21, 22, 23, 21, 23, 22, 22, 21, 20, 0, 12, 11, 8, 10,
         10, 9, 12, 11, 9, 8, 11, 8, 10, 12, 12, 13, 10, 14, 11]),
    "collapse": (
        [0.0, 0.2454, 0.3517, 0.4291, 0.4946, 0.5481, 0.5785, 0.6141, 0.5957, 0.6967, 0.7693, 0.7668, 0.8185,
         0.7733, 0.9029, 1.008, 0.9195, 0.941, 1.03, 1.045, 1.0, 15.82, 16.74, 16.84, 16.85, 16.84, 16.83,
         16.83, 16.82, 16.81, 16.8, 16.8, 16.79, 16.78, 16.78, 16.77, 16.76, 16.76, 16.75, 16.74, 16.73],
        [32, 28, 27, 27, 25, 24, 26, 24, 24, 24, 23, 22, 21, 22, 23, 21, 23, 22, 22, 21, 20, 2, 2, 2, 2, 2, 2,
         2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]),
}
HEALTHY = ("ft_1e-3", "ft_3e-4", "ft_3e-3", "ft_warmup", "mix", "ft_seed2")


def drift(step: int, kl: float, top1: float | None = None, suite: str = "drift", **extra: float) -> Record:
    values = {"kl": kl, "kl_max": 3 * kl, "prompts": 32.0, **extra}
    if top1 is not None:
        values["top1_agreement"] = top1
    return Record("probe", "syn", T0 + step + 0.5, 0, step, values, suite=suite)


def measured(name: str) -> list[Record]:
    kl, top1 = MEASURED[name]
    return [drift(i * EVERY, k, t / 32) for i, (k, t) in enumerate(zip(kl, top1))]


def curve(f: Callable[[float], float], probes: int = 60, noise: float = 0.1, seed: int = 0,
          top1: Callable[[float], float] | None = None) -> list[Record]:
    """A baseline record, then `probes` drift records of KL f(step) with multiplicative noise."""
    rng = random.Random(seed)
    out = [drift(0, 0.0, 1.0)]
    for i in range(1, probes + 1):
        s = i * EVERY
        kl = f(s) * math.exp(rng.gauss(0.0, noise))
        t1 = None if top1 is None else min(1.0, max(0.0, top1(s) + rng.gauss(0.0, 0.03)))
        out.append(drift(s, kl, t1))
    return out


@pytest.mark.parametrize("name", HEALTHY)
def test_measured_healthy_fine_tunes_are_silent(name: str) -> None:
    det = OutputDrift()
    assert fires(replay(det, measured(name))) == []
    assert det.statistic() is not None and det.statistic() < 1.1  # the largest healthy ratio was 1.05


@pytest.mark.parametrize("name", ["lr_blowup", "collapse"])
def test_measured_faults_fire_two_probes_after_they_begin(name: str) -> None:
    out = fires(replay(OutputDrift(), measured(name)))
    assert [f.step for f in out] == [440] and out[0].severity == "warning"
    assert out[0].labels == {"suite": "drift"}
    assert ("KL 16.74 nats is" in out[0].summary) if name == "collapse" else ("top-1 agreement" in out[0].summary)


CONCAVE = {
    "saturating": lambda s: 1.2 * (1 - math.exp(-s / 150)),
    "saturating-fast": lambda s: 0.8 * (1 - math.exp(-s / 30)),
    "saturating-slow": lambda s: 2.0 * (1 - math.exp(-s / 3000)),
    "hyperbolic": lambda s: 1.5 * s / (s + 200),
    "log": lambda s: 0.3 * math.log1p(s / 20),
    "sqrt": lambda s: 0.02 * math.sqrt(s),
    "cube-root": lambda s: 0.05 * s ** (1 / 3),
    "tiny": lambda s: 1e-4 * math.sqrt(s),
}


@pytest.mark.parametrize("shape", sorted(CONCAVE))
def test_concave_growth_is_silent(shape: str) -> None:
    f = CONCAVE[shape]
    for seed in range(20):
        # Agreement falls on trend too, to a quarter by the end: below half its early level.
        recs = curve(f, seed=seed, top1=lambda s: 0.95 - 0.7 * f(s) / f(60 * EVERY))
        assert fires(replay(OutputDrift(), recs)) == [], (shape, seed)


def test_straight_line_growth_rarely_fires() -> None:
    # Not concave: KL growing in proportion to steps for 60 probes, agreement falling on trend to a
    # quarter, 10 % noise a probe. The defaults' comment quotes this count.
    def f(s: float) -> float:
        return 1e-3 * s

    runs = [curve(f, seed=seed, top1=lambda s: 0.95 - 0.7 * f(s) / f(60 * EVERY)) for seed in range(200)]
    assert sum(bool(fires(replay(OutputDrift(), recs))) for recs in runs) == 1


def test_a_jump_fires_after_two_probes_and_resolves_when_it_comes_back() -> None:
    def f(s: float) -> float:
        base = 0.8 * (1 - math.exp(-s / 200))
        return base * 6 if 500 <= s < 600 else base

    out = replay(OutputDrift(), curve(f, noise=0.05, top1=lambda s: 0.9))
    assert [(x.action, x.step) for x in out] == [("fire", 520), ("resolve", 620)]
    assert "early trajectory predicts" in out[0].summary and "probes in a row" in out[0].summary


def test_one_odd_probe_is_not_a_page() -> None:
    def f(s: float) -> float:
        base = 0.8 * (1 - math.exp(-s / 200))
        return base * 6 if s == 500 else base

    assert fires(replay(OutputDrift(), curve(f, noise=0.05))) == []


def test_agreement_collapsing_while_kl_runs_ahead_fires() -> None:
    # KL only 1.8x its prediction (under kl_ratio 2), but agreement fell from 0.9 to 0.3.
    def f(s: float) -> float:
        return 0.05 * math.sqrt(s) * (1.8 if s >= 600 else 1.0)

    out = fires(replay(OutputDrift(), curve(f, noise=0.02, top1=lambda s: 0.3 if s >= 600 else 0.9)))
    assert [x.step for x in out] == [620] and "top-1 agreement" in out[0].summary
    # The same KL with agreement on trend is not a page.
    assert fires(replay(OutputDrift(), curve(f, noise=0.02, top1=lambda s: 0.9))) == []


def test_nothing_is_judged_before_the_early_trajectory_is_learnt() -> None:
    det = OutputDrift()
    recs = [drift(0, 0.0, 1.0), drift(20, 0.01), drift(40, 5.0), drift(60, 9.0)]
    assert replay(det, recs) == [] and det.statistic() is None
    assert det.suites["drift"]["origin"] == 0.0 and len(det.suites["drift"]["early"]) == 3
    assert det.suites["drift"]["fit"] is None


def test_a_new_baseline_starts_the_trajectory_again() -> None:
    def f(s: float) -> float:
        return 0.05 * math.sqrt(s) * (8 if s >= 600 else 1.0)

    recs = curve(f, probes=32, noise=0.02)
    # The job restarts at step 700 and takes its baseline again: KL is measured from there.
    recs += [drift(700, 0.0, 1.0)] + [drift(700 + i * EVERY, 0.05 * math.sqrt(i * EVERY)) for i in range(1, 10)]
    out = replay(OutputDrift(), recs)
    assert [(x.action, x.step) for x in out] == [("fire", 620), ("resolve", 700)]


def test_without_a_baseline_record_steps_count_from_zero() -> None:
    recs = [drift(i * EVERY, 0.05 * math.sqrt(i * EVERY)) for i in range(1, 30)]
    det = OutputDrift()
    assert fires(replay(det, recs)) == []
    assert det.suites["drift"]["origin"] == 0.0
    assert det.predict("drift", 400) == pytest.approx(1.0, rel=1e-6)  # 0.05 * sqrt(400)


def test_suites_are_separate_and_bounded() -> None:
    recs = []
    for name in ("a", "b"):
        recs += [drift(i * EVERY, 0.0 if i == 0 else 0.05 * math.sqrt(i * EVERY), suite=name) for i in range(12)]
    recs += [drift(i * EVERY, 0.5 * math.sqrt(i * EVERY), suite="b") for i in (12, 13)]
    out = fires(replay(OutputDrift(), recs))
    assert [(x.step, x.labels["suite"]) for x in out] == [(260, "b")]
    det = OutputDrift({"max_suites": 2})
    replay(det, [drift(0, 0.0, suite=f"s{i}") for i in range(5)])
    assert len(det.suites) == 2


def test_probe_regression_ignores_drift_records_and_output_drift_ignores_items() -> None:
    recs = measured("collapse") + [Record("probe", "syn", T0 + 900, 0, 900, {"accuracy": 0.0}, suite="arith",
                                          items=[0.0] * 50)]
    assert fires(replay(ProbeRegression(), recs)) == []
    assert DETECTORS["OutputDrift"] is OutputDrift and OutputDrift.severity == "warning"


def test_state_round_trips_mid_run() -> None:
    recs = measured("lr_blowup")
    whole = replay(OutputDrift(), recs)
    det = OutputDrift()
    first = replay(det, recs[:15])
    saved = json.loads(json.dumps(det.state(), allow_nan=False))
    again = OutputDrift()
    again.restore(saved)
    assert again.state() == saved
    rest = replay(again, recs[15:])
    assert [(f.action, f.step, f.summary) for f in first + rest] == [(f.action, f.step, f.summary) for f in whole]


def test_state_while_firing_round_trips_and_resolves_later() -> None:
    def f(s: float) -> float:
        return 0.05 * math.sqrt(s) * (8 if 400 <= s < 500 else 1.0)

    recs = curve(f, probes=40, noise=0.02)
    det = OutputDrift()
    assert [x.action for x in replay(det, recs[:23])] == ["fire"]
    again = OutputDrift()
    again.restore(json.loads(json.dumps(det.state())))
    assert again.firing
    assert [(x.action, x.step) for x in replay(again, recs[23:])] == [("resolve", 520)]


nasty = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e-300, 1e300, 1.7e308, -1.0, 1.0, 2.0]),
    st.floats(min_value=0.0, max_value=20.0),
)
drift_record = st.tuples(
    st.integers(min_value=-5, max_value=10**9),
    st.dictionaries(st.sampled_from(["kl", "kl_max", "top1_agreement", "prompts", "accuracy"]), nasty, max_size=5),
    st.sampled_from(["drift", "d2", ""]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recs=st.lists(drift_record, max_size=80), split=st.integers(0, 80))
def test_random_drift_records_never_raise_and_state_round_trips(recs: list[tuple], split: int) -> None:
    records = [Record("probe", "prop", T0 + i, 0, step, vals, suite=suite)
               for i, (step, vals, suite) in enumerate(recs)]
    det = OutputDrift()
    for r in records[:split]:
        for f in det.update(r, None):
            assert f.alert == "OutputDrift" and f.action in ("fire", "resolve")
    saved = json.dumps(det.state(), allow_nan=False, sort_keys=True)
    again = OutputDrift()
    again.restore(json.loads(saved))
    assert json.dumps(again.state(), allow_nan=False, sort_keys=True) == saved
    for r in records[split:]:
        again.update(r, None)
        s = again.statistic()
        assert s is None or (isinstance(s, float) and s == s)
    json.dumps(again.state(), allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(garbage=st.dictionaries(st.text(max_size=8), st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=16)))
def test_restore_accepts_any_json(garbage: dict[str, Any]) -> None:
    det = OutputDrift()
    det.restore(garbage)
    det.restore({"suites": {"drift": garbage}, "firing": True})
    replay(det, measured("collapse"))
    json.dumps(det.state(), allow_nan=False)


def test_state_stays_small() -> None:
    det = OutputDrift()
    for k in range(20):
        replay(det, [drift(k * 10_000 + i * EVERY, 0.0 if i == 0 else 0.05 * math.sqrt(i * EVERY), suite=f"s{k}")
                     for i in range(200)])
    assert len(json.dumps(det.state())) < 8 * 1024
