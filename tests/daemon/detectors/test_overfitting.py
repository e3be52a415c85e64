"""Overfitting: eval loss rising above its best for several evals while the train loss keeps falling."""

from __future__ import annotations

import math
import random

import pytest

from monitor.daemon.detectors.overfitting import Overfitting
from monitor.records import Record
from tests.daemon.detectors.streams import HEALTHY_SAMPLE, eval_rec, fires, label, replay, trace, train


def run(train_loss: list[float], evals: dict[int, float]) -> list[Record]:
    """Train records for each step, with an eval record after the steps in `evals`."""
    recs = []
    for i, v in enumerate(train_loss):
        recs.append(train(i + 1, loss=v))
        if i + 1 in evals:
            recs.append(eval_rec(i + 1, loss=evals[i + 1]))
    return recs


def falling(n: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [(1.0 + 2.0 * math.exp(-i / 300)) * math.exp(rng.gauss(0, 0.03)) for i in range(n)]


def test_fires_when_eval_rises_while_train_falls() -> None:
    evals = {s: 3.0 - 0.002 * s for s in range(50, 301, 50)}  # best 2.4 at 300
    evals.update({s: 2.4 + 0.0015 * (s - 300) for s in range(350, 1001, 50)})
    out = replay(Overfitting(), run(falling(1000), evals))
    f = fires(out)
    # The rise needs to dominate the last 10 evals (Mann-Kendall) and clear the margin.
    assert len(f) == 1 and 500 <= f[0].step <= 750 and f[0].labels["best_step"] in ("300", "350")
    assert "generalisation gap" in f[0].summary and "Mann-Kendall" in f[0].summary


def test_silent_when_eval_and_train_rise_together() -> None:
    tr = falling(600) + [x * 2 for x in falling(400, seed=1)]
    evals = {s: 3.0 - 0.001 * s for s in range(50, 601, 50)}
    evals.update({s: 4.0 + 0.001 * s for s in range(650, 1001, 50)})
    assert fires(replay(Overfitting(), run(tr, evals))) == []


def test_silent_on_noisy_but_flat_evals() -> None:
    rng = random.Random(3)
    for _ in range(5):
        evals = {s: 2.0 * math.exp(rng.gauss(0, 0.03)) for s in range(50, 3001, 50)}
        assert fires(replay(Overfitting(), run(falling(3000), evals))) == []


def test_one_bad_eval_is_not_enough() -> None:
    evals = {s: 3.0 - 0.001 * s for s in range(50, 1001, 50)}
    evals[500] = 4.0
    assert fires(replay(Overfitting(), run(falling(1000), evals))) == []


def test_resolves_when_the_eval_comes_back() -> None:
    evals = {s: 3.0 - 0.002 * s for s in range(25, 301, 25)}
    evals.update({s: 2.4 + 0.002 * (s - 300) for s in range(325, 701, 25)})
    evals.update({s: 2.3 for s in range(725, 1001, 25)})
    out = replay(Overfitting(), run(falling(1000), evals))
    assert [f.action for f in out] == ["fire", "resolve"]
    assert out[0].step < 700 < out[1].step


def test_cpu_overfit_in_its_window() -> None:
    rel = "cpu/cpu-overfit-01.jsonl.gz"
    exp = label(rel)["expect"][0]
    out = fires(replay(Overfitting(), trace(rel)))
    assert out and exp["from_step"] <= out[0].step <= exp["to_step"]


@pytest.mark.parametrize("rel", HEALTHY_SAMPLE + ("cpu/cpu-divergence-01.jsonl.gz", "cpu/cpu-forgetting-01.jsonl.gz"))
def test_silent_on_healthy_traces(rel: str) -> None:
    assert fires(replay(Overfitting(), trace(rel))) == []
