"""A tiny GPT-2 fitted by Lightning with TrainGuardCallback and a probe on it; writes the losses each rank saw.

Run by tests/integrations/test_lightning.py with plain python; with `--devices 2 --strategy ddp`
Lightning starts the second rank itself. The daemon address and run id come from TRAINGUARD_ADDRESS /
TRAINGUARD_RUN. `--probe-every 0` trains without probes (the reference run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.integrations.tiny import tiny_gpt2, tiny_text_dataset, tiny_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--probe-every", type=int, default=3)
    ap.add_argument("--shard", action="store_true")
    a = ap.parse_args()

    import lightning.pytorch as L
    import torch
    from torch.utils.data import DataLoader

    from monitor.integrations.lightning import TrainGuardCallback
    from probes import Probe

    torch.set_num_threads(1)
    tok = tiny_tokenizer()

    class LM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lm = tiny_gpt2(vocab_size=len(tok), n_positions=64, dropout=0.1)
            self.losses: list[float] = []

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            loss = self.lm(**batch).loss
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    probes = []
    if a.probe_every:
        probes = [Probe("arithmetic", n=6, every_steps=a.probe_every, max_share=None, shard=a.shard,
                        select=lambda module: module.lm)]
    L.seed_everything(0, verbose=False)
    model = LM()
    train = DataLoader(tiny_text_dataset(tok, 64, 32), batch_size=4, shuffle=True)
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, strategy=a.strategy, max_steps=a.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[TrainGuardCallback(heartbeat_interval=0.5, probes=probes, probe_tokenizer=tok)])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        trainer.fit(model, train)
    finally:
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "global_step": trainer.global_step, "losses": model.losses, "training": model.training}))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
