"""Property-based fuzzing of every way bytes get into the daemon: batch decoding and its limits, the trace
reader, the HTTP API's parameters and bodies (a real server), and the config loader. Each may refuse its
input, naming the problem; none may raise anything else. Crashes found here have named tests below."""

from __future__ import annotations

import gzip
import http.client
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from monitor import wire
from monitor.daemon.app import ConfigError, Daemon, DaemonConfig, load_config_file
from monitor.daemon.detectors import DETECTORS
from monitor.daemon.ingest import kept_positions
from monitor.daemon.limits import Admission, Limits, LiveRanks, admit
from monitor.records import Record, RecordBlock, TraceError, read_trace

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = 1_700_000_000.0

names = st.text(st.characters(codec="utf-8"), min_size=0, max_size=6) | st.sampled_from(
    ["loss", "grad_norm", "lr", "tokens", "step_time_seconds", "x" * 129])
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([T0, T0 + 1.5, 0.0, -1.0, 1e11, 1e300])
ints64 = st.integers(-(2 ** 63), 2 ** 63 - 1)
kinds = st.sampled_from(["train", "eval", "probe", "system", "heartbeat", "run", "end", "bogus", ""])


@st.composite
def requests(draw: Any) -> bytes:
    """A ReportRequest with any field values, well-formed or not."""
    req = wire.ReportRequest(run=draw(st.sampled_from(["r", "run-1", "", "bad run", "x" * 129]) | names),
                             rank=draw(st.integers(0, 2 ** 32 - 1)),
                             incarnation=draw(st.sampled_from(["i", ""]) | names),
                             sequence=draw(st.integers(0, 2 ** 64 - 1)), client=draw(names))
    for _ in range(draw(st.integers(0, 6))):
        r = req.records.add(kind=draw(kinds), t=draw(floats))
        if draw(st.booleans()):
            r.step = draw(ints64)
        n = draw(st.integers(0, 4))
        r.names.extend(draw(st.lists(names, min_size=n, max_size=n)))
        r.values.extend(draw(st.lists(floats, min_size=draw(st.sampled_from([n, n, n + 1])), max_size=n + 1)))
        if draw(st.booleans()):
            r.rank = draw(st.integers(0, 2 ** 32 - 1))
        r.suite = draw(names)
        r.items.extend(draw(st.lists(floats, max_size=3)))
        r.world_size = draw(st.integers(0, 2 ** 32 - 1))
        r.meta_json = draw(st.sampled_from(["", "{}", '{"a": 1}', "[1]", "{", "[" * 3000 + "]" * 3000]) | names)
        r.status = draw(st.sampled_from(["", "completed", "failed", "weird"]))
    for _ in range(draw(st.integers(0, 3))):
        b = req.blocks.add(kind=draw(kinds), at=draw(st.integers(0, 12)))
        k = draw(st.integers(0, 3))
        b.names.extend(draw(st.lists(names, min_size=k, max_size=k)))
        n = draw(st.integers(0, 5))
        b.steps.extend(draw(st.lists(ints64, min_size=n, max_size=n)))
        b.t.extend(draw(st.lists(floats, min_size=draw(st.sampled_from([n, n + 1])), max_size=n + 1)))
        b.values.extend(draw(st.lists(floats, min_size=n * k, max_size=n * k + draw(st.integers(0, 1)))))
        if draw(st.booleans()):
            b.rank = draw(st.integers(0, 2 ** 32 - 1))
    data = req.SerializeToString()
    if data and draw(st.booleans()):  # and now and then a damaged encoding
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    return data


limits_st = st.builds(
    Limits, max_values_per_record=st.integers(1, 256), max_name_chars=st.integers(1, 128),
    max_suite_chars=st.integers(1, 128), max_ranks_per_run=st.integers(1, 4), max_live_ranks=st.just(8),
    max_series_per_rank=st.integers(1, 8), max_future_skew_seconds=st.sampled_from([0.0, 300.0]),
    max_step_jump=st.integers(1, 100), max_steps_per_second=st.sampled_from([0.0, 10.0]))


def _records(parts: list[Any]) -> int:
    return sum(len(p) if type(p) is RecordBlock else 1 for p in parts)


