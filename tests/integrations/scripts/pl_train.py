"""A tiny regression model fitted by Lightning with TrainGuardCallback; writes what the module itself saw.

Run by tests/integrations/test_lightning.py with plain python; with `--devices 2 --strategy ddp`
Lightning starts the second rank itself by running this script again. The daemon address and run id
come from TRAINGUARD_ADDRESS / TRAINGUARD_RUN. Each rank writes `<out>/rank<N>.json`: the loss every
training_step returned, the gradient norm before clipping (computed here independently, in float64),
and the validation loss at each validation.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--package", default="lightning.pytorch", choices=["lightning.pytorch", "pytorch_lightning"])
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--fail-at", type=int, default=0, help="training_step raises at this global step")
    a = ap.parse_args()

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    L = importlib.import_module(a.package)
    from monitor.integrations.lightning import TrainGuardCallback

    torch.set_num_threads(1)

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
            self.losses: list[tuple[int, float]] = []  # (record step, loss as training_step returned it)
            self.norms: dict[int, float] = {}
            self.vals: list[tuple[int, float]] = []

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            if a.fail_at and self.trainer.global_step + 1 == a.fail_at:
                raise RuntimeError("injected failure")
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append((self.trainer.global_step + 1, float(loss.detach())))
            return loss

        def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            # Called after the callbacks' hook and before Lightning clips: the reference pre-clip norm.
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            self.norms[self.trainer.global_step + 1] = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))

        def on_validation_end(self) -> None:
            if not self.trainer.sanity_checking:
                self.vals.append((self.trainer.global_step, float(self.trainer.callback_metrics["val_loss"])))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.samples, 8, generator=g)
    y = x.sum(dim=1, keepdim=True).sin()
    train = DataLoader(TensorDataset(x, y), batch_size=a.batch)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=a.batch)
    model = Regressor()
    trainer = L.Trainer(
        accelerator="cpu", devices=a.devices, strategy=a.strategy, max_steps=a.steps,
        accumulate_grad_batches=a.accum, gradient_clip_val=a.clip or None, num_sanity_val_steps=1,
        check_val_every_n_epoch=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[TrainGuardCallback(heartbeat_interval=0.5)],
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
            "losses": model.losses, "norms": model.norms, "vals": model.vals,
        }))

    try:
        trainer.fit(model, train, val)
    finally:
        write()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Without this, DDP on the CPU aborts at interpreter exit.
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
