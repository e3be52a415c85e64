"""Records <-> protobuf. The only module that imports the generated code."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from monitor._pb.trainguard.v1 import telemetry_pb2 as pb
from monitor.records import (
    KINDS,
    MAX_META_BYTES,
    MAX_RANK,
    MAX_STEP,
    MAX_VALUES,
    STEP_REQUIRED,
    InvalidRecord,
    Record,
    check_name,
    check_record,
    check_run_id,
)

SERVICE = "trainguard.v1.Telemetry"
REPORT_METHOD = f"/{SERVICE}/Report"
MAX_BATCH_BYTES = 4 * 1024 * 1024  # the contract: a batch is at most 4 MiB
MAX_REJECTIONS_REPORTED = 16
MAX_INCARNATION_CHARS = 64

ReportRequest = pb.ReportRequest
ReportResponse = pb.ReportResponse


class InvalidBatch(ValueError):
    """The whole batch is unusable (bad header, not a protobuf, too large)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass
class Rejection:
    """One refused record: its position, the field at fault and why."""

    index: int
    field: str
    reason: str


@dataclass
class Batch:
    """A decoded ReportRequest: the header and the records that passed validation."""

    run: str
    rank: int
    incarnation: str
    sequence: int
    client: str
    records: list[Record]
    rejections: list[Rejection] = field(default_factory=list)
    total: int = 0
    lenient: bool = False  # decoded with the byte-string fallback (some text was not UTF-8)

    @property
    def t_range(self) -> tuple[float, float]:
        """Smallest and largest event time of the kept records (0, 0 when there are none)."""
        if not self.records:
            return (0.0, 0.0)
        ts = [r.t for r in self.records]
        return (min(ts), max(ts))


# ---------------------------------------------------------------------------------------------
# Encoding (client and replay)


def _to_float(v: Any) -> float:
    # float() works for Python numbers, numpy scalars and 0-d tensors alike.
    return float(v)


def encode_records(req: Any, records: Iterable[Record], batch_rank: int) -> int:
    """Append records to a ReportRequest; return how many values could not be turned into numbers."""
    bad = 0
    add = req.records.add
    for rec in records:
        r = add()
        r.kind = rec.kind
        r.t = rec.t
        if rec.step is not None:
            r.step = rec.step
        if rec.rank != batch_rank:
            r.rank = rec.rank
        vals = rec.values
        if vals:
            try:
                r.names.extend(vals.keys())
                r.values.extend([_to_float(v) for v in vals.values()])
            except (TypeError, ValueError, RuntimeError):
                del r.names[:]
                del r.values[:]
                for k, v in vals.items():
                    try:
                        fv = _to_float(v)
                    except (TypeError, ValueError, RuntimeError):
                        bad += 1
                        continue
                    r.names.append(k)
                    r.values.append(fv)
        if rec.kind == "run":
            r.world_size = rec.world_size or 0
            if rec.meta is not None:
                r.meta_json = json.dumps(rec.meta, default=str, allow_nan=True)
        elif rec.kind == "probe":
            if rec.suite:
                r.suite = rec.suite
            if rec.items is not None:
                r.items.extend([_to_float(x) for x in rec.items])
        elif rec.kind == "end" and rec.status:
            r.status = rec.status
    return bad


def encode_batch(run: str, rank: int, incarnation: str, sequence: int, records: Sequence[Record],
                 client: str = "") -> bytes:
    """Serialize one batch."""
    req = pb.ReportRequest(run=run, rank=rank, incarnation=incarnation, sequence=sequence, client=client)
    encode_records(req, records, rank)
    return req.SerializeToString()


def decode_response(data: bytes) -> Any:
    """Parse a ReportResponse."""
    return pb.ReportResponse.FromString(data)


def encode_response(ack: int, accepted: int, rejections: Sequence[Rejection], duplicate: bool = False) -> bytes:
    """Serialize a ReportResponse with at most the first few rejection reasons."""
    resp = pb.ReportResponse(ack_sequence=ack, accepted=accepted, rejected=len(rejections), duplicate=duplicate)
    for rj in rejections[:MAX_REJECTIONS_REPORTED]:
        resp.rejections.add(index=rj.index, field=rj.field, reason=rj.reason)
    return resp.SerializeToString()


