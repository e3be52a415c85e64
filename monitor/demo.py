"""`trainguard demo`: a daemon in this process, a tiny language model trained on the CPU, a NaN near the end."""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import sys
import tempfile
import time
import urllib.request
from typing import Any, TextIO


def _free(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _corpus() -> bytes:
    """Real text that ships with Python: the source of a few standard-library modules."""
    import argparse
    import collections
    import dataclasses
    import json as json_mod
    import textwrap

    return "\n".join(inspect.getsource(m) for m in (argparse, collections, dataclasses, json_mod, textwrap)).encode()


def build_tiny_lm() -> Any:
    """A byte-level GRU language model of about 0.1 M parameters: seconds per thousand steps on a CPU."""
    import torch
    from torch import nn

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(256, 64)
            self.rnn = nn.GRU(64, 128, batch_first=True)
            self.head = nn.Linear(128, 256)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.rnn(self.emb(x))
            return self.head(h)

    return TinyLM()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def run_demo(seconds: float = 60.0, nan_at: float = 0.85, db: str | None = None, host: str = "127.0.0.1",
             grpc_port: int = 9751, http_port: int = 9750, keep_serving: bool = False,
             out: TextIO = sys.stdout) -> int:
    """Train for about `seconds`, corrupt a weight with NaN at `nan_at` of the time; 0 if NonFinite fired there."""
    import torch
    from torch import nn

    import monitor
    from monitor.daemon.app import Daemon, DaemonConfig

    # The demo prints each alert itself; the daemon's own log lines would repeat them mid-progress-bar.
    logging.getLogger("trainguard").setLevel(logging.ERROR)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tty = out.isatty()
    if db is None:
        db = os.path.join(tempfile.mkdtemp(prefix="trainguard-demo-"), "trainguard.db")
    cfg = DaemonConfig(host=host, grpc_port=grpc_port if _free(grpc_port, host) else 0,
                       http_port=http_port if _free(http_port, host) else 0, db=db)
    daemon = Daemon(cfg).start()
    url = daemon.http_url
    run = time.strftime("demo-%Y%m%d-%H%M%S")
    print(f"trainguard daemon running in this process (store: {db})", file=out)
    print(f"  metrics:  {url}/metrics", file=out)
    print(f"  runs:     {url}/api/v1/runs", file=out)
    print(f"  alerts:   {url}/api/v1/alerts?run={run}", file=out)
    print(f"  gRPC:     {daemon.grpc_address}   (try: trainguard runs --url {url})", file=out)
    print(f"training a tiny byte-level GRU language model on the CPU for ~{seconds:.0f}s as run {run!r};", file=out)
    print(f"a NaN is injected into one weight at {nan_at:.0%} of the time.\n", file=out)

    data = torch.tensor(list(_corpus()), dtype=torch.long)
    ctx, batch = 64, 16

    model = build_tiny_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mon = monitor.watch(model, opt, run=run, address=daemon.grpc_address, system_interval=2.0,
                        meta={"demo": True, "corpus_bytes": int(data.numel())})
    t0 = time.monotonic()
    injected_step = None
    fired: dict[str, Any] = {}
    last_poll = 0.0
    last_line = 0.0
    status = "completed"
    try:
        while True:
            elapsed = time.monotonic() - t0
            if elapsed >= seconds:
                break
            if injected_step is None and elapsed >= nan_at * seconds:
                with torch.no_grad():
                    model.head.weight[7, 13] = float("nan")
                injected_step = mon.step_count + 1
                print(f"\n>>> injected NaN into head.weight[7, 13] before step {injected_step}", file=out)
            idx = torch.randint(0, data.numel() - ctx - 1, (batch,))
            x = torch.stack([data[i:i + ctx] for i in idx])
            y = torch.stack([data[i + 1:i + ctx + 1] for i in idx])
            loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mon.step(loss=loss, tokens=batch * ctx, samples=batch)
            now = time.monotonic()
            if now - last_poll >= 0.5:
                last_poll = now
                try:
                    detail = _get(f"{url}/api/v1/runs/{run}")
                    alerts = _get(f"{url}/api/v1/alerts?run={run}&state=firing")["alerts"]
                except Exception:  # noqa: BLE001 - the first records may not have arrived yet
                    continue
                for a in alerts:
                    if a["name"] not in fired:
                        fired[a["name"]] = a
                        print(f"\n!!! ALERT {a['name']} [{a['severity']}] fired at step {a['step']}: {a['summary']}",
                              file=out)
                vals = detail.get("values", {}).get("train", {})
                tps = next((r.get("tokens_per_second") for r in detail.get("ranks", [])), None)
                line = (f"step {detail.get('last_step') or 0:>5}  loss {_fmt(vals.get('loss'))}  "
                        f"grad_norm {_fmt(vals.get('grad_norm'))}  tokens/s {_fmt(tps, '.0f')}  "
                        f"health {detail.get('health')}  [{elapsed:4.0f}s/{seconds:.0f}s]")
                if tty:
                    out.write("\r" + line + "   ")
                    out.flush()
                elif now - last_line >= 5.0:
                    last_line = now
                    print(line, file=out)
        if injected_step is not None:
            status = "failed"
    except KeyboardInterrupt:
        status = "stopped"
    finally:
        mon.close(status)
    # Delivery is acknowledged only after the daemon applied it, so the API is now complete.
    alerts = _get(f"{url}/api/v1/alerts?run={run}")["alerts"]
    for a in alerts:
        if a["name"] not in fired:
            fired[a["name"]] = a
            print(f"\n!!! ALERT {a['name']} [{a['severity']}] fired at step {a['step']}: {a['summary']}", file=out)
    print("\n", file=out)
    from monitor.cli import format_alerts

    print(format_alerts(alerts), file=out)
    nf = fired.get("NonFinite")
    ok = injected_step is not None and nf is not None and nf["step"] == injected_step
    if ok:
        print(f"\nNonFinite fired at step {nf['step']}, the first step after the injection.", file=out)
    elif injected_step is not None:
        print(f"\nNonFinite did not fire at step {injected_step} as expected.", file=out)
    if keep_serving:
        print(f"\nThe daemon keeps serving at {url} (Ctrl-C to stop).", file=out)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    daemon.close()
    return 0 if ok or injected_step is None else 1


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


# -- the forgetting scenario -------------------------------------------------------------------------


class CharTokenizer:
    """Printable ASCII and newline, one token a character; id 0 pads and ends a text. No files, no download."""

    pad_token_id = eos_token_id = bos_token_id = 0

    def __init__(self) -> None:
        self.chars = [chr(i) for i in range(32, 127)] + ["\n"]
        self.ids = {c: i + 1 for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """One id per character; characters outside the alphabet become '?'."""
        unk = self.ids["?"]
        return [self.ids.get(c, unk) for c in text]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """The text of `ids`; id 0 is dropped."""
        return "".join(self.chars[i - 1] for i in ids if 0 < int(i) <= len(self.chars))


def build_char_gpt(vocab_size: int, seed: int = 0, n_positions: int = 256) -> Any:
    """A 2-layer GPT-2 of about 0.25 M parameters over characters (transformers), dropout off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=96, n_positions=n_positions,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def task_texts(name: str, n: int, seed: int, exclude: set[str] | None = None) -> list[tuple[str, str]]:
    """(prompt, " answer\\n") pairs of a builtin suite's task, zero-shot, leaving out prompts in `exclude`."""
    from probes.builtin import builtin

    suite = builtin(name, n=n, seed=seed)
    return [(it.prompt, " " + it.gold_text() + "\n") for it in suite.items if it.prompt not in (exclude or set())]


def lm_batch(tok: CharTokenizer, pairs: list[tuple[str, str]], rng: Any, batch: int) -> tuple[Any, Any]:
    """Right-padded input ids and labels (padding ignored) for `batch` random pairs."""
    import torch

    rows = [tok.encode(p + a) for p, a in (pairs[rng.randrange(len(pairs))] for _ in range(batch))]
    width = max(len(r) for r in rows)
    x = torch.zeros((batch, width), dtype=torch.long)
    y = torch.full((batch, width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
        y[i, : len(r)] = torch.tensor(r)
    return x, y


def run_forgetting_demo(pretrain_steps: int = 700, finetune_steps: int = 300, probe_every: int = 25,
                        db: str | None = None, host: str = "127.0.0.1", grpc_port: int = 9751,
                        http_port: int = 9750, keep_serving: bool = False, out: TextIO = sys.stdout) -> int:
    """Pre-train on arithmetic, fine-tune on reading without replay; 0 if ProbeRegression fired."""
    import dataclasses
    import random

    import torch

    import monitor
    from monitor.daemon.app import Daemon, DaemonConfig
    from probes import Probe
    from probes.builtin import builtin
    from probes.runner import CausalLMAdapter, probing, run_suite

    logging.getLogger("trainguard").setLevel(logging.ERROR)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if db is None:
        db = os.path.join(tempfile.mkdtemp(prefix="trainguard-demo-"), "trainguard.db")
    cfg = DaemonConfig(host=host, grpc_port=grpc_port if _free(grpc_port, host) else 0,
                       http_port=http_port if _free(http_port, host) else 0, db=db)
    daemon = Daemon(cfg).start()
    url = daemon.http_url
    run = time.strftime("demo-forgetting-%Y%m%d-%H%M%S")
    print(f"trainguard daemon running in this process (store: {db})", file=out)
    print(f"  metrics:  {url}/metrics   (trainguard_probe_score, trainguard_probe_baseline_delta)", file=out)
    print(f"  alerts:   {url}/api/v1/alerts?run={run}", file=out)

    tok = CharTokenizer()
    # The probe: 100 arithmetic word problems, zero-shot, in the format the model is pre-trained on.
    suite = dataclasses.replace(builtin("arithmetic", n=100, seed=0), fewshot=())
    held_out = {it.prompt for it in suite.items}
    task_a = task_texts("arithmetic", 4000, seed=1, exclude=held_out)
    task_b = task_texts("reading", 4000, seed=1)
    model = build_char_gpt(tok.vocab_size)
    rng = random.Random(0)

    print(f"\n1. pre-training a character-level GPT-2 on arithmetic word problems ({pretrain_steps} steps)", file=out)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    t0 = time.monotonic()
    model.train()
    for step in range(1, pretrain_steps + 1):
        x, y = lm_batch(tok, task_a, rng, 32)
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == pretrain_steps:
            line = f"   step {step:>4}/{pretrain_steps}  loss {loss.item():.3f}  [{time.monotonic() - t0:4.0f}s]"
            if out.isatty():
                out.write("\r" + line)
                out.flush()
            elif step % 200 == 0 or step == pretrain_steps:
                print(line, file=out)
    adapter = CausalLMAdapter(model, tok, batch_size=50)
    with probing(model):
        res = run_suite(adapter, suite, batch_size=50)
    base_acc = sum(m["accuracy"] for m in res.metrics if m) / len(suite.items)
    print(f"\n   held-out arithmetic accuracy after pre-training: {base_acc:.2f}", file=out)

    print(f"\n2. fine-tuning on reading comprehension only, no arithmetic replayed ({finetune_steps} steps), "
          f"as run {run!r};\n   the arithmetic probe runs at the start (the baseline) and every {probe_every} steps",
          file=out)
    probe = Probe(suite, tok, name="arithmetic", every_steps=probe_every, batch_size=50, max_share=None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    mon = monitor.watch(model, opt, run=run, address=daemon.grpc_address, system_interval=2.0,
                        meta={"demo": "forgetting", "pretrained_steps": pretrain_steps}, probes=[probe])
    fired: dict[str, Any] = {}
    shown = 0
    if probe.runs and probe.last is not None:
        shown = probe.runs
        done = [m for m in probe.last.metrics if m]
        print(f"   step    0  baseline probe arithmetic: accuracy "
              f"{sum(m['accuracy'] for m in done) / max(1, len(done)):.2f}", file=out)
    status = "completed"
    try:
        for _ in range(finetune_steps):
            x, y = lm_batch(tok, task_b, rng, 32)
            loss = model(input_ids=x, labels=y).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            mon.step(loss=loss, grad_norm=gn)
            if probe.runs > shown and probe.last is not None:
                shown = probe.runs
                done = [m for m in probe.last.metrics if m]
                acc = sum(m["accuracy"] for m in done) / max(1, len(done))
                lp = sum(m["gold_logprob"] for m in done) / max(1, len(done))
                print(f"   step {mon.step_count:>4}  loss {loss.item():.3f}  probe arithmetic: accuracy {acc:.2f}, "
                      f"gold log-prob {lp:.2f}", file=out)
                try:
                    for a in _get(f"{url}/api/v1/alerts?run={run}&state=firing")["alerts"]:
                        if a["name"] not in fired:
                            fired[a["name"]] = a
                            print(f"\n!!! ALERT {a['name']} [{a['severity']}] fired at step {a['step']}: "
                                  f"{a['summary']}\n", file=out)
                except Exception:  # noqa: BLE001 - the daemon may not have the batch yet
                    pass
    except KeyboardInterrupt:
        status = "stopped"
    finally:
        mon.close(status)
    alerts = _get(f"{url}/api/v1/alerts?run={run}")["alerts"]
    for a in alerts:
        if a["name"] not in fired:
            fired[a["name"]] = a
            print(f"\n!!! ALERT {a['name']} [{a['severity']}] fired at step {a['step']}: {a['summary']}", file=out)
    from monitor.cli import format_alerts

    print("\n" + format_alerts(alerts), file=out)
    pr = fired.get("ProbeRegression")
    if pr is not None:
        print(f"\nProbeRegression fired at step {pr['step']}: the fine-tune is forgetting arithmetic.", file=out)
    else:
        print("\nProbeRegression did not fire.", file=out)
    if keep_serving:
        print(f"\nThe daemon keeps serving at {url} (Ctrl-C to stop).", file=out)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    daemon.close()
    return 0 if pr is not None else 1
