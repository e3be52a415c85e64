"""Records <-> protobuf. The only module that imports the generated code."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from operator import itemgetter
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
    RecordBlock,
    check_name,
    check_record,
    check_run_id,
)

SERVICE = "trainguard.v1.Telemetry"
REPORT_METHOD = f"/{SERVICE}/Report"
MAX_BATCH_BYTES = 4 * 1024 * 1024  # the contract: a batch is at most 4 MiB
MAX_REJECTIONS_REPORTED = 16
MAX_INCARNATION_CHARS = 64
# Sequence numbers are stored as SQLite integers, which are signed 64-bit: 2^63 and above cannot be kept.
MAX_SEQUENCE = (1 << 63) - 1

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
    limit: str | None = None  # the daemon setting that refused it, when a configurable limit did


@dataclass
class Batch:
    """A decoded ReportRequest: the header and the records that passed validation.

    `parts` holds them in the batch's order, each a Record or a RecordBlock of many records.
    """

    run: str
    rank: int
    incarnation: str
    sequence: int
    client: str
    parts: list[Any]
    rejections: list[Rejection] = field(default_factory=list)
    total: int = 0
    lenient: bool = False  # decoded with the byte-string fallback (some text was not UTF-8)

    @property
    def n_records(self) -> int:
        """How many records were kept."""
        return sum(len(p) if type(p) is RecordBlock else 1 for p in self.parts)

    @property
    def records(self) -> list[Record]:
        """The kept records one by one, in order (blocks expanded)."""
        out: list[Record] = []
        for p in self.parts:
            if type(p) is RecordBlock:
                out.extend(p.records())
            else:
                out.append(p)
        return out

    @property
    def t_range(self) -> tuple[float, float]:
        """Smallest and largest event time of the kept records (0, 0 when there are none)."""
        lo, hi = math.inf, -math.inf
        for p in self.parts:
            if type(p) is RecordBlock:
                lo, hi = min(lo, min(p.ts)), max(hi, max(p.ts))
            else:
                lo, hi = min(lo, p.t), max(hi, p.t)
        return (lo, hi) if hi >= lo else (0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# Encoding (client and replay)


def _to_float(v: Any) -> float:
    # float() works for Python numbers, numpy scalars and 0-d tensors alike.
    return float(v)


# Kinds that may travel as blocks, and the shortest run of records worth one.
BLOCK_KINDS = frozenset(("train", "eval", "system", "heartbeat"))
BLOCK_MIN = 4


def _block_key(rec: Record) -> Any:
    if rec.step is None or rec.kind not in BLOCK_KINDS:
        return None
    return (rec.kind, rec.rank, tuple(rec.values))


def encode_records(req: Any, records: Iterable[Record], batch_rank: int, blocks: bool = True) -> int:
    """Append records to a ReportRequest; return how many values could not be turned into numbers.

    Runs of at least BLOCK_MIN records that share kind, rank and value names go as one Block
    (unless `blocks` is False: then every record goes on its own).
    """
    records = records if isinstance(records, list) else list(records)
    keys = [_block_key(r) for r in records] if blocks else [None] * len(records)
    bad = 0
    i, n = 0, len(records)
    while i < n:
        key = keys[i]
        j = i + 1
        if key is not None:
            while j < n and keys[j] == key:
                j += 1
        if j - i < BLOCK_MIN or not _encode_block(req, records, i, j, batch_rank):
            for rec in records[i:j]:
                bad += _encode_record(req, rec, batch_rank)
        i = j
    return bad


def _encode_block(req: Any, records: list[Record], i: int, j: int, batch_rank: int) -> bool:
    """Append records[i:j] as one block; False (and nothing appended) if a value is not a number."""
    run = records[i:j]
    try:
        values = [_to_float(v) for r in run for v in r.values.values()]
        steps = [int(r.step) for r in run]  # type: ignore[arg-type]
        b = req.blocks.add()
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return False
    try:
        b.steps.extend(steps)
        b.t.extend([r.t for r in run])
        b.values.extend(values)
    except (TypeError, ValueError, OverflowError):
        del req.blocks[-1]
        return False
    first = run[0]
    b.kind = first.kind
    b.names.extend(first.values)
    b.at = i
    if first.rank != batch_rank:
        b.rank = first.rank
    return True


def _encode_record(req: Any, rec: Record, batch_rank: int) -> int:
    """Append one record; return how many of its values could not be turned into numbers."""
    bad = 0
    r = req.records.add()
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
                 client: str = "", blocks: bool = True) -> bytes:
    """Serialize one batch."""
    req = pb.ReportRequest(run=run, rank=rank, incarnation=incarnation, sequence=sequence, client=client)
    encode_records(req, list(records), rank, blocks)
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
    wanted = ("ReportRequest", "Block") if records_as_bytes else ("ReportRequest", "Record", "Block")
    keep = [m for m in fdp.message_type if m.name in wanted]
    del fdp.message_type[:]
    for m in keep:
        for f in m.field:
            if f.type_name == ".trainguard.v1.Record" and records_as_bytes:
                f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                f.ClearField("type_name")
            elif f.type_name.startswith(".trainguard.v1."):
                f.type_name = f".trainguard.v1.{package}.{f.type_name.rsplit('.', 1)[1]}"
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
            except RecursionError:
                raise InvalidRecord(prefix + "meta_json", "JSON nested too deeply") from None
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


def _layout(blocks: Sequence[Any], n_loose: int) -> list[int]:
    """The batch position of each loose record, given where the blocks sit; InvalidBatch if they clash."""
    spans = sorted((b.at, len(b.steps), i) for i, b in enumerate(blocks))
    positions: list[int] = []
    pos = 0
    for at, n, i in spans:
        if at < pos:
            raise InvalidBatch(f"blocks[{i}].at", f"position {at} overlaps the records before it (next free: {pos})")
        gap = at - pos
        if len(positions) + gap > n_loose:
            raise InvalidBatch(f"blocks[{i}].at", f"position {at} leaves a gap that the batch's "
                                                  f"{n_loose} single records cannot fill")
        positions.extend(range(pos, at))
        pos = at + n
    positions.extend(range(pos, pos + n_loose - len(positions)))
    return positions


def _decode_block(b: Any, bi: int, batch_rank: int, run: str, lenient: bool) -> tuple[list[Any], list[Rejection]]:
    """One block: ([RecordBlock], []) when all of it is good, else its good records and the rejections."""
    prefix = f"blocks[{bi}]."
    n = len(b.steps)
    at = b.at

    def refuse(field: str, reason: str) -> tuple[list[Any], list[Rejection]]:
        return [], [Rejection(at + j, prefix + field, reason) for j in range(n)]

    try:
        kind = _text(b.kind, prefix + "kind") if lenient else b.kind
        names = [_text(nm, f"{prefix}names[{j}]") for j, nm in enumerate(b.names)] if lenient else list(b.names)
    except InvalidRecord as e:
        return refuse(e.field[len(prefix):], e.reason)
    if not n:
        return [], []
    if kind not in BLOCK_KINDS:
        return refuse("kind", f"{kind!r} cannot travel as a block; blocks carry {', '.join(sorted(BLOCK_KINDS))}")
    k = len(names)
    if len(b.t) != n:
        return refuse("t", f"{len(b.t)} times for {n} steps; there must be one per record")
    if len(b.values) != n * k:
        return refuse("values", f"{len(b.values)} values for {n} records x {k} names")
    if k > MAX_VALUES:
        return refuse("names", f"{k} names, the limit is {MAX_VALUES} per record")
    if len(set(names)) != k:
        return refuse("names", "a name appears twice; each record's names must be distinct")
    for j, nm in enumerate(names):
        try:
            _names.check(nm, f"names[{j}]")
        except InvalidRecord as e:
            return refuse(e.field, e.reason)
    rank = b.rank if b.HasField("rank") else batch_rank
    steps, ts = list(b.steps), list(b.t)
    block = RecordBlock(kind, run, rank, tuple(names), steps, ts, list(b.values), at)
    tsum = sum(ts)
    # The per-record rules of check_record, a column at a time (NaN fails every comparison).
    if rank < MAX_RANK and min(steps) >= 0 and max(steps) <= MAX_STEP and tsum == tsum \
            and min(ts) > 0.0 and max(ts) < 1e11:
        return [block], []
    good: list[Any] = []
    rejections: list[Rejection] = []
    for j, rec in enumerate(block.records()):
        try:
            check_record(rec, f"{prefix}[{j}].")
        except InvalidRecord as e:
            rejections.append(Rejection(at + j, e.field, e.reason))
            continue
        good.append(rec)
    return good, rejections


def _assemble(loose: list[tuple[int, Record]], blocks: list[tuple[int, list[Any]]]) -> list[Any]:
    """Records and blocks back in the batch's order."""
    placed = [(pos, 0, [rec]) for pos, rec in loose] + [(at, 1, parts) for at, parts in blocks]
    placed.sort(key=itemgetter(0, 1))
    return [x for _, _, parts in placed for x in parts]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def _check_count(n: int, max_records: int | None) -> None:
    if max_records is not None and n > max_records:
        raise InvalidBatch("records", f"{n} records in one batch, the limit is {max_records} "
                                      "(max_records_per_batch); send smaller batches")


