"""Plain PyTorch loops: `monitor.watch(model, optimizer)` and `mon.step(loss=...)`."""

from __future__ import annotations

import os
import platform
import socket
import threading
import time
from typing import Any

from monitor.client.collect import system_values
from monitor.client.reporter import Reporter


def _rank_and_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001
        pass
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


class Watch:
    """Reports one plain training loop. Call `step()` once per optimizer step."""

    def __init__(self, model: Any = None, optimizer: Any = None, *, run: str | None = None,
                 reporter: Reporter | None = None, system_interval: float = 5.0,
                 meta: dict[str, Any] | None = None, **reporter_kwargs: Any):
        rank, world = _rank_and_world()
        self.reporter = reporter or Reporter(run=run, rank=rank, **reporter_kwargs)
        self.model = model
        self.optimizer = optimizer
        self.step_count = 0
        self._last = time.perf_counter()
        self._grad_norm: Any = None
        self._hook = None
        self._closed = False
        if optimizer is not None and hasattr(optimizer, "register_step_pre_hook"):
            self._hook = optimizer.register_step_pre_hook(self._before_optimizer_step)
        info: dict[str, Any] = {"framework": "torch", "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ
                                else "python", "host": socket.gethostname(), "pid": os.getpid(),
                                "python": platform.python_version()}
        try:
            import torch

            info["framework"] = f"torch {torch.__version__}"
        except ImportError:
            pass
        if model is not None and hasattr(model, "parameters"):
            info["model"] = {"type": type(model).__name__,
                             "params": int(sum(p.numel() for p in model.parameters()))}
        if optimizer is not None:
            groups = getattr(optimizer, "param_groups", None) or [{}]
            info["optimizer"] = {"name": type(optimizer).__name__, "lr": groups[0].get("lr")}
        info.update(meta or {})
        self.reporter.run_started(world_size=world, meta=info)
        self._stop = threading.Event()
        self._sampler = None
        if system_interval and system_interval > 0:
            self._sampler = threading.Thread(target=self._sample_loop, args=(system_interval,),
                                             name="trainguard-system", daemon=True)
            self._sampler.start()

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # The global gradient norm as the optimizer is about to see it, kept as a tensor: reading
        # it (a device-to-host copy) happens on the sender thread, never here.
        try:
            import torch

            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads, 2.0)
                self._grad_norm = torch.linalg.vector_norm(torch.stack(norms), 2.0).detach()
        except Exception:  # noqa: BLE001
            self._grad_norm = None

    def step(self, loss: Any = None, *, grad_norm: Any = None, tokens: int | None = None,
             samples: int | None = None, **values: Any) -> None:
        """Report one finished optimizer step. Tensors are fine: they are read off the training thread."""
        try:
            now = time.perf_counter()
            self.step_count += 1
            vals: dict[str, Any] = {"step_time_seconds": now - self._last}
            self._last = now
            if loss is not None:
                vals["loss"] = loss.detach() if hasattr(loss, "detach") else loss
            gn = grad_norm if grad_norm is not None else self._grad_norm
            if gn is not None:
                vals["grad_norm"] = gn.detach() if hasattr(gn, "detach") else gn
            self._grad_norm = None
            if self.optimizer is not None:
                groups = getattr(self.optimizer, "param_groups", None)
                if groups:
                    vals["lr"] = groups[0].get("lr")
            if tokens is not None:
                vals["tokens"] = tokens
            if samples is not None:
                vals["samples"] = samples
            vals.update(values)
            self.reporter.log("train", self.step_count, vals)
        except Exception:  # noqa: BLE001 - never raise into the training loop
            pass

    def eval(self, loss: Any = None, **metrics: Any) -> None:
        """Report an evaluation at the current step."""
        vals = dict(metrics)
        if loss is not None:
            vals["loss"] = loss
        self.reporter.log("eval", self.step_count, vals)

    def _sample_loop(self, interval: float) -> None:
        self.reporter.log("system", self.step_count, system_values())
        while not self._stop.wait(interval):
            self.reporter.log("system", self.step_count, system_values())

    def close(self, status: str = "completed", timeout: float = 10.0) -> bool:
        """Report the end of the run and deliver what is queued."""
        if self._closed:
            return True
        self._closed = True
        self._stop.set()
        if self._hook is not None:
            self._hook.remove()
        self.reporter.end(status, self.step_count)
        return self.reporter.close(timeout)

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close("failed" if exc_type is not None else "completed")


def watch(model: Any = None, optimizer: Any = None, **kwargs: Any) -> Watch:
    """Attach trainguard to a plain loop (see Watch)."""
    return Watch(model, optimizer, **kwargs)
