"""The one in-memory shape of a telemetry record, its validation, and the v1 trace (JSON Lines) reader and writer."""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable, Iterator

KINDS = frozenset({"run", "train", "eval", "probe", "system", "heartbeat", "end"})
STEP_REQUIRED = frozenset({"train", "eval", "probe"})
END_STATUSES = frozenset({"completed", "failed", "stopped"})
RUN_ID_PATTERN = r"[A-Za-z0-9._:/-]{1,128}"
_RUN_ID_RE = re.compile(RUN_ID_PATTERN + r"\Z")

# Limits on one record. They bound the daemon's memory per record and keep one bad client from
# starving the others; a serious training job stays far below each of them.
MAX_NAME_CHARS = 128
MAX_VALUES = 256
MAX_ITEMS = 100_000
MAX_SUITE_CHARS = 128
MAX_META_BYTES = 64 * 1024
MAX_RANK = 1 << 20
MAX_STEP = 1 << 53  # the largest integer a JSON double holds exactly


class InvalidRecord(ValueError):
    """A record broke the format; `field` names the part that is wrong."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class Record:
    """One telemetry record, as in TRACE_FORMAT.md (v1)."""

    __slots__ = ("kind", "run", "t", "rank", "step", "values", "world_size", "meta", "suite", "items", "status")

    def __init__(
        self,
        kind: str,
        run: str,
        t: float,
        rank: int = 0,
        step: int | None = None,
        values: dict[str, float] | None = None,
        world_size: int | None = None,
        meta: dict[str, Any] | None = None,
        suite: str | None = None,
        items: list[float] | None = None,
        status: str | None = None,
    ):
        self.kind = kind
        self.run = run
        self.t = t
        self.rank = rank
        self.step = step
        self.values = values if values is not None else {}
        self.world_size = world_size
        self.meta = meta
        self.suite = suite
        self.items = items
        self.status = status

    def __repr__(self) -> str:
        return f"Record({self.to_json()!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return _json_equal(self.to_json(), other.to_json())

    def to_json(self) -> dict[str, Any]:
        """The record as a trace-format JSON object (field order as in TRACE_FORMAT.md)."""
        out: dict[str, Any] = {"kind": self.kind, "run": self.run, "t": self.t, "rank": self.rank}
        if self.step is not None:
            out["step"] = self.step
        if self.values:
            out["values"] = self.values
        if self.world_size is not None:
            out["world_size"] = self.world_size
        if self.meta is not None:
            out["meta"] = self.meta
        if self.suite is not None:
            out["suite"] = self.suite
        if self.items is not None:
            out["items"] = self.items
        if self.status is not None:
            out["status"] = self.status
        return out


@dataclass(eq=False)
class RecordBlock:
    """Records of one kind and rank with the same value names, kept as columns (the proto's Block).

    The daemon folds a block into its state a column at a time and builds Record objects only
    where something needs them one by one (see `records`).
    """

    kind: str
    run: str
    rank: int
    names: tuple[str, ...]
    steps: list[int]
    ts: list[float]
    values: list[float]  # len(steps) x len(names), record after record
    at: int = 0

    def __len__(self) -> int:
        return len(self.steps)

    def column(self, name: str) -> list[float] | None:
        """Every record's value of `name`, in order (None if the block does not carry it)."""
        try:
            j = self.names.index(name)
        except ValueError:
            return None
        return self.values[j::len(self.names)]

    def last_values(self) -> dict[str, float]:
        """The values of the block's last record."""
        k = len(self.names)
        return dict(zip(self.names, self.values[-k:])) if k else {}

    def records(self) -> list[Record]:
        """The block as the records it stands for."""
        kind, run, rank, names, vals = self.kind, self.run, self.rank, self.names, self.values
        k = len(names)
        if not k:
            return [Record(kind, run, t, rank, s, {}) for s, t in zip(self.steps, self.ts)]
        return [Record(kind, run, t, rank, s, dict(zip(names, vals[i:i + k])))
                for i, s, t in zip(range(0, len(vals), k), self.steps, self.ts)]


def _json_equal(a: Any, b: Any) -> bool:
    # NaN != NaN, but two records that both carry NaN are the same record.
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return a == b


def check_run_id(run: Any, field: str = "run") -> str:
    """Return `run` if it is a valid run id, else raise InvalidRecord naming `field`."""
    if not isinstance(run, str):
        raise InvalidRecord(field, f"expected a string, got {_type_name(run)}")
    if not _RUN_ID_RE.match(run):
        if not run or len(run) > 128:
            raise InvalidRecord(field, f"must be 1-128 characters, got {len(run)}")
        bad = next(c for c in run if not re.match(r"[A-Za-z0-9._:/-]", c))
        raise InvalidRecord(field, f"character {bad!r} not allowed; use [A-Za-z0-9._:/-]")
    return run


def check_name(name: str, field: str) -> None:
    """Raise InvalidRecord unless `name` is a usable value name."""
    if not name:
        raise InvalidRecord(field, "value name is empty")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidRecord(field, f"value name is {len(name)} characters, the limit is {MAX_NAME_CHARS}")


def check_record(rec: Record, prefix: str = "") -> None:
    """Validate the parts of a record that do not depend on how it was encoded."""
    kind = rec.kind
    if kind not in KINDS:
        raise InvalidRecord(prefix + "kind", f"unknown kind {kind!r}; expected one of {', '.join(sorted(KINDS))}")
    t = rec.t
    if not (t > 0.0 and t < 1e11):  # also false for NaN
        raise InvalidRecord(prefix + "t", f"event time must be finite Unix seconds, got {t!r}")
    if rec.rank < 0 or rec.rank >= MAX_RANK:
        raise InvalidRecord(prefix + "rank", f"must be in [0, {MAX_RANK}), got {rec.rank}")
    step = rec.step
    if step is None:
        if kind in STEP_REQUIRED:
            raise InvalidRecord(prefix + "step", f"required for kind {kind!r}")
    elif step < 0 or step > MAX_STEP:
        raise InvalidRecord(prefix + "step", f"must be in [0, 2^53], got {step}")
    if len(rec.values) > MAX_VALUES:
        raise InvalidRecord(prefix + "values", f"{len(rec.values)} values, the limit is {MAX_VALUES} per record")
    if kind == "probe":
        if not rec.suite:
            raise InvalidRecord(prefix + "suite", "required for kind 'probe'")
        if len(rec.suite) > MAX_SUITE_CHARS:
            raise InvalidRecord(prefix + "suite", f"{len(rec.suite)} characters, the limit is {MAX_SUITE_CHARS}")
    if rec.items is not None and len(rec.items) > MAX_ITEMS:
        raise InvalidRecord(prefix + "items", f"{len(rec.items)} items, the limit is {MAX_ITEMS}")
    if kind == "run":
        if rec.world_size is None or rec.world_size < 1:
            raise InvalidRecord(prefix + "world_size", "required for kind 'run' and must be >= 1")
        if rec.world_size > MAX_RANK:
            raise InvalidRecord(prefix + "world_size", f"must be <= {MAX_RANK}")
    if kind == "end" and rec.status is not None and rec.status not in END_STATUSES:
        raise InvalidRecord(prefix + "status", f"{rec.status!r} is not one of {', '.join(sorted(END_STATUSES))}")


# ---------------------------------------------------------------------------------------------
# Trace files (JSON Lines, optionally gzip)


@dataclass
class TraceError:
    """One line of a trace file that could not be used."""

    path: str
    line: int
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}"
        return f"{where}: field '{self.field}': {self.reason}" if self.field else f"{where}: {self.reason}"


