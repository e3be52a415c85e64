"""Soak: a real daemon under 64 well-behaved ranks and one abusive client, for a bounded time.

    .venv/bin/python bench/soak.py              # 10 minutes
    .venv/bin/python bench/soak.py --quick      # 1 minute
    .venv/bin/python bench/soak.py --minutes 30

Everything runs in separate processes on loopback: the daemon (`python -m monitor serve`, default
config), four rank processes of 16 Reporters each (8 runs x 8 ranks; every rank logs a train record of
ten values 10 times a second and a system record every 5 s, with Reporter defaults and heartbeats),
and an abusive client that sends, as fast as it is allowed (--abuse-rate), garbage bytes as Report
calls, raw garbage on TCP connections to the gRPC port, malformed protobufs, batches over 4 MiB, run
ids outside the alphabet, and well-formed batches each under a fresh junk run id.

Figures:
(a) daemon RSS sampled every 2 s (psutil): after warm-up (the first quarter of the run) its peak stays
    within 10 % of its value at the end of warm-up;
(b) no good record lost: every rank's train and system records are in the daemon's store exactly once
    after the run (read from the SQLite file after a graceful stop), and no Reporter dropped or had
    refused any;
(c) the abusive client's calls, by status code, next to the daemon's rejection counters from /metrics.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import ROOT, ServeProcess, machine, percentile, table, train_values, verdict  # noqa: E402

RUNS, RANKS_PER_RUN, RANK_PROCESSES = 8, 8, 4
STEPS_PER_SECOND = 10.0
SYSTEM_EVERY = 5.0
RSS_TOLERANCE = 0.10
SAMPLE_EVERY = 2.0


# ---------------------------------------------------------------------------------------------
# child roles


def _emit(event: str, **kw: Any) -> None:
    print(json.dumps({"event": event, **kw}), flush=True)


def role_ranks(address: str, ranks: list[tuple[str, int]], seconds: float) -> int:
    """Play several ranks, each its own Reporter, at a steady pace; report what each logged and its counters."""
    from monitor import Reporter

    reps = [Reporter(run=run, rank=rank, address=address) for run, rank in ranks]
    for rep in reps:
        rep.run_started(world_size=RANKS_PER_RUN, meta={"framework": "soak"})
    logged = [{"train": 0, "system": 0} for _ in reps]
    _emit("started")
    t0 = time.monotonic()
    tick, next_system = 0, t0 + SYSTEM_EVERY
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        tick += 1
        for i, rep in enumerate(reps):
            vals = train_values(tick)
            vals["tokens_per_second"] = 78_000.0
            rep.log("train", tick, vals)
            logged[i]["train"] += 1
        if now >= next_system:
            next_system += SYSTEM_EVERY
            for i, rep in enumerate(reps):
                rep.log("system", tick, {"host_rss_bytes": 2.1e9, "cpu_percent": 95.0,
                                         "gpu_memory_allocated_bytes": 3.0e10})
                logged[i]["system"] += 1
        time.sleep(max(0.0, t0 + tick / STEPS_PER_SECOND - time.monotonic()))
    for rep in reps:
        rep.end("completed")
    out = []
    for (run, rank), rep, n in zip(ranks, reps, logged):
        ok = rep.close(30)
        s = rep.stats()
        out.append({"run": run, "rank": rank, "ok": ok, "train": n["train"], "system": n["system"],
                    "queued": s.queued, "sent": s.sent, "dropped": s.dropped, "rejected": s.rejected,
                    "retries": s.retries, "depth": s.queue_depth, "last_error": s.last_error})
    _emit("done", ranks=out)
    return 0


def _malformed(rng: random.Random, seq: int) -> tuple[list[bytes], list[Any]]:
    """Protobufs that are not valid batches, each in its own way; and the well-framed ones whose records are bad,
    as messages, so that each send can take a new sequence number and be judged rather than taken for a resend."""
    from monitor import wire
    from monitor.records import Record

    good = wire.encode_batch("soak-junk", 0, "junk-inc", seq,
                             [Record("train", "soak-junk", time.time(), 0, s, {"loss": 1.0}) for s in range(1, 50)])
    R = wire.ReportRequest
    bad_values = R(run="soak-junk", rank=0, incarnation="x-values", sequence=seq)
    rec = bad_values.records.add(kind="train", step=1, t=time.time())
    rec.names.extend(f"v{i}" for i in range(300))  # over the per-record value limit
    rec.values.extend([1.0] * 300)
    bad_kind = R(run="soak-junk", rank=0, incarnation="x-kind", sequence=seq)
    bad_kind.records.add(kind="nonsense", step=1, t=float("nan"))
    mismatched = R(run="soak-junk", rank=0, incarnation="x-block", sequence=seq)
    mismatched.blocks.add(kind="train", names=["loss", "lr"], steps=[1, 2, 3], t=[1.0], values=[1.0])
    return [
        good[: len(good) // 2],  # cut short
        good[:-3],
        b"\x0a\xff\xff\xff\xff\x0f" + good,  # a length that runs past the end
        b"\x08\x01" + good,  # a varint where the run id's string goes
        R(run="soak-junk", rank=2**31, incarnation="x", sequence=seq).SerializeToString(),
        R(run="soak-junk", rank=0, incarnation="", sequence=1).SerializeToString(),
        R(run="soak-junk", rank=0, incarnation="x", sequence=0).SerializeToString(),  # sequence 0 is never valid
        R(run="soak-junk", rank=0, incarnation="x" * 1000, sequence=1).SerializeToString(),
        bytes(rng.getrandbits(8) for _ in range(64)) + good,
    ], [bad_values, bad_kind, mismatched]


def role_abuse(address: str, seconds: float, rate: float) -> int:
    """Send the daemon everything a broken or hostile client could, at up to `rate` attempts/s; count outcomes."""
    import grpc

    from monitor import wire
    from monitor.records import Record

    rng = random.Random(7)
    host, port = address.rsplit(":", 1)
    ch = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024),
                                                 ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                                 ("grpc.enable_retries", 0)])
    call = ch.unary_unary(wire.REPORT_METHOD)
    malformed, bad_records = _malformed(rng, 1)
    oversized = os.urandom(5 * 1024 * 1024)
    bad_runs = ["../../etc/passwd", "run with spaces", "r" * 500, "run\x00nul", "ünïcødé", "", "run;DROP TABLE"]
    outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    def attempt(kind: str, payload: bytes) -> None:
        try:
            call(payload, timeout=5)
            outcomes[kind]["OK"] += 1
        except grpc.RpcError as e:
            outcomes[kind][e.code().name if e.code() else "UNKNOWN"] += 1

    def raw_tcp() -> None:
        try:
            with socket.create_connection((host, int(port)), timeout=2) as s:
                s.sendall(os.urandom(rng.randint(1, 4096)))
                s.settimeout(0.2)
                try:
                    s.recv(1024)
                except OSError:
                    pass
            outcomes["raw_tcp"]["sent"] += 1
        except OSError as e:
            outcomes["raw_tcp"][type(e).__name__] += 1

    _emit("started")
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        i += 1
        pick = i % 20
        if pick < 6:
            attempt("garbage", os.urandom(rng.randint(1, 2048)))
        elif pick < 9:
            attempt("malformed", malformed[i % len(malformed)])
        elif pick < 11:
            msg = bad_records[i % len(bad_records)]
            msg.sequence = i
            attempt("bad_records", msg.SerializeToString())
        elif pick < 14:
            run = bad_runs[i % len(bad_runs)]
            req = wire.ReportRequest(run=run, rank=0, incarnation="junk", sequence=1)
            req.records.add(kind="train", step=1, t=time.time(), names=["loss"], values=[1.0])
            attempt("bad_run_id", req.SerializeToString())
        elif pick < 17:
            # Well-formed, but every batch under a run id never seen before: what a leak of run ids costs.
            run = f"junk-{rng.getrandbits(48):012x}"
            attempt("fresh_run_id", wire.encode_batch(run, 0, "junk", 1, [Record("train", run, time.time(), 0, 1,
                                                                                  {"loss": 1.0})]))
        elif pick < 18:
            raw_tcp()
        elif pick < 19:
            # Well-formed, under one run, but every batch from an incarnation never seen before.
            attempt("fresh_incarnation", wire.encode_batch("soak-junk", 1, f"inc-{i}", 1, [
                Record("train", "soak-junk", time.time(), 1, i, {"loss": 1.0})]))
        elif i % 100 == 19:
            attempt("oversized", oversized)
        else:
            attempt("garbage", os.urandom(16))
        if rate > 0:
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    elapsed = time.monotonic() - t0
    ch.close()
    _emit("done", attempts=i, seconds=elapsed, outcomes={k: dict(v) for k, v in outcomes.items()})
    return 0


# ---------------------------------------------------------------------------------------------
# the soak


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)


def _read_event(proc: subprocess.Popen[str], event: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child ended early (exit {proc.wait()})")
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("event") == event:
            return msg
    raise RuntimeError(f"no {event!r} from the child in {timeout}s")


def _metrics(url: str) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _stored(db: str, runs: list[str]) -> dict[tuple[str, int, str], collections.Counter[int]]:
    """(run, rank, kind) -> Counter of steps, for the good runs' train and system records in the store."""
    from monitor import wire
    from monitor.daemon.store import Store

    out: dict[tuple[str, int, str], collections.Counter[int]] = collections.defaultdict(collections.Counter)
    store = Store(db)
    for run in runs:
        for *_, data in store.batches(run):
            for rec in wire.decode_batch(data).records:
                if rec.kind in ("train", "system"):
                    out[(run, rec.rank, rec.kind)][rec.step] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the soak (or one of its child roles)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the load lasts (default 10)")
    ap.add_argument("--quick", action="store_true", help="one minute")
    ap.add_argument("--abuse-rate", type=float, default=1000.0,
                    help="the abusive client's attempts per second at most (default 1000; 0: as fast as it can)")
    ap.add_argument("--daemon-config", default=None, metavar="FILE", help="config file for the daemon")
    ap.add_argument("--role", choices=["ranks", "abuse"], help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "ranks":
        return role_ranks(args.address, [(r, int(k)) for r, k in json.loads(args.ranks)], args.seconds)
    if args.role == "abuse":
        return role_abuse(args.address, args.seconds, args.abuse_rate)

    import psutil

    seconds = 60.0 if args.quick else args.minutes * 60.0
    # The junk run ids fill the daemon's run table in the first half minute; memory is judged after that.
    warmup = max(seconds / 4, 30.0)
    started = time.monotonic()
    all_ranks = [(f"soak-{r}", k) for r in range(RUNS) for k in range(RANKS_PER_RUN)]
    per = len(all_ranks) // RANK_PROCESSES
    groups = [all_ranks[i * per:(i + 1) * per] for i in range(RANK_PROCESSES)]

    serve = ServeProcess(["--config", args.daemon_config] if args.daemon_config else []).start()
    daemon = psutil.Process(serve.pid)
    rss: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample_rss() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            try:
                rss.append((time.monotonic() - t0, daemon.memory_info().rss))
            except psutil.Error:
                return
            stop.wait(SAMPLE_EVERY)

    try:
        rss_fresh = daemon.memory_info().rss
        rank_procs = [_spawn("--role", "ranks", "--address", serve.address, "--ranks", json.dumps(g),
                             "--seconds", str(seconds)) for g in groups]
        for p in rank_procs:
            _read_event(p, "started", 60)
        abuser = _spawn("--role", "abuse", "--address", serve.address, "--seconds", str(seconds),
                        "--abuse-rate", str(args.abuse_rate))
        _read_event(abuser, "started", 60)
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        abuse = _read_event(abuser, "done", seconds + 120)
        stop.set()  # the load is over: what follows is draining, not soaking
        results = []
        for p in rank_procs:
            results.extend(_read_event(p, "done", 300)["ranks"])
        sampler.join(10)
        metrics = _metrics(serve.url)
        runs_api = {r["run"]: r for r in json.load(urllib.request.urlopen(serve.url + "/api/v1/runs",
                                                                          timeout=30))["runs"]}
        for p in rank_procs + [abuser]:
            p.wait(30)
        # A graceful stop, then the store is read as a restarted daemon would read it.
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGTERM)
        serve.proc.wait(60)
        db_bytes = sum(os.path.getsize(serve.db + ext) for ext in ("", "-wal") if os.path.exists(serve.db + ext))
        stored = _stored(serve.db, [f"soak-{r}" for r in range(RUNS)])
    finally:
        stop.set()
        serve.stop()

    # (b) every good record, exactly once
    lost = dup = logged_total = 0
    client_trouble = []
    for r in results:
        for kind in ("train", "system"):
            got = stored.get((r["run"], r["rank"], kind), collections.Counter())
            want = set(range(1, r["train"] + 1)) if kind == "train" else None
            logged_total += r[kind]
            if want is not None:
                lost += len(want - set(got))
            else:
                lost += max(0, r[kind] - len(got))
            dup += sum(c - 1 for c in got.values() if c > 1)
        if not r["ok"] or r["dropped"] or r["rejected"] or r["depth"]:
            client_trouble.append(r)
    retries = [r["retries"] for r in results]

    # (a) memory
    mb = 1024 * 1024
    after = [(t, v) for t, v in rss if t >= warmup]
    at_warm = after[0][1] if after else (rss[-1][1] if rss else 0)
    peak_after = max((v for _, v in after), default=at_warm)
    final = rss[-1][1] if rss else 0
    growth = (peak_after - at_warm) / at_warm if at_warm else float("inf")

    # (c) the abusive client and the daemon's view of it
    refusals = sorted(((name, dict(labels), v) for (name, labels), v in metrics.items()
                       if ("reject" in name or "limit" in name or "refus" in name) and "client" not in name
                       and v and name.endswith("_total")), key=lambda x: (x[0], sorted(x[1].items())))
    refused_calls = sum(n for kind, by in abuse["outcomes"].items() if kind != "raw_tcp"
                        for code, n in by.items() if code != "OK")
    live_runs = len(runs_api)

    print(f"bench/soak.py: {RUNS} runs x {RANKS_PER_RUN} ranks in {RANK_PROCESSES} processes at "
          f"{STEPS_PER_SECOND:.0f} steps/s, an abusive client at up to {args.abuse_rate:.0f} attempts/s, against "
          f"`trainguard serve` for {seconds / 60:.1f} min; total {time.monotonic() - started:.0f}s")
    print(f"machine: {machine()}")
    print()
    rows = [["daemon RSS fresh / at end of warm-up / peak after / final (MB)",
             f"{rss_fresh / mb:.0f} / {at_warm / mb:.0f} / {peak_after / mb:.0f} / {final / mb:.0f}"],
            ["RSS growth after warm-up (peak vs end of warm-up)", f"{growth * 100:+.1f} %"],
            ["good records logged (train + system)", f"{logged_total:,}"],
            ["lost / stored twice", f"{lost} / {dup}"],
            ["Reporters that dropped, had records refused or ended undelivered", f"{len(client_trouble)}"],
            ["good Reporters' retries, median / max", f"{percentile(retries, 50):.0f} / {max(retries, default=0)}"],
            ["abusive attempts (per second)", f"{abuse['attempts']:,} ({abuse['attempts'] / abuse['seconds']:,.0f})"],
            ["abusive Report calls refused", f"{refused_calls:,}"],
            ["runs the daemon holds at the end (8 good ones)", f"{live_runs:,}"],
            ["store size at the end (MB)", f"{db_bytes / mb:.0f}"]]
    print(table(["figure", "value"], rows))
    print()
    print("RSS over time (MB): " + ", ".join(f"{t:.0f}s {v / mb:.0f}" for t, v in rss[:: max(1, len(rss) // 20)]))
    print()
    print("abusive client, by attempt and outcome:")
    for kind, by in sorted(abuse["outcomes"].items()):
        print(f"  {kind:<14} " + ", ".join(f"{code} {n:,}" for code, n in sorted(by.items())))
    print("the daemon's refusal counters (/metrics):")
    for name, labels, v in refusals:
        lab = ",".join(f"{k}={val}" for k, val in sorted(labels.items()))
        print(f"  {name}{{{lab}}} {v:,.0f}")
    for r in client_trouble[:5]:
        print(f"  trouble: {r}")
    print()
    ok_a = bool(after) and growth <= RSS_TOLERANCE
    ok_b = lost == 0 and dup == 0 and not client_trouble and logged_total > 0
    ok_c = refused_calls > 0 and bool(refusals)
    print(verdict(f"(a) daemon RSS within {RSS_TOLERANCE * 100:.0f} % after warm-up", ok_a,
                  f"{growth * 100:+.1f} % ({at_warm / mb:.0f} -> peak {peak_after / mb:.0f} MB)"))
    print(verdict("(b) no good record lost or stored twice", ok_b,
                  f"{lost} lost, {dup} twice, {len(client_trouble)} Reporters in trouble, of {logged_total:,}"))
    print(verdict("(c) the abusive client refused and counted", ok_c,
                  f"{refused_calls:,} calls refused; {sum(v for _, _, v in refusals):,.0f} counted by the daemon"))
    return 0 if ok_a and ok_b and ok_c else 1


if __name__ == "__main__":
    sys.exit(main())
