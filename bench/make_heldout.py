"""Build a held-out labelled trace set from small real training runs on the CPU, with injected faults.

Each scenario trains one small model in a fresh process, attached with `monitor.watch(..., address="off",
record_path=...)`, so the record file is the trace and nothing is sent anywhere. The models and data differ
from the labelled CPU set under tests/data/bench/cpu (byte-level GPT/GRU language models on licence text):

  - `mlp-cls`: an MLP classifier on synthetic data labelled by a fixed random teacher network (AdamW);
  - `mlp-reg`: a residual MLP regressor on a synthetic sum-of-sines target (SGD with Nesterov momentum);
  - `tfm-bytes`: a 2-layer pre-LN causal transformer on the bytes of the Python standard library sources (AdamW).

The labels (expect windows, onset) are fixed here, in SCENARIOS, before any detector sees the traces; the
only data-derived window end is the gradient explosion's, by the rule given with it. Each label also carries
a `check` that the injected fault is visible in the recorded data itself (not in any alert).

    .venv/bin/python bench/make_heldout.py                    # every scenario into tests/data/heldout/
    .venv/bin/python bench/make_heldout.py --only healthy-01 --out /tmp/h
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "tests" / "data" / "heldout"
SYSTEM_INTERVAL = 0.25  # seconds between `system` records
EVAL_EVERY = 100
STOP_AFTER_NONFINITE = 40  # a run stops ("failed") this many steps after its first non-finite loss

# -- the scenarios ---------------------------------------------------------------------------------
# Models: see build_model. Schedules: (name, params). Faults: (type, params). Windows are inclusive steps,
# or seconds after onset_t for the stall.

TFM_SMALL = {"kind": "tfm-bytes", "d": 64, "layers": 2, "heads": 4, "context": 64}
TFM_WIDE = {"kind": "tfm-bytes", "d": 80, "layers": 2, "heads": 4, "context": 48}
MLP_CLS = {"kind": "mlp-cls", "d_in": 64, "hidden": 768, "depth": 2, "classes": 10}
MLP_REG = {"kind": "mlp-reg", "d_in": 16, "hidden": 384, "blocks": 3}

SCENARIOS: dict[str, dict[str, Any]] = {
    "healthy-01": {
        "model": MLP_CLS, "seed": 7301, "batch": 128, "steps": 1000,
        "opt": {"name": "adamw", "lr": 2e-3, "wd": 0.05, "betas": [0.9, 0.999]}, "clip": 1.0,
        "schedule": {"name": "cosine", "warmup": 50, "min_ratio": 0.05},
        "fault": {"type": "none"}, "expect": [],
    },
    "healthy-02": {
        "model": TFM_WIDE, "seed": 7302, "batch": 24, "steps": 900,
        "opt": {"name": "adamw", "lr": 1.5e-3, "wd": 0.1, "betas": [0.9, 0.98]}, "clip": 1.0,
        "schedule": {"name": "cosine", "warmup": 80, "min_ratio": 0.1},
        "fault": {"type": "none"}, "expect": [],
    },
    "healthy-03": {
        "model": MLP_REG, "seed": 7303, "batch": 64, "steps": 1200,
        "opt": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "nesterov": True, "wd": 1e-4}, "clip": 5.0,
        "schedule": {"name": "step", "warmup": 100, "milestones": [600, 900], "gamma": 0.3},
        "fault": {"type": "none"}, "expect": [],
    },
    "spike-01": {
        # 20 consecutive batches of uniformly random bytes (a corrupted shard), then clean data again.
        "model": TFM_SMALL, "seed": 7304, "batch": 16, "steps": 900,
        "opt": {"name": "adamw", "lr": 2e-3, "wd": 0.01, "betas": [0.9, 0.95]}, "clip": 1.0,
        "schedule": {"name": "constant", "warmup": 50},
        "fault": {"type": "random_batches", "onset": 500, "n": 20},
        "expect": [{"alert": "LossSpike", "from_step": 500, "to_step": 530},
                   {"alert": "LossDivergence", "from_step": 500, "to_step": 530}],
        "any_of": True,
    },
    "divergence-01": {
        "model": MLP_CLS, "seed": 7305, "batch": 96, "steps": 1000,
        "opt": {"name": "adamw", "lr": 1e-3, "wd": 0.01, "betas": [0.9, 0.999]}, "clip": 1.0,
        "schedule": {"name": "constant", "warmup": 50},
        "fault": {"type": "lr_mult", "onset": 500, "mult": 100.0},
        "expect": [{"alert": "LossDivergence", "from_step": 500, "to_step": 800}],
    },
    "nonfinite-01": {
        "model": MLP_REG, "seed": 7306, "batch": 64, "steps": 900,
        "opt": {"name": "sgd", "lr": 0.015, "momentum": 0.9, "nesterov": True, "wd": 1e-4}, "clip": 5.0,
        "schedule": {"name": "cosine", "warmup": 60, "min_ratio": 0.1},
        "fault": {"type": "nan_weight", "onset": 600, "param": "blocks.1.fc1.weight", "index": 37},
        "expect": [{"alert": "NonFinite", "from_step": 600, "to_step": 602}],
    },
    "grad_explosion-01": {
        # lr grows 3 % a step from the onset and keeps growing. Window end, fixed rule: 10 steps after the
        # median gradient norm of the last 10 steps first exceeds 10x its median over the 100 steps before the
        # onset (this regression loss is too noisy batch to batch for a single-step loss threshold).
        "model": MLP_REG, "seed": 7307, "batch": 64, "steps": 800,
        "opt": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True, "wd": 1e-4}, "clip": 5.0,
        "schedule": {"name": "constant", "warmup": 50},
        "fault": {"type": "lr_growth", "onset": 400, "growth": 1.03},
        "expect": [{"alert": "GradientExplosion", "from_step": 400, "to_step": "grad_norm_10x+10"}],
    },
    "lr_zero-01": {
        "model": MLP_CLS, "seed": 7308, "batch": 128, "steps": 1000,
        "opt": {"name": "adamw", "lr": 3e-3, "wd": 0.05, "betas": [0.9, 0.999]}, "clip": 1.0,
        "schedule": {"name": "cosine", "warmup": 50, "min_ratio": 0.1},
        "fault": {"type": "lr_zero", "onset": 450},
        "expect": [{"alert": "LearningRateAnomaly", "from_step": 450, "to_step": 500},
                   {"alert": "LossPlateau", "from_step": 450, "to_step": 1000}],
        "any_of": True,
    },
    "slowdown-01": {
        # From the onset a forward pre-hook sleeps as long as the median step of steps 400-499 took.
        "model": TFM_WIDE, "seed": 7309, "batch": 24, "steps": 900,
        "opt": {"name": "adamw", "lr": 1e-3, "wd": 0.1, "betas": [0.9, 0.95]}, "clip": 1.0,
        "schedule": {"name": "cosine", "warmup": 60, "min_ratio": 0.1},
        "fault": {"type": "slow_forward", "onset": 500, "sleep_x_step": 1.0},
        "expect": [{"alert": "ThroughputDrop", "from_step": 500, "to_step": 700}],
    },
    "leak-01": {
        "model": MLP_CLS, "seed": 7310, "batch": 128, "steps": 1000,
        "opt": {"name": "adamw", "lr": 1.5e-3, "wd": 0.05, "betas": [0.9, 0.999]}, "clip": 1.0,
        "schedule": {"name": "cosine", "warmup": 50, "min_ratio": 0.1},
        "fault": {"type": "leak", "onset": 450, "mb_per_step": 2.0},
        "expect": [{"alert": "MemoryLeak", "from_step": 450, "to_step": 850}],
    },
    "stall-01": {
        # The training thread sleeps 70 s before step 500 (heartbeats go on), then the job is stopped.
        "model": TFM_SMALL, "seed": 7311, "batch": 16, "steps": 1000,
        "opt": {"name": "adamw", "lr": 1.5e-3, "wd": 0.01, "betas": [0.9, 0.95]}, "clip": 1.0,
        "schedule": {"name": "cosine", "warmup": 80, "min_ratio": 0.1},
        "fault": {"type": "stall", "onset": 500, "seconds": 70.0},
        "expect": [{"alert": "TrainingStalled", "from_t_offset": 0, "to_t_offset": 60}],
    },
}


# -- data ------------------------------------------------------------------------------------------

def _torch():
    import torch

    return torch


class TeacherData:
    """Gaussian inputs labelled by a fixed random 2-layer tanh teacher, with 5 % label noise."""

    def __init__(self, seed: int, d_in: int, classes: int, n_train: int = 60_000, n_eval: int = 2_048):
        torch = _torch()
        g = torch.Generator().manual_seed(seed + 1000)
        w1 = torch.randn(d_in, 96, generator=g) / math.sqrt(d_in)
        w2 = torch.randn(96, classes, generator=g) / math.sqrt(96)
        x = torch.randn(n_train + n_eval, d_in, generator=g)
        y = (torch.tanh(x @ w1 * 2.0) @ w2).argmax(1)
        noisy = torch.rand(len(y), generator=g) < 0.05
        y[noisy] = torch.randint(0, classes, (int(noisy.sum()),), generator=g)
        self.x, self.y = x[:n_train], y[:n_train]
        self.ex, self.ey = x[n_train:], y[n_train:]
        self.classes = classes
        self.g = torch.Generator().manual_seed(seed)

    def batch(self, b: int, corrupt: bool = False):
        torch = _torch()
        i = torch.randint(0, len(self.x), (b,), generator=self.g)
        y = self.y[i]
        if corrupt:
            y = torch.randint(0, self.classes, (b,), generator=self.g)
        return self.x[i], y

    def eval_batches(self):
        return [(self.ex, self.ey)]


class WaveData:
    """Uniform inputs in [-1, 1]^d; target a fixed sum of 8 sines of random projections, plus noise."""

    def __init__(self, seed: int, d_in: int, n_train: int = 60_000, n_eval: int = 2_048):
        torch = _torch()
        g = torch.Generator().manual_seed(seed + 1000)
        w = torch.randn(d_in, 8, generator=g) * 0.5
        b = torch.rand(8, generator=g) * 6.283
        a = torch.randn(8, generator=g)
        x = torch.rand(n_train + n_eval, d_in, generator=g) * 2 - 1
        y = (torch.sin(x @ w + b) * a).sum(1, keepdim=True)
        y = (y - y.mean()) / y.std()
        y = y + 0.05 * torch.randn(y.shape, generator=g)
        self.x, self.y = x[:n_train], y[:n_train]
        self.ex, self.ey = x[n_train:], y[n_train:]
        self.g = torch.Generator().manual_seed(seed)

    def batch(self, b: int, corrupt: bool = False):
        torch = _torch()
        i = torch.randint(0, len(self.x), (b,), generator=self.g)
        y = self.y[i]
        if corrupt:
            y = torch.randn(y.shape, generator=self.g) * 3.0
        return self.x[i], y

    def eval_batches(self):
        return [(self.ex, self.ey)]


def stdlib_bytes(limit: int = 3_000_000) -> tuple[bytes, list[str]]:
    """The bytes of the Python standard library's top-level modules, in name order, up to `limit`."""
    lib = Path(os.__file__).parent
    out, names, n = [], [], 0
    for p in sorted(lib.glob("*.py")):
        b = p.read_bytes()
        out.append(b)
        names.append(p.name)
        n += len(b)
        if n >= limit:
            break
    return b"".join(out)[:limit], names