# ---------------------------------------------------------------------------------------------
# Decoding (daemon)


def _twin_request_class(package: str, records_as_bytes: bool) -> Any:
    """A twin of ReportRequest with the same field numbers and wire types, so it reads the same bytes.

    Lenient twin (records_as_bytes=False): every text field is bytes. proto3 refuses a whole message
    when one string is not UTF-8; with the twin each record's text is checked on its own, so the
    good records of the batch are kept and the bad one is named.

    Raw twin (records_as_bytes=True): each record stays its own unparsed encoding. The header is
    parsed and checked as usual; each record can then be matched against a known layout or parsed alone.
    """
    fdp = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = f"trainguard/v1/telemetry_{package}.proto"
    fdp.package = f"trainguard.v1.{package}"
    del fdp.service[:]
    wanted = ("ReportRequest",) if records_as_bytes else ("ReportRequest", "Record")
    keep = [m for m in fdp.message_type if m.name in wanted]
    del fdp.message_type[:]
    for m in keep:
        for f in m.field:
            if f.type_name == ".trainguard.v1.Record":
                if records_as_bytes:
                    f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                    f.ClearField("type_name")
                else:
                    f.type_name = f".trainguard.v1.{package}.Record"
            elif f.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING and not records_as_bytes:
                f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
        fdp.message_type.add().CopyFrom(m)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"trainguard.v1.{package}.ReportRequest"))


_LenientRequest = _twin_request_class("lenient", records_as_bytes=False)
_RawRequest = _twin_request_class("raw", records_as_bytes=True)


def _text(v: Any, field: str) -> str:
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRecord(field, f"not valid UTF-8 (byte {e.start}: {v[e.start:e.start + 1]!r})") from None
    return v


def _header_text(v: Any, field: str) -> str:
    try:
        return _text(v, field)
    except InvalidRecord as e:
        raise InvalidBatch(e.field, e.reason) from None


class _NameCache:
    """Value names already seen valid. Names repeat every step, so each is checked once."""

    def __init__(self, limit: int = 100_000):
        self.ok: set[str] = set()
        self.limit = limit

    def check(self, name: str, field: str) -> None:
        if name in self.ok:
            return
        check_name(name, field)
        if len(self.ok) < self.limit:
            self.ok.add(name)


_names = _NameCache()


def _decode_record(r: Any, i: int, batch_rank: int, run: str, lenient: bool) -> Record:
    prefix = f"records[{i}]."
    kind = _text(r.kind, prefix + "kind") if lenient else r.kind
    if kind not in KINDS:
        raise InvalidRecord(prefix + "kind", f"unknown kind {kind!r}; expected one of {', '.join(sorted(KINDS))}")
    names = r.names
    values = r.values
    n = len(names)
    if n != len(values):
        raise InvalidRecord(prefix + "values", f"{n} names but {len(values)} values; they must pair up")
    if n > MAX_VALUES:
        raise InvalidRecord(prefix + "values", f"{n} values, the limit is {MAX_VALUES} per record")
    if lenient:
        names = [_text(nm, f"{prefix}names[{j}]") for j, nm in enumerate(names)]
    check = _names.check
    for j, nm in enumerate(names):
        check(nm, f"{prefix}names[{j}]")
    rank = r.rank if r.HasField("rank") else batch_rank
    step = r.step if r.HasField("step") else None
    rec = Record(kind, run, r.t, rank, step, dict(zip(names, values)))
    if kind == "run":
        rec.world_size = r.world_size
        meta_json = _text(r.meta_json, prefix + "meta_json") if lenient else r.meta_json
        if meta_json:
            if len(meta_json) > MAX_META_BYTES:
                raise InvalidRecord(prefix + "meta_json", f"{len(meta_json)} bytes, the limit is {MAX_META_BYTES}")
            try:
                meta = json.loads(meta_json)
            except ValueError as e:
                raise InvalidRecord(prefix + "meta_json", f"not valid JSON ({e})") from None
            if not isinstance(meta, dict):
                raise InvalidRecord(prefix + "meta_json", "must be a JSON object")
            rec.meta = meta
    elif kind == "probe":
        rec.suite = _text(r.suite, prefix + "suite") if lenient else r.suite
        rec.items = list(r.items) if len(r.items) else None
    elif kind == "end":
        status = _text(r.status, prefix + "status") if lenient else r.status
        rec.status = status or None
    check_record(rec, prefix)
    return rec


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varint_value(b: bytes) -> int:
    n = 0
    shift = 0
    for byte in b:
        n |= (byte & 0x7F) << shift
        shift += 7
    return n


