"""RankLost: names the rank whose records stop while the others go on; blind to late heartbeats and clock skew."""

from __future__ import annotations

import json
import random

import pytest

from monitor.daemon.detectors.rank_lost import RankLost
from monitor.records import Record
from tests.daemon.detectors.streams import HEALTHY_SAMPLE, T0, fires, label, replay, run_state, trace


def job(ranks: int = 4, seconds: float = 200.0, step_time: float = 0.5,
        silent: dict[int, tuple[float, float]] | None = None, skew: dict[int, float] | None = None,
        end_at: dict[int, float] | None = None, seed: int = 0) -> list[Record]:
    """A synchronous job: a train record per rank per step and a heartbeat per rank per second.

    `silent` maps a rank to the (from, to) event seconds during which it sends nothing; `skew` adds
    a constant to a rank's clock; `end_at` makes a rank send `end` and stop. Records come in the
    order they were sent (true time), as a live daemon receives them, whatever their clocks say.
    """
    rng = random.Random(seed)
    silent = silent or {}
    skew = skew or {}
    end_at = end_at or {}
    out = [(0.0, Record("run", "syn", T0, 0, world_size=ranks))]
    step = 0
    t = 0.0
    next_hb = 1.0
    while t < seconds:
        t += step_time
        step += 1
        for r in range(ranks):
            a, b = silent.get(r, (1e18, 1e18))
            if a <= t < b or t >= end_at.get(r, 1e18):
                continue
            off = skew.get(r, 0.0)
            jitter = rng.uniform(0, 0.01)
            out.append((t + jitter, Record("train", "syn", T0 + t + off + jitter, r, step,
                                           {"loss": 2.0, "step_time_seconds": step_time})))
        if t >= next_hb:
            next_hb += 1.0
            for r in range(ranks):
                a, b = silent.get(r, (1e18, 1e18))
                if a <= t < b or t >= end_at.get(r, 1e18):
                    continue
                out.append((t + 0.02, Record("heartbeat", "syn", T0 + t + skew.get(r, 0.0) + 0.02, r, step)))
    for r, te in end_at.items():
        out.append((te, Record("end", "syn", T0 + te + skew.get(r, 0.0), r, step, status="completed")))
    out.sort(key=lambda x: x[0])
    return [rec for _, rec in out]


def test_names_the_lost_rank_within_35_s_and_resolves_when_it_returns() -> None:
    out = replay(RankLost(), job(silent={2: (100.0, 160.0)}))
    fired = fires(out)
    assert len(fired) == 1
    f = fired[0]
    assert f.rank == 2 and f.severity == "critical" and f.step is None
    assert 130.0 <= f.t - T0 <= 135.0
    assert "rank 2 silent for 3" in f.summary and "3 rank(s) still reporting" in f.summary
    resolved = [x for x in out if x.action == "resolve"]
    assert len(resolved) == 1 and 160.0 <= resolved[0].t - T0 <= 162.0


def test_silent_on_late_heartbeats_and_short_gaps() -> None:
    # A rank that goes quiet for 20 s (a long GC pause, a slow network) is not lost.
    assert fires(replay(RankLost(), job(silent={1: (50.0, 70.0), 3: (120.0, 145.0)}))) == []


@pytest.mark.parametrize("offset", [-45.0, 45.0])
def test_blind_to_a_skewed_host_clock(offset: float) -> None:
    # Rank 3's host clock is 45 s off: measured against the run's clock it looks silent (or makes
    # everyone else look silent), but its records keep coming.
    assert fires(replay(RankLost(), job(skew={3: offset}))) == []


def test_ranks_that_ended_are_not_lost() -> None:
    assert fires(replay(RankLost(), job(end_at={0: 80.0, 1: 80.0}))) == []


def test_single_rank_run_and_whole_job_silence_do_not_fire() -> None:
    assert fires(replay(RankLost(), job(ranks=1, silent={0: (50.0, 150.0)}))) == []
    everyone = {r: (100.0, 1e9) for r in range(4)}
    assert fires(replay(RankLost(), job(silent=everyone))) == []


def test_several_lost_ranks_are_listed() -> None:
    out = fires(replay(RankLost(), job(ranks=8, silent={5: (60.0, 1e9), 6: (60.0, 1e9)})))
    assert len(out) == 1 and out[0].rank is None
    assert out[0].labels["ranks"] == "5, 6" and "2 ranks (5, 6)" in out[0].summary


def test_restart_keeps_the_episode() -> None:
    recs = job(silent={1: (50.0, 150.0)})
    cut = next(i for i, r in enumerate(recs) if r.t - T0 > 100.0)
    det = RankLost()
    st = run_state()
    st.set_detectors([det])
    first = st.apply(recs[:cut], 0.0)
    assert len(fires(first)) == 1
    saved = json.loads(json.dumps(det.state(), allow_nan=False))
    # A new daemon: state refilled from the stored records without the detector, then restored.
    det2 = RankLost()
    st2 = run_state()
    st2.apply(recs[:cut], 0.0, detect=False)
    st2.set_detectors([det2])
    det2.restore(saved)
    rest = st2.apply(recs[cut:], 0.0)
    assert fires(rest) == []
    assert [f.action for f in rest] == ["resolve"]


def test_real_lost_rank_trace() -> None:
    rel = "cpu/cpu-rank_lost-01.jsonl.gz"
    lab = label(rel)
    out = fires(replay(RankLost(), trace(rel)))
    assert len(out) == 1 and out[0].rank == lab["expect"][0]["rank"]
    assert 0.0 <= out[0].t - lab["onset_t"] <= 35.0


@pytest.mark.parametrize("rel", HEALTHY_SAMPLE + ("cpu/cpu-stall-01.jsonl.gz", "cpu/cpu-straggler-01.jsonl.gz"))
def test_silent_on_real_traces_without_a_lost_rank(rel: str) -> None:
    assert fires(replay(RankLost(), trace(rel))) == []
