"""Daemon ingest: sustained throughput, log-to-visible latency under that load, and memory for a big job.

    .venv/bin/python bench/ingest.py            # about 75 s
    .venv/bin/python bench/ingest.py --quick    # about 25 s (no baseline for the memory figure)

Everything runs in separate processes on loopback: the daemon (`python -m monitor serve`), a load
generator, and this process (the latency probe). The load generator plays 64 clients, each its own
(run, rank, incarnation) with increasing sequence numbers and one batch in flight, as a Reporter
under pressure does: 8 runs of 8 ranks, 1,000 train records of 9 values per batch. The records
are serialized once; each batch re-serializes only its header (protobuf messages concatenate, so
header bytes + records bytes parse as one ReportRequest) and goes out as raw bytes.

(a) records/s acknowledged by the daemon (an acknowledgement means committed and applied).
(b) right after (a), under the same load: real Reporters (default settings) log a train step at
    random moments, and pollers watch GET /api/v1/runs/{run} until last_step shows it; the figure
    is the time from log() to visible. The pollers stay out of (a)'s window, since their requests
    cost the daemon too. The same figure on the idle daemon is shown for reference.
(c) RSS of a fresh daemon after one run of 1,024 ranks has reported 30 value series each for 300
    steps (every per-rank window full).

The baseline is a bare gRPC server in its own process that acknowledges the same bytes without
looking at them, under the same load: the transport's ceiling next to trainguard's figure.

Targets: (a) >= 250,000 records/s; (b) p99 <= 250 ms; (c) RSS <= 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import ROOT, TRAIN_NAMES, ServeProcess, machine, percentile, table, train_values, verdict  # noqa: E402

TARGET_RPS = 250_000
TARGET_P99_S = 0.250
TARGET_RSS = 300 * 1024 * 1024
MEM_SERIES_EXTRA = tuple(f"layer{i:02d}_grad_norm" for i in range(30))


# ---------------------------------------------------------------------------------------------
# payloads


def _records_bytes(first_step: int, n: int, names: tuple[str, ...], t0: float) -> bytes:
    """n train records serialized as the `records` field of a ReportRequest (no header)."""
    from monitor import wire
    from monitor.records import Record

    recs = []
    for i in range(n):
        step = first_step + i
        base = train_values(step)
        vals = {nm: base.get(nm, 1.0 + (step + k) * 1e-3) for k, nm in enumerate(names)}
        recs.append(Record("train", "x", t0 + step * 0.1, 0, step, vals))
    req = wire.ReportRequest()
    wire.encode_records(req, recs, 0)
    return req.SerializeToString()


def _header(run: str, rank: int, incarnation: str, seq: int) -> bytes:
    from monitor import wire

    return wire.ReportRequest(run=run, rank=rank, incarnation=incarnation, sequence=seq,
                              client="trainguard-bench").SerializeToString()


def _channel(address: str) -> Any:
    import grpc

    return grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 16 << 20),
                                                   ("grpc.max_receive_message_length", 16 << 20)])


# ---------------------------------------------------------------------------------------------
# child roles


def role_ack_server(ready_file: str) -> int:
    """A bare gRPC server on the Report method that acknowledges every batch without reading it."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from monitor import wire

    ack = wire.encode_response(1, 1000, [])
    server = grpc.server(ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        wire.SERVICE, {"Report": grpc.unary_unary_rpc_method_handler(lambda req, ctx: ack)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with open(ready_file + ".tmp", "w") as f:
        json.dump({"grpc_port": port, "pid": os.getpid()}, f)
    os.replace(ready_file + ".tmp", ready_file)
    while not stop.wait(0.5):
        pass
    server.stop(1).wait(2)
    return 0


def role_load(address: str, clients: int, runs: int, batch: int, warmup: float, seconds: float, extra: float,
              check: bool, rate: float = 0.0) -> int:
    """Keep `clients` senders busy for warmup + seconds (+ extra); print JSON lines with what was acknowledged.

    With `rate` (records/s over all clients) each sender paces its batches instead of sending back to back.
    """
    from monitor import wire

    payload = _records_bytes(1, batch, TRAIN_NAMES, time.time() - 3600)
    chans = [_channel(address) for _ in range(runs)]
    calls = [ch.unary_unary(wire.REPORT_METHOD) for ch in chans]
    acked = [0] * clients
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    stop = threading.Event()
    measuring = threading.Event()
    tag = uuid.uuid4().hex[:6]

    def sender(i: int) -> None:
        run, rank = f"bench-ingest-{tag}-{i % runs}", i // runs
        inc = uuid.uuid4().hex[:16]
        call = calls[i % runs]
        seq = 0
        interval = clients * batch / rate if rate > 0 else 0.0
        next_at = time.perf_counter() + random.uniform(0.0, interval)
        while not stop.is_set():
            if interval:
                time.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += interval
            seq += 1
            data = _header(run, rank, inc, seq) + payload
            t0 = time.perf_counter()
            try:
                resp = call(data, timeout=60)
            except Exception as e:  # noqa: BLE001 - counted and shown, the others keep going
                errors.append(repr(e)[:200])
                time.sleep(0.1)
                continue
            dt = time.perf_counter() - t0
            if check:
                r = wire.decode_response(resp)
                if r.accepted != batch or r.duplicate or r.ack_sequence != seq:
                    errors.append(f"client {i}: unexpected ack {r}")
            acked[i] += batch
            if measuring.is_set():
                lat[i].append(dt)

    threads = [threading.Thread(target=sender, args=(i,), daemon=True) for i in range(clients)]
    for th in threads:
        th.start()
    time.sleep(warmup)
    n0, t0 = sum(acked), time.perf_counter()
    measuring.set()
    print(json.dumps({"event": "measuring"}), flush=True)
    # The rate in each second too: on a shared machine the spread says how much to trust the mean.
    per_second = []
    last = n0
    for k in range(1, int(seconds) + 1):
        time.sleep(max(0.0, t0 + k - time.perf_counter()))
        now = sum(acked)
        per_second.append(now - last)
        last = now
    time.sleep(max(0.0, t0 + seconds - time.perf_counter()))
    n1, t1 = sum(acked), time.perf_counter()
    measuring.clear()
    lats = [x for xs in lat for x in xs]
    print(json.dumps({"event": "measured", "records": n1 - n0, "seconds": t1 - t0, "rps": (n1 - n0) / (t1 - t0),
                      "per_second": per_second,
                      "calls": len(lats), "call_p50": percentile(lats, 50), "call_p99": percentile(lats, 99),
                      "errors": len(errors), "first_error": errors[0] if errors else None}), flush=True)
    # The same load goes on while the caller measures something else under it.
    time.sleep(extra)
    n2, t2 = sum(acked), time.perf_counter()
    stop.set()
    for th in threads:
        th.join(70)
    print(json.dumps({"event": "done", "rps": (n2 - n1) / (t2 - t1) if t2 > t1 else 0.0, "errors": len(errors)}),
          flush=True)
    for ch in chans:
        ch.close()
    return 0


def role_mem_load(address: str, ranks: int, series: int, steps: int, batch: int) -> int:
    """One run of `ranks` ranks, each reporting `series` value series for `steps` steps."""
    from concurrent.futures import ThreadPoolExecutor

    from monitor import wire
    from monitor.daemon.state import WINDOW_SERIES

    # Every series the daemon keeps a window for, then per-layer norms: the most memory per series.
    names = (tuple(WINDOW_SERIES) + MEM_SERIES_EXTRA)[:series]
    t0 = time.time() - 3600
    sizes = [min(batch, steps - s) for s in range(0, steps, batch)]
    chunks = [_records_bytes(s, n, names, t0) for s, n in zip(range(0, steps, batch), sizes)]
    run = f"bench-mem-{uuid.uuid4().hex[:6]}"
    chans = [_channel(address) for _ in range(8)]
    calls = [ch.unary_unary(wire.REPORT_METHOD) for ch in chans]
    errors: list[str] = []

    def one_rank(rank: int) -> tuple[int, int]:
        inc = uuid.uuid4().hex[:16]
        call = calls[rank % len(calls)]
        batches = records = 0
        for seq, (chunk, n) in enumerate(zip(chunks, sizes), 1):
            try:
                call(_header(run, rank, inc, seq) + chunk, timeout=60)
                batches += 1
                records += n
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e)[:200])
        return batches, records

    start = time.perf_counter()
    with ThreadPoolExecutor(64) as ex:
        done = list(ex.map(one_rank, range(ranks)))
    print(json.dumps({"event": "done", "run": run, "batches": sum(b for b, _ in done),
                      "records": sum(r for _, r in done),
                      "seconds": time.perf_counter() - start, "errors": len(errors),
                      "first_error": errors[0] if errors else None}), flush=True)
    for ch in chans:
        ch.close()
    return 0


