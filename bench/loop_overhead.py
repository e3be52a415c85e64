"""What trainguard adds to a plain PyTorch training step on the CPU.

    .venv/bin/python bench/loop_overhead.py            # about 75 s
    .venv/bin/python bench/loop_overhead.py --quick    # about 15 s, a smoke run: too short to resolve 2 %

The model is the demo's byte-level GRU language model (embedding 64, GRU 128, 256-way head; 16
sequences of 64 bytes per step) on one intra-op thread. Four identical copies train on the same
batches: A is the bare loop (the baseline); B the same loop with `monitor.watch(model, optimizer)`
(its grad-norm hook, sender, heartbeat and system sampler) and `mon.step(loss=loss)`, reporting to
a real `trainguard serve` process; D reports through the reporter alone (`hooks=False`: the
loss, learning rate and step time that `mon.step` is given, heartbeats and the system sampler,
without the forward and backward hooks of the collectors); C is the bare loop again, an A/A control that shows how much
two identical loops differ on this machine. Each round runs one short block of each, in a
rotating order, so that drift in the machine's speed falls on all three; each step is timed from
the forward pass to the end of `mon.step`. The overhead is the median over rounds of (B's block
median / A's block median - 1): a neighbour process that takes the CPU for a while moves a few
rounds, not the verdict. The pooled medians are shown too.

Target: step time with trainguard at most 2 % above the bare loop, for D and for B.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import time
import urllib.request
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import ServeProcess, machine, percentile, table, verdict  # noqa: E402

TARGET_PCT = 2.0


def _model() -> Any:
    from monitor.demo import build_tiny_lm

    return build_tiny_lm()


def _batches(n: int, batch: int, ctx: int) -> list[tuple[Any, Any]]:
    """Byte sequences of real text (the source of a few standard-library modules)."""
    import inspect
    import json as json_mod
    import textwrap

    import torch

    text = "\n".join(inspect.getsource(m) for m in (json_mod.decoder, json_mod.encoder, textwrap)).encode()
    data = torch.tensor(list(text), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        idx = torch.randint(0, data.numel() - ctx - 1, (batch,), generator=g)
        out.append((torch.stack([data[i:i + ctx] for i in idx]), torch.stack([data[i + 1:i + ctx + 1] for i in idx])))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table; exit status 1 if the target is missed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="12 rounds of 10-step blocks (about 15 s)")
    ap.add_argument("--blocks", type=int, default=None, help="rounds, one block per variant each (default 72)")
    ap.add_argument("--steps", type=int, default=None, help="steps per block (default 15)")
    args = ap.parse_args(argv)
    # Many short blocks: the machine's speed drifts, and neighbouring blocks see the same drift.
    blocks = args.blocks or (12 if args.quick else 72)
    steps = args.steps or (10 if args.quick else 15)

    import torch
    from torch import nn

    import monitor

    torch.set_num_threads(1)
    torch.manual_seed(0)
    batch, ctx = 16, 64
    data = _batches(64, batch, ctx)
    base = _model()
    clock = time.perf_counter_ns
    serve = ServeProcess().start()
    run = "bench-loop-overhead"

    class Variant:
        """One copy of the model and its optimizer, trained in blocks of steps."""

        def __init__(self, name: str, watch: dict[str, Any] | None):
            self.name = name
            self.model = copy.deepcopy(base)
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
            self.mon = None if watch is None else monitor.watch(
                self.model, self.opt, run=f"{run}-{name[0].lower()}", address=serve.address, **watch)
            self.times: list[int] = []
            self.block_medians: list[float] = []
            self.cursor = 0

        def block(self, n: int, keep: bool = True) -> None:
            model, opt, mon = self.model, self.opt, self.mon
            out = []
            for _ in range(n):
                x, y = data[self.cursor % len(data)]
                self.cursor += 1
                t0 = clock()
                loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if mon is not None:
                    mon.step(loss=loss)
                out.append(clock() - t0)
            if keep:
                self.times += out
                self.block_medians.append(percentile(out, 50))

    a = Variant("A: plain loop (baseline)", None)
    b = Variant("B: with monitor.watch + mon.step (all collectors)", {})
    c = Variant("C: plain loop, second copy (A/A control)", None)
    d = Variant("D: reporter only: monitor.watch(hooks=False) + mon.step", {"hooks": False})
    variants = (a, b, c, d)
    orders = list(itertools.permutations(variants))
    try:
        t_start = time.monotonic()
        warm = 20 if args.quick else 50
        for v in variants:
            v.block(warm, keep=False)  # allocator, caches, the sender's first connection
        # Each round runs one block of each, in a rotating order so that no variant always goes first.
        for i in range(blocks):
            for v in orders[i % len(orders)]:
                v.block(steps)
        elapsed = time.monotonic() - t_start
        assert b.mon is not None and d.mon is not None
        delivered = b.mon.close(timeout=30.0) and d.mon.close(timeout=30.0)
        stats = b.mon.reporter.stats()
        with urllib.request.urlopen(f"{serve.url}/api/v1/runs/{run}-b", timeout=10) as r:
            detail = json.load(r)
    finally:
        serve.stop()

    def paired(v: Variant) -> list[float]:
        return sorted((mv - ma) / ma * 100.0 for ma, mv in zip(a.block_medians, v.block_medians))

    rows = []
    for v in variants:
        xs = v.times
        rows.append([v.name, f"{percentile(xs, 50) / 1e6:.3f}", f"{sum(xs) / len(xs) / 1e6:.3f}",
                     f"{percentile(xs, 10) / 1e6:.3f}", f"{percentile(xs, 90) / 1e6:.3f}",
                     f"{'-' if v is a else format(percentile(paired(v), 50), '+.2f')}", f"{len(xs):,}"])
    print(f"bench/loop_overhead.py: byte-level GRU LM, batch {batch}x{ctx}, torch {torch.__version__}, 1 thread; "
          f"{blocks} rounds of one {steps}-step block per variant, order rotating; {elapsed:.0f}s")
    print(f"machine: {machine()}")
    print()
    print(table(["variant", "median ms", "mean ms", "p10 ms", "p90 ms", "vs A, % (block pairs)", "steps"], rows))
    print()
    over_b, over_c, over_d = percentile(paired(b), 50), percentile(paired(c), 50), percentile(paired(d), 50)
    pooled = (percentile(b.times, 50) / percentile(a.times, 50) - 1) * 100.0
    pb, pc = paired(b), paired(c)
    print(f"B vs A per round: p25 {percentile(pb, 25):+.1f} %, median {over_b:+.2f} %, p75 {percentile(pb, 75):+.1f} %;"
          f" pooled medians {pooled:+.2f} %")
    print(f"C vs A per round (identical loops, so this is the noise): p25 {percentile(pc, 25):+.1f} %, median "
          f"{over_c:+.2f} %, p75 {percentile(pc, 75):+.1f} %")
    print(f"daemon saw last_step {detail.get('last_step')} for {len(b.times) + warm} watched steps; "
          f"client sent {stats.sent:,} records, dropped {stats.dropped}, delivered everything: {delivered}")
    if args.quick:
        print("--quick runs too few rounds to resolve 2 % on a busy machine (see the A/A control); "
              "the default run decides")
    print()
    ok_d, ok_b = over_d <= TARGET_PCT, over_b <= TARGET_PCT
    print(verdict(f"reporter (D) step overhead <= {TARGET_PCT:.0f} %", ok_d,
                  f"{over_d:+.2f} % (median over rounds of D's block median vs A's; the A/A control reads "
                  f"{over_c:+.2f} %)"))
    print(verdict(f"all collectors (B) step overhead <= {TARGET_PCT:.0f} %", ok_b, f"{over_b:+.2f} %"))
    return 0 if ok_d and ok_b else 1


if __name__ == "__main__":
    sys.exit(main())
