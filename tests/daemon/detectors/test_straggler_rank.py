"""StragglerRank: names the rank whose compute time is far above the fastest rank's; silent on noise and bursts."""

from __future__ import annotations

import math
import random

import pytest

from monitor.daemon.detectors.straggler_rank import StragglerRank
from monitor.records import Record
from tests.daemon.detectors.streams import HEALTHY_SAMPLE, T0, fires, label, replay, trace


def job(ranks: int = 8, steps: int = 800, slow: dict[int, tuple[int, int, float]] | None = None, seed: int = 0,
        phi: float = 0.0, sigma: float = 0.05, metric: str = "compute_time_seconds") -> list[Record]:
    """Synchronous steps of 0.2 s; each rank's compute time is 0.1 s with AR(1) lognormal noise.

    `slow` maps a rank to (from_step, to_step, factor): its compute time is multiplied meanwhile.
    """
    rng = random.Random(seed)
    slow = slow or {}
    x = [0.0] * ranks
    innov = sigma * math.sqrt(1 - phi * phi)
    out = []
    for step in range(1, steps + 1):
        for r in range(ranks):
            x[r] = phi * x[r] + rng.gauss(0.0, innov)
            v = 0.1 * math.exp(x[r])
            a, b, k = slow.get(r, (0, 0, 1.0))
            if a <= step < b:
                v *= k
            out.append(Record("train", "syn", T0 + 0.2 * step + 0.001 * r, r, step, {metric: v, "loss": 2.0}))
    return out


def test_names_the_straggler_and_resolves() -> None:
    out = replay(StragglerRank(), job(slow={5: (300, 600, 2.0)}))
    fired = fires(out)
    assert len(fired) == 1
    f = fired[0]
    assert f.rank == 5 and f.severity == "warning" and 300 <= f.step <= 420
    assert "rank 5 scores 0.5" in f.summary
    resolved = [x for x in out if x.action == "resolve"]
    assert len(resolved) == 1 and resolved[0].t - T0 >= 0.2 * 600


@pytest.mark.parametrize("phi", [0.0, 0.8, 0.95])
def test_silent_on_noise(phi: float) -> None:
    # Each rank's compute time wanders by 5 % (sd) on its own, slowly for phi = 0.95.
    for seed in range(3):
        assert fires(replay(StragglerRank(), job(ranks=16, seed=seed, phi=phi, sigma=0.05))) == []


def test_one_unusually_fast_rank_among_many_is_not_the_reference() -> None:
    # Rank 0 of 40 does a third less work (an uneven shard): the others are not stragglers.
    assert fires(replay(StragglerRank(), job(ranks=40, steps=300, slow={0: (0, 300, 0.6)}))) == []


def test_a_burst_of_slow_steps_on_one_rank_is_not_a_straggler() -> None:
    # 25 steps at 3x (a GC pause, a checkpoint shard written by that rank).
    assert fires(replay(StragglerRank(), job(slow={2: (400, 425, 3.0)}))) == []


def test_falls_back_to_step_time() -> None:
    fired = fires(replay(StragglerRank(), job(ranks=4, slow={1: (300, 800, 1.8)}, metric="step_time_seconds")))
    assert len(fired) == 1 and fired[0].rank == 1 and "step time" in fired[0].summary


def test_several_stragglers_are_listed_and_scores_exported() -> None:
    det = StragglerRank()
    fired = fires(replay(det, job(slow={3: (200, 800, 2.0), 6: (200, 800, 1.8)})))
    assert len(fired) == 1 and fired[0].rank is None and fired[0].labels["ranks"] == "3, 6"
    assert "2 ranks (3, 6) slow" in fired[0].summary
    scores = det.scores()
    assert set(scores) == set(range(8)) and scores[3] < 0.55 and 0.5 < scores[6] < 0.62
    assert det.statistic() == min(scores.values())


def test_real_straggler_trace() -> None:
    rel = "cpu/cpu-straggler-01.jsonl.gz"
    exp = label(rel)["expect"][0]
    out = fires(replay(StragglerRank(), trace(rel)))
    assert len(out) == 1 and out[0].rank == exp["rank"] and exp["from_step"] <= out[0].step <= exp["to_step"]


@pytest.mark.parametrize("rel", HEALTHY_SAMPLE + ("cpu/cpu-stall-01.jsonl.gz", "cpu/cpu-rank_lost-01.jsonl.gz"))
def test_silent_on_real_traces_without_a_straggler(rel: str) -> None:
    assert fires(replay(StragglerRank(), trace(rel))) == []


@pytest.mark.parametrize("seed", range(5))
def test_a_block_leaves_the_paces_its_records_would(seed: int) -> None:
    import random

    from monitor.records import RecordBlock

    rng = random.Random(seed)
    one, whole = StragglerRank(), StragglerRank()
    step = 0
    for _ in range(40):
        n = rng.choice([1, 3, 16, 17, 64, 200])
        name = rng.choice(["compute_time_seconds"] * 4 + ["step_time_seconds"])
        vals = [rng.choice([rng.uniform(0.1, 0.2), math.nan, -1.0, math.inf]) if rng.random() < 0.1
                else rng.uniform(0.1, 0.2) for _ in range(n)]
        rank = rng.choice([1, 2])
        steps = list(range(step, step + n))
        step += n
        ts = [1.7e9 + s for s in steps]
        block = RecordBlock("train", "r", rank, (name,), steps, ts, vals)
        for rec in block.records():
            one.update(rec, None)
        whole.update_block(block, None)
        assert one.source == whole.source
        assert {r: (list(p.times), p.fresh, repr(p.level), list(p.levels), p.last_t) for r, p in one.per.items()} == \
            {r: (list(p.times), p.fresh, repr(p.level), list(p.levels), p.last_t) for r, p in whole.per.items()}