# Kinds whose records carry nothing beyond kind, step, t, names and values. Their lengths differ,
# so the kind's length byte (the second byte of a record) picks the candidate layouts.
_SHAPE_KINDS = ("train", "eval", "system", "heartbeat")
_SHAPES_PER_KIND = 8
_unpack_t = struct.Struct("<d").unpack


class _Shape:
    """One record layout: a kind and its value names, matched whole by one anchored expression.

    Protobuf encoders write fields in field-number order: kind, step (optional), t, each name,
    then the values packed. With the names fixed, all of that is a constant except the step, the
    time and the values, so the expression matches the whole record in C and captures just those.
    A record with any other field, another order, unpacked values or other names does not match.
    """

    __slots__ = ("match", "unpack", "names", "kind")

    def __init__(self, kind: str, names: tuple[str, ...]):
        kb = kind.encode()
        n = len(names)
        head = re.escape(b"\x0a" + _varint(len(kb)) + kb)
        body = re.escape(b"".join(b"\x22" + _varint(len(nb)) + nb for nb in (x.encode() for x in names)))
        vals = re.escape(b"\x2a" + _varint(8 * n)) + b"(.{%d})" % (8 * n) if n else b"()"
        # At most 9 step bytes: 0 <= step < 2^63. A negative step (10 bytes) goes the slow way.
        self.match = re.compile(head + rb"(?:\x10([\x80-\xff]{0,8}[\x00-\x7f]))?\x19(.{8})" + body + vals,
                                re.S).fullmatch
        self.unpack = struct.Struct(f"<{n}d").unpack
        self.names = names
        self.kind = kind


class _Shapes:
    """Layouts learnt from records the slow way decoded; a few per kind, most recently used first.

    A layout is learnt on its third sighting, so that a client whose names change every record
    does not pay to compile an expression per record. Lists are replaced, never changed in place,
    so readers on other threads always see a whole list.
    """

    def __init__(self) -> None:
        self.by_len: dict[int, list[_Shape]] = {}
        self._seen: dict[tuple[str, tuple[str, ...]], int] = {}

    def learn(self, r: Any, rec: Record) -> None:
        """Count the layout of a record decoded the slow way; remember it once it recurs."""
        kind = rec.kind
        if kind not in _SHAPE_KINDS or r.HasField("rank") or r.world_size or r.suite or r.meta_json \
                or r.status or len(r.items):
            return
        key = (kind, tuple(r.names))
        seen = self._seen
        n = seen.get(key, 0) + 1
        if n < 3:
            if len(seen) >= 4096:
                seen.clear()
            seen[key] = n
            return
        seen.pop(key, None)
        k = len(kind)
        shapes = self.by_len.get(k, [])
        if any(s.kind == kind and s.names == key[1] for s in shapes):
            return
        self.by_len[k] = [_Shape(kind, key[1])] + shapes[:_SHAPES_PER_KIND - 1]

    def promote(self, k: int, shape: _Shape) -> None:
        """Move a layout to the front of its kind's list."""
        shapes = self.by_len.get(k, [])
        self.by_len[k] = [shape] + [s for s in shapes if s is not shape]


_shapes = _Shapes()


