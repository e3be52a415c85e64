"""TrainingStalled: pages when heartbeats go on but no step finishes; silent on pauses a run survives."""

from __future__ import annotations

import json

import pytest

from monitor.daemon.detectors.training_stalled import TrainingStalled
from monitor.records import Record
from tests.daemon.detectors.streams import HEALTHY_SAMPLE, T0, fires, label, replay, run_state, trace


def job(seconds: float = 200.0, ranks: int = 2, step_time: float = 0.5, pauses: tuple[tuple[float, float], ...] = (),
        silent: dict[int, float] | None = None, start_at: float = 0.0, end_at: float | None = None) -> list[Record]:
    """Ranks finishing a step every `step_time` s and sending a heartbeat each second.

    During each (from, to) of `pauses` no step finishes but heartbeats go on (a hang, or a long
    eval); a rank in `silent` sends nothing from that time on; before `start_at` only heartbeats
    with no step come (start-up); at `end_at` every rank sends `end`.
    """
    out = []
    step = 0
    t = 0.0
    next_step = start_at + step_time
    next_hb = 1.0
    silent = silent or {}
    stop = end_at if end_at is not None else seconds
    while t < stop:
        t = min(next_step, next_hb)
        if t == next_step:
            next_step += step_time
            if not any(a <= t < b for a, b in pauses):
                step += 1
                out += [Record("train", "syn", T0 + t, r, step, {"loss": 2.0, "step_time_seconds": step_time})
                        for r in range(ranks) if t < silent.get(r, 1e18)]
        else:
            next_hb += 1.0
            out += [Record("heartbeat", "syn", T0 + t + 0.01, r, step if step else None)
                    for r in range(ranks) if t < silent.get(r, 1e18)]
    if end_at is not None:
        out += [Record("end", "syn", T0 + end_at, r, step, status="completed") for r in range(ranks)]
    return out


def test_pages_within_35_s_of_a_hang_and_resolves_when_steps_resume() -> None:
    out = replay(TrainingStalled(), job(pauses=((100.0, 170.0),)))
    fired = fires(out)
    assert len(fired) == 1
    f = fired[0]
    assert f.severity == "critical" and f.step is None
    assert 130.0 <= f.t - T0 <= 133.0
    assert "no step finished for 3" in f.summary and "step 199" in f.summary
    resolved = [x for x in out if x.action == "resolve"]
    assert len(resolved) == 1 and 170.0 <= resolved[0].t - T0 <= 172.0


def test_silent_on_pauses_shorter_than_the_threshold() -> None:
    # A 20 s eval, a 25 s checkpoint: heartbeats with an old step, then steps again.
    assert fires(replay(TrainingStalled(), job(pauses=((50.0, 70.0), (120.0, 145.0))))) == []


def test_slow_steps_raise_the_threshold() -> None:
    # 8 s steps: 10 x the median step time is 80 s, so a 60 s pause is not a stall, a 100 s one is.
    assert fires(replay(TrainingStalled(), job(seconds=600.0, step_time=8.0, pauses=((300.0, 360.0),)))) == []
    out = fires(replay(TrainingStalled(), job(seconds=600.0, step_time=8.0, pauses=((300.0, 420.0),))))
    assert len(out) == 1 and 375.0 <= out[0].t - T0 <= 380.0  # last step at 296 s


def test_a_pause_the_run_came_back_from_is_learnt() -> None:
    cfg = {"min_stall_s": 10.0}
    # The first 14 s checkpoint pages (nothing to compare with); the next one, no longer, does not.
    out = fires(replay(TrainingStalled(cfg), job(pauses=((50.0, 64.0), (120.0, 136.0)))))
    assert len(out) == 1 and 59.0 <= out[0].t - T0 <= 63.0


def test_silent_during_start_up_and_after_the_end() -> None:
    # Two minutes of heartbeats without a step (compilation, data download): not a stall.
    assert fires(replay(TrainingStalled(), job(start_at=120.0))) == []
    # After `end` nothing is judged, even if records trickle in.
    recs = job(end_at=100.0)
    recs += [Record("heartbeat", "syn", T0 + 100 + k, 0, 199) for k in range(1, 60)]
    assert fires(replay(TrainingStalled(), recs)) == []


def test_a_silent_rank_is_left_to_rank_lost() -> None:
    assert fires(replay(TrainingStalled(), job(silent={1: 100.0}, pauses=((100.0, 1e9),)))) == []


def test_names_the_rank_that_is_behind() -> None:
    recs = job(ranks=4, pauses=((100.0, 1e9),))
    # Ranks 0, 1 and 3 finished one more step than rank 2 before everything stopped.
    last = max(r.step for r in recs if r.kind == "train")
    extra = [Record("train", "syn", T0 + 100.2, r, last + 1, {"step_time_seconds": 0.5}) for r in (0, 1, 3)]
    recs = sorted(recs + extra, key=lambda r: r.t)
    recs = [r if r.kind != "heartbeat" or r.rank == 2 or r.t < T0 + 100.3 else
            Record("heartbeat", "syn", r.t, r.rank, last + 1) for r in recs]
    out = fires(replay(TrainingStalled(), recs))
    assert len(out) == 1 and out[0].rank == 2 and out[0].labels["ranks_behind"] == "2"


def test_restart_keeps_the_episode() -> None:
    recs = job(pauses=((100.0, 170.0),))
    cut = next(i for i, r in enumerate(recs) if r.t - T0 > 140.0)
    det = TrainingStalled()
    st = run_state()
    st.set_detectors([det])
    assert len(fires(st.apply(recs[:cut], 0.0))) == 1
    det2 = TrainingStalled()
    det2.restore(json.loads(json.dumps(det.state(), allow_nan=False)))
    st2 = run_state()
    st2.apply(recs[:cut], 0.0, detect=False)
    st2.set_detectors([det2])
    rest = st2.apply(recs[cut:], 0.0)
    assert [f.action for f in rest] == ["resolve"]


def test_real_stall_trace() -> None:
    rel = "cpu/cpu-stall-01.jsonl.gz"
    out = fires(replay(TrainingStalled(), trace(rel)))
    assert len(out) == 1 and 0.0 <= out[0].t - label(rel)["onset_t"] <= 35.0


@pytest.mark.parametrize("rel", HEALTHY_SAMPLE + ("cpu/cpu-rank_lost-01.jsonl.gz", "cpu/cpu-straggler-01.jsonl.gz",
                                                  "cpu/cpu-slowdown-01.jsonl.gz"))
def test_silent_on_real_traces_without_a_hang(rel: str) -> None:
    assert fires(replay(TrainingStalled(), trace(rel))) == []
