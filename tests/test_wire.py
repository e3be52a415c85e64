"""Records <-> protobuf (monitor/wire.py): round trips, per-record validation, whole-batch errors."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pytest

from monitor import wire
from monitor.records import MAX_META_BYTES, MAX_RANK, MAX_VALUES, Record, TraceError, read_trace
from tests.helpers import SAMPLE_TRACES

T0 = 1_700_000_000.0
RUN = "wire-run"


def _all_kinds() -> list[Record]:
    return [
        Record("run", RUN, T0, 0, world_size=4, meta={"framework": "torch", "hp": {"lr": 3e-4}, "tags": ["a", "b"]}),
        Record("train", RUN, T0 + 1, 0, 1, {"loss": 2.5, "grad_norm": 0.75, "lr": 1e-3, "tokens": 8192.0}),
        Record("train", RUN, T0 + 1.5, 3, 1, {"loss": math.nan, "grad_norm": math.inf, "param_norm": -math.inf}),
        Record("train", RUN, T0 + 2, 0, 0, {}),  # step 0 is a real step, not "unset"
        Record("eval", RUN, T0 + 3, 0, 1, {"loss": 2.8, "accuracy": 0.25}),
        Record("probe", RUN, T0 + 4, 1, 1, {"accuracy": 0.5}, suite="arithmetic", items=[1.0, 0.0, 0.5]),
        Record("system", RUN, T0 + 5, 2, None, {"host_rss_bytes": 1.5e9, "gpu_memory_allocated_bytes": 2e9}),
        Record("heartbeat", RUN, T0 + 6, 2, 1, {"client_dropped_total": 3.0}),
        Record("end", RUN, T0 + 7, 0, 1, status="failed"),
        Record("end", RUN, T0 + 8, 1, None),
    ]


def test_round_trip_every_kind() -> None:
    recs = _all_kinds()
    data = wire.encode_batch(RUN, 0, "inc-1", 7, recs, client="tests/1.0")
    b = wire.decode_batch(data)
    assert (b.run, b.rank, b.incarnation, b.sequence, b.client) == (RUN, 0, "inc-1", 7, "tests/1.0")
    assert b.rejections == [] and b.total == len(recs) and not b.lenient
    assert b.records == recs
    # the details that equality alone would not show
    assert b.records[3].step == 0
    assert b.records[6].step is None
    assert math.isnan(b.records[2].values["loss"]) and b.records[2].values["param_norm"] == -math.inf
    assert [r.rank for r in b.records] == [r.rank for r in recs]
    assert b.t_range == (T0, T0 + 8)


def test_round_trip_with_a_nonzero_batch_rank() -> None:
    recs = [Record("train", RUN, T0, 5, 1, {"loss": 1.0}), Record("train", RUN, T0 + 1, 0, 1, {"loss": 1.0})]
    b = wire.decode_batch(wire.encode_batch(RUN, 5, "i", 1, recs))
    assert [r.rank for r in b.records] == [5, 0]


@pytest.mark.parametrize("path", SAMPLE_TRACES, ids=lambda p: p.name)
def test_round_trip_every_trace_record(path: Any) -> None:
    recs = [r for r in read_trace(str(path)) if not isinstance(r, TraceError)]
    b = wire.decode_batch(wire.encode_batch(recs[0].run, 0, "i", 1, recs))
    assert b.rejections == []
    assert b.records == recs


def test_values_that_are_not_numbers_are_dropped_and_counted() -> None:
    req = wire.ReportRequest(run=RUN, rank=0, incarnation="i", sequence=1)
    rec = Record("train", RUN, T0, 0, 1, {"loss": Decimal("1.5"), "bad": object(), "lr": 2})  # type: ignore[dict-item]
    assert wire.encode_records(req, [rec], 0) == 1
    r = req.records[0]
    assert list(r.names) == ["loss", "lr"] and list(r.values) == [1.5, 2.0]


def test_empty_batch_is_valid() -> None:
    b = wire.decode_batch(wire.encode_batch(RUN, 0, "i", 1, []))
    assert b.records == [] and b.total == 0 and b.t_range == (0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# one bad record: named by index and field, the rest of the batch is kept


def _req(records: list[dict[str, Any]], run: str = RUN) -> Any:
    req = wire.ReportRequest(run=run, rank=0, incarnation="inc", sequence=1)
    for fields in records:
        r = req.records.add()
        for k, v in fields.items():
            if isinstance(v, list):
                getattr(r, k).extend(v)
            else:
                setattr(r, k, v)
    return req


GOOD = {"kind": "train", "step": 1, "t": T0, "names": ["loss"], "values": [1.0]}


@pytest.mark.parametrize("bad,field,words", [
    ({"kind": "bogus", "t": T0}, "kind", "unknown kind"),
    ({"kind": "train", "t": T0}, "step", "required"),
    ({"kind": "eval", "t": T0}, "step", "required"),
    ({"kind": "train", "step": 1, "t": T0, "names": [f"v{i}" for i in range(300)], "values": [0.0] * 300},
     "values", str(MAX_VALUES)),
    ({"kind": "train", "step": 1, "t": T0, "names": ["n" * 200], "values": [1.0]}, "names[0]", "limit is 128"),
    ({"kind": "train", "step": 1, "t": T0, "names": ["ok", ""], "values": [1.0, 2.0]}, "names[1]", "empty"),
    ({"kind": "train", "step": 1, "t": T0, "names": ["a", "b"], "values": [1.0]}, "values", "pair up"),
    ({"kind": "train", "step": 1, "t": math.nan}, "t", "finite"),
    ({"kind": "train", "step": 1, "t": 0.0}, "t", "finite"),
    ({"kind": "train", "step": -3, "t": T0}, "step", "[0, 2^53]"),
    ({"kind": "train", "step": 1, "t": T0, "rank": MAX_RANK}, "rank", "[0,"),
    ({"kind": "run", "t": T0}, "world_size", "required"),
    ({"kind": "run", "t": T0, "world_size": 1, "meta_json": "{not json"}, "meta_json", "JSON"),
    ({"kind": "run", "t": T0, "world_size": 1, "meta_json": "[1]"}, "meta_json", "object"),
    ({"kind": "run", "t": T0, "world_size": 1, "meta_json": '{"x": "' + "a" * MAX_META_BYTES + '"}'},
     "meta_json", str(MAX_META_BYTES)),
    ({"kind": "probe", "step": 1, "t": T0}, "suite", "required"),
    ({"kind": "end", "t": T0, "status": "exploded"}, "status", "exploded"),
])
def test_bad_record_is_rejected_alone(bad: dict[str, Any], field: str, words: str) -> None:
    b = wire.decode_batch(_req([GOOD, bad, dict(GOOD, step=2)]).SerializeToString())
    assert [r.step for r in b.records] == [1, 2]
    assert len(b.rejections) == 1 and b.total == 3
    rj = b.rejections[0]
    assert rj.index == 1
    assert rj.field == f"records[1].{field}"
    assert words in rj.reason


def test_non_utf8_value_name_is_rejected_alone() -> None:
    req = _req([GOOD, dict(GOOD, step=2, names=["NONUTF8X"]), dict(GOOD, step=3)])
    data = req.SerializeToString().replace(b"NONUTF8X", b"NON\xffTF8X")
    b = wire.decode_batch(data)
    assert b.lenient
    assert [r.step for r in b.records] == [1, 3]
    assert [(rj.index, rj.field) for rj in b.rejections] == [(1, "records[1].names[0]")]
    assert "UTF-8" in b.rejections[0].reason
    # the good records of a lenient batch carry ordinary str text
    assert all(isinstance(r.kind, str) and all(isinstance(k, str) for k in r.values) for r in b.records)
    # the stored form of the batch holds only the kept records and parses strictly
    kept = wire.decode_batch(wire.reencode_kept(b))
    assert not kept.lenient and kept.records == b.records and kept.sequence == b.sequence


def test_non_utf8_kind_and_suite_are_named() -> None:
    req = _req([dict(GOOD), {"kind": "probe", "step": 1, "t": T0, "suite": "SUITEX"}])
    req.records[0].kind = "KINDXYZ"
    data = req.SerializeToString().replace(b"KINDXYZ", b"KIN\xfeXYZ").replace(b"SUITEX", b"SUI\xffEX")
    b = wire.decode_batch(data)
    assert [rj.field for rj in b.rejections] == ["records[0].kind", "records[1].suite"]
    assert b.records == []


def test_many_rejections_are_counted_but_few_reported() -> None:
    bad = {"kind": "bogus", "t": T0}
    b = wire.decode_batch(_req([bad] * 40 + [GOOD]).SerializeToString())
    assert len(b.rejections) == 40 and len(b.records) == 1
    resp = wire.decode_response(wire.encode_response(b.sequence, len(b.records), b.rejections))
    assert resp.ack_sequence == 1 and resp.accepted == 1 and resp.rejected == 40 and not resp.duplicate
    assert len(resp.rejections) == wire.MAX_REJECTIONS_REPORTED
    assert [rj.index for rj in resp.rejections] == list(range(wire.MAX_REJECTIONS_REPORTED))
    assert resp.rejections[0].field == "records[0].kind"


def test_response_round_trip_with_duplicate_flag() -> None:
    resp = wire.decode_response(wire.encode_response(9, 3, [wire.Rejection(2, "records[2].t", "bad")], True))
    assert (resp.ack_sequence, resp.accepted, resp.rejected, resp.duplicate) == (9, 3, 1, True)
    assert (resp.rejections[0].index, resp.rejections[0].field, resp.rejections[0].reason) == (2, "records[2].t", "bad")


# ---------------------------------------------------------------------------------------------
# the batch as a whole


def _batch_error(data: bytes, **kw: Any) -> wire.InvalidBatch:
    with pytest.raises(wire.InvalidBatch) as e:
        wire.decode_batch(data, **kw)
    return e.value


@pytest.mark.parametrize("header,field,words", [
    ({"run": "bad run!"}, "run", "not allowed"),
    ({"run": ""}, "run", "1-128"),
    ({"run": "r" * 129}, "run", "1-128"),
    ({"incarnation": ""}, "incarnation", "1-64"),
    ({"incarnation": "i" * 65}, "incarnation", "1-64"),
    ({"sequence": 0}, "sequence", ">= 1"),
    ({"rank": MAX_RANK}, "rank", str(MAX_RANK)),
])
def test_bad_header_refuses_the_batch(header: dict[str, Any], field: str, words: str) -> None:
    fields = {"run": RUN, "rank": 0, "incarnation": "inc", "sequence": 1, **header}
    req = wire.ReportRequest(**fields)
    req.records.add(**{k: v for k, v in GOOD.items() if k not in ("names", "values")})
    err = _batch_error(req.SerializeToString())
    assert err.field == field and words in err.reason
    assert str(err).startswith(f"{field}: ")


def test_non_utf8_run_id_names_run() -> None:
    data = wire.encode_batch("RUNXYZ", 0, "inc", 1, []).replace(b"RUNXYZ", b"RUN\xffYZ")
    err = _batch_error(data)
    assert err.field == "run" and "UTF-8" in err.reason


def test_garbage_is_refused_naming_the_batch() -> None:
    err = _batch_error(b"\xff\xff\xff\xff this is not a protobuf")
    assert err.field == "batch" and "trainguard.v1.ReportRequest" in err.reason


def test_oversized_batch_is_refused_naming_the_limit() -> None:
    assert wire.MAX_BATCH_BYTES == 4 * 1024 * 1024
    big = [Record("probe", RUN, T0, 0, i, suite="s", items=[0.5] * 90_000) for i in range(7)]
    data = wire.encode_batch(RUN, 0, "i", 1, big)
    assert len(data) > wire.MAX_BATCH_BYTES
    err = _batch_error(data)
    assert err.field == "batch" and str(wire.MAX_BATCH_BYTES) in err.reason and "4 MiB" in err.reason
    # the same bytes are fine under a larger limit
    b = wire.decode_batch(data, max_bytes=8 * 1024 * 1024)
    assert b.rejections == [] and b.records == big


def test_client_name_is_truncated() -> None:
    b = wire.decode_batch(wire.encode_batch(RUN, 0, "i", 1, [], client="c" * 1000))
    assert b.client == "c" * 128
