"""What trainguard adds to a training step: Hugging Face Trainer, and a plain PyTorch loop, on the CPU.

    .venv/bin/python bench/overhead.py            # about 3 minutes
    .venv/bin/python bench/overhead.py --quick    # about 40 s, a smoke run: too short to resolve 2 %
    .venv/bin/python bench/overhead.py --case hf  # one case only (hf or loop)

Model: a 2-layer GPT-2 (n_embd 64, 2 heads, vocabulary 512, about 140k parameters) with a
byte-level BPE tokenizer trained in code, 16 sequences of 64 tokens per step, one intra-op thread.

Each case has three copies: A bare (the baseline); B with trainguard, reporting to a real
`trainguard serve` process; C bare again, an A/A control that shows how much two identical copies
differ on this machine. Each round runs one short block of steps of each copy, in a rotating order,
so drift in the machine's speed falls on all three. The overhead is the median over rounds of
(B's block median / A's block median - 1).

- `hf`: one `Trainer` (logging_steps=50, AdamW, linear schedule with warm-up, max_grad_norm 1.0)
  whose blocks take turns: for a B block `monitor.integrations.hf.attach(trainer)` is called (a new
  Watch and Reporter, with their threads), for A and C blocks it is detached again. Separate Trainers
  would share Accelerate's process-wide state, and separate processes differ in speed by several per
  cent on their own, more than the effect measured. A step is the time between two `on_step_end`
  calls of a timing callback, so it holds everything the Trainer and trainguard do for one step; the
  first 5 steps of each block hold the switch and are not counted.
- `loop`: three copies of the same model in a plain loop (forward, backward, clip_grad_norm_, AdamW
  step); B adds `monitor.watch(model, optimizer)` with its defaults and
  `mon.step(loss=loss, grad_norm=norm)` with the norm clip_grad_norm_ returned (from then on the
  Watch computes no second one).

For the Trainer it also times attach()'s own per-step work alone (taps, callback events, Watch.step
with stubs in place of the model's work): a figure that the machine's noise does not blur.

Targets: step time with trainguard at most 3 % above the bare Trainer, 2 % above the bare loop.
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
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import ServeProcess, machine, percentile, table, verdict  # noqa: E402

TARGETS = {"hf": 3.0, "loop": 2.0}
SKIP = 5  # steps at the start of each Trainer block that hold the switch between copies
BATCH, SEQ = 16, 64


class Variant:
    """One copy under test: its per-step times and the median of each block."""

    def __init__(self, name: str):
        self.name = name
        self.times: list[float] = []
        self.block_medians: list[float] = []
        self.run_block: Callable[[int, bool], None] = lambda n, keep: None
        self.mon: Any = None
        self.recv: Any = None
        self.pipe: Any = None

    def record(self, out: list[float], keep: bool) -> None:
        if keep and out:
            self.times += out
            self.block_medians.append(percentile(out, 50))


def _data() -> tuple[Any, Any, list[dict[str, Any]]]:
    import torch

    from tests.integrations.tiny import tiny_gpt2, tiny_text_dataset, tiny_tokenizer

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    ds = tiny_text_dataset(tok, 512, SEQ)
    return tiny_gpt2(), ds, [ds[i] for i in range(len(ds))]


def hf_variants(serve: ServeProcess, run: str) -> tuple[list[Variant], Callable[[list[tuple[Variant, int, bool]]],
                                                                              dict[str, Any]]]:
    """One Trainer whose blocks alternate between bare (A, C) and attached (B); returns the variants and a runner.

    Accelerate keeps process-wide state, and two processes (or two Trainers) differ in speed by several
    per cent for reasons of their own, so the copies are blocks of the same Trainer: trainguard is
    attached for a B block (a new Watch and Reporter each time, its threads running) and detached
    (closed, callback and taps removed) for A and C blocks. The first SKIP steps of every block are
    not counted: they hold the switch.
    """
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from monitor.integrations.hf import attach

    model, ds, _ = _data()
    variants = [Variant("A: Trainer (baseline)"), Variant("B: Trainer + attach(trainer)"),
                Variant("C: Trainer, second copy (A/A control)")]
    watched = variants[1]
    client = {"delivered": True, "sent": 0, "dropped": 0, "attachments": 0}

    def runner(schedule: list[tuple[Variant, int, bool]]) -> dict[str, Any]:
        state: dict[str, Any] = {"i": -1, "cb": None, "trainer": None}

        def switch(v: Variant | None) -> None:
            cb = state["cb"]
            if v is watched and cb is None:
                state["cb"] = attach(state["trainer"], run=run, address=serve.address)
                client["attachments"] += 1
            elif v is not watched and cb is not None:
                client["delivered"] = cb.detach(timeout=30.0) and client["delivered"]
                st = cb.reporter.stats()
                client["sent"] += st.sent
                client["dropped"] += st.dropped
                state["cb"] = None

        class Baton(TrainerCallback):
            """Times each step (on_step_end to on_step_end) and moves to the next block of the schedule."""

            def __init__(self) -> None:
                self.out: list[float] = []
                self.last = 0.0

            def next_block(self, control: Any) -> None:
                state["i"] += 1
                if state["i"] >= len(schedule):
                    switch(None)
                    control.should_training_stop = True
                    return
                switch(schedule[state["i"]][0])
                self.out = []
                self.last = time.perf_counter()

            def on_train_begin(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
                torch.set_num_threads(1)
                self.next_block(control)

            def on_step_end(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
                now = time.perf_counter()
                self.out.append(now - self.last)
                self.last = now
                v, n, keep = schedule[state["i"]]
                if len(self.out) >= n + SKIP:
                    v.record(self.out[SKIP:], keep)
                    self.next_block(control)

        args = TrainingArguments(
            output_dir=os.path.join(serve.tmp.name, "out"), max_steps=10**6, per_device_train_batch_size=BATCH,
            learning_rate=3e-3, warmup_steps=20, weight_decay=0.01, max_grad_norm=1.0, logging_steps=50,
            use_cpu=True, report_to="none", save_strategy="no", seed=0, disable_tqdm=True,
            dataloader_num_workers=0, log_level="error",
        )
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[Baton()])
        state["trainer"] = trainer
        trainer.train()
        return client

    return variants, runner


def loop_variants(serve: ServeProcess, run: str) -> tuple[list[Variant], Callable[[list[tuple[Variant, int, bool]]],
                                                                                dict[str, Any]]]:
    """Three copies of a plain loop on the same batches; B is watched."""
    import torch

    import monitor

    base, _, examples = _data()
    batches = []
    for i in range(0, len(examples) - BATCH + 1, BATCH):
        chunk = examples[i:i + BATCH]
        batches.append({k: torch.stack([e[k] for e in chunk]) for k in ("input_ids", "attention_mask", "labels")})
    clock = time.perf_counter
    variants = []
    for name, watched in (("A: plain loop (baseline)", False), ("B: loop + monitor.watch + mon.step", True),
                          ("C: plain loop, second copy (A/A control)", False)):
        v = Variant(name)
        model = copy.deepcopy(base)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        # The loop clips and hands clip_grad_norm_'s pre-clip norm to step(): the Watch stops computing
        # its own after the first one. Everything is the default.
        mon = monitor.watch(model, opt, run=run, address=serve.address) if watched else None
        v.mon = mon
        cursor = [0]

        def run_block(n: int, keep: bool, model: Any = model, opt: Any = opt, mon: Any = mon, v: Variant = v,
                      cursor: list[int] = cursor) -> None:
            out = []
            for _ in range(n):
                batch = batches[cursor[0] % len(batches)]
                cursor[0] += 1
                t0 = clock()
                loss = model(**batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if mon is not None:
                    mon.step(loss=loss, grad_norm=norm)
                out.append(clock() - t0)
            v.record(out, keep)

        v.run_block = run_block
        variants.append(v)

    def runner(schedule: list[tuple[Variant, int, bool]]) -> dict[str, Any]:
        for v, n, keep in schedule:
            v.run_block(n, keep)
        mon = variants[1].mon
        delivered = mon.close(timeout=30.0)
        st = mon.reporter.stats()
        return {"delivered": delivered, "sent": st.sent, "dropped": st.dropped, "attachments": 1}

    return variants, runner


def callback_cost(n: int = 3000) -> float:
    """Seconds per step that attach()'s own code takes on the training thread, without the model's work.

    The Trainer's methods under the taps are replaced by stubs that return ready tensors, so what is
    timed is the taps, the callback's events and Watch.step with its Reporter.log (sending is off).
    The Watch's forward hooks are not included: they run inside the model's forward.
    """
    import types

    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from monitor.integrations.hf import TrainGuardCallback

    model, _, _ = _data()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss, norm = torch.tensor(2.5), torch.tensor(0.9)
    stub = types.SimpleNamespace(training_step=lambda *a, **k: loss, get_batch_samples=lambda *a, **k: ([], None),
                                 _get_grad_norm=lambda *a, **k: norm, optimizer=opt, model=model, deepspeed=None,
                                 accelerator=None)
    cb = TrainGuardCallback(stub, run="bench-callback-cost", address="off", system_interval=0,
                            heartbeat_interval=0)
    cb.install(stub)
    args = TrainingArguments(output_dir="/tmp/unused-bench", use_cpu=True, report_to="none", max_steps=n)
    state, control = TrainerState(), TrainerControl()
    state.max_steps = n
    cb.on_train_begin(args, state, control, model=model)
    times = []
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        stub.get_batch_samples(None, 1, None)
        cb.on_step_begin(args, state, control, optimizer=opt)
        stub.training_step(model, {})
        stub._get_grad_norm(model)
        state.global_step += 1
        cb.on_step_end(args, state, control)
        times.append(clock() - t0)
    cb.close(timeout=1.0)
    return percentile(times[n // 10:], 50)


def measure(case: str, blocks: int, steps: int, warm: int) -> dict[str, Any]:
    """Run one case against a fresh daemon; returns its figures."""
    serve = ServeProcess().start()
    run = f"bench-overhead-{case}"
    try:
        variants, runner = (hf_variants if case == "hf" else loop_variants)(serve, run)
        a, b, c = variants
        orders = list(itertools.permutations(variants))
        # Warm-up blocks first (allocator, caches, the sender's first connection), then one block of each
        # copy per round, in a rotating order so that no copy always goes first.
        schedule = [(v, warm, False) for v in variants]
        schedule += [(v, steps, True) for i in range(blocks) for v in orders[i % len(orders)]]
        t0 = time.monotonic()
        client = runner(schedule)
        elapsed = time.monotonic() - t0
        with urllib.request.urlopen(f"{serve.url}/api/v1/runs/{run}", timeout=10) as r:
            detail = json.load(r)
    finally:
        serve.stop()

    def paired(v: Variant) -> list[float]:
        return sorted((mv - ma) / ma * 100.0 for ma, mv in zip(a.block_medians, v.block_medians))

    return {"case": case, "variants": variants, "a": a, "b": b, "c": c, "pb": paired(b), "pc": paired(c),
            "elapsed": elapsed, "client": client, "detail": detail, "blocks": blocks,
            "steps": steps, "warm": warm}


def report(res: dict[str, Any]) -> bool:
    """Print one case's table and verdict; True when its target is met."""
    a = res["a"]
    target = TARGETS[res["case"]]
    rows = []
    for v in res["variants"]:
        xs = v.times
        pv = res["pb"] if v is res["b"] else res["pc"] if v is res["c"] else None
        rows.append([v.name, f"{percentile(xs, 50) * 1e3:.3f}", f"{sum(xs) / len(xs) * 1e3:.3f}",
                     f"{percentile(xs, 10) * 1e3:.3f}", f"{percentile(xs, 90) * 1e3:.3f}",
                     "-" if pv is None else f"{percentile(pv, 50):+.2f}", f"{len(xs):,}"])
    title = {"hf": "HF Trainer", "loop": "plain PyTorch loop"}[res["case"]]
    print(f"== {title}: tiny GPT-2, batch {BATCH}x{SEQ}; {res['blocks']} rounds of one {res['steps']}-step block "
          f"per copy, order rotating; {res['elapsed']:.0f}s")
    print(table(["variant", "median ms", "mean ms", "p10 ms", "p90 ms", "vs A, % (block pairs)", "steps"], rows))
    pb, pc = res["pb"], res["pc"]
    over_b, over_c = percentile(pb, 50), percentile(pc, 50)
    pooled = (percentile(res["b"].times, 50) / percentile(a.times, 50) - 1) * 100.0
    print(f"B vs A per round: p25 {percentile(pb, 25):+.1f} %, median {over_b:+.2f} %, p75 {percentile(pb, 75):+.1f} %;"
          f" pooled medians {pooled:+.2f} %")
    print(f"C vs A per round (identical copies: the noise): p25 {percentile(pc, 25):+.1f} %, median {over_c:+.2f} %, "
          f"p75 {percentile(pc, 75):+.1f} %")
    cl = res["client"]
    watched = len(res["b"].times)
    print(f"daemon saw last_step {res['detail'].get('last_step')}, {watched} watched steps timed; client sent "
          f"{cl['sent']:,} records over {cl['attachments']} attachment(s), dropped {cl['dropped']}, delivered "
          f"everything: {cl['delivered']}")
    if res["case"] == "hf":
        cost = callback_cost()
        print(f"attach()'s own work on the training thread, timed alone: {cost * 1e6:.1f} us per step = "
              f"{cost / percentile(a.times, 50) * 100:.2f} % of A's median step")
    ok = over_b <= target
    print(verdict(f"{title} step overhead <= {target:.0f} %", ok,
                  f"{over_b:+.2f} % (median over rounds; the A/A control reads {over_c:+.2f} %)"))
    print()
    return ok


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its tables; exit status 1 if a target is missed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="12 rounds of 10-step blocks per case")
    ap.add_argument("--case", choices=("hf", "loop", "all"), default="all")
    ap.add_argument("--blocks", type=int, default=None, help="rounds per case (default 60)")
    ap.add_argument("--steps", type=int, default=None, help="steps per block (default 15)")
    args = ap.parse_args(argv)
    blocks = args.blocks or (12 if args.quick else 60)
    steps = args.steps or (10 if args.quick else 15)
    warm = 20 if args.quick else 40

    import torch
    import transformers

    print(f"bench/overhead.py: torch {torch.__version__}, transformers {transformers.__version__}, 1 intra-op thread")
    print(f"machine: {machine()}")
    print()
    ok = True
    for case in (("hf", "loop") if args.case == "all" else (args.case,)):
        ok = report(measure(case, blocks, steps, warm)) and ok
    if args.quick:
        print("--quick runs too few rounds to resolve a few per cent on a busy machine (see the A/A controls); "
              "the default run decides")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
