"""What probing costs: wall time per builtin suite, and its share of training time at the default schedule.

    .venv/bin/python bench/probes.py            # about 4 minutes on 2 CPUs
    .venv/bin/python bench/probes.py --quick    # about 1 minute, a smoke run (20-item suites)

The model is the forgetting demo's character-level GPT-2 (2 layers, 96 wide, 4 heads, 256
positions), trained on 16 sequences of up to 256 characters per step on one CPU thread, after a
short pre-training on the four builtin tasks so that it answers in their form (and its answers end
where a real model's would). Each builtin suite (100 items, its own few-shot examples) and the drift
probe (32 prompts) run twice on it; the second run is timed. A probe's share at the default schedule
is its time over its time plus `every_steps` (500) training steps of the measured median step time.

Then the same training run twice from the same weights, side by side in this process: the bare
loop (the baseline) and the loop with all five probes (20-item suites) asked for every 20 steps, far
more often than the default `max_share` (5 %) allows, which measures the cap: the probes' own time
over the probed run's wall time after the baseline round, beside the wall-time difference of the
two runs.

Target: each probe at most 5 % of training time at the default schedule; the share cap holding any
schedule, all probes together, near 5 %.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import random
import sys
import time
from typing import Any

# This file's name is the package's: the repository root, not bench/, must come first on the path.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_BENCH)] + [p for p in sys.path if os.path.abspath(p or ".") != _BENCH] + [_BENCH]

from _common import machine, table, verdict  # noqa: E402

TARGET_PCT = 5.0


class _Sink:
    """Keeps probe records in memory: the reporter's own cost is bench/loop_overhead.py's subject."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int, dict[str, float]]] = []

    def log(self, kind: str, step: int, values: dict[str, float], **kw: Any) -> None:
        self.records.append((kw.get("suite") or "", step, values))


def _train(model: Any, tok: Any, pairs: list[tuple[str, str]], steps: int, batch: int, probe_set: Any = None
           ) -> tuple[float, list[float], float]:
    """`steps` AdamW steps; the wall time, the per-step times (probes excluded) and the baseline round's time."""
    import torch

    from monitor.demo import lm_batch

    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    t0 = time.perf_counter()
    if probe_set is not None:
        probe_set.start(0, model)
    start_s = time.perf_counter() - t0
    per_step = []
    for step in range(1, steps + 1):
        s0 = time.perf_counter()
        x, y = lm_batch(tok, pairs, rng, batch)
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        per_step.append(time.perf_counter() - s0)
        if probe_set is not None:
            probe_set.after_step(step, model)
    return time.perf_counter() - t0, per_step, start_s