def decode_batch(data: bytes, max_bytes: int = MAX_BATCH_BYTES, max_records: int | None = None) -> Batch:
    """Parse and validate one batch; raise InvalidBatch if the batch as a whole is unusable.

    `max_records` bounds the records of one batch (blocks count each record they stand for); it is
    checked before any record is decoded, so an oversized batch costs no more than its header.
    """
    if len(data) > max_bytes:
        raise InvalidBatch("batch", f"{len(data)} bytes, the limit is {max_bytes} bytes ({_mib(max_bytes)}); "
                                    "send smaller batches")
    # The common case, fast: a well-formed batch with a good header. Records in a learnt layout
    # are decoded straight from their bytes, others are parsed one at a time. Anything unusual
    # (not protobuf, text that is not UTF-8, a bad header) goes the full way, which gives the same
    # answer and the same error messages.
    try:
        req = _RawRequest.FromString(data)
    except DecodeError:
        return _decode_batch_full(data, max_records)
    run = req.run
    rank = req.rank
    incarnation = req.incarnation
    sequence = req.sequence
    try:
        check_run_id(run)
    except InvalidRecord:
        return _decode_batch_full(data, max_records)
    if rank >= MAX_RANK or not incarnation or len(incarnation) > MAX_INCARNATION_CHARS or sequence == 0 \
            or sequence > MAX_SEQUENCE:
        return _decode_batch_full(data, max_records)
    raws = req.records
    blocks = req.blocks
    if max_records is not None:
        _check_count(len(raws) + sum(len(b.steps) for b in blocks), max_records)
    positions = _layout(blocks, len(raws)) if blocks else None
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
                return _decode_batch_full(data, max_records)
            try:
                rec = _decode_record(r, i, rank, run, False)
            except InvalidRecord as e:
                rejections.append(Rejection(positions[i] if positions else i, e.field, e.reason))
                continue
            _shapes.learn(r, rec)
        append(rec)
    if positions is None:
        return Batch(run, rank, incarnation, sequence, req.client[:128], records, rejections, len(raws), False)
    return _with_blocks(req, run, rank, incarnation, sequence, req.client[:128], records, rejections,
                        positions, len(raws), False)