_NONFINITE_STRINGS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "+inf": math.inf,
                      "infinity": math.inf, "-infinity": -math.inf}


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _number(v: Any, field: str) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str) and v.lower() in _NONFINITE_STRINGS:
        return _NONFINITE_STRINGS[v.lower()]
    raise InvalidRecord(field, f"expected a number, got {_type_name(v)} {json.dumps(v)[:40]}")


def _integer(v: Any, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidRecord(field, f"expected an integer, got {_type_name(v)} {json.dumps(v)[:40]}")
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            raise InvalidRecord(field, f"expected an integer, got {v!r}")
        v = int(v)
    return v


def record_from_json(obj: Any) -> Record:
    """Build a Record from a decoded trace line; raise InvalidRecord naming the bad field."""
    if not isinstance(obj, dict):
        raise InvalidRecord("record", f"expected a JSON object, got {_type_name(obj)}")
    for req in ("kind", "run", "t"):
        if req not in obj:
            raise InvalidRecord(req, "required field is missing")
    kind = obj["kind"]
    if not isinstance(kind, str):
        raise InvalidRecord("kind", f"expected a string, got {_type_name(kind)}")
    run = check_run_id(obj["run"])
    t = _number(obj["t"], "t")
    rank = _integer(obj["rank"], "rank") if obj.get("rank") is not None else 0
    step = _integer(obj["step"], "step") if obj.get("step") is not None else None
    values: dict[str, float] = {}
    raw_values = obj.get("values")
    if raw_values is not None:
        if not isinstance(raw_values, dict):
            raise InvalidRecord("values", f"expected an object of name -> number, got {_type_name(raw_values)}")
        if len(raw_values) > MAX_VALUES:
            raise InvalidRecord("values", f"{len(raw_values)} values, the limit is {MAX_VALUES} per record")
        for name, v in raw_values.items():
            check_name(name, f"values.{name[:40]}")
            values[name] = _number(v, f"values.{name}")
    world_size = _integer(obj["world_size"], "world_size") if obj.get("world_size") is not None else None
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise InvalidRecord("meta", f"expected an object, got {_type_name(meta)}")
    suite = obj.get("suite")
    if suite is not None and not isinstance(suite, str):
        raise InvalidRecord("suite", f"expected a string, got {_type_name(suite)}")
    items = obj.get("items")
    if items is not None:
        if not isinstance(items, list):
            raise InvalidRecord("items", f"expected an array of numbers, got {_type_name(items)}")
        items = [_number(x, f"items[{i}]") for i, x in enumerate(items)]
    status = obj.get("status")
    if status is not None and not isinstance(status, str):
        raise InvalidRecord("status", f"expected a string, got {_type_name(status)}")
    rec = Record(kind, run, t, rank, step, values, world_size, meta, suite, items, status)
    check_record(rec)
    return rec


def read_trace(path: str, on_progress: Callable[[int, int], None] | None = None) -> Iterator[Record | TraceError]:
    """Yield each line of a v1 trace as a Record, or a TraceError for a line that cannot be used.

    A bad line never stops the reading: the good lines around it are still yielded.
    `on_progress(bytes_read, file_size)` is called every 1,000 lines (sizes of the file on disk).
    """
    for _lineno, item in read_trace_numbered(path, on_progress):
        yield item


def read_trace_numbered(path: str, on_progress: Callable[[int, int], None] | None = None
                        ) -> Iterator[tuple[int, Record | TraceError]]:
    """Like read_trace, with the line number of each item."""
    try:
        raw_f = open(path, "rb")
    except OSError as e:
        yield 0, TraceError(path, 0, None, f"cannot open: {e.strerror}")
        return
    with raw_f:
        size = os.fstat(raw_f.fileno()).st_size
        gz = raw_f.read(2) == b"\x1f\x8b"
        raw_f.seek(0)
        f: IO[bytes] = gzip.GzipFile(fileobj=raw_f, mode="rb") if gz else raw_f  # type: ignore[assignment]
        lineno = 0
        try:
            for lineno, raw in enumerate(f, 1):
                if on_progress is not None and lineno % 1000 == 0:
                    on_progress(raw_f.tell(), size)
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield lineno, TraceError(path, lineno, None, f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
                    continue
                try:
                    obj = json.loads(text)
                except ValueError as e:
                    yield lineno, TraceError(path, lineno, None, f"not valid JSON ({e})")
                    continue
                except RecursionError:
                    yield lineno, TraceError(path, lineno, None, "JSON nested too deeply")
                    continue
                try:
                    yield lineno, record_from_json(obj)
                except InvalidRecord as e:
                    yield lineno, TraceError(path, lineno, e.field, e.reason)
        except (OSError, EOFError, zlib.error) as e:
            yield lineno + 1, TraceError(path, lineno + 1, None, f"cannot read the file further: {e}")
        if on_progress is not None:
            on_progress(size, size)


def iter_trace_lines(lines: Iterable[str]) -> Iterator[Record]:
    """Parse trace lines that are known to be good (tests, fixtures); raise on a bad one."""
    for line in lines:
        if line.strip():
            yield record_from_json(json.loads(line))


def dumps_record(rec: Record) -> str:
    """One trace line (without the newline); non-finite numbers as the bare tokens NaN/Infinity."""
    return json.dumps(rec.to_json(), separators=(",", ":"), allow_nan=True)


class TraceWriter:
    """Appends records to a v1 trace file; gzip-compressed when the path ends in .gz."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        raw: IO[bytes]
        if self.path.endswith(".gz"):
            raw = gzip.open(self.path, "ab")  # type: ignore[assignment]
        else:
            raw = open(self.path, "ab")
        self._f = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")

    def write(self, recs: Iterable[Record]) -> None:
        """Append records, one line each."""
        self._f.write("".join(dumps_record(r) + "\n" for r in recs))

    def flush(self) -> None:
        """Push buffered lines to the operating system."""
        self._f.flush()

    def close(self) -> None:
        """Flush and close the file."""
        if not self._f.closed:
            self._f.close()
