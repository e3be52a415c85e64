"""What `Reporter.log()` costs the training thread, next to a bare deque append and a no-op call.

    .venv/bin/python bench/log_cost.py            # about 20 s
    .venv/bin/python bench/log_cost.py --quick    # about 5 s

Each variant makes the same calls in chunks; a chunk is timed with perf_counter_ns and divided by
its length, so the per-call figure carries no timer overhead. The median and p99 are over chunks.
The Reporter is measured twice: with a live daemon in this process (its sender thread and the
daemon's threads compete with the caller for the GIL, the worst case) and with no daemon at all
(the address is a closed port, so the sender retries with backoff and the queue overflows).

Target: median cost of one `Reporter.log()` call <= 5 us.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import closed_port_address, machine, percentile, table, train_values, verdict  # noqa: E402

TARGET_NS = 5_000


def _time_chunks(call: Callable[[str, int, Any], Any], values: dict[str, float], calls: int, chunk: int,
                 start_step: int) -> list[float]:
    """Per-call nanoseconds of each chunk of `chunk` calls."""
    out = []
    clock = time.perf_counter_ns
    step = start_step
    for _ in range(calls // chunk):
        rng = range(step, step + chunk)
        t0 = clock()
        for i in rng:
            call("train", i, values)
        out.append((clock() - t0) / chunk)
        step += chunk
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table; exit status 1 if the target is missed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer calls (about 5 s)")
    ap.add_argument("--calls", type=int, default=None, help="calls per variant per round (default 200,000)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds, variants interleaved (default 5)")
    ap.add_argument("--chunk", type=int, default=100, help="calls per timed chunk (default 100)")
    args = ap.parse_args(argv)
    calls = args.calls or (50_000 if args.quick else 200_000)
    rounds = args.rounds or (1 if args.quick else 5)

    from monitor import Reporter
    from monitor.daemon.app import Daemon, DaemonConfig

    values = train_values(1)
    tmp = tempfile.TemporaryDirectory(prefix="trainguard-bench-")
    daemon = Daemon(DaemonConfig(grpc_port=0, http_port=0, db=os.path.join(tmp.name, "bench.db"))).start()
    live = Reporter(run="bench-log-live", rank=0, address=daemon.grpc_address)
    absent = Reporter(run="bench-log-absent", rank=0, address=closed_port_address())

    def noop(kind: str, step: int, vals: Any) -> None:
        return None

    dq: collections.deque[tuple] = collections.deque(maxlen=100_000)
    fields: dict[str, Any] = {}
    tup = ("train", 0, values, 1.7e9, fields)

    def deque_append(kind: str, step: int, vals: Any, _append: Any = dq.append, _tup: tuple = tup) -> None:
        _append(_tup)

    # The bare append is also timed inline (no wrapper call), the floor of any queue-based client.
    def inline_append_chunks(n: int, chunk: int) -> list[float]:
        out = []
        clock = time.perf_counter_ns
        append = dq.append
        for _ in range(n // chunk):
            rng = range(chunk)
            t0 = clock()
            for _i in rng:
                append(tup)
            out.append((clock() - t0) / chunk)
        return out

    variants: list[tuple[str, Any]] = [
        ("baseline: no-op function call", noop),
        ("baseline: deque.append (inline)", None),
        ("baseline: deque.append via a function", deque_append),
        ("Reporter.log, daemon live (in-process)", live.log),
        ("Reporter.log, daemon absent (closed port)", absent.log),
    ]
    samples: dict[str, list[float]] = {name: [] for name, _ in variants}
    wall: dict[str, list[float]] = {name: [] for name, _ in variants}
    step = 0
    for _ in range(rounds):
        for name, fn in variants:
            gc.collect()
            t0 = time.perf_counter_ns()
            if fn is None:
                samples[name] += inline_append_chunks(calls, args.chunk)
            else:
                samples[name] += _time_chunks(fn, values, calls, args.chunk, step)
            wall[name].append((time.perf_counter_ns() - t0) / calls)
            step += calls
        # Let the live sender catch up between rounds so each round starts from the same place.
        live.flush(30.0)

    live_ok = live.flush(30.0)
    live_stats, absent_stats = live.stats(), absent.stats()
    live.close(5.0)
    absent.close(0.1)
    daemon.close(2.0)
    tmp.cleanup()

    rows = []
    for name, _ in variants:
        xs = samples[name]
        rows.append([name, f"{percentile(xs, 50):,.0f}", f"{percentile(xs, 99):,.0f}", f"{max(xs):,.0f}",
                     f"{sum(wall[name]) / len(wall[name]):,.0f}", f"{len(xs) * args.chunk:,}"])
    print(f"bench/log_cost.py: {rounds} round(s) x {calls:,} calls per variant, timed in chunks of {args.chunk}; "
          f"train record with {len(values)} values")
    print(f"machine: {machine()}")
    print()
    print(table(["variant", "median ns/call", "p99 ns/call", "max ns/call", "wall ns/call", "calls"], rows))
    print()
    print("median and p99 are over chunks (chunk time / chunk length); wall includes the harness loop and GIL waits")
    print(f"live daemon: {live_stats.sent:,} records delivered, {live_stats.dropped:,} dropped on a full queue, "
          f"flushed={live_ok}")
    print(f"absent daemon: {absent_stats.dropped:,} dropped on a full queue (bounded at {absent.max_queue:,}), "
          f"{absent_stats.retries} send retries")
    print()
    ok_all = True
    for name in ("Reporter.log, daemon live (in-process)", "Reporter.log, daemon absent (closed port)"):
        med = percentile(samples[name], 50)
        base = percentile(samples["baseline: deque.append via a function"], 50)
        ok = med <= TARGET_NS
        ok_all &= ok
        print(verdict(f"{name}: median <= {TARGET_NS / 1000:.0f} us", ok,
                      f"median {med / 1000:.2f} us ({med / base:.1f}x a deque.append via a function)"))
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