def _with_blocks(req: Any, run: str, rank: int, incarnation: str, sequence: int, client: str,
                 records: list[Record], rejections: list[Rejection], positions: list[int], n_loose: int,
                 lenient: bool) -> Batch:
    """Finish a batch that has blocks: decode them and put everything back in order."""
    # Rejected loose records left no entry in `records`: pair the kept ones with their positions.
    refused = {rj.index for rj in rejections}
    kept_pos = [pos for pos in positions if pos not in refused]
    placed_blocks = []
    total = n_loose
    for bi, b in enumerate(req.blocks):
        parts, rjs = _decode_block(b, bi, rank, run, lenient)
        placed_blocks.append((b.at, parts))
        rejections.extend(rjs)
        total += len(b.steps)
    rejections.sort(key=lambda rj: rj.index)
    parts = _assemble(list(zip(kept_pos, records)), placed_blocks)
    return Batch(run, rank, incarnation, sequence, client, parts, rejections, total, lenient)


def _decode_batch_full(data: bytes, max_records: int | None = None) -> Batch:
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
    if req.sequence > MAX_SEQUENCE:
        raise InvalidBatch("sequence", f"must be < 2^63 (the store keeps signed 64-bit integers), got {req.sequence}")
    _check_count(len(req.records) + sum(len(b.steps) for b in req.blocks), max_records)
    client = _header_text(req.client, "client")[:128]
    positions = _layout(req.blocks, len(req.records)) if req.blocks else None
    records: list[Record] = []
    rejections: list[Rejection] = []
    for i, r in enumerate(req.records):
        try:
            records.append(_decode_record(r, i, rank, run, lenient))
        except InvalidRecord as e:
            rejections.append(Rejection(positions[i] if positions else i, e.field, e.reason))
    if positions is None:
        return Batch(run, rank, incarnation, req.sequence, client, records, rejections, len(req.records), lenient)
    return _with_blocks(req, run, rank, incarnation, req.sequence, client, records, rejections, positions,
                        len(req.records), lenient)


def reencode_kept(batch: Batch) -> bytes:
    """Serialize only the kept records of a batch (used when some records were refused)."""
    return encode_batch(batch.run, batch.rank, batch.incarnation, batch.sequence, batch.records, batch.client)

