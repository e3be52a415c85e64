"""ProbeRegression: paired tests of each probe against the run's first probe of its suite."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from monitor.daemon.detectors.probe_regression import (ProbeRegression, binom_sf_half, mcnemar_one_sided,
                                                       wilcoxon_one_sided)
from tests.daemon.detectors.streams import fires, label, probe, replay, trace


def binary_items(n: int, acc: float, rng: random.Random) -> list[float]:
    return [1.0 if rng.random() < acc else 0.0 for _ in range(n)]


def test_binomial_tail_is_exact() -> None:
    for n in range(0, 25):
        for k in range(0, n + 2):
            want = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n if k <= n else 0.0
            assert math.isclose(binom_sf_half(k, n), min(1.0, want) if k > 0 else 1.0, rel_tol=1e-9, abs_tol=1e-300)


def test_mcnemar_counts_discordant_pairs() -> None:
    p, losses, gains = mcnemar_one_sided([1, 1, 1, 0, 0, 1], [0, 0, 1, 1, 0, 1])
    assert (losses, gains) == (2, 1) and math.isclose(p, 0.5)


def test_wilcoxon_matches_the_exact_distribution_roughly() -> None:
    base = [float(i) for i in range(12)]
    cur = [b - d for b, d in zip(base, [0.5, -0.2, 1.1, 0.7, 0.9, -0.1, 1.3, 0.4, 0.8, 1.7, 0.3, 0.6])]
    p, n = wilcoxon_one_sided(base, cur)
    diffs = [b - c for b, c in zip(base, cur)]
    ranks = {d: r + 1 for r, d in enumerate(sorted(diffs, key=abs))}
    w = sum(ranks[d] for d in diffs if d > 0)
    exact = sum(1 for signs in itertools.product((0, 1), repeat=n)
                if sum(r for s, r in zip(signs, range(1, n + 1)) if s) >= w) / 2 ** n
    assert n == 12 and abs(p - exact) < 0.01


def test_fires_on_a_real_drop_of_binary_items() -> None:
    rng = random.Random(0)
    base = binary_items(200, 0.9, rng)
    worse = [b if rng.random() > 0.3 else 0.0 for b in base]  # ~27 points lost
    out = replay(ProbeRegression(), [probe(0, base), probe(100, base), probe(200, worse)])
    f = fires(out)
    assert [x.step for x in f] == [200] and "McNemar" in f[0].summary and f[0].labels["suite"] == "arith"


def test_silent_on_resampled_noise_over_many_looks() -> None:
    rng = random.Random(1)
    for _ in range(10):
        truth = [rng.random() for _ in range(200)]
        recs = [probe(s * 10, [1.0 if rng.random() < t else 0.0 for t in truth]) for s in range(100)]
        assert fires(replay(ProbeRegression(), recs)) == []


def test_small_drops_are_not_worth_a_page() -> None:
    base = [1.0] * 4000
    cur = [0.0] * 60 + [1.0] * 3940  # 1.5 points: significant, below min_drop
    assert fires(replay(ProbeRegression({"max_items": 4096}), [probe(0, base), probe(1, cur)])) == []


def test_continuous_scores() -> None:
    rng = random.Random(2)
    base = [rng.gauss(0.6, 0.2) for _ in range(150)]
    same = [b + rng.gauss(0, 0.05) for b in base]
    worse = [b - 0.1 + rng.gauss(0, 0.05) for b in base]
    out = replay(ProbeRegression(), [probe(0, base), probe(1, same), probe(2, worse), probe(3, same), probe(4, same)])
    assert [(f.action, f.step) for f in out] == [("fire", 2), ("resolve", 4)]
    assert "Wilcoxon" in out[0].summary


def test_suites_are_separate_and_items_of_a_new_length_restart_the_baseline() -> None:
    a = [1.0] * 100
    b = [1.0] * 50
    recs = [probe(0, a, "a"), probe(0, b, "b"), probe(10, [0.0] * 30 + [1.0] * 20, "b"), probe(10, a, "a")]
    out = fires(replay(ProbeRegression(), recs))
    assert [(f.step, f.labels["suite"]) for f in out] == [(10, "b")]
    assert fires(replay(ProbeRegression(), [probe(0, a), probe(5, [0.0] * 60)])) == []


def test_restart_keeps_the_baseline() -> None:
    base = [1.0] * 80 + [0.0] * 20
    det = ProbeRegression()
    replay(det, [probe(0, base), probe(10, base)])
    st = det.state()
    assert isinstance(st["suites"]["arith"]["base"], str)  # 0/1 items stored compactly
    again = ProbeRegression()
    again.restore(st)
    out = fires(replay(again, [probe(20, [0.0] * 100)]))
    assert [f.step for f in out] == [20]


def test_cpu_forgetting_in_its_window() -> None:
    rel = "cpu/cpu-forgetting-01.jsonl.gz"
    exp = label(rel)["expect"][0]
    out = fires(replay(ProbeRegression(), trace(rel)))
    assert out and exp["from_step"] <= out[0].step <= exp["to_step"]


@pytest.mark.parametrize("rel", ["cpu/cpu-replay-01.jsonl.gz", "cpu/cpu-healthy-01.jsonl.gz"])
def test_silent_on_healthy_traces(rel: str) -> None:
    assert fires(replay(ProbeRegression(), trace(rel))) == []
