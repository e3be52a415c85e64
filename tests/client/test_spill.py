"""The spill: its file format (torn tails, corrupt frames, stale offsets), and the Reporter spilling, draining in
order, staying bounded, surviving its own process, and honouring the daemon's retry delay."""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from monitor import wire
from monitor.client import spill
from monitor.client.reporter import Reporter, retry_after
from monitor.records import Record
from tests.client.test_reporter import absent_address, make, metric, metric_samples, run_script, stored_records
from tests.helpers import http_json, wait_for


def payload(seq: int, steps: range, run: str = "sp", inc: str = "inc-a") -> bytes:
    recs = [Record("train", run, 1.7e9 + s, 0, s, {"loss": 1.0}) for s in steps]
    return wire.encode_batch(run, 0, inc, seq, recs, client="test")


def fill(directory: Path, frames: int = 3, per: int = 5) -> spill.SpillFile:
    f = spill.SpillFile.create(str(directory), spill.file_name("sp", 0, "inc-a"))
    for i in range(frames):
        f.append(payload(i + 1, range(i * per + 1, (i + 1) * per + 1)), per)
    return f


def drain(f: spill.SpillFile) -> list[int]:
    """The sequence numbers of the frames left, read and consumed in order."""
    seqs = []
    while (got := f.peek()) is not None:
        seqs.append(wire.decode_batch(got[1]).sequence)
        f.consume(got[0])
    return seqs


# ---------------------------------------------------------------------------------------------
# the file


def test_frames_come_back_in_order_and_an_adopter_resumes_after_the_consumed_ones(tmp_path: Path) -> None:
    f = fill(tmp_path, frames=4)
    assert (f.frames, f.records) == (4, 20)
    got = f.peek()
    assert got is not None and got[0] == 5
    f.consume(got[0])
    # A live owner holds the lock: nobody else may take the file.
    assert spill.SpillFile.adopt(f.path) is None
    f.release(sync=False)
    g = spill.SpillFile.adopt(f.path)
    assert g is not None
    assert (g.frames, g.records, g.torn) == (3, 15, 0)
    assert drain(g) == [2, 3, 4]
    g.remove()
    assert os.listdir(tmp_path) == []


def test_a_torn_last_write_is_cut_off_and_counted(tmp_path: Path) -> None:
    f = fill(tmp_path)
    size = f.end
    f.release(sync=False)
    with open(f.path, "r+b") as fh:
        fh.truncate(size - 7)  # the last frame's tail never reached the disk
    g = spill.SpillFile.adopt(f.path)
    assert g is not None
    assert (g.frames, g.records, g.torn) == (2, 10, 1)
    assert os.path.getsize(g.path) == g.end < size - 7
    # Appending after the cut leaves a file that reads back whole.
    g.append(payload(9, range(100, 103)), 3)
    assert drain(g) == [1, 2, 9]
    g.forget()


def test_a_corrupt_frame_ends_the_file_and_its_records_are_counted_lost(tmp_path: Path) -> None:
    f = fill(tmp_path)
    second = spill.HEADER_BYTES + spill.FRAME_BYTES + len(payload(1, range(1, 6)))
    os.pwrite(f.fd, b"\xff\xff", second + spill.FRAME_BYTES + 10)  # a flipped byte inside frame 2's payload
    assert drain(f) == [1]
    assert (f.torn, f.lost_records, f.frames, f.records) == (1, 10, 0, 0)
    f.forget()


def test_a_torn_header_means_everything_is_sent_again(tmp_path: Path) -> None:
    f = fill(tmp_path)
    for _ in range(2):
        f.consume(f.peek()[0])  # type: ignore[index]
    f.release(sync=False)
    with open(f.path, "r+b") as fh:
        fh.seek(16)
        fh.write(b"\x00\x00\x00\x00")  # the offset's checksum no longer matches
    g = spill.SpillFile.adopt(f.path)
    assert g is not None
    # Resent batches keep their sequence numbers, so the daemon stores them once (see the Reporter tests).
    assert drain(g) == [1, 2, 3]
    g.forget()