class ByteData:
    """Random windows of the standard library's source bytes; the last 10 % is held out for eval."""

    def __init__(self, seed: int, context: int):
        torch = _torch()
        raw, self.files = stdlib_bytes()
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        cut = int(len(data) * 0.9)
        self.train, self.eval = data[:cut], data[cut:]
        self.context = context
        self.g = torch.Generator().manual_seed(seed)
        eg = torch.Generator().manual_seed(seed + 1000)
        starts = torch.randint(0, len(self.eval) - context - 1, (128,), generator=eg)
        chunks = torch.stack([self.eval[s:s + context + 1] for s in starts.tolist()])
        self._eval = [(chunks[i:i + 32, :-1], chunks[i:i + 32, 1:]) for i in range(0, 128, 32)]

    def batch(self, b: int, corrupt: bool = False):
        torch = _torch()
        if corrupt:
            x = torch.randint(0, 256, (b, self.context + 1), generator=self.g)
        else:
            s = torch.randint(0, len(self.train) - self.context - 1, (b,), generator=self.g)
            x = torch.stack([self.train[i:i + self.context + 1] for i in s.tolist()])
        return x[:, :-1], x[:, 1:]

    def eval_batches(self):
        return self._eval


# -- models ----------------------------------------------------------------------------------------

def build_model(spec: dict[str, Any]):
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    class MLPClassifier(nn.Module):
        def __init__(self, d_in: int, hidden: int, depth: int, classes: int):
            super().__init__()
            layers, d = [], d_in
            for _ in range(depth):
                layers += [nn.Linear(d, hidden), nn.GELU()]
                d = hidden
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(d, classes)

        def forward(self, x):
            return self.head(self.body(x))

    class Block(nn.Module):
        def __init__(self, h: int):
            super().__init__()
            self.norm = nn.LayerNorm(h)
            self.fc1 = nn.Linear(h, 2 * h)
            self.fc2 = nn.Linear(2 * h, h)

        def forward(self, x):
            return x + self.fc2(F.gelu(self.fc1(self.norm(x))))

    class ResMLP(nn.Module):
        def __init__(self, d_in: int, hidden: int, blocks: int):
            super().__init__()
            self.inp = nn.Linear(d_in, hidden)
            self.blocks = nn.ModuleList(Block(hidden) for _ in range(blocks))
            self.norm = nn.LayerNorm(hidden)
            self.out = nn.Linear(hidden, 1)

        def forward(self, x):
            h = self.inp(x)
            for b in self.blocks:
                h = b(h)
            return self.out(self.norm(h))

    class Attention(nn.Module):
        def __init__(self, d: int, heads: int):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(b, t, d))

    class TfmBlock(nn.Module):
        def __init__(self, d: int, heads: int):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = Attention(d, heads)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class TinyGPT(nn.Module):
        def __init__(self, d: int, layers: int, heads: int, context: int):
            super().__init__()
            self.tok = nn.Embedding(256, d)
            self.pos = nn.Embedding(context, d)
            self.blocks = nn.ModuleList(TfmBlock(d, heads) for _ in range(layers))
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, 256, bias=False)
            self.head.weight = self.tok.weight  # tied, as in GPT-2
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)

        def forward(self, idx):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
            for b in self.blocks:
                x = b(x)
            return self.head(self.ln(x))

    kind = spec["kind"]
    if kind == "mlp-cls":
        return MLPClassifier(spec["d_in"], spec["hidden"], spec["depth"], spec["classes"])
    if kind == "mlp-reg":
        return ResMLP(spec["d_in"], spec["hidden"], spec["blocks"])
    if kind == "tfm-bytes":
        return TinyGPT(spec["d"], spec["layers"], spec["heads"], spec["context"])
    raise ValueError(kind)


