"""SQLite history: runs, alerts and every received batch, written by one thread.

Batches are committed before the daemon acknowledges them (group commit: one transaction for
whatever is queued), so an acknowledged batch survives a crash of the daemon. WAL mode lets the
API read while the writer writes.

The writer never stops for a failed write. A batch that cannot be committed fails its caller, who
tells the client to resend it; summaries, alerts and silences that cannot be written are kept
(the latest of each) and written again once the store takes writes, so a full disk or a locked
file loses nothing that comes back within the bound. `health()` says whether the store takes
writes now, for /healthz and gRPC health.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import sqlite3
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Iterator

log = logging.getLogger("trainguard.store")
READER_CACHE_KIB = 256  # page cache of each reader connection

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
  run TEXT PRIMARY KEY, world_size INTEGER, status TEXT, meta TEXT, first_t REAL, last_t REAL,
  last_step INTEGER, created_at REAL, updated_at REAL, expired INTEGER NOT NULL DEFAULT 0,
  detector_state TEXT
);
CREATE TABLE IF NOT EXISTS alerts (
  id INTEGER PRIMARY KEY, run TEXT NOT NULL, name TEXT NOT NULL, severity TEXT, state TEXT, rank INTEGER,
  step INTEGER, started_at REAL, resolved_at REAL, summary TEXT, description TEXT, value TEXT,
  labels TEXT, updated_at REAL
);
CREATE INDEX IF NOT EXISTS alerts_by_run ON alerts (run, state);
CREATE TABLE IF NOT EXISTS batches (
  id INTEGER PRIMARY KEY, run TEXT NOT NULL, rank INTEGER NOT NULL, incarnation TEXT NOT NULL,
  seq INTEGER NOT NULL, t_min REAL, t_max REAL, n INTEGER, received_at REAL, data BLOB,
  UNIQUE (run, rank, incarnation, seq)
);
CREATE INDEX IF NOT EXISTS batches_by_time ON batches (run, t_min, t_max);
CREATE TABLE IF NOT EXISTS silences (
  id INTEGER PRIMARY KEY, run TEXT NOT NULL, alert TEXT NOT NULL, starts_at REAL NOT NULL, ends_at REAL NOT NULL,
  comment TEXT, created_by TEXT, created_at REAL
);
"""
# Columns added after a table was first created: (table, column, type). Added on open when missing.
_ADDED_COLUMNS = (
    ("alerts", "lifecycle", "TEXT"),  # pending/hold bookkeeping of a live alert, JSON
)


class StoreError(RuntimeError):
    """The store could not write (or open)."""


class StoreCorrupt(StoreError):
    """The database file is not a usable SQLite database; the message names the file."""

    def __init__(self, path: str, detail: str):
        super().__init__(f"{path}: not a usable trainguard database ({detail}); move it aside, or start with "
                         "`trainguard serve --move-corrupt-aside` to rename it and begin a new one")
        self.path = path


def is_corruption(e: BaseException) -> bool:
    """Whether an sqlite3 error says the file itself is damaged (not busy, full or missing)."""
    name = getattr(e, "sqlite_errorname", "")
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or name.startswith(("SQLITE_CORRUPT_", "SQLITE_IOERR_SHORT_READ")):
        return True
    text = str(e)
    return "malformed" in text or "not a database" in text


def _storage_error(e: BaseException) -> bool:
    """A problem of the storage (full, locked, I/O, damaged), which retrying op by op cannot cure.

    Anything else (a value SQLite cannot bind, a constraint) belongs to one operation: the others
    of its transaction are written without it.
    """
    if isinstance(e, (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.DataError)):
        return False
    return isinstance(e, (sqlite3.DatabaseError, OSError, MemoryError))


# Writes without a caller waiting (summaries, alerts, silences) kept for another try after a failed
# transaction. Each key keeps its latest write only, so this bounds keys, not attempts.
MAX_REWRITES = 10_000
# How often the writer tries its kept writes again while nothing new arrives.
RETRY_INTERVAL = 1.0


@dataclass
class StoreStats:
    """The writer's counters."""

    batches_written: int = 0
    records_written: int = 0
    bytes_written: int = 0
    commits: int = 0
    write_errors: int = 0
    queue_depth: int = 0  # filled in by Store.stats_now(): queued, in the open transaction, kept for a retry
    failed_batches: int = 0  # batches not committed: their callers were told, and their clients resend them
    dropped_writes: int = 0  # summaries, alerts and silences given up (beyond MAX_REWRITES, or refused by SQLite)
    # Seconds spent inside transactions: its rate is the writer's busy fraction, and over commits the mean latency.
    commit_seconds: float = 0.0