@FUZZ
@given(data=requests() | st.binary(max_size=200), limits=limits_st)
def test_decode_and_admit_refuse_or_keep_every_record(data: bytes, limits: Limits) -> None:
    try:
        batch = wire.decode_batch(data, max_records=50)
    except wire.InvalidBatch as e:
        assert e.field and e.reason
        return
    assert 1 <= batch.sequence <= wire.MAX_SEQUENCE
    assert batch.n_records + len(batch.rejections) == batch.total
    adm = Admission()
    kept, refused = admit(adm, batch.run, batch.parts, kept_positions(batch), limits, LiveRanks(), time.time())
    assert _records(kept) + len(refused) == batch.n_records
    assert all(rj.limit and rj.reason and rj.field.startswith("records[") for rj in refused)
    batch.parts = kept
    batch.rejections = sorted(batch.rejections + refused, key=lambda rj: rj.index)
    assert len({rj.index for rj in batch.rejections}) == len(batch.rejections)  # one reason per record
    again = wire.decode_batch(wire.reencode_kept(batch), max_bytes=1 << 30)  # what the store keeps reads back
    assert again.n_records == batch.n_records and not again.rejections
    for rec in again.records:
        assert len(rec.values) <= limits.max_values_per_record and rec.t <= time.time() + 301


# -- the trace reader ----------------------------------------------------------------------------

lines = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    st.builds(lambda d: json.dumps(d), st.dictionaries(st.sampled_from(
        ["kind", "run", "t", "rank", "step", "values", "world_size", "meta", "suite", "items", "status"]),
        st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), floats.filter(math.isfinite),
                  st.text(max_size=8), st.lists(st.integers(), max_size=3),
                  st.dictionaries(st.text(max_size=130), st.integers() | st.text(max_size=3), max_size=3)),
        max_size=11)),
    st.sampled_from(['{"kind":"train","run":"r","t":1e300,"step":1}', '[' * 3000 + ']' * 3000,
                     '{"kind":"train","run":"r","t":1.7e9,"step":1e400}', '{"values":' * 3000]),
)