def test_orphans_skip_live_files_foreign_files_and_remove_drained_ones(tmp_path: Path) -> None:
    live = fill(tmp_path)
    dead = spill.SpillFile.create(str(tmp_path), spill.file_name("other", 1, "inc-b"))
    dead.append(payload(1, range(1, 4), run="other", inc="inc-b"), 3)
    dead.release(sync=False)
    drained = spill.SpillFile.create(str(tmp_path), spill.file_name("old", 2, "inc-c"))
    drained.release(sync=False)  # empty: release removes it at once
    empty = spill.SpillFile.create(str(tmp_path), spill.file_name("old", 3, "inc-d"))
    empty.append(payload(1, range(1, 2), inc="inc-d"), 1)
    empty.consume(empty.peek()[0])  # type: ignore[index]
    empty.gone = True  # its owner "died" after the last acknowledgement, before removing it
    os.close(empty.fd)
    (tmp_path / "notes.spill").write_bytes(b"not ours at all")
    found = list(spill.orphans(str(tmp_path)))
    assert [os.path.basename(f.path) for f in found] == [os.path.basename(dead.path)]
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(live.path), os.path.basename(dead.path),
                                                   "notes.spill"])
    for f in found:
        f.forget()
    live.forget()


# ---------------------------------------------------------------------------------------------
# the Reporter


def log_steps(rep: Reporter, steps: range, pause_every: int = 10) -> None:
    """Log train records in bursts smaller than the memory queue, as a training loop spaced by its steps would."""
    for s in steps:
        rep.log("train", s, {"loss": 1.0 / s})
        if s % pause_every == 0:
            time.sleep(0.005)


def test_an_absence_longer_than_the_queue_spills_and_everything_arrives_in_order(
        daemon_factory: Any, reporters: list[Reporter], tmp_path: Path) -> None:
    port, addr = absent_address()
    run, n, max_queue = "sp-absent", 3000, 50
    spill_dir = tmp_path / "spill"
    rep = make(reporters, run=run, address=addr, max_queue=max_queue, batch_size=20, flush_interval=0.02,
               heartbeat_interval=0.1, max_backoff=0.2, spill_path=str(spill_dir))
    log_steps(rep, range(1, n + 1))
    wait_for(lambda: rep.stats().spilled >= n - max_queue, timeout=5, what="the backlog to reach the spill")
    s = rep.stats()
    assert (s.sent, s.dropped) == (0, 0)
    assert s.queued == s.queue_depth  # every record is still held, most of them on disk
    assert s.spill_bytes > 0 and len(os.listdir(spill_dir)) == 1

    d = daemon_factory(grpc_port=port)
    assert rep.flush(20) is True
    s = rep.stats()
    assert (s.dropped, s.rejected, s.queue_depth, s.spill_bytes) == (0, 0, 0, 0)
    assert s.sent == s.queued
    assert [r.step for r in stored_records(d.store, run, "train")] == list(range(1, n + 1))
    assert os.listdir(spill_dir) == []  # a drained spill leaves nothing behind
    # The heartbeats carried the spill's counters.
    beats = stored_records(d.store, run, "heartbeat")
    assert max(b.values["client_spilled_total"] for b in beats) >= n - max_queue
    assert max(b.values["client_spill_bytes"] for b in beats) > 0
    assert all(b.values["client_spill_torn_total"] == 0 for b in beats)


def test_a_full_spill_drops_and_counts_every_record_it_cannot_hold(
        daemon_factory: Any, reporters: list[Reporter], tmp_path: Path) -> None:
    port, addr = absent_address()
    run, n = "sp-full", 3000
    rep = make(reporters, run=run, address=addr, max_queue=50, batch_size=20, flush_interval=0.02,
               heartbeat_interval=0, max_backoff=0.2, spill_path=str(tmp_path), spill_max_bytes=8 * 1024)
    log_steps(rep, range(1, n + 1))
    wait_for(lambda: rep.stats().dropped > 0 and rep.stats().queue_depth <= 50 + rep.stats().spilled,
             timeout=5, what="the spill to fill")
    assert os.path.getsize(next(tmp_path.glob("*.spill"))) <= 8 * 1024
    d = daemon_factory(grpc_port=port)
    assert rep.flush(20) is True
    s = rep.stats()
    steps = [r.step for r in stored_records(d.store, run, "train")]
    assert (s.queued, s.rejected, s.queue_depth) == (n, 0, 0)
    assert len(steps) == len(set(steps)) == s.sent == n - s.dropped
    # What the file held is the oldest, in order; then the newest from memory.
    assert steps[:s.spilled] == list(range(1, s.spilled + 1))
    assert steps[-1] == n