def _median_step(model: Any, tok: Any, pairs: list[tuple[str, str]], batch: int, steps: int = 40) -> float:
    """The median training step time of a copy of `model` (the model itself is left as it is)."""
    _, per_step, _ = _train(copy.deepcopy(model), tok, pairs, steps, batch)
    return sorted(per_step)[len(per_step) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example:\n  .venv/bin/python bench/probes.py --quick")
    ap.add_argument("--quick", action="store_true", help="20-item suites and shorter runs: a smoke run")
    ap.add_argument("--items", type=int, default=None, help="items per suite (default 100; 20 with --quick)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per training step (default 16)")
    ap.add_argument("--pretrain", type=int, default=None, help="steps before measuring (default 200; 60 quick)")
    ap.add_argument("--steps", type=int, default=None, help="steps of each side-by-side run (default 400; 100 quick)")
    ap.add_argument("--ask", type=int, default=20, help="steps between probes asked for in that run (default 20)")
    a = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from monitor.demo import CharTokenizer, build_char_gpt, task_texts
    from probes import BUILTIN, Drift, Probe, ProbeSet
    from probes.builtin import builtin
    from probes.probe import DEFAULT_EVERY_STEPS, DEFAULT_MAX_SHARE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    items = a.items or (20 if a.quick else 100)
    a.pretrain = a.pretrain if a.pretrain is not None else (60 if a.quick else 200)
    a.steps = a.steps or (100 if a.quick else 400)
    tok = CharTokenizer()
    model = build_char_gpt(tok.vocab_size)
    # Passages with a question and answer, up to the model's 256 positions: the fine-tune's data.
    pairs = [(p[-240:], a_) for p, a_ in task_texts("reading", 2000, seed=1)]
    mix = [pq for name in BUILTIN for pq in task_texts(name, 500, seed=2)]
    print(f"machine: {machine()}; torch {torch.__version__}, 1 intra-op thread")
    print(f"model: character-level GPT-2, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
          f"{a.batch} sequences of up to 256 characters per step")
    print(f"pre-training {a.pretrain} steps on the four tasks, so that the model answers in their form ...", flush=True)
    _train(model, tok, [(p[-240:], a_) for p, a_ in mix], a.pretrain, a.batch)

    step_s = _median_step(model, tok, pairs, a.batch)
    period = DEFAULT_EVERY_STEPS * step_s
    rows = []
    round_s = 0.0
    worst = 0.0
    for name in BUILTIN:
        suite = builtin(name, n=items)
        probe = Probe(suite, tok, budget_seconds=None)
        probe.run(model)
        t0 = time.perf_counter()
        recs = probe.run(model)
        took = time.perf_counter() - t0
        round_s += took
        kind = "generate" if suite.items[0].type == "generate" else "choice"
        worst = max(worst, took / (took + period) * 100)
        rows.append([name, kind, len(suite.items), f"{took:.2f}", f"{len(suite.items) / took:.0f}",
                     f"{took / (took + period) * 100:.1f}"])
    drift = Drift(tokenizer=tok)
    drift.run(model)
    t0 = time.perf_counter()
    drift.run(model)
    took = time.perf_counter() - t0
    round_s += took
    worst = max(worst, took / (took + period) * 100)
    rows.append(["drift", "next-token", len(drift.prompts), f"{took:.2f}", f"{len(drift.prompts) / took:.0f}",
                 f"{took / (took + period) * 100:.1f}"])
    rows.append(["all five", "", "", f"{round_s:.2f}", "", f"{round_s / (round_s + period) * 100:.1f}"])
    print(f"\nprobe wall time (second run of each, default batch of 16, no budget) and its share of training time "
          f"at the default every_steps={DEFAULT_EVERY_STEPS} ({DEFAULT_EVERY_STEPS} steps of {step_s * 1000:.0f} ms "
          "between runs):")
    print(table(["suite", "type", "items", "seconds", "items/s", "share %"], rows))

    # Side by side, from the same weights: the bare loop, then the loop with all five probes asked
    # for every `ask` steps, far more often than the share cap allows: the cap decides. Suites of 20
    # items, so that the run holds several of the cap's periods.
    steps, ask = a.steps, a.ask
    bare_model, probed_model = copy.deepcopy(model), copy.deepcopy(model)
    probes = [Probe(builtin(name, n=20), tok, every_steps=ask) for name in BUILTIN]
    probes.append(Drift(tokenizer=tok, every_steps=ask))
    ps = ProbeSet(probes, _Sink())
    print(f"\ntraining {steps} steps bare, then the same {steps} steps with all five probes asked for every {ask} "
          f"steps and the default max_share of {DEFAULT_MAX_SHARE:.0%} ...", flush=True)
    bare_s, bare_steps, _ = _train(bare_model, tok, pairs, steps, a.batch)
    probed_s, probed_steps, first_s = _train(probed_model, tok, pairs, steps, a.batch, ps)
    rounds = max(p.runs for p in probes)
    postponed = max(p.postponed for p in probes)
    probe_s = sum(p.seconds for p in probes)
    measured = (probed_s - bare_s) / probed_s * 100
    # The cap spaces the rounds after the baseline by the training time since; the baseline itself
    # comes before any training, so it is left out of the share the cap promises.
    capped = (probed_s - bare_s - first_s) / (probed_s - first_s) * 100
    # The probes' own time, timed around each run: what the cap controls, free of the drift in the
    # machine's speed between the two runs (the median step times show how large that drift is).
    direct = (probe_s - first_s) / (probed_s - first_s) * 100
    print(table(["run", "steps", "wall s", "median step s", "probe rounds", "postponed", "probe s"], [
        ["bare (baseline)", steps, f"{bare_s:.1f}", f"{sorted(bare_steps)[len(bare_steps) // 2]:.4f}", 0, 0, "0"],
        ["probed", steps, f"{probed_s:.1f}", f"{sorted(probed_steps)[len(probed_steps) // 2]:.4f}", rounds,
         postponed, f"{probe_s:.1f}"],
    ]))
    both = round_s / (round_s + period) * 100
    print(f"\nshare of the probed run's wall time spent in probes after the baseline round ({first_s:.1f} s): "
          f"{direct:.1f} %")
    print(f"wall-time difference between the two runs: {measured:.1f} % with the baseline round, {capped:.1f} % "
          "after it (includes any change in the machine's speed between them)")
    ok_default = worst <= TARGET_PCT
    ok_cap = direct <= TARGET_PCT + 0.5  # a round may start a little past the cap's point: half a point
    print(verdict(f"each probe's share at the default schedule <= {TARGET_PCT:.0f} %", ok_default,
                  f"largest {worst:.1f} %; all five together {both:.1f} % before the share cap"))
    print(verdict(f"the share cap holds a schedule that asks for more near {TARGET_PCT:.0f} %", ok_cap,
                  f"{direct:.1f} % after the baseline, {rounds} rounds, {postponed} postponed"))
    return 0 if ok_default and ok_cap else 1


if __name__ == "__main__":
    sys.exit(main())
