"""The store under faults, with real SQLite and real files: a write it cannot take, a locked database, a
stopped writer, a full disk, a damaged file. The daemon keeps serving metrics and alerts, reports itself
unhealthy with the reason, acknowledges nothing it did not store, counts what it could not store, and
recovers when the fault goes."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from monitor import wire
from monitor.daemon.store import Store, StoreCorrupt, StoreError
from tests.daemon.clients import T0, Client, batch, train
from tests.helpers import IN_CI, ROOT, http_json, metrics, sample, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def healthz(d: Any) -> tuple[int, dict[str, Any]]:
    try:
        return 200, http_json(d.http_url + "/healthz")
    except urllib.error.HTTPError as e:
        import json

        return e.code, json.loads(e.read())


def _row(seq: int, n: int = 1) -> tuple:
    return ("r", 0, "inc", seq, T0, T0, n, batch("r", [train("r", 1)], seq=seq))


def test_a_write_sqlite_cannot_take_fails_alone_and_the_writer_goes_on(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.db"), commit_interval=0.05)  # a long group: the bad batch shares it
    store.start()
    try:
        futs = []
        for seq in (1, 2 ** 63, 3):  # 2^63 does not fit an SQLite integer: OverflowError in the writer
            run, rank, inc, s, t0, t1, n, data = _row(seq)
            futs.append(store.put_batch(run, rank, inc, s, t0, t1, n, data))
        assert futs[0].result(5) and futs[2].result(5)
        with pytest.raises(StoreError, match="OverflowError"):
            futs[1].result(5)
        assert store.health() == (True, "ok")  # one operation's fault, not the store's
        assert store.writer_alive
        fut = store.put_batch(*_row(4))
        assert fut.result(5)
        assert sorted(seq for _, _, _, seq, _ in store.batches("r")) == [1, 3, 4]
        assert store.stats.failed_batches == 1
        assert store.stats.write_errors == 2  # the shared transaction, then the bad batch on its own
        assert store.stats.dropped_writes == 0
    finally:
        store.close(2)


def test_a_locked_database_turns_health_off_and_nothing_is_acknowledged(daemon_factory: Any, tmp_path: Path) -> None:
    db = str(tmp_path / "locked.db")
    d = daemon_factory(db=db, store_stall_seconds=0.3, commit_timeout=1.5)
    c = Client(d.grpc_address)
    try:
        assert c.send(batch("lk", [train("lk", 1)])).accepted == 1
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock (a backup tool, a second daemon)
        try:
            t0 = time.monotonic()
            err = c.error(batch("lk", [train("lk", 2)], seq=2))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < 5
            assert "batch not committed within 1.5 s" in err.details()
            assert "database locked by another process" in err.details()
            code, body = healthz(d)
            assert code == 503 and body["status"] == "unhealthy" and "waiting" in body["reason"]
            wait_for(lambda: c.health() == NOT_SERVING, timeout=3, what="gRPC health NOT_SERVING")
            assert c.health(wire.SERVICE) == NOT_SERVING
            m = metrics(d)  # still served
            assert sample(m, "trainguard_store_healthy") == 0
            assert sample(m, "trainguard_store_queue_depth") >= 1  # the real depth, not the last one seen
            assert sample(m, "trainguard_train_loss", run="lk") == 2.0
        finally:
            other.execute("ROLLBACK")
            other.close()
        wait_for(lambda: healthz(d)[0] == 200, timeout=10, what="health back")
        wait_for(lambda: c.health() == SERVING, timeout=3, what="gRPC health SERVING")
        resent = c.send(batch("lk", [train("lk", 2)], seq=2))  # the client's resend goes in, once
        assert resent.accepted == 1 and not resent.duplicate
        assert d.flush(5)
        assert d.store.count_records("lk") == 2
        assert http_json(d.http_url + "/api/v1/runs/lk")["records"] == 2
    finally:
        c.close()


def test_a_stopped_writer_is_reported_and_batches_are_refused_at_once(daemon: Any) -> None:
    c = Client(daemon.grpc_address)
    try:
        assert c.send(batch("w", [train("w", 1, loss=float("nan"))])).accepted == 1
        daemon.store._q.put(("stop", (), None))  # the writer thread ends, as if it had died
        wait_for(lambda: not daemon.store.writer_alive, timeout=5, what="the writer to stop")
        t0 = time.monotonic()
        err = c.error(batch("w", [train("w", 2)], seq=2))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 2
        assert "store writer thread stopped" in err.details()
        code, body = healthz(daemon)
        assert code == 503 and "writer thread stopped" in body["reason"]
        wait_for(lambda: c.health() == NOT_SERVING, timeout=3, what="gRPC health NOT_SERVING")
        # metrics and alerts still work
        assert sample(metrics(daemon), "trainguard_alert_active", run="w", alert="NonFinite", severity="critical") == 1
        assert [a["name"] for a in http_json(daemon.http_url + "/api/v1/alerts?run=w")["alerts"]] == ["NonFinite"]
        assert sample(metrics(daemon), "trainguard_ingest_errors_total") == 1
    finally:
        c.close()


# -- a full disk --------------------------------------------------------------------------------


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _in_namespace_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 2 MiB tmpfs at tmp_path/disk (needs root: run directly, or in a user namespace by the test below)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill_the_disk_and_recover(d: Any, disk: Path) -> None:
    c = Client(d.grpc_address)
    filler = disk / "filler"
    try:
        import random

        rnd = random.Random(1)
        acked = 0
        refused = None
        for seq in range(1, 400):
            # incompressible values, 40 KiB a batch: the disk fills after a few dozen
            recs = [train("full", seq * 100 + i, t=T0 + seq, **{f"v{j}": rnd.random() for j in range(50)})
                    for i in range(100)]
            data = batch("full", recs, seq=seq)
            try:
                acked += c.send(data, timeout=10).accepted
            except grpc.RpcError as e:
                refused = (seq, data, e)
                break
            if seq == 3:  # leave room for a few batches, then take the rest
                free = shutil.disk_usage(disk).free
                with open(filler, "wb") as f:
                    f.write(b"\0" * max(0, free - 300_000))
        assert refused is not None, "the disk never filled"
        seq, data, err = refused
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "full" in err.details(), err.details()
        code, body = healthz(d)
        assert code == 503 and "full" in body["reason"], body
        wait_for(lambda: c.health() == NOT_SERVING, timeout=3, what="gRPC health NOT_SERVING")
        m = metrics(d)
        assert sample(m, "trainguard_store_healthy") == 0
        assert sample(m, "trainguard_store_failed_batches_total") >= 1
        assert sample(m, "trainguard_store_write_errors_total") >= 1
        assert sample(m, "trainguard_step", run="full") is not None  # state is still exported
        alerts = http_json(d.http_url + "/api/v1/alerts")["alerts"]  # the API answers, from memory
        assert all(a["run"] == "full" for a in alerts)
        # nothing was acknowledged that is not stored
        assert d.store.count_records("full") == acked
        filler.unlink()  # space comes back
        wait_for(lambda: healthz(d)[0] == 200, timeout=15, what="health back after space returned")
        assert c.send(data, timeout=10).accepted == 100  # the client's resend is taken
        acked += 100
        assert d.flush(5)
        assert d.store.count_records("full") == acked
        assert http_json(d.http_url + "/api/v1/runs/full")["records"] == acked
        # the run summaries the janitor saved while the disk was full were kept and written afterwards
        assert d.store.stats_now().dropped_writes == 0
        assert d.flush(5)
        assert {r["run"]: r["last_step"] for r in d.store.load_runs()}["full"] == seq * 100 + 99
    finally:
        c.close()


@pytest.mark.skipif(not _can_mount(), reason="mounting a small tmpfs needs root (the next test tries a user "
                                             "namespace instead)")
def test_full_disk(daemon_factory: Any, small_disk: Path) -> None:
    d = daemon_factory(db=str(small_disk / "t.db"), janitor_interval=0.2, store_stall_seconds=5)
    _fill_the_disk_and_recover(d, small_disk)


@pytest.mark.skipif(_can_mount(), reason="runs as root: test_full_disk mounts the small filesystem itself")
def test_full_disk_in_a_user_namespace() -> None:
    if not _in_namespace_works():
        # One of the two full-disk tests must run in CI: there this is a failure.
        message = "neither root nor `unshare -rm` is available to mount a small filesystem"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    # In a user and mount namespace this process's user is root there and may mount a tmpfs.
    out = subprocess.run(["unshare", "-rm", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"{__file__}::test_full_disk"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 passed" in out.stdout


# -- a damaged file -----------------------------------------------------------------------------


def _serve(db: Path, tmp_path: Path, *extra: str, timeout: float = 30.0) -> subprocess.Popen:
    ready = tmp_path / "ready.json"
    if ready.exists():
        ready.unlink()
    return subprocess.Popen([sys.executable, "-m", "monitor", "serve", "--grpc-port", "0", "--http-port", "0",
                             "--db", str(db), "--ready-file", str(ready), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _damaged(tmp_path: Path, how: str) -> Path:
    db = tmp_path / f"{how}.db"
    if how == "garbage":
        db.write_bytes(b"this is not a database at all" * 200)
        return db
    store = Store(str(db))
    store.start()
    for i in range(200):
        store.put_run({"run": f"r{i}", "meta": {"x": "y" * 200}, "detector_state": {}})
    store.close(5)
    size = db.stat().st_size
    with open(db, "r+b") as f:  # keep the header page, overwrite the pages behind it
        f.seek(8192)
        f.write(os.urandom(size - 8192 - 4096))
    return db


@pytest.mark.parametrize("how", ["garbage", "pages"])
def test_a_damaged_database_stops_start_up_with_one_line_naming_the_file(tmp_path: Path, how: str) -> None:
    db = _damaged(tmp_path, how)
    with pytest.raises(StoreCorrupt, match="not a usable trainguard database"):
        Store(str(db))
    proc = _serve(db, tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and str(db) in lines[0] and "--move-corrupt-aside" in lines[0], err
    assert "Traceback" not in err
    assert db.exists()  # nothing is moved without the flag


def test_move_corrupt_aside_renames_the_file_and_starts_fresh(tmp_path: Path) -> None:
    db = _damaged(tmp_path, "pages")
    damaged = db.read_bytes()
    proc = _serve(db, tmp_path, "--move-corrupt-aside")
    try:
        wait_for(lambda: (tmp_path / "ready.json").exists() or proc.poll() is not None, timeout=30,
                 what="the daemon to start")
        assert proc.poll() is None, proc.communicate()
        import json

        port = json.loads((tmp_path / "ready.json").read_text())["http_port"]
        assert http_json(f"http://127.0.0.1:{port}/healthz")["status"] == "ok"
        aside = [p for p in tmp_path.iterdir() if p.name.startswith("pages.db.corrupt-")]
        assert [p for p in aside if not p.name.endswith(("-wal", "-shm"))][0].read_bytes() == damaged
        assert Store(str(db)).load_runs() == []  # a new, empty database
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "moved it to" in err and ".corrupt-" in err


def test_a_store_that_cannot_be_opened_is_one_line_too(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    proc = _serve(tmp_path / "dir.db", tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "Traceback" not in err
    assert "dir.db: cannot open the database" in err

