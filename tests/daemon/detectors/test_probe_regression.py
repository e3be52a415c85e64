"""ProbeRegression: paired tests of each probe against the run's first probe of its series and its best checkpoint."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from monitor.daemon.detectors.probe_regression import (ProbeRegression, binom_sf_half, mcnemar_one_sided,
                                                       wilcoxon_one_sided)
from monitor.records import Record
from tests.daemon.detectors.streams import T0, fires, label, probe, replay, trace


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


# -- the best checkpoint as a second baseline, per-suite minimum drops, continuous series ------------

def rec(step: int, items: list[float], suite: str = "arith", **values: float) -> Record:
    """A probe record of any series, with extra values (min_drop, ...)."""
    return Record("probe", "syn", T0 + step + 0.25, 0, step, {"accuracy": sum(items) / len(items), **values},
                  suite=suite, items=list(items))


def rise_and_fall(n: int = 400) -> tuple[list[float], list[float], list[float]]:
    """First probe at 0.5; a best checkpoint at 0.7 (80 items gained, none lost); then back at 0.5 on other items."""
    base = [1.0] * (n // 2) + [0.0] * (n // 2)
    better = list(base)
    for i in range(n // 2, n // 2 + 80):
        better[i] = 1.0
    back = list(base)
    for i in range(10):  # 10 of the first probe's right answers lost, 10 others gained: no drop against it
        back[i] = 0.0
        back[n - 1 - i] = 1.0
    return base, better, back


def test_a_skill_learnt_then_lost_fires_against_the_best_checkpoint() -> None:
    base, better, back = rise_and_fall()
    det = ProbeRegression()
    out = replay(det, [rec(0, base), rec(100, base), rec(200, better), rec(300, better), rec(400, back)])
    st = det.suites["arith"]
    assert st["best_step"] == 200 and st["best_mean"] == pytest.approx(0.7)
    f = fires(out)
    assert [x.step for x in f] == [400]
    assert f[0].labels == {"suite": "arith", "metric": "accuracy", "series": "arith", "baseline": "best",
                           "baseline_step": "200"}
    assert "best checkpoint so far, step 200" in f[0].summary and "half on each baseline" in f[0].summary
    # The same fall with no rise before it is no drop at all: the first probe alone says nothing.
    assert fires(replay(ProbeRegression(), [rec(0, base), rec(100, base), rec(400, back)])) == []


def test_a_rise_that_is_not_significant_is_no_best() -> None:
    base, _, back = rise_and_fall()
    slightly = list(base)
    for i in range(200, 206):  # 6 items gained: p = 1/64, far above alpha / 2 at the first look
        slightly[i] = 1.0
    det = ProbeRegression()
    assert fires(replay(det, [rec(0, base), rec(100, slightly), rec(200, back)])) == []
    assert det.suites["arith"]["best"] is None


def test_a_drop_below_both_baselines_names_the_first() -> None:
    base, better, _ = rise_and_fall()
    worse = [0.0] * 60 + base[60:]
    f = fires(replay(ProbeRegression(), [rec(0, base), rec(100, better), rec(200, worse)]))
    assert [x.labels["baseline"] for x in f] == ["first"] and f[0].labels["baseline_step"] == "0"
    assert "first probe at step 0 (and below the best checkpoint, step 100, too)" in f[0].summary


def drop_of_4_points() -> tuple[list[float], list[float]]:
    base = [1.0] * 1800 + [0.0] * 200
    return base, [0.0] * 80 + base[80:]  # 80 of 2,000 lost: 4 points, p ~ 1e-24


@pytest.mark.parametrize("config, record_min_drop, fires_at", [
    ({}, None, [1]),  # the default, 2 points
    ({"suites": {"arith": {"min_drop": 0.05}}}, None, []),  # the suite owner's config
    ({}, 0.05, []),  # the record's own min_drop
    ({"suites": {"arith": {"min_drop": 0.03}}}, 0.05, [1]),  # config over the record
    ({"suites": {"other": {"min_drop": 0.05}}}, None, [1]),  # another suite's setting is not this one's
    ({"min_drop": 0.05}, None, []),  # the detector default
    ({"min_drop": 0.05}, 0.03, [1]),  # the record over the detector default
], ids=["default", "config", "record", "config-over-record", "other-suite", "detector-default", "record-over-default"])
def test_min_drop_precedence(config: dict, record_min_drop: float | None, fires_at: list[int]) -> None:
    base, cur = drop_of_4_points()
    extra = {} if record_min_drop is None else {"min_drop": record_min_drop}
    out = fires(replay(ProbeRegression({"max_items": 4096, **config}), [rec(0, base, **extra), rec(1, cur, **extra)]))
    assert [f.step for f in out] == fires_at
    if out and config.get("suites", {}).get("arith"):
        assert "from suites.arith" in out[0].summary
    elif out and record_min_drop is not None:
        assert "from the record's min_drop" in out[0].summary


def gold_logprobs(n: int = 150, seed: int = 3, drop: float = 0.3) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    base = [-abs(rng.gauss(1.5, 0.8)) for _ in range(n)]
    return base, [b - drop + rng.gauss(0, 0.2) for b in base]


def test_continuous_series_have_their_own_labels_and_minimum_in_nats() -> None:
    base, cur = gold_logprobs()
    series = "arith/gold_logprob"
    f = fires(replay(ProbeRegression(), [rec(0, base, series), rec(1, cur, series)]))
    assert [x.step for x in f] == [1] and "Wilcoxon" in f[0].summary
    assert (f[0].labels["suite"], f[0].labels["metric"], f[0].labels["series"]) == ("arith", "gold_logprob", series)
    # 0.3 nats lost: under a floor of 0.5 nats (the record's own, or the config's), not a page.
    recs = [rec(0, base, series, min_drop=0.5), rec(1, cur, series, min_drop=0.5)]
    assert fires(replay(ProbeRegression(), recs)) == []
    cfg = {"suites": {"arith": {"min_drop": 0.05}, series: {"min_drop": 0.5}}}
    assert fires(replay(ProbeRegression(cfg), [rec(0, base, series), rec(1, cur, series)])) == []
    # The series' own entry wins over its base suite's, both ways.
    cfg = {"suites": {"arith": {"min_drop": 0.5}, series: {"min_drop": 0.1}}}
    assert [x.step for x in fires(replay(ProbeRegression(cfg), [rec(0, base, series), rec(1, cur, series)]))] == [1]
    # And a base suite's entry covers its series when they have none of their own.
    cfg = {"suites": {"arith": {"min_drop": 0.5}}}
    assert fires(replay(ProbeRegression(cfg), [rec(0, base, series), rec(1, cur, series)])) == []


def test_the_series_of_one_suite_are_judged_apart() -> None:
    acc = [1.0] * 100
    base, cur = gold_logprobs(n=100)
    det = ProbeRegression()
    recs = [rec(0, acc), rec(0, base, "arith/gold_logprob"), rec(1, acc), rec(1, cur, "arith/gold_logprob")]
    f = fires(replay(det, recs))
    assert [(x.step, x.labels["metric"]) for x in f] == [(1, "gold_logprob")]
    assert set(det.suites) == {"arith", "arith/gold_logprob"} and not det.suites["arith"]["bad"]


def test_judge_preferences_are_judged_like_continuous_scores() -> None:
    ties = [0.5] * 120  # the baseline probe judges itself: all ties
    mixed = [0.5] * 100 + [1.0] * 10 + [0.0] * 10
    worse = [0.0] * 60 + [0.5] * 50 + [1.0] * 10  # the first probe's answers preferred on half the items
    out = replay(ProbeRegression(), [rec(0, ties, "arith/judge"), rec(1, mixed, "arith/judge"),
                                     rec(2, worse, "arith/judge")])
    f = fires(out)
    assert [x.step for x in f] == [2] and (f[0].labels["suite"], f[0].labels["metric"]) == ("arith", "judge")
    assert "Wilcoxon" in f[0].summary


def test_suites_setting_is_checked_and_names_the_field() -> None:
    from monitor.daemon.app import ConfigError, DaemonConfig

    def check(suites: object) -> None:
        DaemonConfig.from_mapping({"detectors": {"ProbeRegression": {"suites": suites}}}).validate()

    check({"arithmetic": {"min_drop": 0.05}, "arithmetic/gold_logprob": {"min_drop": 0.5}, "x": {"min_drop": 0}})
    for bad, message in [
        ([1, 2], r"detectors\.ProbeRegression\.suites: expected a table"),
        ({"arithmetic": 0.05}, r"detectors\.ProbeRegression\.suites\.arithmetic: expected a table such as"),
        ({"arithmetic": {"min_drop": -0.1}}, r"suites\.arithmetic\.min_drop: must be a number >= 0"),
        ({"arithmetic": {"min_drop": "5%"}}, r"suites\.arithmetic\.min_drop: must be a number >= 0"),
        ({"arithmetic": {"min_drop": True}}, r"suites\.arithmetic\.min_drop: must be a number >= 0"),
        ({"arithmetic": {"min_drop": math.inf}}, r"suites\.arithmetic\.min_drop: must be a number >= 0"),
        ({"arithmetic/gold_logprob": {"min_drop": -1}}, r'suites\."arithmetic/gold_logprob"\.min_drop: must be'),
        ({"arithmetic": {"min_drp": 0.05}}, r"suites\.arithmetic: unknown setting\(s\) min_drp; known: min_drop"),
        ({"": {"min_drop": 0.05}}, r"suites: a suite name must be 1-128 characters"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check(bad)


def test_the_documented_toml_is_accepted() -> None:
    import tomllib

    from monitor.daemon.app import DaemonConfig
    from monitor.daemon.detectors import build_detectors

    text = ('[detectors.ProbeRegression]\n'
            'suites = {arithmetic = {min_drop = 0.05}, "arithmetic/gold_logprob" = {min_drop = 0.5}}\n')
    cfg = DaemonConfig.from_mapping(tomllib.loads(text)).validate()
    det = next(d for d in build_detectors(cfg.detectors) if d.name == "ProbeRegression")
    assert det.min_drop_for("arithmetic", None, True) == (0.05, "suites.arithmetic")
    assert det.min_drop_for("arithmetic/gold_logprob", 2.0, False) == (0.5, 'suites."arithmetic/gold_logprob"')
    assert det.min_drop_for("arithmetic/judge", None, False) == (0.05, "suites.arithmetic")
    assert det.min_drop_for("other", 0.07, True) == (0.07, "the record's min_drop")
    assert det.min_drop_for("other", None, True) == (0.02, "min_drop")
    assert det.min_drop_for("other/gold_logprob", None, False) == (0.0, "min_drop_continuous")


def test_state_round_trips_the_best_baseline_and_each_series() -> None:
    base, better, back = rise_and_fall()
    lp_base, _ = gold_logprobs()
    det = ProbeRegression()
    replay(det, [rec(0, base, min_drop=0.03), rec(0, lp_base, "arith/gold_logprob", min_drop=0.4),
                 rec(100, better), rec(100, lp_base, "arith/gold_logprob")])
    saved = json.loads(json.dumps(det.state(), allow_nan=False))
    assert saved["suites"]["arith"]["best_step"] == 100 and isinstance(saved["suites"]["arith"]["best"], str)
    assert saved["suites"]["arith/gold_logprob"]["min_drop"] == 0.4
    again = ProbeRegression()
    again.restore(saved)
    assert again.state() == saved
    f = fires(replay(again, [rec(200, back)]))
    assert [(x.step, x.labels["baseline"], x.labels["baseline_step"]) for x in f] == [(200, "best", "100")]


def test_state_saved_before_the_best_baseline_still_restores() -> None:
    old = {"suites": {"arith": {"base": "1" * 80 + "0" * 20, "step": 0, "looks": 3, "bad": False, "ok": 0},
                      "arith/gold_logprob": {"base": [-1.0, None, -2.0] * 10, "step": 0, "looks": 1, "bad": True,
                                             "ok": 1}},
           "firing": True}
    det = ProbeRegression()
    det.restore(old)
    assert det.firing and det.suites["arith"]["best"] is None and det.suites["arith"]["looks"] == 3
    assert math.isnan(det.suites["arith/gold_logprob"]["base"][1])
    out = fires(replay(det, [rec(10, [0.0] * 100)]))
    assert out == []  # already firing: one alert per run
    assert det.suites["arith"]["bad"]
