"""The v1 trace reader and writer, and record validation (monitor/records.py)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from monitor.records import (
    MAX_VALUES,
    InvalidRecord,
    Record,
    TraceError,
    TraceWriter,
    check_record,
    check_run_id,
    dumps_record,
    iter_trace_lines,
    read_trace,
    read_trace_numbered,
    record_from_json,
)
from tests.helpers import SAMPLE_TRACES, TRACES

# Records per sampled trace file (tests/helpers.py): the reader must yield every one of them.
TRACE_COUNTS = {
    "cpu/cpu-divergence-01.jsonl.gz": 921,
    "cpu/cpu-forgetting-01.jsonl.gz": 852,
    "cpu/cpu-grad_explosion-01.jsonl.gz": 921,
    "cpu/cpu-healthy-01.jsonl.gz": 1381,
    "cpu/cpu-healthy-02.jsonl.gz": 2267,
    "cpu/cpu-healthy-03.jsonl.gz": 925,
    "cpu/cpu-leak-01.jsonl.gz": 1253,
    "cpu/cpu-lr_zero-01.jsonl.gz": 1380,
    "cpu/cpu-nonfinite-01.jsonl.gz": 749,
    "cpu/cpu-overfit-01.jsonl.gz": 1187,
    "cpu/cpu-rank_lost-01.jsonl.gz": 1620,
    "cpu/cpu-replay-01.jsonl.gz": 852,
    "cpu/cpu-slowdown-01.jsonl.gz": 1049,
    "cpu/cpu-spike-01.jsonl.gz": 1050,
    "cpu/cpu-stall-01.jsonl.gz": 1575,
    "cpu/cpu-straggler-01.jsonl.gz": 2273,
    "healthy-nanogpt/2024-12-04-ValueEmbed-00008ea0.jsonl.gz": 1531,
    "incidents-bloom/tr11-176B-spike-31214.jsonl.gz": 12,
    "incidents-bloom/tr8-104B-exp1-glitch-7000.jsonl.gz": 5,
    "incidents-bloom/tr8-104B-exp11-spike-11447.jsonl.gz": 4,
    "incidents-bloom/tr8-104B-exp12-spike-8740.jsonl.gz": 9,
    "incidents-bloom/tr8-104B-glitch2-6900.jsonl.gz": 6,
}
T0 = 1_700_000_000.0


def test_every_trace_file_is_listed() -> None:
    found = sorted(str(p.relative_to(TRACES)) for p in SAMPLE_TRACES)
    assert found == sorted(TRACE_COUNTS)


@pytest.mark.parametrize("name", sorted(TRACE_COUNTS))
def test_reader_reads_every_trace_without_errors(name: str) -> None:
    path = str(TRACES / name)
    items = list(read_trace(path))
    errors = [i for i in items if isinstance(i, TraceError)]
    assert errors == []
    assert len(items) == TRACE_COUNTS[name]
    recs: list[Record] = items  # type: ignore[assignment]
    # Each trace is one run, announced first, ordered by event time (TRACE_FORMAT.md).
    assert len({r.run for r in recs}) == 1
    assert recs[0].kind == "run" and recs[0].world_size is not None and recs[0].world_size >= 1
    ts = [r.t for r in recs]
    assert ts == sorted(ts)
    assert all(r.step is not None for r in recs if r.kind in ("train", "eval", "probe"))
    assert {r.rank for r in recs} <= set(range(recs[0].world_size))


def test_nonfinite_trace_carries_nan_as_floats() -> None:
    recs = [r for r in read_trace(str(TRACES / "cpu/cpu-nonfinite-01.jsonl.gz")) if isinstance(r, Record)]
    bad = [r.step for r in recs if r.kind == "train" and not math.isfinite(r.values.get("loss", 0.0))]
    assert bad and bad[0] == 610
    assert all(isinstance(v, float) for r in recs for v in r.values.values())


def test_numbered_reader_line_numbers_match_file_lines() -> None:
    path = TRACES / "incidents-bloom/tr11-176B-spike-31214.jsonl.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    numbered = list(read_trace_numbered(str(path)))
    assert [n for n, _ in numbered] == list(range(1, len(lines) + 1))
    for n, rec in numbered:
        assert isinstance(rec, Record)
        assert rec.step == json.loads(lines[n - 1]).get("step")


def test_progress_callback_reports_file_size() -> None:
    path = TRACES / "cpu/cpu-healthy-01.jsonl.gz"
    size = path.stat().st_size
    calls: list[tuple[int, int]] = []
    n = sum(1 for _ in read_trace(str(path), on_progress=lambda done, total: calls.append((done, total))))
    assert n == 1381
    # one call per 1,000 lines, then a final one at 100%
    assert len(calls) == 2
    assert all(total == size for _, total in calls)
    assert 0 < calls[0][0] <= size
    assert calls[-1] == (size, size)


# ---------------------------------------------------------------------------------------------
# writer round trip


def _sample_records() -> list[Record]:
    return [
        Record("run", "rt-run", T0, 0, world_size=2, meta={"framework": "torch", "lr": 3e-4, "nested": {"a": [1, 2]}}),
        Record("train", "rt-run", T0 + 1, 0, 1, {"loss": 2.5, "grad_norm": 1.25, "lr": 3e-4, "tokens": 4096.0}),
        Record("train", "rt-run", T0 + 2, 1, 2, {"loss": math.nan, "grad_norm": math.inf, "lr": -math.inf}),
        Record("eval", "rt-run", T0 + 3, 0, 2, {"loss": 2.75, "accuracy": 0.5}),
        Record("probe", "rt-run", T0 + 4, 0, 2, {"accuracy": 0.75}, suite="arithmetic", items=[1.0, 0.0, 1.0, 1.0]),
        Record("system", "rt-run", T0 + 5, 1, None, {"host_rss_bytes": 123456789.0}),
        Record("heartbeat", "rt-run", T0 + 6, 1, 2),
        Record("end", "rt-run", T0 + 7, 0, 2, status="completed"),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_trace_writer_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / ("sub/dir/trace" + suffix)  # missing parent folders are created
    recs = _sample_records()
    w = TraceWriter(path)
    w.write(recs[:3])
    w.flush()
    w.write(recs[3:])
    w.close()
    w.close()  # closing twice is harmless

    raw = path.read_bytes()
    if suffix.endswith(".gz"):
        assert raw[:2] == b"\x1f\x8b"
        raw = gzip.decompress(raw)
    else:
        assert raw[:1] == b"{"
    text = raw.decode()
    lines = text.splitlines()
    assert len(lines) == len(recs) and text.endswith("\n")
    # Non-finite values are written as the bare JSON tokens Python's json writes.
    assert '"loss":NaN' in lines[2] and '"grad_norm":Infinity' in lines[2] and '"lr":-Infinity' in lines[2]

    back = list(read_trace(str(path)))
    assert back == recs
    assert math.isnan(back[2].values["loss"])  # type: ignore[union-attr]
    assert back[2].values["grad_norm"] == math.inf  # type: ignore[union-attr]
    assert back[2].values["lr"] == -math.inf  # type: ignore[union-attr]
    assert back[4].items == [1.0, 0.0, 1.0, 1.0]  # type: ignore[union-attr]
    assert back[0].meta == recs[0].meta  # type: ignore[union-attr]


def test_gzip_writer_appends_as_a_second_member(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    recs = _sample_records()
    for chunk in (recs[:4], recs[4:]):
        w = TraceWriter(path)
        w.write(chunk)
        w.close()
    assert list(read_trace(str(path))) == recs


def test_reader_accepts_nonfinite_strings(tmp_path: Path) -> None:
    path = tmp_path / "strings.jsonl"
    lines = [
        {"kind": "train", "run": "s", "t": T0, "step": 1, "values": {"a": "nan", "b": "inf", "c": "-inf", "d": "NaN"}},
        {"kind": "probe", "run": "s", "t": T0 + 1, "step": 1, "suite": "x", "items": ["nan", 1, "inf"]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recs = list(read_trace(str(path)))
    assert all(isinstance(r, Record) for r in recs)
    v = recs[0].values  # type: ignore[union-attr]
    assert math.isnan(v["a"]) and math.isnan(v["d"]) and v["b"] == math.inf and v["c"] == -math.inf
    items = recs[1].items  # type: ignore[union-attr]
    assert math.isnan(items[0]) and items[1:] == [1.0, math.inf]
    # and a string that is not a non-finite spelling is still an error
    with pytest.raises(InvalidRecord) as e:
        record_from_json({"kind": "train", "run": "s", "t": T0, "step": 1, "values": {"a": "1.5"}})
    assert e.value.field == "values.a"


def test_dumps_record_is_one_compact_line() -> None:
    rec = Record("train", "r", T0, 0, 3, {"loss": math.nan})
    line = dumps_record(rec)
    assert "\n" not in line and " " not in line
    assert line == '{"kind":"train","run":"r","t":1700000000.0,"rank":0,"step":3,"values":{"loss":NaN}}'
    assert list(iter_trace_lines([line, "", line])) == [rec, rec]


def test_unknown_fields_and_value_names_are_kept_and_ignored() -> None:
    rec = record_from_json({"kind": "train", "run": "r", "t": T0, "step": 1, "values": {"my_metric": 3},
                            "future_field": {"x": 1}})
    assert rec.values == {"my_metric": 3.0}
    assert rec.rank == 0


def test_integral_float_step_is_accepted() -> None:
    rec = record_from_json({"kind": "train", "run": "r", "t": T0, "step": 7.0, "rank": 2.0})
    assert rec.step == 7 and isinstance(rec.step, int) and rec.rank == 2


# ---------------------------------------------------------------------------------------------
# bad lines: each one is a TraceError naming the line and the field; good lines around it still come


def _good(step: int) -> str:
    return json.dumps({"kind": "train", "run": "bad-lines", "t": T0 + step, "step": step, "values": {"loss": 1.0}})


BAD_LINES: list[tuple[bytes, str | None, str]] = [
    # (line, field named in the error, words the reason must contain)
    (b'{"kind":"train","run":"bad-lines","t":1700000000.5,"step":1,"values":{"lo\xffss":1.0}}', None, "UTF-8"),
    (b'{"kind": "train", "run": "bad-lines", ', None, "not valid JSON"),
    (b'[1, 2, 3]', "record", "JSON object"),
    (b'{"kind":"train","run":"bad-lines","t":1700000000.5,"step":"abc"}', "step", "integer"),
    (b'{"kind":"train","run":"bad-lines","t":1700000000.5,"step":1,"values":[1,2]}', "values", "object"),
    (b'{"kind":"train","run":"bad-lines","t":1700000000.5,"step":1,"values":{"loss":"x"}}', "values.loss", "number"),
    (b'{"kind":"train","run":"bad-lines","step":1,"values":{"loss":1.0}}', "t", "missing"),
    (b'{"kind":"train","run":"bad run!","t":1700000000.5,"step":1}', "run", "not allowed"),
    (('{"kind":"train","run":"' + "r" * 200 + '","t":1700000000.5,"step":1}').encode(), "run", "1-128"),
    (b'{"kind":"bogus","run":"bad-lines","t":1700000000.5,"step":1}', "kind", "unknown kind"),
    (b'{"kind":"train","run":"bad-lines","t":1700000000.5,"step":1.5}', "step", "integer"),
    (b'{"kind":"run","run":"bad-lines","t":1700000000.5}', "world_size", "required"),
    (b'{"kind":"train","run":"bad-lines","t":1700000000.5}', "step", "required"),
    (b'{"kind":"train","run":"bad-lines","t":"yesterday","step":1}', "t", "number"),
    (b'{"kind":"train","run":"bad-lines","t":1700000000.5,"step":-1}', "step", "[0, 2^53]"),
    (b'{"kind":"train","run":"bad-lines","t":1700000000.5,"step":1,"rank":true}', "rank", "integer"),
    (b'{"kind":"train","run":"bad-lines","t":"nan","step":1}', "t", "finite"),
    (b'{"kind":"probe","run":"bad-lines","t":1700000000.5,"step":1}', "suite", "required"),
    (b'{"kind":"end","run":"bad-lines","t":1700000000.5,"status":"exploded"}', "status", "exploded"),
    (b'{"kind":7,"run":"bad-lines","t":1700000000.5}', "kind", "string"),
    (b'{"kind":"train","run":"bad-lines","t":1700000000.5,"step":1,"values":{"' + b"n" * 200 + b'":1}}',
     "values." + "n" * 40, "limit is 128"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_bad_lines_are_named_and_good_lines_still_come(tmp_path: Path, suffix: str) -> None:
    lines: list[bytes] = [_good(0).encode()]
    expected_errors: dict[int, tuple[str | None, str]] = {}
    for i, (bad, field, words) in enumerate(BAD_LINES):
        lines.append(bad)
        expected_errors[len(lines)] = (field, words)
        lines.append(_good(i + 1).encode())
    lines.append(b"")  # a blank line is skipped but still counted
    lines.append(_good(999).encode())
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / ("bad" + suffix)
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)

    numbered = list(read_trace_numbered(str(path)))
    errors = {n: e for n, e in numbered if isinstance(e, TraceError)}
    good = [(n, r) for n, r in numbered if isinstance(r, Record)]

    assert sorted(errors) == sorted(expected_errors)
    for n, (field, words) in expected_errors.items():
        err = errors[n]
        assert err.line == n and err.path == str(path)
        assert err.field == field, (n, err)
        assert words in err.reason, (n, err)
        text = str(err)
        assert text.startswith(f"{path}:{n}: ")
        if field is not None:
            assert f"field '{field}'" in text
    assert [r.step for _, r in good] == list(range(len(BAD_LINES) + 1)) + [999]
    assert good[-1][0] == len(lines)  # line numbers count the blank line


def test_truncated_gzip_yields_good_lines_then_an_error(tmp_path: Path) -> None:
    data = gzip.compress(("\n".join(_good(i) for i in range(2000)) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    items = list(read_trace(str(path)))
    good = [r for r in items if isinstance(r, Record)]
    errors = [e for e in items if isinstance(e, TraceError)]
    assert len(errors) == 1 and "cannot read the file further" in errors[0].reason
    assert 0 < len(good) < 2000
    assert [r.step for r in good] == list(range(len(good)))
    assert errors[0].line == len(good) + 1


def test_missing_file_is_one_error(tmp_path: Path) -> None:
    items = list(read_trace(str(tmp_path / "nope.jsonl")))
    assert len(items) == 1 and isinstance(items[0], TraceError)
    assert items[0].line == 0 and "cannot open" in items[0].reason


# ---------------------------------------------------------------------------------------------
# validation shared with the wire decoder


@pytest.mark.parametrize("run", ["a", "team/exp-1:v2.0_x", "r" * 128])
def test_valid_run_ids(run: str) -> None:
    assert check_run_id(run) == run


@pytest.mark.parametrize("run,words", [("", "1-128"), ("r" * 129, "1-128"), ("a b", "' '"), ("é", "'é'"),
                                       (5, "string"), (None, "string")])
def test_invalid_run_ids(run: object, words: str) -> None:
    with pytest.raises(InvalidRecord) as e:
        check_run_id(run, field="hdr.run")
    assert e.value.field == "hdr.run" and words in e.value.reason


def test_check_record_limits_carry_the_prefix() -> None:
    with pytest.raises(InvalidRecord) as e:
        check_record(Record("train", "r", T0, 0, 1, {f"v{i}": 1.0 for i in range(MAX_VALUES + 1)}), "records[4].")
    assert e.value.field == "records[4].values" and str(MAX_VALUES) in e.value.reason
    with pytest.raises(InvalidRecord) as e:
        check_record(Record("train", "r", T0, 1 << 20, 1), "records[0].")
    assert e.value.field == "records[0].rank"
    with pytest.raises(InvalidRecord) as e:
        check_record(Record("train", "r", 1e12, 0, 1))
    assert e.value.field == "t"
    check_record(Record("heartbeat", "r", T0))  # step is optional for heartbeats


def test_record_equality_treats_nan_as_equal() -> None:
    a = Record("train", "r", T0, 0, 1, {"loss": math.nan})
    assert a == Record("train", "r", T0, 0, 1, {"loss": math.nan})
    assert a != Record("train", "r", T0, 0, 1, {"loss": 1.0})
    assert a != Record("train", "r", T0, 0, 2, {"loss": math.nan})
