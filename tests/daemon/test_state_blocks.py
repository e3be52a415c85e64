"""Records that arrive as blocks give the detectors the same findings as the same records one by one."""

from __future__ import annotations

from typing import Any

import pytest

from monitor import wire
from monitor.daemon.detectors import build_detectors
from monitor.daemon.state import RunState
from monitor.records import Record, read_trace
from tests.helpers import TRACES

TRACE_NAMES = ["cpu-spike-01", "cpu-divergence-01", "cpu-stall-01", "cpu-straggler-01", "cpu-leak-01", "cpu-lr_zero-01"]


def _findings(recs: list[Record], blocks: bool, batch: int) -> tuple[list[Any], Any]:
    st = RunState(recs[0].run, 256)
    st.set_detectors(build_detectors({}))
    out = []
    for i in range(0, len(recs), batch):
        part = recs[i:i + batch]
        for rank in sorted({r.rank for r in part}):
            # As a client of each rank sends them: its own records, in order.
            mine = [r for r in part if r.rank == rank]
            b = wire.decode_batch(wire.encode_batch(st.run, rank, "inc", i + 1, mine, blocks=blocks))
            assert not b.rejections
            for f in st.apply(b.parts, 0.0):
                out.append((f.alert, f.action, f.severity, f.step, f.rank, round(f.t, 6)))
    lead = st.ranks[st.lead]
    return sorted(out, key=repr), (st.records, st.clock, lead.last_step, lead.latest)


@pytest.mark.parametrize("name", TRACE_NAMES)
def test_blocks_and_records_give_the_same_alerts(name: str) -> None:
    recs = [r for r in read_trace(str(TRACES / "cpu" / f"{name}.jsonl.gz")) if isinstance(r, Record)]
    one_by_one, state = _findings(recs, blocks=False, batch=400)
    assert one_by_one, "the trace should make some detector speak"
    assert _findings(recs, blocks=True, batch=400) == (one_by_one, state)
