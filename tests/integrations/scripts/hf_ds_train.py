"""HF Trainer with DeepSpeed ZeRO on a tiny GPT-2, under torchrun, with trainguard attached; writes reference values.

Run by tests/integrations/test_hf.py. The daemon address and run id come from TRAINGUARD_ADDRESS / TRAINGUARD_RUN.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.integrations.tiny import tiny_gpt2, tiny_text_dataset, tiny_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", required=True, help="path with {rank}")
    a = ap.parse_args()

    import torch
    from transformers import Trainer, TrainingArguments

    # The shared-memory collective op would be JIT-compiled (about 30 s) and is not needed on gloo.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    from monitor.integrations.hf import attach

    torch.set_num_threads(1)
    step_loss: dict[int, float] = {}

    class Recording(Trainer):
        # The test's own record of each step's loss (sum of the micro-batch losses the Trainer accumulates).
        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            out = super().training_step(*args, **kwargs)
            s = self.state.global_step + 1
            step_loss[s] = step_loss.get(s, 0.0) + float(out)
            return out

    tok = tiny_tokenizer()
    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "gradient_clipping": "auto", "zero_optimization": {"stage": a.stage}, "steps_per_print": 10**9}
    args = TrainingArguments(
        output_dir="/tmp/unused-hf-ds", max_steps=a.steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=2, max_grad_norm=1.0, logging_steps=4,
        use_cpu=True, report_to="none", save_strategy="no", seed=0, disable_tqdm=True, deepspeed=ds_config,
    )
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)  # a config "optimizer" would JIT-compile FusedAdam
    trainer = Recording(model=model, args=args, train_dataset=tiny_text_dataset(tok, 64, 32),
                        optimizers=(optimizer, None))
    cb = attach(trainer, heartbeat_interval=0)
    trainer.train()
    ok = cb.close()
    rank = int(os.environ.get("RANK", "0"))
    logged = {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}
    Path(a.out.format(rank=rank)).write_text(json.dumps({
        "rank": rank, "closed": ok, "run": cb.reporter.run, "step_loss": step_loss, "logged_grad_norm": logged}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
