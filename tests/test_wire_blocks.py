"""Blocks (runs of similar records sent column by column) mean exactly the records they stand for."""

from __future__ import annotations

import math
import random

import pytest

from monitor import wire
from monitor._pb.trainguard.v1 import telemetry_pb2 as pb
from monitor.records import MAX_STEP, Record, RecordBlock

RUN = "block-run"


def _records(rng: random.Random, n: int) -> list[Record]:
    """A stream as a busy client sends it: mostly train steps, some system, heartbeat and odd records."""
    out = []
    step = rng.randrange(1000)
    for i in range(n):
        t = 1.7e9 + i * 0.01
        roll = rng.random()
        if roll < 0.75:
            step += 1
            names = ("loss", "grad_norm", "lr") if rng.random() < 0.9 else ("loss",)
            vals = {k: rng.choice([rng.uniform(0, 5), math.nan, math.inf]) for k in names}
            out.append(Record("train", RUN, t, rng.choice([0, 0, 0, 1]), step, vals))
        elif roll < 0.85:
            out.append(Record("system", RUN, t, 0, step, {"host_rss_bytes": float(rng.randrange(10**9))}))
        elif roll < 0.93:
            out.append(Record("heartbeat", RUN, t, 0, rng.choice([step, None]), {}))
        elif roll < 0.97:
            out.append(Record("eval", RUN, t, 0, step, {"loss": rng.uniform(0, 5)}))
        else:
            # values that a check refuses: they must be refused at the same positions either way
            out.append(Record("train", RUN, rng.choice([t, -1.0, math.nan]), 0,
                              rng.choice([step, MAX_STEP + 1]), {"loss": 1.0}))
    return out


def _decoded(data: bytes) -> tuple[list[Record], list[int], int]:
    b = wire.decode_batch(data)
    return b.records, [rj.index for rj in b.rejections], b.total


@pytest.mark.parametrize("seed", range(6))
def test_blocks_decode_to_the_same_records_in_the_same_order(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        recs = _records(rng, rng.randrange(1, 80))
        with_blocks = wire.encode_batch(RUN, 0, "inc", 1, recs)
        one_by_one = wire.encode_batch(RUN, 0, "inc", 1, recs, blocks=False)
        assert _decoded(with_blocks) == _decoded(one_by_one)
        assert wire.decode_batch(with_blocks).n_records == len(_decoded(one_by_one)[0])


def test_a_long_run_travels_as_one_block_and_is_smaller() -> None:
    recs = [Record("train", RUN, 1.7e9 + i, 0, i, {"loss": 2.0, "grad_norm": 1.0, "lr": 1e-3}) for i in range(1000)]
    data = wire.encode_batch(RUN, 0, "inc", 1, recs)
    req = pb.ReportRequest.FromString(data)
    assert len(req.blocks) == 1 and len(req.records) == 0 and len(req.blocks[0].steps) == 1000
    assert len(data) < 0.5 * len(wire.encode_batch(RUN, 0, "inc", 1, recs, blocks=False))
    b = wire.decode_batch(data)
    assert len(b.parts) == 1 and isinstance(b.parts[0], RecordBlock)
    assert b.parts[0].column("loss") == [2.0] * 1000 and b.t_range == (1.7e9, 1.7e9 + 999)


def _block_request(**fields) -> bytes:
    req = pb.ReportRequest(run=RUN, rank=0, incarnation="inc", sequence=1)
    blk = req.blocks.add(kind="train", names=["loss"], steps=[1, 2, 3], t=[1.7e9, 1.7e9 + 1, 1.7e9 + 2],
                         values=[1.0, 2.0, 3.0])
    for k, v in fields.items():
        if isinstance(v, list):
            getattr(blk, k)[:] = v
        else:
            setattr(blk, k, v)
    req.records.add(kind="train", step=9, t=1.7e9 + 5, names=["loss"], values=[9.0])
    return req.SerializeToString()


@pytest.mark.parametrize("fields, field, reason", [
    ({"kind": "run"}, "blocks[0].kind", "cannot travel as a block"),
    ({"values": [1.0, 2.0]}, "blocks[0].values", "2 values for 3 records x 1 names"),
    ({"t": [1.7e9]}, "blocks[0].t", "1 times for 3 steps"),
    ({"names": ["loss", "loss"], "values": [1.0] * 6}, "blocks[0].names", "appears twice"),
    ({"names": ["x" * 200]}, "blocks[0].names[0]", "128"),
])
def test_a_bad_block_is_refused_by_name_and_the_rest_is_kept(fields, field, reason) -> None:
    b = wire.decode_batch(_block_request(**fields))
    assert [rj.index for rj in b.rejections] == [0, 1, 2]
    assert all(rj.field == field and reason in rj.reason for rj in b.rejections), b.rejections
    assert [r.step for r in b.records] == [9]


def test_one_bad_record_in_a_block_is_refused_alone() -> None:
    b = wire.decode_batch(_block_request(t=[1.7e9, math.nan, 1.7e9 + 2]))
    assert [(rj.index, rj.field) for rj in b.rejections] == [(1, "blocks[0].[1].t")]
    assert [r.step for r in b.records] == [1, 3, 9]


def test_blocks_that_overlap_are_refused_as_a_batch() -> None:
    req = pb.ReportRequest(run=RUN, rank=0, incarnation="inc", sequence=1)
    for _ in range(2):
        req.blocks.add(kind="train", names=["loss"], steps=[1, 2], t=[1.7e9, 1.7e9], values=[1.0, 2.0], at=0)
    with pytest.raises(wire.InvalidBatch, match="overlaps"):
        wire.decode_batch(req.SerializeToString())
