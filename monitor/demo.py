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