# The key of each kind of write nobody waits for: a later write of the same key replaces an earlier one.
_KEYS = {
    "alert": lambda args: ("alert", args[0]["id"]),
    "alert_delete": lambda args: ("alert", args[0]),
    "run": lambda args: ("run", args[0]["run"]),
    "silence": lambda args: ("silence", args[0]["id"]),
}


def _value_text(v: float | None) -> str | None:
    return None if v is None else repr(float(v))


def _value_float(s: str | None) -> float | None:
    return None if s is None else float(s)


class Store:
    """The daemon's SQLite database; all writes go through one writer thread."""

    def __init__(self, path: str, commit_interval: float = 0.002, stall_after: float = 10.0):
        self.path = path
        self.commit_interval = commit_interval
        self.stall_after = stall_after
        self._q: queue.Queue[tuple[str, tuple, Future | None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats = StoreStats()
        self._local = threading.local()
        # Writer-side state read by health(): when the open transaction began, how many operations
        # it holds, the writes kept for another try, and the storage error not yet cured.
        self._busy_since: float | None = None
        self._inflight = 0
        self._rewrites: collections.OrderedDict[tuple[str, Any], tuple[str, tuple]] = collections.OrderedDict()
        self._failure: str | None = None
        self._failing_since: float | None = None
        try:
            self._open_schema()
        except sqlite3.DatabaseError as e:
            if is_corruption(e):
                raise StoreCorrupt(path, str(e)) from None
            raise StoreError(f"{path}: cannot open the database ({e})") from None

    def _open_schema(self) -> None:
        conn = self._connect()
        try:
            with conn:
                conn.executescript(_SCHEMA)
                for table, column, ctype in _ADDED_COLUMNS:
                    have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                    if column not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ctype}")
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None:
                    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif not str(row[0]).isdigit():
                    raise StoreCorrupt(self.path, f"schema version {row[0]!r} is not a number")
                elif int(row[0]) > SCHEMA_VERSION:
                    raise StoreError(f"{self.path}: schema version {row[0]} is newer than this trainguard "
                                     f"({SCHEMA_VERSION})")
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable against a crash of the daemon process (not of the machine) in WAL mode.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA query_only=1")
            # One reader per gRPC and HTTP thread (up to a hundred or more): with SQLite's default 2 MiB
            # page cache each, lookups spread over the threads grew the daemon by tens of MB over a
            # soak. Readers seek by index; the OS page cache serves what they miss.
            conn.execute(f"PRAGMA cache_size=-{READER_CACHE_KIB}")
        return conn

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer_loop, name="trainguard-store", daemon=True)
            self._thread.start()

    @property
    def writer_alive(self) -> bool:
        """Whether the writer thread runs (it stops only at close)."""
        return self._thread is not None and self._thread.is_alive()

    def health(self, now: float | None = None) -> tuple[bool, str]:
        """(takes writes now, why not): the writer is running, not stuck in a transaction, and not failing."""
        if self._closed:
            return False, "store closed"
        if self._thread is not None and not self._thread.is_alive():
            return False, "store writer thread stopped; nothing can be stored until the daemon restarts"
        now = time.monotonic() if now is None else now
        busy = self._busy_since
        if busy is not None and now - busy > self.stall_after:
            return False, (f"store: a write has been waiting {now - busy:.0f} s (database locked by another "
                           "process, or the disk stalled)")
        failure = self._failure
        if failure is not None:
            since = self._failing_since or now
            return False, f"store: writes failing for {now - since:.0f} s: {failure}"
        return True, "ok"

    def stats_now(self) -> StoreStats:
        """The counters, with the queue depth as of now: queued, in the open transaction and kept for a retry.

        Read live, not when the writer last took from the queue: a writer blocked in a transaction
        takes nothing, and that is exactly when the depth matters.
        """
        self.stats.queue_depth = self._q.qsize() + self._inflight + len(self._rewrites)
        return self.stats

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is committed (False if some of it could not be)."""
        if self._thread is None or not self._thread.is_alive():
            return self._q.empty()
        fut: Future = Future()
        self._q.put(("noop", (), fut))
        try:
            fut.result(timeout)
        except Exception:  # noqa: BLE001
            return False
        return not self._rewrites

    def close(self, timeout: float = 10.0) -> bool:
        """Commit what is queued and stop the writer."""
        if self._closed:
            return True
        ok = self.flush(timeout)
        self._closed = True
        self._q.put(("stop", (), None))
        if self._thread is not None:
            self._thread.join(timeout)
        return ok

    # -- writes (queued) -------------------------------------------------------------------------

    def put_batch(self, run: str, rank: int, incarnation: str, seq: int, t_min: float, t_max: float,
                  n: int, data: bytes) -> Future:
        """Queue a received batch; the future completes when it is committed."""
        if self._thread is not None and not self._thread.is_alive():
            raise StoreError("store writer thread stopped; nothing can be stored until the daemon restarts")
        fut: Future = Future()
        received = time.time()
        # Compressed on the caller's thread: zlib releases the GIL, so callers compress side by
        # side while the single writer only writes. Under load every GIL hand-back costs the writer
        # a wait behind the busy threads, and it was paying that once more per batch.
        blob = zlib.compress(data, 1)
        self._q.put(("batch", (run, rank, incarnation, seq, t_min, t_max, n, received, blob), fut))
        return fut

    def put_alert(self, alert: dict[str, Any]) -> None:
        """Insert or update an alert (by id)."""
        self._put("alert", (alert,))

    def put_run(self, run: dict[str, Any]) -> None:
        """Insert or update a run summary."""
        self._put("run", (run,))

    def delete_alert(self, alert_id: int) -> None:
        """Remove an alert that never fired (a pending one whose condition ended)."""
        self._put("alert_delete", (alert_id,))

    def put_silence(self, silence: dict[str, Any]) -> None:
        """Insert or update a silence (by id)."""
        self._put("silence", (silence,))

    def _put(self, kind: str, args: tuple) -> None:
        """Queue a write nobody waits for; a stopped writer would only let it pile up, so it is counted instead."""
        if self._thread is not None and not self._thread.is_alive():
            self.stats.dropped_writes += 1
            return
        self._q.put((kind, args, None))

    def _writer_loop(self) -> None:
        conn: sqlite3.Connection | None = None
        while True:
            try:
                if conn is None:
                    conn = self._connect()
                if self._take_and_write(conn):
                    conn.close()
                    return
            except Exception as e:  # noqa: BLE001 - the writer must outlive any one failure
                self._failed(f"{type(e).__name__}: {e}")
                log.exception("store: writer error")
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass
                conn = None  # a new connection for the next try
                time.sleep(RETRY_INTERVAL)

    def _failed(self, why: str) -> None:
        if self._failure is None:
            self._failing_since = time.monotonic()
        self._failure = why

    def _take_and_write(self, conn: sqlite3.Connection) -> bool:
        """Take what is queued (after the writes kept from a failed try) and write it; True on stop."""
        try:
            op = self._q.get(timeout=RETRY_INTERVAL if self._rewrites else None)
            ops = [op]
        except queue.Empty:
            ops = []
        # Group commit: take whatever else is already queued into the same transaction.
        deadline = time.monotonic() + self.commit_interval
        while ops and len(ops) < 5000:
            try:
                ops.append(self._q.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        if self._rewrites:
            ops = [(kind, args, None) for kind, args in self._rewrites.values()] + ops
            self._rewrites.clear()
        self._inflight = len(ops)
        err = self._transaction(conn, ops)
        if err is not None and not _storage_error(err) and len(ops) > 1:
            # One operation SQLite cannot take must not fail the others: each goes on its own.
            results = [self._transaction(conn, [op]) for op in ops]
        else:
            results = [err] * len(ops)
        self._inflight = 0
        stop = False
        storage_failure = None
        for (kind, args, fut), e in zip(ops, results):
            if kind == "stop":
                stop = True
            if e is None:
                if kind == "batch":
                    self.stats.batches_written += 1
                    self.stats.records_written += args[6]
                if fut is not None:
                    fut.set_result(True)
                continue
            if _storage_error(e):
                storage_failure = e
            if kind == "batch":
                self.stats.failed_batches += 1
            elif kind in _KEYS and _storage_error(e):
                self._keep_for_retry(kind, args)
            elif kind in _KEYS:
                self.stats.dropped_writes += 1
                log.error("store: %s write refused by SQLite and dropped: %s", kind, e)
            if fut is not None:
                fut.set_exception(StoreError(f"store: {type(e).__name__}: {e}"))
        if storage_failure is not None:
            self._failed(f"{type(storage_failure).__name__}: {storage_failure}")
        elif ops:
            self._failure = None
            self._failing_since = None
        if stop and self._rewrites:
            self.stats.dropped_writes += len(self._rewrites)
            log.error("store: %d summary, alert or silence write(s) could not be stored before shutdown: %s",
                      len(self._rewrites), self._failure)
        return stop

    def _keep_for_retry(self, kind: str, args: tuple) -> None:
        """Keep the latest write of each key for the next transaction, up to MAX_REWRITES keys."""
        key = _KEYS[kind](args)
        self._rewrites.pop(key, None)
        self._rewrites[key] = (kind, args)
        while len(self._rewrites) > MAX_REWRITES:
            self._rewrites.popitem(last=False)
            self.stats.dropped_writes += 1

    def _transaction(self, conn: sqlite3.Connection, ops: list[tuple[str, tuple, Future | None]]
                     ) -> Exception | None:
        """Write ops in one transaction; the exception that undid it, or None once committed."""
        self._busy_since = time.monotonic()
        t0 = time.perf_counter()
        try:
            conn.execute("BEGIN")
            # Consecutive batches go in together, in queue order, a few statements per group
            # rather than one per batch (each statement hands the GIL back and waits for it).
            rows: list[tuple] = []
            for kind, args, _ in ops:
                if kind == "batch":
                    rows.append(args)
                    continue
                if rows:
                    self._write_batches(conn, rows)
                    rows = []
                if kind == "alert":
                    self._write_alert(conn, *args)
                elif kind == "run":
                    self._write_run(conn, *args)
                elif kind == "alert_delete":
                    conn.execute("DELETE FROM alerts WHERE id = ?", args)
                elif kind == "silence":
                    self._write_silence(conn, *args)
            if rows:
                self._write_batches(conn, rows)
            conn.execute("COMMIT")
            self.stats.commits += 1
            return None
        except Exception as e:  # noqa: BLE001 - any failure undoes the transaction and is reported per op
            self.stats.write_errors += 1
            log.error("store: write failed: %s: %s", type(e).__name__, e)
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            return e
        finally:
            self.stats.commit_seconds += time.perf_counter() - t0
            self._busy_since = None

    def _write_batches(self, conn: sqlite3.Connection, rows: list[tuple]) -> None:
        """Insert batch rows (run, rank, incarnation, seq, t_min, t_max, n, received_at, compressed data)."""
        # 100 rows x 9 parameters stays under SQLite's historical limit of 999 per statement.
        for i in range(0, len(rows), 100):
            chunk = rows[i:i + 100]
            conn.execute(
                "INSERT OR IGNORE INTO batches (run, rank, incarnation, seq, t_min, t_max, n, received_at, data) "
                "VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk)),
                [v for row in chunk for v in row])
            self.stats.bytes_written += sum(len(row[8]) for row in chunk)

    def _write_alert(self, conn: sqlite3.Connection, a: dict[str, Any]) -> None:
        conn.execute(
            "INSERT INTO alerts (id, run, name, severity, state, rank, step, started_at, resolved_at, summary, "
            "description, value, labels, updated_at, lifecycle) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET state=excluded.state, resolved_at=excluded.resolved_at, "
            "summary=excluded.summary, description=excluded.description, value=excluded.value, "
            "labels=excluded.labels, updated_at=excluded.updated_at, lifecycle=excluded.lifecycle",
            (a["id"], a["run"], a["name"], a["severity"], a["state"], a["rank"], a["step"], a["started_at"],
             a["resolved_at"], a["summary"], a["description"], _value_text(a["value"]),
             json.dumps(a["labels"]), time.time(),
             None if a.get("lifecycle") is None else json.dumps(a["lifecycle"])))

    def _write_silence(self, conn: sqlite3.Connection, s: dict[str, Any]) -> None:
        conn.execute(
            "INSERT INTO silences (id, run, alert, starts_at, ends_at, comment, created_by, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET ends_at=excluded.ends_at, "
            "comment=excluded.comment",
            (s["id"], s["run"], s["alert"], s["starts_at"], s["ends_at"], s["comment"], s["created_by"],
             s["created_at"]))

    def _write_run(self, conn: sqlite3.Connection, r: dict[str, Any]) -> None:
        conn.execute(
            "INSERT INTO runs (run, world_size, status, meta, first_t, last_t, last_step, created_at, updated_at, "
            "expired, detector_state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(run) DO UPDATE SET world_size=excluded.world_size, status=excluded.status, "
            "meta=excluded.meta, first_t=excluded.first_t, last_t=excluded.last_t, last_step=excluded.last_step, "
            "updated_at=excluded.updated_at, expired=excluded.expired, detector_state=excluded.detector_state",
            (r["run"], r.get("world_size"), r.get("status"), json.dumps(r.get("meta") or {}, default=str),
             r.get("first_t"), r.get("last_t"), r.get("last_step"), r.get("created_at", time.time()), time.time(),
             int(bool(r.get("expired"))), json.dumps(r.get("detector_state") or {})))

    # -- reads -------------------------------------------------------------------------------------

    def load_runs(self, include_expired: bool = False) -> list[dict[str, Any]]:
        """Run summaries, newest first."""
        sql = "SELECT run, world_size, status, meta, first_t, last_t, last_step, created_at, expired, " \
              "detector_state FROM runs"
        if not include_expired:
            sql += " WHERE expired = 0"
        out = []
        for row in self._reader().execute(sql + " ORDER BY last_t DESC"):
            out.append({"run": row[0], "world_size": row[1], "status": row[2], "meta": json.loads(row[3] or "{}"),
                        "first_t": row[4], "last_t": row[5], "last_step": row[6], "created_at": row[7],
                        "expired": bool(row[8]), "detector_state": json.loads(row[9] or "{}")})
        return out

    def load_alerts(self, run: str | None = None, state: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Stored alerts, newest first."""
        where, args = [], []
        if run is not None:
            where.append("run = ?")
            args.append(run)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        sql = ("SELECT id, run, name, severity, state, rank, step, started_at, resolved_at, summary, description, "
               "value, labels, lifecycle FROM alerts")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        keys = ("id", "run", "name", "severity", "state", "rank", "step", "started_at", "resolved_at", "summary",
                "description", "value", "labels", "lifecycle")
        out = []
        for row in self._reader().execute(sql, args):
            a = dict(zip(keys, row))
            a["value"] = _value_float(a["value"])
            a["labels"] = json.loads(a["labels"] or "{}")
            a["lifecycle"] = json.loads(a["lifecycle"]) if a["lifecycle"] else None
            out.append(a)
        return out

    def load_silences(self) -> list[dict[str, Any]]:
        """Every stored silence, oldest first."""
        keys = ("id", "run", "alert", "starts_at", "ends_at", "comment", "created_by", "created_at")
        rows = self._reader().execute(f"SELECT {', '.join(keys)} FROM silences ORDER BY id")
        return [dict(zip(keys, row)) for row in rows]

    def max_silence_id(self) -> int:
        """The largest silence id used so far."""
        row = self._reader().execute("SELECT MAX(id) FROM silences").fetchone()
        return int(row[0] or 0)

    def max_alert_id(self) -> int:
        """The largest alert id used so far."""
        row = self._reader().execute("SELECT MAX(id) FROM alerts").fetchone()
        return int(row[0] or 0)

    def batches(self, run: str, since_id: int = 0, limit: int | None = None, newest: bool = False
                ) -> Iterator[tuple[int, int, str, int, bytes]]:
        """(id, rank, incarnation, seq, uncompressed bytes) of a run's batches in arrival order.

        With `newest`, only the last `limit` batches (still yielded oldest first).
        """
        conn = self._reader()
        if newest and limit:
            sql = ("SELECT * FROM (SELECT id, rank, incarnation, seq, data FROM batches WHERE run = ? AND id > ? "
                   "ORDER BY id DESC LIMIT ?) ORDER BY id")
            args: tuple = (run, since_id, limit)
        else:
            sql = "SELECT id, rank, incarnation, seq, data FROM batches WHERE run = ? AND id > ? ORDER BY id"
            args = (run, since_id)
            if limit:
                sql += " LIMIT ?"
                args = (run, since_id, limit)
        for bid, rank, inc, seq, blob in conn.execute(sql, args):
            yield bid, rank, inc, seq, zlib.decompress(blob)

    def max_sequences(self, run: str) -> dict[tuple[int, str], int]:
        """The last stored batch of each sender (rank, incarnation) of a run, the least recent sender first."""
        rows = self._reader().execute(
            "SELECT rank, incarnation, MAX(seq) FROM batches WHERE run = ? GROUP BY rank, incarnation ORDER BY MAX(id)",
            (run,))
        return {(r, i): s for r, i, s in rows}

    def max_sequence(self, run: str, rank: int, incarnation: str) -> int:
        """The last stored batch of one sender (0 if none)."""
        row = self._reader().execute("SELECT MAX(seq) FROM batches WHERE run = ? AND rank = ? AND incarnation = ?",
                                     (run, rank, incarnation)).fetchone()
        return int(row[0] or 0)

    def count_records(self, run: str | None = None) -> int:
        """How many records the stored batches hold."""
        if run is None:
            row = self._reader().execute("SELECT COALESCE(SUM(n), 0) FROM batches").fetchone()
        else:
            row = self._reader().execute("SELECT COALESCE(SUM(n), 0) FROM batches WHERE run = ?", (run,)).fetchone()
        return int(row[0])

