"""Plain PyTorch loops and torchrun: `monitor.watch(model, optimizer)` and `mon.step(loss=...)`.

Watch is also the base the framework integrations build on: it resolves the rank's identity,
announces the run, hooks the model and the optimizer for the collectors in monitor.client.collect,
and turns each step into one `train` record without waiting on the device.
"""

from __future__ import annotations

import atexit
import sys
import time
import weakref
from typing import Any

from monitor.client.collect import (ForwardProbe, SystemSampler, UpdateRatio, grad_norms, read_later,
                                    top_level_groups)
from monitor.client.identity import Identity, framework_meta, resolve_identity
from monitor.client.reporter import Reporter

_GRAD_NORM_AT = ("backward", "optimizer", "off")


def _cuda_index(params: list[Any]) -> int | None:
    """The CUDA device the model lives on (None on a CPU), for the system sampler's thread."""
    for p in params:
        dev = getattr(p, "device", None)
        if getattr(dev, "type", None) == "cuda":
            return dev.index if dev.index is not None else 0
        break
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.current_device()
    except Exception:  # noqa: BLE001
        pass
    return None


class Watch:
    """Reports one training loop, on every rank. Call `step()` once per optimizer step.

    Per step: loss, the global gradient norm before clipping, lr, loss_scale (with `scaler`),
    step_time_seconds, and from hooks on the model compute_time_seconds, data_time_seconds, samples
    and tokens. Every `norms_every` steps: param_norm and update_ratio; every `group_norms_every`
    steps: grad_norm/<top-level module>. Every `system_interval` seconds: memory, CPU, GPU.

    The gradient norm is taken when backward ends (after DDP's all-reduce, before any clipping,
    divided by the GradScaler's scale): `grad_norm_at="backward"`. Without a model it falls back to
    the optimizer's step pre-hook (`"optimizer"`, which sees clipped grads when you clip); `"off"`
    computes none. An explicit `step(grad_norm=...)` always wins.

    `probes`: `probes.Probe` / `probes.Drift` objects, run on the model at once (the baseline) and
    then on their schedule after `step()`; their time is left out of the step timings.
    `probe_tokenizer` is used by probes that were given none.
    """

    def __init__(self, model: Any = None, optimizer: Any = None, *, run: str | None = None,
                 reporter: Reporter | None = None, system_interval: float = 5.0,
                 meta: dict[str, Any] | None = None, scaler: Any = None, grad_norm_at: str = "backward",
                 norms_every: int = 50, group_norms_every: int = 0, framework: str = "torch",
                 batch_size: int | None = None, max_steps: int | None = None, share_run_id: bool = True,
                 hooks: bool = True, probes: Any = None, probe_tokenizer: Any = None, **reporter_kwargs: Any):
        if grad_norm_at not in _GRAD_NORM_AT:
            raise ValueError(f"grad_norm_at must be one of {_GRAD_NORM_AT}, got {grad_norm_at!r}")
        if reporter is not None:
            ident = resolve_identity(reporter.run, agree=False)
            ident = Identity(**{**ident.as_dict(), "rank": reporter.rank})
        else:
            ident = resolve_identity(run, agree=share_run_id)
            reporter = Reporter(run=ident.run, rank=ident.rank, **reporter_kwargs)
        self.identity: Identity = ident
        self.reporter = reporter
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.grad_norm_at = grad_norm_at
        # Set once step() is given a norm: from then on the loop supplies it and ours is not computed.
        self._norm_given = False
        self.norms_every = max(0, int(norms_every or 0))
        self.group_norms_every = max(0, int(group_norms_every or 0))
        self.step_count = 0
        self._closed = False
        self._last = time.perf_counter()
        self._bwd_norm: Any = None
        self._bwd_groups: dict[str, Any] = {}
        self._bwd_scale: Any = None
        self._pre_norm: Any = None
        self._pre_groups: dict[str, Any] = {}
        self._update_vals: dict[str, Any] = {}
        self._update = UpdateRatio()
        self._updating = False
        self._handles: list[Any] = []
        self._probe: ForwardProbe | None = None
        self._groups: dict[int, str] = {}
        if self.group_norms_every and model is not None:
            self._groups = top_level_groups(model)

        info = framework_meta(framework, identity=ident, model=model, optimizer=optimizer,
                              batch_size=batch_size, max_steps=max_steps)
        if self.norms_every:
            info["norms_every"] = self.norms_every
        info.update(meta or {})
        self.reporter.run_started(world_size=ident.world_size, meta=info)

        if hooks:
            self._install_hooks()
        self._sampler = SystemSampler(self.reporter, system_interval, device=_cuda_index(self._params()),
                                      step=lambda: self.step_count).start()
        self.probes: Any = None
        if probes:
            self.add_probes(probes, probe_tokenizer)
        _live.add(self)

    def add_probes(self, probes: Any, tokenizer: Any = None) -> None:
        """Schedule `probes` on this watch's model; their baselines run now, at the current step."""
        from probes.probe import ProbeSet

        self.probes = ProbeSet(probes, self.reporter, tokenizer=tokenizer)
        if self.model is not None:
            self._run_probes(start=True)

    def _run_probes(self, start: bool = False, model: Any = None) -> None:
        """Run what is due; the probe's forwards and wall time must not count in the next step."""
        try:
            ps = self.probes
            if not ps:
                return
            m = model if model is not None else self.model
            ran = ps.start(self.step_count, m) if start else ps.after_step(self.step_count, m)
            if ran:
                now = time.perf_counter()
                self._last = now
                if self._probe is not None:
                    self._probe.reset(now)
        except Exception:  # noqa: BLE001 - never raise into the training loop
            pass

    # -- hooks ---------------------------------------------------------------------------------

    def _install_hooks(self) -> None:
        opt, model = self.optimizer, self.model
        try:
            if model is not None and hasattr(model, "register_forward_pre_hook"):
                on_end = self._on_backward_end if self.grad_norm_at == "backward" else None
                self._probe = ForwardProbe(model, on_backward_end=on_end)
        except Exception:  # noqa: BLE001 - without hooks we still report what step() is given
            self._probe = None
        if opt is not None and hasattr(opt, "register_step_pre_hook"):
            try:
                self._handles.append(opt.register_step_pre_hook(self._before_optimizer_step))
                self._handles.append(opt.register_step_post_hook(self._after_optimizer_step))
            except Exception:  # noqa: BLE001
                pass

    def _params(self) -> list[Any]:
        """The parameters being trained: the optimizer's, else the model's."""
        try:
            groups = getattr(self.optimizer, "param_groups", None)
            if groups:
                return [p for g in groups for p in g["params"]]
            if self.model is not None and hasattr(self.model, "parameters"):
                return list(self.model.parameters())
        except Exception:  # noqa: BLE001
            pass
        return []

    def _due(self, every: int) -> bool:
        return bool(every) and (self.step_count + 1) % every == 0

    def _scale(self) -> Any:
        """The GradScaler's current scale as a tensor (None without an enabled scaler)."""
        sc = self.scaler
        if sc is None:
            return None
        try:
            if not sc.is_enabled():
                return None
            return getattr(sc, "_scale", None)
        except Exception:  # noqa: BLE001
            return None

    def _on_backward_end(self) -> None:
        # Runs at the end of every backward through the model (each micro-batch): the last one
        # before the optimizer step sees the accumulated, reduced, not yet clipped gradients.
        scale = self._scale()
        groups = self._groups if self._due(self.group_norms_every) else None
        self._bwd_scale = read_later(scale, clone=True) if scale is not None else None
        if self._norm_given and groups is None:
            return  # the loop hands step() its own norm (clip_grad_norm_'s): no need for ours
        self._bwd_norm, self._bwd_groups = grad_norms(self._params(), groups, scale)

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        try:
            if self._bwd_norm is None and self.grad_norm_at != "off" and not self._norm_given:
                groups = self._groups if self._due(self.group_norms_every) else None
                self._pre_norm, self._pre_groups = grad_norms(self._params(), groups)
            if self._due(self.norms_every):
                self._update.before(self._params())
                self._updating = True
        except Exception:  # noqa: BLE001 - never raise into optimizer.step()
            self._pre_norm = None

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        try:
            if self._updating:
                self._updating = False
                self._update_vals = self._update.after(self._params())
        except Exception:  # noqa: BLE001
            self._update_vals = {}

    # -- public API ------------------------------------------------------------------------------

    def step(self, loss: Any = None, *, grad_norm: Any = None, tokens: int | None = None,
             samples: int | None = None, global_step: int | None = None, **values: Any) -> None:
        """Report one finished optimizer step. Tensors are fine: they are read off the training thread.

        `grad_norm` overrides the collected norm (pass what clip_grad_norm_ returned);
        `tokens`/`samples` override what the forward's inputs showed; `global_step` sets the step number.
        """
        try:
            now = time.perf_counter()
            self.step_count = int(global_step) if global_step is not None else self.step_count + 1
            vals: dict[str, Any] = {"step_time_seconds": now - self._last}
            self._last = now
            if self._probe is not None:
                vals.update(self._probe.take())
            if loss is not None:
                vals["loss"] = read_later(loss)
            gn, groups = grad_norm, None
            if gn is not None:
                self._norm_given = True
                groups = self._bwd_groups or None
            elif self._bwd_norm is not None:
                gn, groups = self._bwd_norm, self._bwd_groups
            elif self._pre_norm is not None:
                gn, groups = self._pre_norm, self._pre_groups
            if gn is not None:
                vals["grad_norm"] = read_later(gn)
            for g, n in (groups or {}).items():
                vals["grad_norm/" + g] = read_later(n)
            for k, v in self._update_vals.items():
                vals[k] = read_later(v)
            opt_groups = getattr(self.optimizer, "param_groups", None) if self.optimizer is not None else None
            if opt_groups:
                lr = opt_groups[0].get("lr")
                if lr is not None:
                    vals["lr"] = read_later(lr, clone=True)
            if self._bwd_scale is not None:
                vals["loss_scale"] = self._bwd_scale
            elif self.scaler is not None:
                scale = self._scale()
                if scale is not None:
                    vals["loss_scale"] = read_later(scale, clone=True)
            if tokens is not None:
                vals["tokens"] = tokens
            if samples is not None:
                vals["samples"] = samples
            for k, v in values.items():
                vals[k] = read_later(v)
            self.reporter.log("train", self.step_count, vals)
        except Exception:  # noqa: BLE001 - never raise into the training loop
            pass
        finally:
            self._bwd_norm = self._pre_norm = self._bwd_scale = None
            self._bwd_groups, self._pre_groups, self._update_vals = {}, {}, {}
            if self._probe is not None:
                self._probe.reset(time.perf_counter())
        if self.probes:
            self._run_probes()

    def eval(self, loss: Any = None, *, global_step: int | None = None, **metrics: Any) -> None:
        """Report an evaluation at the current step (or at `global_step`)."""
        try:
            if global_step is not None:
                self.step_count = int(global_step)
            vals = {k: read_later(v) for k, v in metrics.items()}
            if loss is not None:
                vals["loss"] = read_later(loss)
            self.reporter.log("eval", self.step_count, vals)
        except Exception:  # noqa: BLE001
            pass

    def close(self, status: str = "completed", timeout: float = 10.0) -> bool:
        """Report the end of the run, remove the hooks and deliver what is queued."""
        if self._closed:
            return True
        self._closed = True
        _live.discard(self)
        self._sampler.close(1.0)
        if self._probe is not None:
            self._probe.remove()
        for h in self._handles:
            try:
                h.remove()
            except Exception:  # noqa: BLE001
                pass
        self._handles = []
        self.reporter.end(status, self.step_count)
        return self.reporter.close(timeout)

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close("failed" if exc_type is not None else "completed")


def watch(model: Any = None, optimizer: Any = None, **kwargs: Any) -> Watch:
    """Attach trainguard to a plain loop (see Watch)."""
    return Watch(model, optimizer, **kwargs)


_live: "weakref.WeakSet[Watch]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Registered after the reporter's own exit handler, so it runs first: `end` is still delivered.
    status = "failed" if getattr(sys, "last_value", None) is not None else "completed"
    for w in list(_live):
        try:
            w.close(status, timeout=5.0)
        except Exception:  # noqa: BLE001
            pass
