"""The committed generated code under monitor/_pb is what `make proto` makes from proto/ today."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from monitor import wire
from monitor._pb import generate as gen
from monitor._pb.trainguard.v1 import telemetry_pb2 as pb

COMMITTED = Path(gen.ROOT) / "monitor" / "_pb"
GENERATED_FILES = ("telemetry_pb2.py", "telemetry_pb2.pyi")


def test_committed_code_matches_a_fresh_regeneration(tmp_path: Path) -> None:
    gen.generate(str(tmp_path))
    for name in GENERATED_FILES:
        fresh = (tmp_path / "trainguard" / "v1" / name).read_bytes()
        committed = (COMMITTED / "trainguard" / "v1" / name).read_bytes()
        assert fresh == committed, f"monitor/_pb/trainguard/v1/{name} is stale: run `make proto` and commit it"
    # the packages protoc's output needs exist in the committed tree too
    for pkg in ("", "trainguard", "trainguard/v1"):
        assert (tmp_path / pkg / "__init__.py").exists()
        assert (COMMITTED / pkg / "__init__.py").exists()
    fresh_py = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*_pb2.py*"))
    committed_py = sorted(p.relative_to(COMMITTED).as_posix() for p in COMMITTED.rglob("*_pb2.py*"))
    assert fresh_py == committed_py


def test_the_comparison_notices_a_changed_proto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prove that the test above would fail on a proto edited without regenerating.
    proto_copy = tmp_path / "proto"
    shutil.copytree(gen.PROTO_DIR, proto_copy)
    src = proto_copy / "trainguard" / "v1" / "telemetry.proto"
    text = src.read_text()
    assert "string client = 6;" in text
    src.write_text(text.replace("string client = 6;", "string client = 6;\n  string extra_field = 99;"))
    monkeypatch.setattr(gen, "PROTO_DIR", str(proto_copy))
    out = tmp_path / "out"
    gen.generate(str(out))
    fresh = (out / "trainguard" / "v1" / "telemetry_pb2.py").read_bytes()
    assert fresh != (COMMITTED / "trainguard" / "v1" / "telemetry_pb2.py").read_bytes()
    assert b"extra_field" in (out / "trainguard" / "v1" / "telemetry_pb2.pyi").read_bytes()


def test_service_and_method_names_match_the_wire_constants() -> None:
    svc = pb.DESCRIPTOR.services_by_name["Telemetry"]
    assert svc.full_name == wire.SERVICE == "trainguard.v1.Telemetry"
    method = svc.methods_by_name["Report"]
    assert f"/{svc.full_name}/{method.name}" == wire.REPORT_METHOD
    assert method.input_type.full_name == "trainguard.v1.ReportRequest"
    assert method.output_type.full_name == "trainguard.v1.ReportResponse"


def test_lenient_twin_has_the_same_fields_with_text_as_bytes() -> None:
    # The twin must read exactly the bytes ReportRequest reads; a field added to the proto
    # appears in both because the twin is built from the generated descriptor.
    twin = wire._LenientRequest.DESCRIPTOR
    for strict_msg, twin_msg in ((pb.ReportRequest.DESCRIPTOR, twin),
                                 (pb.Record.DESCRIPTOR, twin.fields_by_name["records"].message_type)):
        strict = {f.number: f for f in strict_msg.fields}
        lenient = {f.number: f for f in twin_msg.fields}
        assert strict.keys() == lenient.keys()
        for num, f in strict.items():
            g = lenient[num]
            assert g.name == f.name and g.is_repeated == f.is_repeated and g.has_presence == f.has_presence
            if f.type == f.TYPE_STRING:
                assert g.type == g.TYPE_BYTES
            else:
                assert g.type == f.type


def test_record_step_and_rank_track_presence() -> None:
    # step 0 and "no step" must differ on the wire (heartbeats and system records may omit it).
    r = pb.Record(kind="train", t=1.0)
    assert not r.HasField("step") and not r.HasField("rank")
    r.step = 0
    r.rank = 0
    assert r.HasField("step") and r.HasField("rank")
    back = pb.Record.FromString(r.SerializeToString())
    assert back.HasField("step") and back.step == 0