# ---------------------------------------------------------------------------------------------
# orchestration


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)


def _read_event(proc: subprocess.Popen[str], event: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load process ended early (exit {proc.wait()})")
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("event") == event:
            return msg
    raise RuntimeError(f"no {event!r} from the load process in {timeout}s")


class AckServer:
    """The baseline server as a child process."""

    def __enter__(self) -> "AckServer":
        self.tmp = tempfile.TemporaryDirectory(prefix="trainguard-bench-")
        ready = os.path.join(self.tmp.name, "ready.json")
        self.proc = _spawn("--role", "ack-server", "--ready-file", ready)
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the baseline server did not start")
            time.sleep(0.05)
        with open(ready) as f:
            info = json.load(f)
        self.address = f"127.0.0.1:{info['grpc_port']}"
        self.pid = info["pid"]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.tmp.cleanup()


def _rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


class LatencyProbe:
    """Reporters that log a train step at random moments, and pollers that time when each step shows up."""

    def __init__(self, address: str, url: str, n: int = 4, mean_interval: float = 0.25, poll: float = 0.01,
                 flush_interval: float | None = None):
        from monitor import Reporter

        tag = uuid.uuid4().hex[:6]
        self.url = url
        self.runs = [f"bench-latency-{tag}-{i}" for i in range(n)]
        kw = {} if flush_interval is None else {"flush_interval": flush_interval}
        self.reporters = [Reporter(run=r, rank=0, address=address, **kw) for r in self.runs]
        self.mean_interval = mean_interval
        self.poll = poll
        self._samples: list[float] = []
        self._logged: list[dict[int, float]] = [{} for _ in self.runs]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._active = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> "LatencyProbe":
        """Start the reporters' loops and the pollers (idle until measure())."""
        for i in range(len(self.runs)):
            self._threads.append(threading.Thread(target=self._log_loop, args=(i,), daemon=True))
            self._threads.append(threading.Thread(target=self._poll_loop, args=(i,), daemon=True))
        for th in self._threads:
            th.start()
        return self

    def measure(self, seconds: float, drain: float = 10.0) -> tuple[list[float], int]:
        """Log for `seconds`, wait up to `drain` for the steps to show up; (sorted latencies, steps never seen)."""
        with self._lock:
            self._samples = []
        self._active.set()
        time.sleep(seconds)
        self._active.clear()
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline:
            with self._lock:
                if not any(self._logged):
                    break
            time.sleep(0.02)
        with self._lock:
            misses = sum(len(d) for d in self._logged)
            for d in self._logged:
                d.clear()
            return sorted(self._samples), misses

    def _log_loop(self, i: int) -> None:
        rep = self.reporters[i]
        rng = random.Random(i)
        step = 0
        # Random gaps: a fixed period would lock onto the sender's flush timer and bias the figure.
        while not self._stop.wait(rng.uniform(0.5, 1.5) * self.mean_interval):
            step += 1
            t = time.perf_counter()
            rep.log("train", step, train_values(step))
            if self._active.is_set():
                with self._lock:
                    self._logged[i][step] = t

    def _poll_loop(self, i: int) -> None:
        url = f"{self.url}/api/v1/runs/{self.runs[i]}"
        while not self._stop.is_set():
            with self._lock:
                pending = bool(self._logged[i])
            if not pending:
                time.sleep(self.poll)
                continue
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    last = json.load(r).get("last_step") or 0
            except Exception:  # noqa: BLE001 - the run appears with its first batch
                time.sleep(self.poll)
                continue
            now = time.perf_counter()
            with self._lock:
                for s in [s for s in self._logged[i] if s <= last]:
                    self._samples.append(now - self._logged[i].pop(s))
            time.sleep(self.poll)

    def close(self) -> None:
        """Stop the loops and the reporters."""
        self._stop.set()
        for th in self._threads:
            th.join(15)
        for rep in self.reporters:
            rep.close(2.0)


def run_load(address: str, args: argparse.Namespace, probe: LatencyProbe | None, check: bool,
             rate: float = 0.0) -> dict[str, Any]:
    """Drive the load process against `address`: throughput first, then the latency probe under the same load.

    The probe's pollers stay out of the throughput window: their HTTP requests cost the daemon too.
    """
    extra = args.probe_seconds + 3.0 if probe is not None else 0.0
    proc = _spawn("--role", "load", "--address", address, "--clients", str(args.clients), "--runs", str(args.runs),
                  "--batch", str(args.batch), "--warmup", str(args.warmup), "--seconds", str(args.seconds),
                  "--extra", str(extra), "--rate", str(rate), *(["--check"] if check else []))
    try:
        _read_event(proc, "measuring", args.warmup + 60)
        res = _read_event(proc, "measured", args.seconds + 90)
        if probe is not None:
            res["latency"], res["latency_misses"] = probe.measure(args.probe_seconds, drain=60.0)
        done = _read_event(proc, "done", extra + 120)
        res["rps_during_probe"] = done["rps"]
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return res


def run_mem_load(address: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run of args.ranks ranks x args.series series; returns the load process's summary."""
    proc = _spawn("--role", "mem-load", "--address", address, "--ranks", str(args.ranks), "--series",
                  str(args.series), "--mem-steps", str(args.mem_steps), "--mem-batch", str(args.mem_batch))
    try:
        res = _read_event(proc, "done", 300)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return res


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one of its child roles)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter load phases (about 20 s)")
    ap.add_argument("--daemon-config", default=None, metavar="FILE",
                    help="config file for the measured daemon (e.g. to see the cost of the detectors)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument("--runs", type=int, default=8, help="runs the clients are spread over (default 8)")
    ap.add_argument("--batch", type=int, default=1000, help="records per batch (default 1000)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds of load before measuring (default 3)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds measured for (a) (default 15)")
    ap.add_argument("--probe-seconds", type=float, default=None, help="seconds of logging for (b) (default 15)")
    ap.add_argument("--ranks", type=int, default=1024, help="ranks for the memory figure (default 1024)")
    ap.add_argument("--series", type=int, default=30, help="value series per rank (default 30)")
    ap.add_argument("--mem-steps", type=int, default=300, help="steps per rank for the memory figure (default 300)")
    ap.add_argument("--mem-batch", type=int, default=300, help="records per batch for the memory figure (default 300)")
    ap.add_argument("--skip-baseline", action="store_true", help="measure trainguard only")
    ap.add_argument("--flush-interval", type=float, default=None,
                    help="the probe Reporters' flush_interval (default: the Reporter's default)")
    ap.add_argument("--role", choices=["ack-server", "load", "mem-load"], help=argparse.SUPPRESS)
    ap.add_argument("--ready-file", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--extra", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "ack-server":
        return role_ack_server(args.ready_file)
    if args.role == "load":
        return role_load(args.address, args.clients, args.runs, args.batch, args.warmup, args.seconds, args.extra,
                         args.check, args.rate)
    if args.role == "mem-load":
        return role_mem_load(args.address, args.ranks, args.series, args.mem_steps, args.mem_batch)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    args.seconds = args.seconds if args.seconds is not None else (3.0 if args.quick else 15.0)
    args.probe_seconds = args.probe_seconds if args.probe_seconds is not None else (3.0 if args.quick else 15.0)
    args.idle_seconds = 2.0 if args.quick else 6.0

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    base: dict[str, Any] = {}
    if not args.skip_baseline:
        with AckServer() as ack:
            base["rss_idle"] = _rss(ack.pid)
            base["load"] = run_load(ack.address, args, None, check=False)
            if not args.quick:
                run_mem_load(ack.address, args)
                time.sleep(0.5)
                base["rss_mem"] = _rss(ack.pid)

    tg: dict[str, Any] = {}
    with ServeProcess(["--config", args.daemon_config] if args.daemon_config else []) as serve:
        probe = LatencyProbe(serve.address, serve.url, flush_interval=args.flush_interval).start()
        try:
            tg["idle_latency"], tg["idle_misses"] = probe.measure(args.idle_seconds)
            tg["load"] = run_load(serve.address, args, probe, check=True)
            # Latency at saturation is queueing by definition; the figure a run sees in practice is at
            # a load the daemon keeps up with, so it is measured again at half the capacity just found.
            tg["paced"] = run_load(serve.address, args, probe, check=True, rate=0.5 * tg["load"]["rps"])
        finally:
            probe.close()
        tg["rss_load"] = _rss(serve.pid)
    with ServeProcess() as fresh:
        tg["rss_fresh"] = _rss(fresh.pid)
        tg["mem"] = run_mem_load(fresh.address, args)
        time.sleep(0.5)
        tg["rss_mem"] = _rss(fresh.pid)
        runs = {r["run"]: r for r in _get(f"{fresh.url}/api/v1/runs")["runs"]}
        mem_run = runs.get(tg["mem"]["run"], {})

    mb = 1024 * 1024
    ld, bl = tg["load"], base.get("load")
    lat, idle = ld["latency"], tg["idle_latency"]

    def ms(xs: list[float], q: float) -> str:
        return f"{percentile(xs, q) * 1e3:.0f}" if xs else "-"

    rows = [
        [f"(a) records/s, {args.clients} clients x {args.batch:,}-record batches", f"{ld['rps']:,.0f}",
         f"{bl['rps']:,.0f}" if bl else "-", f">= {TARGET_RPS:,}"],
        ["    Report call p50 / p99 under that load (ms)", f"{ld['call_p50'] * 1e3:.0f} / {ld['call_p99'] * 1e3:.0f}",
         f"{bl['call_p50'] * 1e3:.1f} / {bl['call_p99'] * 1e3:.1f}" if bl else "-", ""],
        ["(b) log() -> visible in runs API under load, p50 (ms)", ms(lat, 50), "-", ""],
        ["    log() -> visible in runs API under load, p99 (ms)", ms(lat, 99), "-", f"<= {TARGET_P99_S * 1e3:.0f}"],
        ["    log() -> visible in runs API, idle daemon, p50 / p99 (ms)", f"{ms(idle, 50)} / {ms(idle, 99)}", "-", ""],
        [f"    log() -> visible at half capacity ({tg['paced']['rps']:,.0f} records/s), p50 / p99 (ms)",
         f"{ms(tg['paced']['latency'], 50)} / {ms(tg['paced']['latency'], 99)}", "-", ""],
        ["(c) RSS, fresh daemon (MB)", f"{tg['rss_fresh'] / mb:.0f}", f"{base['rss_idle'] / mb:.0f}" if base else "-",
         ""],
        [f"    RSS after {args.ranks:,} ranks x {args.series} series x {args.mem_steps} steps (MB)",
         f"{tg['rss_mem'] / mb:.0f}", f"{base['rss_mem'] / mb:.0f}" if "rss_mem" in base else "-",
         f"<= {TARGET_RSS // mb}"],
        ["    RSS after the load of (a) and (b) (MB)", f"{tg['rss_load'] / mb:.0f}", "-", ""],
    ]
    print(f"bench/ingest.py: daemon, load generator and probe in separate processes on loopback; "
          f"{args.warmup:.0f}s warm-up + {args.seconds:.0f}s measured; total {time.monotonic() - started:.0f}s")
    print(f"machine: {machine()} (load {load_before:.2f} before the run)")
    print()
    print(table(["figure", "trainguard", "baseline: bare gRPC ack server", "target"], rows))
    print()
    ps = ld["per_second"]
    print(f"(a) {ld['records']:,} records acknowledged in {ld['seconds']:.1f}s over {ld['calls']:,} calls, "
          f"{ld['errors']} errors{': ' + ld['first_error'] if ld['errors'] else ''}; each acknowledgement means "
          f"committed to SQLite and applied; per second min/median/max {min(ps):,} / {percentile(ps, 50):,.0f} / "
          f"{max(ps):,}")
    print(f"(b) {len(lat)} samples from {len(probe.runs)} Reporters over {args.probe_seconds:.0f}s under the same "
          f"load ({ld['rps_during_probe']:,.0f} records/s meanwhile), {ld['latency_misses']} never seen; "
          f"{len(idle)} samples at idle; Reporter defaults (flush_interval {probe.reporters[0].flush_interval}s)")
    m = tg["mem"]
    print(f"(c) {m['records']:,} records in {m['batches']:,} batches in {m['seconds']:.1f}s, {m['errors']} errors; "
          f"the runs API shows world_size {mem_run.get('world_size')}, last_step {mem_run.get('last_step')}")
    print()
    ok_a = ld["rps"] >= TARGET_RPS and ld["errors"] == 0
    ok_b = bool(lat) and percentile(lat, 99) <= TARGET_P99_S and ld["latency_misses"] == 0
    ok_c = tg["rss_mem"] <= TARGET_RSS and m["errors"] == 0 and mem_run.get("world_size") == args.ranks
    print(verdict(f"(a) sustained ingest >= {TARGET_RPS:,} records/s", ok_a, f"{ld['rps']:,.0f} records/s"))
    print(verdict(f"(b) log() -> visible p99 <= {TARGET_P99_S * 1e3:.0f} ms under load", ok_b,
                  f"p99 {ms(lat, 99)} ms"))
    print(verdict(f"(c) RSS after {args.ranks:,} ranks x {args.series} series <= {TARGET_RSS // mb} MB", ok_c,
                  f"{tg['rss_mem'] / mb:.0f} MB"))
    return 0 if ok_a and ok_b and ok_c else 1


if __name__ == "__main__":
    sys.exit(main())