def build_data(spec: dict[str, Any], seed: int):
    if spec["kind"] == "mlp-cls":
        return TeacherData(seed, spec["d_in"], spec["classes"])
    if spec["kind"] == "mlp-reg":
        return WaveData(seed, spec["d_in"])
    return ByteData(seed, spec["context"])


def loss_of(kind: str, out, y):
    F = _torch().nn.functional
    if kind == "mlp-reg":
        return F.mse_loss(out, y)
    if kind == "tfm-bytes":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


def lr_mult(sched: dict[str, Any], step: int, total: int) -> float:
    """The schedule's multiplier of the base lr at optimizer step `step` (1-based)."""
    w = sched.get("warmup", 0)
    if step <= w:
        return step / w
    if sched["name"] == "constant":
        return 1.0
    if sched["name"] == "cosine":
        p = (step - w) / max(1, total - w)
        m = sched.get("min_ratio", 0.0)
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
    if sched["name"] == "step":
        return sched["gamma"] ** sum(step > s for s in sched["milestones"])
    raise ValueError(sched["name"])


# -- one run ---------------------------------------------------------------------------------------

def run_one(name: str, out_dir: Path) -> dict[str, Any]:
    """Train scenario `name`, recording its trace; returns what the label needs (onset_t for a stall)."""
    torch = _torch()
    import monitor

    sc = SCENARIOS[name]
    torch.set_num_threads(1)
    torch.manual_seed(sc["seed"])
    mspec, kind = sc["model"], sc["model"]["kind"]
    model = build_model(mspec)
    data = build_data(mspec, sc["seed"])
    o = sc["opt"]
    if o["name"] == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], weight_decay=o["wd"], betas=tuple(o["betas"]))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"],
                              weight_decay=o["wd"])
    fault = sc["fault"]
    ftype, onset = fault["type"], fault.get("onset")
    model_meta = dict(mspec, params=sum(p.numel() for p in model.parameters()))
    if kind == "mlp-cls":
        data_meta = {"source": "synthetic teacher MLP, gaussian inputs", "label_noise": 0.05, "train_samples": 60_000}
    elif kind == "mlp-reg":
        data_meta = {"source": "synthetic sum of 8 sines of random projections", "noise": 0.05, "train_samples": 60_000}
    else:
        data_meta = {"source": "python stdlib sources (bytes)", "files": len(data.files),
                     "train_bytes": len(data.train), "eval_bytes": len(data.eval)}
    meta = {"device": "cpu", "threads_per_rank": 1, "seed": sc["seed"], "model": model_meta, "optimizer": o,
            "batch": sc["batch"], "steps_planned": sc["steps"], "schedule": sc["schedule"], "grad_clip": sc["clip"],
            "data": data_meta, "eval_every": EVAL_EVERY, "fault": fault, "set": "heldout"}
    run_id = f"heldout-{name}"
    path = out_dir / f"{run_id}.jsonl.gz"
    if path.exists():
        path.unlink()
    mon = monitor.watch(model, opt, run=run_id, address="off", record_path=str(path),
                        system_interval=SYSTEM_INTERVAL, batch_size=sc["batch"], max_steps=sc["steps"], meta=meta,
                        share_run_id=False)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            ls = [loss_of(kind, model(x), y).item() for x, y in data.eval_batches()]
        model.train()
        return sum(ls) / len(ls)

    leak: list[Any] = []
    step_times: list[float] = []
    sleep_s = 0.0
    hook = None
    first_bad = None
    result: dict[str, Any] = {}
    t_prev = time.perf_counter()
    status = "completed"
    model.train()
    for step in range(1, sc["steps"] + 1):
        if ftype == "stall" and step == onset:
            result["onset_t"] = time.time()
            time.sleep(fault["seconds"])
            status = "stopped"
            break
        if ftype == "nan_weight" and step == onset:
            with torch.no_grad():
                dict(model.named_parameters())[fault["param"]].view(-1)[fault["index"]] = float("nan")
        if ftype == "slow_forward" and step == onset:
            sleep_s = fault["sleep_x_step"] * statistics.median(step_times[onset - 101:onset - 1])
            result["sleep_s"] = sleep_s
            hook = model.register_forward_pre_hook(lambda m, a: time.sleep(sleep_s) if m.training else None)
        if ftype == "leak" and onset is not None and step >= onset:
            leak.append(torch.ones(int(fault["mb_per_step"] * 2**20) // 4))

        corrupt = ftype == "random_batches" and onset <= step < onset + fault["n"]
        x, y = data.batch(sc["batch"], corrupt=corrupt)
        lr = o["lr"] * lr_mult(sc["schedule"], step, sc["steps"])
        if onset is not None and step >= onset:
            if ftype == "lr_mult":
                lr *= fault["mult"]
            elif ftype == "lr_zero":
                lr = 0.0
            elif ftype == "lr_growth":
                lr *= fault["growth"] ** (step - onset + 1)
        for gr in opt.param_groups:
            gr["lr"] = lr

        loss = loss_of(kind, model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sc["clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), sc["clip"])
        opt.step()
        mon.step(loss.detach())
        now = time.perf_counter()
        step_times.append(now - t_prev)
        t_prev = now
        if step % EVAL_EVERY == 0:
            mon.eval(loss=evaluate())
        if first_bad is None and not math.isfinite(loss.item()):
            first_bad = step
        if first_bad is not None and step >= first_bad + STOP_AFTER_NONFINITE:
            status = "failed"  # the training script's own NaN check stops the job
            break
    if hook is not None:
        hook.remove()
    mon.close(status)
    result["status"] = status
    return result


# -- labels ----------------------------------------------------------------------------------------

def _series(path: Path) -> tuple[list[Any], list[Any]]:
    from monitor.records import read_trace

    recs = list(read_trace(str(path)))
    return [r for r in recs if r.kind == "train"], recs


def label(name: str, path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """The scenario's label, with a check that its fault shows in the recorded data."""
    sc = SCENARIOS[name]
    fault = sc["fault"]
    onset = fault.get("onset")
    train, recs = _series(path)
    by = {r.step: r.values for r in train}
    steps = sorted(by)
    loss = {s: by[s].get("loss", math.nan) for s in steps}
    gn = {s: by[s].get("grad_norm", math.nan) for s in steps}
    lab: dict[str, Any] = {"scenario": name.rsplit("-", 1)[0], "expect": [], "fault": fault}
    notes: list[str] = []
    ok = True
    if onset is not None:
        pre = [loss[s] for s in steps if onset - 100 <= s < onset]
        pre_loss = statistics.median(pre) if pre else math.nan
        pre_gn = statistics.median([gn[s] for s in steps if onset - 100 <= s < onset] or [math.nan])
    for e in sc["expect"]:
        e = dict(e)
        if e.get("to_step") == "grad_norm_10x+10":
            def rolling(series: dict[int, float], s: int) -> float:
                w = [series[k] for k in steps if s - 10 < k <= s]
                return statistics.median(w) if all(math.isfinite(v) for v in w) else math.inf

            gn1 = next((s for s in steps if s >= onset and not (gn[s] <= 10 * pre_gn)), None)
            gn10 = next((s for s in steps if s >= onset and rolling(gn, s) > 10 * pre_gn), None)
            blow = next((s for s in steps if s >= onset and rolling(loss, s) > 2 * pre_loss), None)
            e["to_step"] = (gn10 + 10) if gn10 is not None else steps[-1]
            notes.append(f"grad_norm pre-onset median {pre_gn:.3g}, one step >10x at step {gn1}, 10-step median "
                         f">10x at step {gn10}; loss pre-onset median {pre_loss:.3g}, 10-step median >2x at step "
                         f"{blow}; window ends 10 steps after the gradient norm's 10-step median passes 10x")
            ok &= gn10 is not None
        lab["expect"].append(e)
    if sc.get("any_of"):
        lab["any_of"] = True
    if onset is not None:
        lab["onset_step"] = onset
    t = fault["type"]
    if t == "none":
        fin = all(math.isfinite(v) for v in loss.values())
        first = statistics.median(loss[s] for s in steps[:20])
        last = statistics.median(loss[s] for s in steps[-50:])
        ok &= fin and last < first
        notes.append(f"loss median {first:.3g} over the first 20 steps, {last:.3g} over the last 50")
    elif t == "random_batches":
        during = statistics.mean(loss[s] for s in steps if onset <= s < onset + fault["n"])
        after = statistics.median(loss[s] for s in steps if onset + fault["n"] + 20 <= s < onset + fault["n"] + 70)
        ok &= during > pre_loss + 1.0
        notes.append(f"pre-onset median loss {pre_loss:.3g}; mean {during:.3g} over the {fault['n']} random batches "
                     f"(steps {onset}-{onset + fault['n'] - 1}); median {after:.3g} 20-70 steps after them")
    elif t == "lr_mult":
        post = statistics.median(loss[s] for s in steps if onset <= s <= onset + 100)
        ok &= post > 2 * pre_loss
        notes.append(f"pre-onset median loss {pre_loss:.3g}; median over steps {onset}-{onset + 100}: {post:.3g}; "
                     f"last {loss[steps[-1]]:.3g} at step {steps[-1]}")
    elif t == "nan_weight":
        ok &= not math.isfinite(loss.get(onset, 0.0)) and all(math.isfinite(loss[s]) for s in steps if s < onset)
        notes.append(f"first non-finite loss at step {next((s for s in steps if not math.isfinite(loss[s])), None)}; "
                     f"run stopped at step {steps[-1]}")
    elif t == "lr_growth":
        bad = next((s for s in steps if not math.isfinite(loss[s])), None)
        if bad is not None:
            notes.append(f"first non-finite loss at step {bad}; run stopped at step {steps[-1]}")
    elif t == "lr_zero":
        ok &= all(by[s].get("lr") == 0 for s in steps if s >= onset)
        post = statistics.median(loss[s] for s in steps if s >= onset)
        notes.append(f"lr 0 from step {onset}; pre-onset median loss {pre_loss:.3g}, after {post:.3g}")
    elif t == "slow_forward":
        st = {s: by[s].get("step_time_seconds", math.nan) for s in steps}
        before = statistics.median(st[s] for s in steps if onset - 100 <= s < onset)
        after = statistics.median(st[s] for s in steps if s >= onset)
        ok &= after > 1.5 * before
        notes.append(f"median step time {before * 1e3:.1f} ms before, {after * 1e3:.1f} ms from step {onset} "
                     f"(forward sleeps {result.get('sleep_s', 0) * 1e3:.1f} ms)")
    elif t == "leak":
        sysr = [r for r in recs if r.kind == "system" and "host_rss_bytes" in r.values]
        at = [r for r in sysr if (r.step or 0) <= onset]
        rss0 = (at[-1] if at else sysr[0]).values["host_rss_bytes"]
        rss1 = sysr[-1].values["host_rss_bytes"]
        grow = (rss1 - rss0) / 2**20 / max(1, steps[-1] - onset)
        ok &= grow > 0.8 * fault["mb_per_step"]
        notes.append(f"host RSS {rss0 / 2**20:.0f} MiB at the onset, {rss1 / 2**20:.0f} MiB at the end "
                     f"({grow:.2f} MiB/step); {len(sysr)} system records")
    elif t == "stall":
        lab["onset_t"] = result["onset_t"]
        hb = [r for r in recs if r.kind == "heartbeat" and r.t >= result["onset_t"]]
        last_t = max(r.t for r in recs)
        ok &= steps[-1] == onset - 1 and bool(hb) and last_t - result["onset_t"] >= 60
        notes.append(f"last step {steps[-1]}; {len(hb)} heartbeats after onset_t; trace ends "
                     f"{last_t - result['onset_t']:.1f} s after onset_t (job stopped)")
    lab["check"] = "ok" if ok else "FAILED"
    lab["note"] = "; ".join(notes)
    return lab


# -- driver ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: tests/data/heldout)")
    ap.add_argument("--only", nargs="*", default=None, metavar="SCENARIO", help=f"any of: {', '.join(SCENARIOS)}")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.child:  # one run, in its own process (its own RSS, threads and exit handlers)
        res = run_one(args.child, args.out)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    names = args.only or list(SCENARIOS)
    lab_path = args.out / "scenarios.json"
    labels = json.loads(lab_path.read_text())["traces"] if lab_path.exists() else {}
    for name in names:
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, __file__, "--child", name, "--out", str(args.out)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stdout, p.stderr, file=sys.stderr)
            return 1
        res = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))[7:])
        fname = f"heldout-{name}.jsonl.gz"
        lab = label(name, args.out / fname, res)
        labels[fname] = lab
        size = (args.out / fname).stat().st_size
        print(f"{fname:36s} {time.monotonic() - t0:5.1f} s  {size / 1024:5.0f} KiB  check={lab['check']}  "
              f"{lab['note']}", flush=True)
        lab_path.write_text(json.dumps({"traces": dict(sorted(labels.items()))}, indent=1) + "\n")
    bad = [k for k, v in labels.items() if v["check"] != "ok"]
    if bad:
        print(f"check failed: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
