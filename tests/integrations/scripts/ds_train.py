"""A raw DeepSpeed engine on a tiny GPT-2 watched by monitor.integrations.deepspeed; writes reference values.

Run by tests/integrations/test_deepspeed.py (plain python for 1 process, torchrun for more). The daemon
address and run id come from TRAINGUARD_ADDRESS / TRAINGUARD_RUN.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.integrations.tiny import tiny_gpt2, tiny_text_dataset, tiny_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--gas", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--nan-grad-at", type=int, default=0, help="optimizer step whose gradient gets a NaN")
    ap.add_argument("--out", required=True)
    ap.add_argument("--probe-every", type=int, default=0, help="probe the model every N steps (0: no probes)")
    a = ap.parse_args()

    import torch
    import deepspeed

    # The shared-memory collective op would be JIT-compiled (about 30 s) and is not needed on gloo.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    from monitor.integrations import deepspeed as tg_deepspeed

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    model = tiny_gpt2()
    rank = int(os.environ.get("RANK", "0"))
    data = tiny_text_dataset(tok, 64, 32, seed=rank)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": a.gas,
              "gradient_clipping": a.clip, "zero_optimization": {"stage": a.stage}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    extra = {}
    if a.probe_every:
        from probes import Probe

        extra = {"probes": [Probe("arithmetic", n=6, every_steps=a.probe_every, max_share=None)],
                 "probe_tokenizer": tok}
    mon = tg_deepspeed.watch(engine, heartbeat_interval=0, system_interval=0.2, **extra)

    # A NaN in one gradient of one optimizer step, put there during backward (before any reduction).
    poison = {"on": False}

    def nan_grad(g: torch.Tensor) -> torch.Tensor:
        if not poison["on"]:
            return g
        g = g.clone()
        g.view(-1)[0] = float("nan")
        return g

    next(engine.module.parameters()).register_hook(nan_grad)

    ref: list[dict] = []
    micro: list[float] = []
    i = 0
    while engine.global_steps < a.steps:
        inputs = {k: torch.stack([data[(i * 4 + j) % len(data)][k] for j in range(4)])
                  for k in ("input_ids", "attention_mask", "labels")}
        i += 1
        boundary = engine.is_gradient_accumulation_boundary()
        poison["on"] = boundary and engine.global_steps + 1 == a.nan_grad_at
        lr = engine.get_lr()[0]
        loss = engine(**inputs).loss
        engine.backward(loss)
        micro.append(float(loss.detach()))
        own = None
        if boundary:
            # Without ZeRO the reduced, not yet clipped gradients are still in .grad here.
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            own = float(torch.nn.utils.get_total_norm(grads)) if grads else None
        engine.step()
        mon.step(loss=loss)
        if boundary:
            gn = engine.get_global_grad_norm()
            ref.append({"step": engine.global_steps, "loss": sum(micro) / len(micro), "lr": lr,
                        "engine_grad_norm": None if gn is None else float(gn), "own_grad_norm": own,
                        "skipped_steps": engine.skipped_steps, "micro_batches": len(micro)})
            micro = []
    mon.eval(loss=torch.tensor(1.5), accuracy=0.25)
    ok = mon.close()
    Path(a.out).write_text(json.dumps({"rank": rank, "closed": ok, "run": mon.reporter.run, "steps": ref},
                                      allow_nan=True))


if __name__ == "__main__":
    main()
