"""ThroughputDrop: a sustained fall of tokens/s against the run's own baseline; one-off slow steps do not count."""

from __future__ import annotations

import json
import math
import random

import pytest

from monitor.daemon.detectors.throughput_drop import ThroughputDrop
from monitor.records import Record
from tests.daemon.detectors.streams import (HEALTHY_SAMPLE, ar1, eval_rec, fires, label, replay, run_state, trace,
                                            train_series)


def step_times(n: int, seed: int = 0, level: float = 0.2, sigma: float = 0.03) -> list[float]:
    """Step times with lognormal noise and, like real ones, an occasional slow step (1 in 50, 2-4x)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        v = level * math.exp(rng.gauss(0.0, sigma))
        if rng.random() < 0.02:
            v *= rng.uniform(2.0, 4.0)
        out.append(v)
    return out


def run(st: list[float], tokens: list[float] | float = 8192.0) -> list[Record]:
    """Train records with these step times and tokens per step."""
    tok = tokens if isinstance(tokens, list) else [tokens] * len(st)
    return train_series(step_time_seconds=st, tokens=tok)


def test_silent_on_noisy_step_times() -> None:
    for seed in range(5):
        assert fires(replay(ThroughputDrop(), run(step_times(3000, seed=seed)))) == []


@pytest.mark.parametrize("phi", [0.5, 0.8, 0.9])
def test_silent_on_autocorrelated_step_times(phi: float) -> None:
    for seed in range(3):
        assert fires(replay(ThroughputDrop(), run(ar1(3000, seed=seed, level=0.2, phi=phi, sigma=0.04)))) == []


def test_one_slow_step_and_a_checkpoint_stretch_do_not_count() -> None:
    st = step_times(1500, seed=1)
    st[700] = 30.0  # one step 150x slower (a recompilation)
    for i in range(1000, 1012):
        st[i] = 2.0  # twelve slow steps in a row (a checkpoint written over several steps)
    assert fires(replay(ThroughputDrop(), run(st))) == []


def test_the_step_after_an_eval_is_not_counted() -> None:
    st = step_times(1500, seed=2)
    recs = run(st)
    out = []
    for r in recs:
        out.append(r)
        if r.step % 10 == 0:
            out.append(eval_rec(r.step, loss=2.0))
    # Every step right after an eval is 5x slower: 10 % of steps, all of them excluded.
    for r in out:
        if r.kind == "train" and r.step % 10 == 1:
            r.values["step_time_seconds"] *= 5
    assert fires(replay(ThroughputDrop(), out)) == []


def test_batch_ramp_and_slow_drift_are_not_drops() -> None:
    n = 3000
    base = step_times(n, seed=3)
    # Tokens per step double and step time with them: throughput is unchanged.
    ramp = [1.0 if i < 1000 else 2.0 for i in range(n)]
    assert fires(replay(ThroughputDrop(), run([s * k for s, k in zip(base, ramp)], [8192.0 * k for k in ramp]))) == []
    # Step time drifts up 15 % over the run (a growing attention window).
    drift = [s * (1 + 0.15 * i / n) for i, s in enumerate(base)]
    assert fires(replay(ThroughputDrop(), run(drift))) == []


def test_fires_on_a_sustained_drop_and_resolves_after_recovery() -> None:
    st = step_times(2000, seed=4)
    for i in range(800, 1300):
        st[i] *= 1.6  # 37.5 % fewer tokens/s
    out = replay(ThroughputDrop(), run(st))
    fired = fires(out)
    assert len(fired) == 1
    f = fired[0]
    assert 801 <= f.step <= 850 and f.severity == "warning"
    assert "throughput down 3" in f.summary and "tokens/s" in f.summary
    resolved = [x for x in out if x.action == "resolve"]
    assert len(resolved) == 1 and 1300 <= resolved[0].step <= 1360


def test_without_tokens_it_watches_step_time() -> None:
    st = step_times(1500, seed=5)
    for i in range(900, 1500):
        st[i] *= 1.5
    fired = fires(replay(ThroughputDrop(), train_series(step_time_seconds=st)))
    assert len(fired) == 1 and "s/step" in fired[0].summary


def test_a_restart_relearns_the_baseline() -> None:
    first = run(step_times(600, seed=6))
    second = run([s * 2 for s in step_times(600, seed=7)])
    for r in second:
        r.t += 1000
    restart = Record("run", "syn", first[-1].t + 1, 0, world_size=1)
    assert fires(replay(ThroughputDrop(), first + [restart] + second)) == []


def test_state_round_trip_continues_the_same_episode() -> None:
    st = step_times(2000, seed=8)
    for i in range(800, 2000):
        st[i] *= 1.6
    recs = run(st)
    det = ThroughputDrop()
    rs = run_state()
    rs.set_detectors([det])
    assert len(fires(rs.apply(recs[:1000], 0.0))) == 1
    det2 = ThroughputDrop()
    det2.restore(json.loads(json.dumps(det.state(), allow_nan=False)))
    assert det2.state() == det.state()
    rs2 = run_state()
    rs2.set_detectors([det2])
    assert fires(rs2.apply(recs[1000:], 0.0)) == []


def test_real_slowdown_trace() -> None:
    rel = "cpu/cpu-slowdown-01.jsonl.gz"
    exp = label(rel)["expect"][0]
    out = fires(replay(ThroughputDrop(), trace(rel)))
    assert len(out) == 1 and exp["from_step"] <= out[0].step <= exp["to_step"]


@pytest.mark.parametrize("rel", HEALTHY_SAMPLE)
def test_silent_on_healthy_traces(rel: str) -> None:
    assert fires(replay(ThroughputDrop(), trace(rel))) == []


def test_extreme_but_finite_values_do_not_raise() -> None:
    # tokens / step time underflows to 0.0 here; the detector must take it as a (tiny) throughput.
    from monitor.daemon.state import RunState
    from monitor.records import Record

    d = ThroughputDrop()
    run = RunState("x", 16)
    rec = Record("train", "x", 1.7e9, 0, 0, {"tokens": 2.3e-291, "step_time_seconds": 9.5e32})
    assert d.update(rec, run) == []