SPILL_SCRIPT = """
import json, sys
from monitor import Reporter

rep = Reporter(run=sys.argv[2], address=sys.argv[1], max_queue=1000, batch_size=10, flush_interval=0.02,
               heartbeat_interval=0, max_backoff=0.2, spill_path=sys.argv[3])
first, last = int(sys.argv[4]), int(sys.argv[5])
for s in range(first, last + 1):
    rep.log("train", s, {"loss": 1.0})
ok = rep.close(float(sys.argv[6]))
st = rep.stats()
print(json.dumps({"ok": ok, "incarnation": rep.incarnation, "queued": st.queued, "sent": st.sent,
                  "dropped": st.dropped, "depth": st.queue_depth, "recovered": st.recovered}))
"""


def test_records_spilled_by_a_process_that_exits_are_sent_by_the_next_one_exactly_once(
        daemon_factory: Any, tmp_path: Path) -> None:
    port, addr = absent_address()
    spill_dir = tmp_path / "spill"
    # The first process gives up waiting at exit: its memory queue goes to the spill with the rest.
    res = run_script(SPILL_SCRIPT, addr, "sp-first", str(spill_dir), "1", "500", "0.3")
    assert res.returncode == 0, res.stderr
    first = __import__("json").loads(res.stdout)
    assert (first["ok"], first["sent"], first["dropped"]) == (False, 0, 0)
    assert first["depth"] == first["queued"] == 500
    files = list(spill_dir.glob("*.spill"))
    assert len(files) == 1
    # Kept aside: the same batches found again later, as if a crash came after they were acknowledged.
    shutil.copy(files[0], tmp_path / "copy")

    d = daemon_factory(grpc_port=port)
    res = run_script(SPILL_SCRIPT, d.grpc_address, "sp-second", str(spill_dir), "1", "50", "10")
    assert res.returncode == 0, res.stderr
    second = __import__("json").loads(res.stdout)
    assert second["ok"] is True
    assert second["recovered"] == 500
    assert second["sent"] == 50
    assert [r.step for r in stored_records(d.store, "sp-first", "train")] == list(range(1, 501))
    assert [r.step for r in stored_records(d.store, "sp-second", "train")] == list(range(1, 51))
    assert list(spill_dir.iterdir()) == []

    # The copy comes back under its old identity: the daemon recognises every batch and stores none twice.
    shutil.copy(tmp_path / "copy", files[0])
    dups_before = d.ingest.duplicates
    res = run_script(SPILL_SCRIPT, d.grpc_address, "sp-third", str(spill_dir), "1", "5", "10")
    assert res.returncode == 0, res.stderr
    assert __import__("json").loads(res.stdout)["recovered"] == 500  # delivered, and acknowledged as duplicates
    assert d.ingest.duplicates - dups_before == 50
    assert [r.step for r in stored_records(d.store, "sp-first", "train")] == list(range(1, 501))
    assert list(spill_dir.iterdir()) == []


def test_spill_counters_reach_the_daemon_metrics(daemon_factory: Any, reporters: list[Reporter],
                                                 tmp_path: Path) -> None:
    port, addr = absent_address()
    rep = make(reporters, run="sp-metrics", address=addr, max_queue=10, batch_size=5, flush_interval=0.02,
               heartbeat_interval=0.1, max_backoff=0.2, spill_path=str(tmp_path))
    log_steps(rep, range(1, 201), pause_every=5)
    wait_for(lambda: rep.stats().spilled >= 150, timeout=5, what="records to spill")
    d = daemon_factory(grpc_port=port)
    assert rep.flush(10) is True
    spilled = rep.stats().spilled
    assert spilled >= 150

    def reported() -> Any:
        # The daemon keeps each rank's latest client counters, from its latest heartbeat.
        rank = http_json(f"{d.http_url}/api/v1/runs/sp-metrics")["ranks"][0]
        c = rank["client"]
        return c.get("client_spilled_total") == spilled and c.get("client_spill_bytes") == 0 and c

    # A heartbeat from after the drain: everything spilled, all of it sent.
    client = wait_for(reported, timeout=10, what="a heartbeat with the final spill counts")
    assert client["client_spill_torn_total"] == 0
    # The daemon exports the client counters it knows by name (the spill's are listed in the report to it).
    labels = {"run": "sp-metrics", "rank": "0"}
    assert metric(metric_samples(d.http_url), "trainguard_client_sent_records_total", **labels) is not None


