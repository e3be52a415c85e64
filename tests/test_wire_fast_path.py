"""decode_batch's fast path (records matched against learnt layouts) answers exactly as the full parse does."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from monitor import wire
from monitor._pb.trainguard.v1 import telemetry_pb2 as pb
from monitor.records import MAX_STEP, Record

NAME_SETS = [("loss", "grad_norm", "lr"), ("loss",), (), ("a*b", "x\x2a", "é名"), ("loss", "loss")]
KINDS = ["train", "train", "train", "eval", "system", "heartbeat", "run", "probe", "end", "bogus"]


def _record(rng: random.Random) -> Any:
    r = pb.Record(kind=rng.choice(KINDS))
    if rng.random() < 0.8:
        r.step = rng.choice([0, 1, 127, 128, 16384, 2**21, MAX_STEP, MAX_STEP + 1, 2**62, -1, rng.randrange(10**7)])
    r.t = 1.7e9 + rng.random() if rng.random() < 0.9 else rng.choice([0.0, -1.0, math.nan, 1e12, 5e-324])
    names = rng.choice(NAME_SETS)
    r.names.extend(names)
    vals = [rng.choice([rng.uniform(-1e6, 1e6), math.nan, math.inf, -0.0]) for _ in names]
    r.values.extend(vals[:-1] if vals and rng.random() < 0.05 else vals)
    if rng.random() < 0.05:
        r.rank = rng.choice([0, 3])
    if r.kind == "probe":
        r.suite = rng.choice(["", "arith"])
    if r.kind == "end":
        r.status = rng.choice(["", "completed", "weird"])
    return r


def _batch(rng: random.Random) -> bytes:
    req = pb.ReportRequest(run=rng.choice(["run-1", "run-1", "bad run"]), rank=rng.choice([0, 3, 2**20]),
                           incarnation=rng.choice(["inc", "inc", ""]), sequence=rng.choice([1, 1, 0]), client="c")
    for _ in range(rng.randrange(12)):
        req.records.add().CopyFrom(_record(rng))
    data = bytearray(req.SerializeToString())
    if data and rng.random() < 0.2:  # damaged bytes: a bad record, a bad header, or not protobuf at all
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def _outcome(decode: Any, data: bytes) -> Any:
    try:
        b = decode(data)
    except wire.InvalidBatch as e:
        return ("refused", e.field, e.reason)
    return (b.run, b.rank, b.incarnation, b.sequence, b.client, b.records,
            [(x.index, x.field, x.reason) for x in b.rejections], b.total, b.lenient)


@pytest.mark.parametrize("seed", range(4))
def test_fast_path_matches_the_full_parse(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(1500):
        data = _batch(rng)
        for _ in range(4):  # layouts are learnt on their third sighting; later rounds take the fast path
            assert _outcome(wire.decode_batch, data) == _outcome(wire._decode_batch_full, data)


def test_learnt_layout_decodes_steps_times_and_values_exactly() -> None:
    names = {"loss": 2.5, "grad_norm": math.inf, "lr": 3e-4, "tokens": 8192.0}
    recs = [Record("train", "fast-run", 1.7e9 + i / 3, 2, step, dict(names, loss=float(step)))
            for i, step in enumerate([0, 1, 127, 128, 16383, 16384, 2**35, MAX_STEP])]
    recs.append(Record("heartbeat", "fast-run", 1.7e9 + 9, 2, None, {}))
    data = wire.encode_batch("fast-run", 2, "inc", 1, recs, blocks=False)
    for _ in range(4):
        b = wire.decode_batch(data)
        assert b.records == recs and not b.rejections
    assert any(s.names == tuple(names) for s in wire._shapes.by_len.get(len("train"), []))
