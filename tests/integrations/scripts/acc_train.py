"""A tiny GPT-2 trained with Accelerate, reported by TrainGuardTracker and its per-rank watch.

Run by tests/integrations/test_accelerate.py under torchrun (2 processes) or plain python (1). The
daemon address and run id come from TRAINGUARD_ADDRESS / TRAINGUARD_RUN. Each rank writes what it
computed (the logged losses, the pre-clip gradient norms, the eval loss) to `<out>/rank<N>.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.integrations.tiny import tiny_gpt2, tiny_text_dataset, tiny_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--clip", type=float, default=0.5, help="0: no clipping")
    ap.add_argument("--fail-at", type=int, default=0, help="raise an exception in this optimizer step")
    ap.add_argument("--trackers-first", action="store_true", help="init_trackers before the watch is attached")
    ap.add_argument("--manual", action="store_true", help="auto_step=False: the loop hands its loss to mon.step()")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--probe-every", type=int, default=0, help="probe the model every N steps (0: no probes)")
    ap.add_argument("--shard", action="store_true", help="split the probe's items over the ranks")
    a = ap.parse_args()

    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from monitor.integrations.accelerate import TrainGuardTracker

    torch.set_num_threads(1)
    extra = {}
    tok = tiny_tokenizer()
    if a.probe_every:
        from probes import Probe

        extra["probes"] = [Probe("reading", tok, n=6, every_steps=a.probe_every, max_share=None, shard=a.shard)]
    tracker = TrainGuardTracker(heartbeat_interval=0.5, **extra)
    # cpu=True: under torchrun without a GPU, Accelerate only goes multi-process when told it is on the CPU.
    accelerator = Accelerator(log_with=[tracker], gradient_accumulation_steps=a.accum, cpu=True)
    per_rank = a.steps * a.accum * a.batch
    data = tiny_text_dataset(tok, n=per_rank * accelerator.num_processes, seq_len=a.seq)
    val = tiny_text_dataset(tok, n=2 * a.batch * accelerator.num_processes, seq_len=a.seq, seed=1)
    model = tiny_gpt2(vocab_size=len(tok), n_positions=a.seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr)
    loader = DataLoader(data, batch_size=a.batch)
    val_loader = DataLoader(val, batch_size=a.batch)
    model, optimizer, loader, val_loader = accelerator.prepare(model, optimizer, loader, val_loader)
    config = {"lr": a.lr, "accum": a.accum, "clip": a.clip}
    if a.trackers_first:
        accelerator.init_trackers("trainguard-test", config=config)
    mon = tracker.watch(accelerator, model, optimizer, auto_step=not a.manual)
    if not a.trackers_first:
        accelerator.init_trackers("trainguard-test", config=config)

    logged: list[float] = []
    norms: list[float] = []
    own: list[float] = []  # this rank's mean micro-batch loss per step
    micro: list[torch.Tensor] = []
    step = 0
    model.train()
    for batch in loader:
        if a.fail_at and step + 1 == a.fail_at:
            raise RuntimeError("injected failure")
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            micro.append(loss.detach())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if a.clip > 0:
                    norms.append(float(accelerator.clip_grad_norm_(model.parameters(), a.clip)))
                else:
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    norms.append(float(torch.nn.utils.get_total_norm(grads, 2.0)))
            optimizer.step()
            optimizer.zero_grad()
            if a.manual:
                mon.step(loss=loss)
        if accelerator.sync_gradients:
            step += 1
            own.append(float(torch.stack(micro).mean()))
            # The mean micro-batch loss over every rank: what a script would log as its train loss.
            mean = accelerator.gather(torch.stack(micro).mean().reshape(1)).mean()
            micro = []
            accelerator.log({"train_loss": mean, "learning_rate": a.lr, "epoch": 0, "note": "text"}, step=step)
            logged.append(float(mean))

    model.eval()
    total = torch.zeros(())
    with torch.no_grad():
        for batch in val_loader:
            total += model(**batch).loss
    eval_loss = accelerator.gather((total / len(val_loader)).reshape(1)).mean()
    accelerator.log({"eval_loss": eval_loss, "perplexity": math.exp(float(eval_loss))}, step=step)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps({
        "rank": accelerator.process_index, "world_size": accelerator.num_processes, "steps": step,
        "logged": logged, "norms": norms, "own": own, "eval_loss": float(eval_loss),
        "tokens": a.accum * a.batch * a.seq, "samples": a.accum * a.batch,
    }))
    accelerator.end_training()


if __name__ == "__main__":
    main()
