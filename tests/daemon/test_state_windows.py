"""Per-rank windows are folded in lazily: whatever reads them sees one point per record, in order."""

from __future__ import annotations

import math
import random

import pytest

from monitor.daemon.state import WINDOW_SERIES, RankState, Ring, RunState
from monitor.records import Record


def _expected(recs: list[Record], cap: int) -> dict[str, list[tuple[float, float, float]]]:
    """What appending one point per record and series would leave in each window."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for r in recs:
        if r.kind not in ("train", "system", "probe") or not r.values:
            continue
        for name in WINDOW_SERIES:
            if name in r.values:
                step = math.nan if r.step is None else float(r.step)
                out.setdefault(name, []).append((r.t, step, r.values[name]))
    return {k: v[-cap:] for k, v in out.items()}


def _same(a: list[tuple[float, float, float]], b: list[tuple[float, float, float]]) -> bool:
    return repr(a) == repr(b)  # NaN steps compare equal this way


@pytest.mark.parametrize("seed", range(3))
def test_windows_hold_every_point_in_order(seed: int) -> None:
    rng = random.Random(seed)
    names = list(WINDOW_SERIES) + ["samples", "accuracy"]
    for cap in (1, 3, 16, 256):
        st = RunState("r", cap)
        recs = []
        for i in range(rng.choice([5, 700, 1300])):
            kind = rng.choice(["train"] * 5 + ["system", "eval", "heartbeat", "probe"])
            keys = rng.sample(names, rng.randrange(0, 5)) if rng.random() < 0.3 else names[:4]
            step = None if rng.random() < 0.1 else i
            rec = Record(kind, "r", 1.7e9 + i, 0, step, {k: rng.random() for k in keys},
                         suite="s" if kind == "probe" else None)
            recs.append(rec)
            st.observe(rec, 0.0)
            if rng.random() < 0.01:  # a read mid-batch sees everything observed so far
                want = _expected(recs, cap)
                got = {k: w.points() for k, w in st.ranks[0].windows.items()}
                assert got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
        st.settle()
        want = _expected(recs, cap)
        rs = st.ranks[0]
        assert {k: len(w) for k, w in rs.windows.items()} == {k: len(v) for k, v in want.items()}
        for k, w in rs.windows.items():
            assert _same(w.points(), want[k])
            assert w.last() == want[k][-1][2]


def test_ring_extend_equals_appends() -> None:
    for cap in (1, 4, 7):
        for first in range(0, 9):
            for k in range(0, 17):
                a, b = Ring(cap), Ring(cap)
                for i in range(first):
                    a.append(float(i), float(i), float(i))
                    b.append(float(i), float(i), float(i))
                pts = [(100.0 + i, 200.0 + i, 300.0 + i) for i in range(k)]
                for p in pts:
                    a.append(*p)
                b.extend([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts])
                assert a.points() == b.points() and len(a) == len(b) and a.last() == b.last()


def test_rank_state_alone_folds_on_read() -> None:
    rs = RankState(0, 8)
    for i in range(20):
        rs.observe(Record("train", "r", 1.7e9 + i, 0, i, {"loss": float(i)}))
    assert rs.windows["loss"].values() == [float(i) for i in range(12, 20)]


@pytest.mark.parametrize("seed", range(4))
def test_blocks_leave_the_same_state_as_their_records(seed: int) -> None:
    # A rank other than the lead has its blocks folded a column at a time; a run fed the same
    # records one by one must end in the same state, window points and latest values included.
    from monitor import wire

    rng = random.Random(seed)
    names = ["loss", "grad_norm", "step_time_seconds", "tokens"]
    for cap in (2, 64):
        recs = []
        step = 0
        for i in range(rng.choice([40, 900])):
            kind = rng.choice(["train"] * 6 + ["system", "heartbeat", "eval"])
            step += kind == "train"
            keys = names if rng.random() < 0.9 else names[:2]
            vals = {k: rng.uniform(0, 9) for k in keys} if kind != "heartbeat" else {}
            recs.append(Record(kind, "r", 1.7e9 + i, 1, step, vals))
        states = []
        for blocks in (True, False):
            st = RunState("r", cap)
            st.rank(0)  # rank 0 is the lead: rank 1's blocks take the column path
            batch = wire.decode_batch(wire.encode_batch("r", 1, "inc", 1, recs, blocks=blocks))
            assert any(type(p) is not Record for p in batch.parts) == blocks
            st.apply(batch.parts, 0.0)
            rs = st.ranks[1]
            states.append((st.records, st.clock, st.first_t, rs.records, rs.last_t, rs.last_step, rs.heartbeat_step,
                           rs.latest, {k: repr(w.points()) for k, w in rs.windows.items()}))
        assert states[0] == states[1]
