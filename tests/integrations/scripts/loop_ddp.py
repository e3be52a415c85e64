"""A plain DDP training loop under torchrun (gloo, CPU), watched by monitor.watch on every rank.

    torchrun --nproc_per_node=2 ... loop_ddp.py --out DIR [--steps N] [--slow-rank R --delay S]

One rank can be made slow in its forward (a sleep: a slow GPU, a throttled host). Each rank writes
DIR/rank<R>.json with what the loop itself saw: its run id, losses, and the gradient norm before
clipping as clip_grad_norm_ returned it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import monitor


class Net(nn.Module):
    """A small MLP whose forward can be made slow on one rank."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        return self.head(self.body(x))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--slow-rank", type=int, default=-1)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=0.5)
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = Net(args.delay if rank == args.slow_rank else 0.0)
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    # The watch comes after init_process_group: a generated run id is then agreed on by all ranks.
    mon = monitor.watch(model, opt, heartbeat_interval=0, system_interval=0.5, norms_every=10,
                        group_norms_every=10, batch_size=32, max_steps=args.steps)
    gen = torch.Generator().manual_seed(100 + rank)
    losses, norms = [], []
    for _ in range(args.steps):
        x = torch.randn(32, 16, generator=gen)
        y = x[:, :4].sum(dim=1, keepdim=True).sin()
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        mon.step(loss)
        losses.append(float(loss.detach()))
        norms.append(float(norm))
    ok = mon.close()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"run": mon.reporter.run, "rank": mon.reporter.rank, "losses": losses, "norms": norms,
                   "delivered": ok, "identity": mon.identity.as_dict()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