def decode_batch(data: bytes, max_bytes: int = MAX_BATCH_BYTES) -> Batch:
    """Parse and validate one batch; raise InvalidBatch if the batch as a whole is unusable."""
    if len(data) > max_bytes:
        raise InvalidBatch("batch", f"{len(data)} bytes, the limit is {max_bytes} bytes (4 MiB); send smaller batches")
    # The common case, fast: a well-formed batch with a good header. Records in a learnt layout
    # are decoded straight from their bytes, others are parsed one at a time. Anything unusual
    # (not protobuf, text that is not UTF-8, a bad header) goes the full way, which gives the same
    # answer and the same error messages.
    try:
        req = _RawRequest.FromString(data)
    except DecodeError:
        return _decode_batch_full(data)
    run = req.run
    rank = req.rank
    incarnation = req.incarnation
    sequence = req.sequence
    try:
        check_run_id(run)
    except InvalidRecord:
        return _decode_batch_full(data)
    if rank >= MAX_RANK or not incarnation or len(incarnation) > MAX_INCARNATION_CHARS or sequence == 0:
        return _decode_batch_full(data)
    raws = req.records
    records: list[Record] = []
    rejections: list[Rejection] = []
    append = records.append
    by_len = _shapes.by_len
    for i, raw in enumerate(raws):
        rec = None
        shapes = by_len.get(raw[1]) if len(raw) > 8 and raw[0] == 0x0A else None
        if shapes:
            for shape in shapes:
                m = shape.match(raw)
                if m is None:
                    continue
                sb, tb, vb = m.groups()
                t = _unpack_t(tb)[0]
                if sb is None:
                    step = None
                elif len(sb) == 1:
                    step = sb[0]
                elif len(sb) == 2:
                    step = (sb[0] & 0x7F) | (sb[1] << 7)
                else:
                    step = _varint_value(sb)
                kind = shape.kind
                # Out-of-range values go the slow way, which names the field.
                if 0.0 < t < 1e11 and (step <= MAX_STEP if step is not None else kind not in STEP_REQUIRED):
                    rec = Record(kind, run, t, rank, step, dict(zip(shape.names, shape.unpack(vb))))
                    if shape is not shapes[0]:
                        _shapes.promote(raw[1], shape)
                break
        if rec is None:
            try:
                r = pb.Record.FromString(raw)
            except DecodeError:
                return _decode_batch_full(data)
            try:
                rec = _decode_record(r, i, rank, run, False)
            except InvalidRecord as e:
                rejections.append(Rejection(i, e.field, e.reason))
                continue
            _shapes.learn(r, rec)
        append(rec)
    return Batch(run, rank, incarnation, sequence, req.client[:128], records, rejections, len(raws), False)


def _decode_batch_full(data: bytes) -> Batch:
    """decode_batch for any input: the whole message parsed at once, with the lenient fallback."""
    lenient = False
    try:
        req = pb.ReportRequest.FromString(data)
    except DecodeError:
        try:
            req = _LenientRequest.FromString(data)
        except DecodeError as e:
            raise InvalidBatch("batch", f"not a valid trainguard.v1.ReportRequest protobuf ({e})") from None
        lenient = True
    run = _header_text(req.run, "run")
    try:
        check_run_id(run)
    except InvalidRecord as e:
        raise InvalidBatch(e.field, e.reason) from None
    rank = req.rank
    if rank >= MAX_RANK:
        raise InvalidBatch("rank", f"must be < {MAX_RANK}, got {rank}")
    incarnation = _header_text(req.incarnation, "incarnation")
    if not incarnation or len(incarnation) > MAX_INCARNATION_CHARS:
        raise InvalidBatch("incarnation", f"must be 1-{MAX_INCARNATION_CHARS} characters, got {len(incarnation)}")
    if req.sequence == 0:
        raise InvalidBatch("sequence", "must be >= 1")
    client = _header_text(req.client, "client")[:128]
    records: list[Record] = []
    rejections: list[Rejection] = []
    for i, r in enumerate(req.records):
        try:
            records.append(_decode_record(r, i, rank, run, lenient))
        except InvalidRecord as e:
            rejections.append(Rejection(i, e.field, e.reason))
    return Batch(run, rank, incarnation, req.sequence, client, records, rejections, len(req.records), lenient)


def reencode_kept(batch: Batch) -> bytes:
    """Serialize only the kept records of a batch (used when some records were refused)."""
    return encode_batch(batch.run, batch.rank, batch.incarnation, batch.sequence, batch.records, batch.client)

