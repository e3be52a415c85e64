"""SQLite history: runs, alerts and every received batch, written by one thread.

Batches are committed before the daemon acknowledges them (group commit: one transaction for
whatever is queued), so an acknowledged batch survives a crash of the daemon. WAL mode lets the
API read while the writer writes.
"""

from __future__ import annotations

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
    """The store could not write."""


@dataclass
class StoreStats:
    """The writer's counters."""

    batches_written: int = 0
    records_written: int = 0
    bytes_written: int = 0
    commits: int = 0
    write_errors: int = 0
    queue_depth: int = 0
    # Seconds spent inside transactions: its rate is the writer's busy fraction, and over commits the mean latency.
    commit_seconds: float = 0.0


def _value_text(v: float | None) -> str | None:
    return None if v is None else repr(float(v))


def _value_float(s: str | None) -> float | None:
    return None if s is None else float(s)


class Store:
    """The daemon's SQLite database; all writes go through one writer thread."""

    def __init__(self, path: str, commit_interval: float = 0.002):
        self.path = path
        self.commit_interval = commit_interval
        self._q: queue.Queue[tuple[str, tuple, Future | None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats = StoreStats()
        self._local = threading.local()
        conn = self._connect()
        with conn:
            conn.executescript(_SCHEMA)
            for table, column, ctype in _ADDED_COLUMNS:
                have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ctype}")
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"{path}: schema version {row[0]} is newer than this trainguard ({SCHEMA_VERSION})")
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
        return conn

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer_loop, name="trainguard-store", daemon=True)
            self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is committed."""
        if self._thread is None or not self._thread.is_alive():
            return self._q.empty()
        fut: Future = Future()
        self._q.put(("noop", (), fut))
        try:
            fut.result(timeout)
            return True
        except Exception:  # noqa: BLE001
            return False

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
        self._q.put(("alert", (alert,), None))

    def put_run(self, run: dict[str, Any]) -> None:
        """Insert or update a run summary."""
        self._q.put(("run", (run,), None))

    def delete_alert(self, alert_id: int) -> None:
        """Remove an alert that never fired (a pending one whose condition ended)."""
        self._q.put(("alert_delete", (alert_id,), None))

    def put_silence(self, silence: dict[str, Any]) -> None:
        """Insert or update a silence (by id)."""
        self._q.put(("silence", (silence,), None))

    def _writer_loop(self) -> None:
        conn = self._connect()
        while True:
            op = self._q.get()
            ops = [op]
            # Group commit: take whatever else is already queued into the same transaction.
            deadline = time.monotonic() + self.commit_interval
            while len(ops) < 5000:
                try:
                    ops.append(self._q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self.stats.queue_depth = self._q.qsize()
            stop = False
            err: Exception | None = None
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
                    elif kind == "stop":
                        stop = True
                if rows:
                    self._write_batches(conn, rows)
                conn.execute("COMMIT")
                self.stats.commits += 1
            except sqlite3.Error as e:
                err = e
                self.stats.write_errors += 1
                log.error("store: write failed: %s", e)
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            self.stats.commit_seconds += time.perf_counter() - t0
            for kind, args, fut in ops:
                if fut is None:
                    continue
                if err is None:
                    if kind == "batch":
                        self.stats.batches_written += 1
                        self.stats.records_written += args[6]
                    fut.set_result(True)
                else:
                    fut.set_exception(StoreError(f"store: {err}"))
            if stop:
                conn.close()
                return

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
        """The last stored batch of each sender (rank, incarnation) of a run."""
        rows = self._reader().execute(
            "SELECT rank, incarnation, MAX(seq) FROM batches WHERE run = ? GROUP BY rank, incarnation", (run,))
        return {(r, i): s for r, i, s in rows}

    def count_records(self, run: str | None = None) -> int:
        """How many records the stored batches hold."""
        if run is None:
            row = self._reader().execute("SELECT COALESCE(SUM(n), 0) FROM batches").fetchone()
        else:
            row = self._reader().execute("SELECT COALESCE(SUM(n), 0) FROM batches WHERE run = ?", (run,)).fetchone()
        return int(row[0])