def test_the_training_thread_never_waits_for_the_spill(reporters: list[Reporter], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # A disk that takes 50 ms per write: log() must not notice.
    real = os.pwrite

    def slow(fd: int, data: bytes, off: int) -> int:
        if threading.current_thread().name == "trainguard-sender":
            time.sleep(0.05)
        return real(fd, data, off)

    monkeypatch.setattr(spill.os, "pwrite", slow)
    _, addr = absent_address()
    rep = make(reporters, run="sp-slow", address=addr, max_queue=20, batch_size=10, flush_interval=0.01,
               heartbeat_interval=0, max_backoff=0.2, spill_path=str(tmp_path))
    worst = 0.0
    for s in range(1, 2001):
        t0 = time.perf_counter()
        rep.log("train", s, {"loss": 1.0})
        worst = max(worst, time.perf_counter() - t0)
        if s % 10 == 0:
            time.sleep(0.002)
    assert rep.stats().spilled > 0
    assert worst < 0.02, worst


def test_an_unwritable_spill_directory_falls_back_to_counted_drops(daemon_factory: Any, reporters: list[Reporter],
                                                                   tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    port, addr = absent_address()
    rep = make(reporters, run="sp-unwritable", address=addr, max_queue=20, batch_size=10, flush_interval=0.02,
               heartbeat_interval=0, max_backoff=0.2, spill_path=str(blocker / "spill"))
    log_steps(rep, range(1, 501))
    wait_for(lambda: rep.stats().queue_depth <= 20, timeout=5, what="the backlog to be trimmed")
    d = daemon_factory(grpc_port=port)
    assert rep.flush(10) is True
    s = rep.stats()
    assert s.spilled == 0
    assert len(stored_records(d.store, "sp-unwritable", "train")) == s.sent == 500 - s.dropped
    assert s.dropped > 0


# ---------------------------------------------------------------------------------------------
# the daemon's retry delay


class Refusing:
    """A Report endpoint that answers RESOURCE_EXHAUSTED (with the given trailer) `refusals` times, then accepts."""

    def __init__(self, refusals: int, trailer: tuple[tuple[str, str], ...]):
        self.refusals = refusals
        self.trailer = trailer
        self.calls: list[float] = []
        self.seqs: list[int] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            wire.SERVICE, {"Report": grpc.unary_unary_rpc_method_handler(self.report)})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def report(self, request: bytes, context: Any) -> bytes:
        batch = wire.decode_batch(request)
        self.calls.append(time.monotonic())
        self.seqs.append(batch.sequence)
        if len(self.calls) <= self.refusals:
            context.set_trailing_metadata(self.trailer)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests from this client")
        return wire.encode_response(batch.sequence, batch.n_records, [])


@pytest.mark.parametrize("trailer, low, high", [
    ((("retry-after-ms", "400"),), 0.4, 0.9),  # the daemon's delay, whatever the client's own backoff says
    ((), 0.0, 0.3),  # no trailer: the client's backoff (capped here at 0.1 s)
    ((("retry-after-ms", "soon"),), 0.0, 0.3),  # a malformed trailer: the same
])
def test_resource_exhausted_waits_as_long_as_the_daemon_asks(reporters: list[Reporter], trailer: Any,
                                                             low: float, high: float) -> None:
    srv = Refusing(2, trailer)
    try:
        rep = make(reporters, run="sp-limited", address=f"127.0.0.1:{srv.port}", heartbeat_interval=0,
                   flush_interval=0.01, max_backoff=0.1)
        rep.log("train", 1, {"loss": 1.0})
        assert rep.flush(10) is True
        assert srv.seqs == [1, 1, 1]  # the same batch each time, not a new one
        gaps = [b - a for a, b in zip(srv.calls, srv.calls[1:])]
        assert all(low <= g <= high for g in gaps), gaps
        s = rep.stats()
        assert (s.sent, s.retries, s.dropped) == (1, 2, 0)
    finally:
        srv.server.stop(0)


def test_retry_after_reads_the_trailer() -> None:
    class Err:
        def __init__(self, md: Any):
            self.md = md

        def trailing_metadata(self) -> Any:
            return self.md

    assert retry_after(Err((("retry-after-ms", "250"),))) == 0.25
    assert retry_after(Err((("other", "1"), ("retry-after-ms", b"1000")))) == 1.0
    assert retry_after(Err((("retry-after-ms", "999999999"),))) == 60.0
    assert retry_after(Err((("retry-after-ms", "-5"),))) == 0.0
    assert retry_after(Err(None)) is None
    assert retry_after(Err((("retry-after-ms", "x"),))) is None
    assert retry_after(object()) is None