@FUZZ
@given(content=st.lists(lines, max_size=8), gz=st.booleans(), cut=st.booleans())
def test_read_trace_yields_records_or_errors_and_never_raises(tmp_path_factory: Any, content: list[str],
                                                              gz: bool, cut: bool) -> None:
    raw = "\n".join(content).encode("utf-8", "surrogatepass")
    if gz:
        raw = gzip.compress(raw)
    if cut and len(raw) > 4:
        raw = raw[:len(raw) // 2]
    path = tmp_path_factory.mktemp("trace") / ("t.jsonl.gz" if gz else "t.jsonl")
    path.write_bytes(raw)
    for item in read_trace(str(path)):
        assert isinstance(item, (Record, TraceError))


# -- the HTTP API on a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: Any) -> Iterator[Daemon]:
    d = Daemon(DaemonConfig(grpc_port=0, http_port=0, db=str(tmp_path_factory.mktemp("fuzz") / "f.db"),
                            max_silences=20)).start()
    yield d
    d.close(timeout=1.0)


def _request(d: Daemon, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.http_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


url_text = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#"), max_size=40) | \
    st.sampled_from(["%00", "%ff%fe", "%2e%2e/", "9" * 5000, "-1", "1e9", "%", "?state=%ZZ"])


@FUZZ
@given(base=st.sampled_from(["/api/v1/runs/", "/api/v1/alerts?run=", "/api/v1/alerts?state=", "/api/v1/silences/",
                             "/api/v1/silences?state=", "/api/v1/", "/", "/metrics?", "/healthz/"]), tail=url_text,
       method=st.sampled_from(["GET", "HEAD", "DELETE", "POST"]))
def test_api_parameters_never_give_a_server_error(api: Daemon, base: str, tail: str, method: str) -> None:
    status, body = _request(api, method, base + tail, b"{}" if method == "POST" else None)
    assert status in (200, 400, 404, 405, 413), (status, body[:200])
    if method != "HEAD" and base not in ("/metrics?",) and status != 200:
        assert "error" in json.loads(body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=15)
silence_bodies = st.dictionaries(st.sampled_from(["run", "alert", "duration_seconds", "ends_at", "comment",
                                                  "created_by", "other"]), json_values | st.sampled_from(
    ["*", "r", "NonFinite", 60, 1e12, -1, "x" * 2000]), max_size=6)


@FUZZ
@given(body=silence_bodies | json_values)
def test_silence_bodies_are_created_or_refused_by_name(api: Daemon, body: Any) -> None:
    raw = json.dumps(body, allow_nan=True).encode()
    assume(len(raw) < 60_000)
    status, out = _request(api, "POST", "/api/v1/silences", raw)
    assert status in (200, 400), (status, out[:200])
    res = json.loads(out)
    if status == 400:
        assert res["error"].split(":")[0] in ("body", "run", "alert", "duration_seconds", "ends_at", "comment",
                                              "created_by", "silences") or "unknown field" in res["error"], res
    else:
        _request(api, "DELETE", f"/api/v1/silences/{res['id']}")  # keep under max_silences


# -- the config loader ---------------------------------------------------------------------------

config_keys = st.sampled_from(sorted(DaemonConfig.__dataclass_fields__) + ["daemon", "nope"])
detector_tables = st.sampled_from(sorted(DETECTORS)).flatmap(lambda name: st.fixed_dictionaries({name: st.dictionaries(
    st.sampled_from(sorted(DETECTORS[name].defaults) + ["enabled", "severity", "nope"]), json_values, max_size=3)}))


@FUZZ
@given(section=st.dictionaries(config_keys, json_values, max_size=5), nested=st.booleans(),
       detectors=st.none() | detector_tables)
def test_config_from_any_mapping_is_valid_or_a_config_error(section: dict[str, Any], nested: bool,
                                                            detectors: dict[str, Any] | None) -> None:
    data = {"daemon": section} if nested else section
    if detectors is not None:
        data = {**data, "detectors": detectors}
    try:
        DaemonConfig.from_mapping(data, "fuzz.toml").validate()
    except ConfigError as e:
        assert str(e)


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode) | st.sampled_from(
    [b"[daemon]\nmax_live_runs = 5\n", b"a = " + b"[" * 5000 + b"]" * 5000, b"\xff\xfe[daemon]", b"x = 1\nx = 2\n"]))
def test_config_files_load_or_give_a_config_error(tmp_path_factory: Any, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "t.toml"
    path.write_bytes(raw)
    try:
        data = load_config_file(str(path))
    except ConfigError as e:
        assert str(e).startswith("--config: ")
        return
    try:
        DaemonConfig.from_mapping(data, str(path)).validate()
    except ConfigError:
        pass


# -- crashes the fuzzers found, kept as named tests ------------------------------------------------


def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_bytes(b"\xff\xfe[daemon]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config_file(str(tmp_path / "c.toml"))


def test_daemon_key_that_is_not_a_table_is_named() -> None:
    with pytest.raises(ConfigError, match=r"daemon: expected a table"):
        DaemonConfig.from_mapping({"daemon": 5})


def test_db_and_host_must_be_strings() -> None:
    with pytest.raises(ConfigError, match="db: expected a string"):
        DaemonConfig(db=5).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="host: expected a string"):
        DaemonConfig(host=None).validate()  # type: ignore[arg-type]


def test_detectors_that_are_not_a_table_are_named() -> None:
    with pytest.raises(ConfigError, match="detectors: expected a table"):
        DaemonConfig.from_mapping({"detectors": None}).validate()


def test_a_detector_setting_of_the_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"detectors.RankLost.lost_after_s: expected a number \(the default is"):
        DaemonConfig.from_mapping({"detectors": {"RankLost": {"lost_after_s": ["30"]}}}).validate()
    with pytest.raises(ConfigError, match=r"detectors.NonFinite.resolve_after_steps: expected a whole number"):
        DaemonConfig.from_mapping({"detectors": {"NonFinite": {"resolve_after_steps": float("-inf")}}}).validate()


def test_detector_state_of_the_wrong_shape_restores_empty() -> None:
    from monitor.daemon.detectors.loss_divergence import LossDivergence

    det = LossDivergence()
    det.restore({"level": 1})
    assert det.state() is not None
