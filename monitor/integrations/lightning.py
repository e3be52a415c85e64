"""PyTorch Lightning: `Trainer(callbacks=[TrainGuardCallback()])` reports every rank of a fit.

Example:
    from monitor.integrations.lightning import TrainGuardCallback

    trainer = L.Trainer(max_steps=1000, strategy="ddp", devices=8,
                        callbacks=[TrainGuardCallback(run="my-run")])   # or TRAINGUARD_RUN / TRAINGUARD_ADDRESS
    trainer.fit(model, train_loader, val_loader)

Every rank (`trainer.global_rank`) sends one `train` record per optimizer step, at `trainer.global_step`
(so with `accumulate_grad_batches=k` one record per k batches): `loss` (the mean of the batches'
losses as `training_step` returned them), `grad_norm` (global, taken in `on_before_optimizer_step`:
after DDP's all-reduce and AMP's unscaling, before Lightning clips), `lr`, `step_time_seconds`,
`compute_time_seconds` (training_step up to the backward, before its collectives; CUDA events on a
GPU), `data_time_seconds`, `samples`, `tokens` (for batches of token ids) and, under 16-bit mixed
precision, `loss_scale`. Validation inside the fit counts towards no step's times. Each validation (not the sanity check)
sends an `eval` record of the metrics logged during it (`val_loss` -> `loss`); memory is sampled every
few seconds; `end` comes with teardown (`failed` when the fit raised). Nothing here reads a tensor on
the training thread: values are read on the Reporter's sender thread.

Works with `lightning.pytorch` and with `pytorch_lightning` (the class derives from both when both
are installed).
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any, Mapping

from monitor.client.collect import ElapsedTime, grad_norms, read_later, total_norm
from monitor.client.reporter import Reporter
from monitor.integrations.loop import Watch

__all__ = ["TrainGuardCallback", "eval_name"]

log = logging.getLogger("trainguard.client")

_EVAL_PREFIXES = ("val_", "val/", "valid_", "valid/", "validation_", "validation/", "eval_", "eval/")
_ALIASES = {"acc": "accuracy", "ppl": "perplexity"}
_MAX_NAME = 128


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(name).Callback)
        except Exception:  # noqa: BLE001 - either package is enough
            pass
    if not bases:
        raise ImportError("monitor.integrations.lightning needs `lightning` or `pytorch_lightning`")
    return tuple(bases)


def eval_name(key: str) -> str | None:
    """The eval value name for a metric logged during validation (`val_loss` -> `loss`), None to skip it."""
    if key.endswith("_step"):  # the per-batch twin of an `_epoch` metric
        return None
    name = key[: -len("_epoch")] if key.endswith("_epoch") else key
    low = name.lower()
    for p in _EVAL_PREFIXES:
        if low.startswith(p):
            name = name[len(p):]
            break
    name = _ALIASES.get(name.lower(), name)
    return name if name and len(name) <= _MAX_NAME else None


def _scalar(v: Any) -> Any:
    """A logged metric as the Reporter takes it (a number or a detached one-element tensor), or None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    try:
        if hasattr(v, "detach") and v.numel() == 1:
            return v.detach()
    except Exception:  # noqa: BLE001
        pass
    return None


def _batch_counts(batch: Any) -> tuple[int, int]:
    """(samples, tokens) from a batch's shapes: metadata only, nothing is read from the device."""
    x = batch
    if isinstance(batch, Mapping):
        x = batch.get("input_ids")
        if x is None:
            x = next((v for v in batch.values() if hasattr(v, "shape")), None)
    elif isinstance(batch, (list, tuple)) and batch:
        x = batch[0]
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) == 0:
        return 0, 0
    samples = int(shape[0])
    tokens = 0
    # A 2-D integer tensor is a batch of token ids (as monitor.client.collect.ForwardProbe counts them).
    if len(shape) == 2 and hasattr(x, "is_floating_point") and not x.is_floating_point():
        tokens = samples * int(shape[1])
    return samples, tokens


class _Hooks:
    """The callback's behaviour; TrainGuardCallback mixes it into the installed Callback base classes."""

    def __init__(self, run: str | None = None, *, meta: dict[str, Any] | None = None,
                 system_interval: float = 5.0, probes: Any = None, probe_tokenizer: Any = None,
                 **reporter_kwargs: Any):
        self.run = run
        self._probe_list: list[Any] = []
        if probes:
            from probes.probe import check_probes

            self._probe_list = check_probes(probes)
        self._probe_tokenizer = probe_tokenizer
        self.probes: Any = None
        self.meta = dict(meta or {})
        self.system_interval = system_interval
        self.reporter_kwargs = reporter_kwargs
        self.watch: Watch | None = None
        self.reporter: Reporter | None = None
        self._explicit = run is not None
        self._cuda = False
        try:
            from monitor.client.identity import resolve_identity

            # Settle the run id here, in the launching process: a generated one goes into
            # TRAINGUARD_RUN, so the ranks that Lightning's DDP launcher starts later inherit it.
            self.run = resolve_identity(run, agree=False).run
        except Exception:  # noqa: BLE001
            pass
        self._reset()
        self._t_prev: float | None = None  # end of the previous batch (or of the previous step)
        self._t_step: float | None = None  # end of the previous optimizer step
        self._t_val: float | None = None
        self._last_step = 0
        self._val_before: dict[str, Any] = {}

    def _reset(self) -> None:
        self._losses: list[Any] = []
        self._norms: list[Any] = []
        self._lr: Any = None
        self._scale: Any = None
        self._spans: list[list[Any]] = []  # [start, end, start event, end event] of each batch's compute
        self._data = 0.0
        self._samples = 0
        self._tokens = 0

    # -- start and end ------------------------------------------------------------------------------

    def _ensure(self, trainer: Any, pl_module: Any) -> None:
        """Start reporting on this rank (every rank calls this from the same hook)."""
        if self.watch is not None:
            return
        run = self.run
        try:
            if not self._explicit and int(trainer.world_size) > 1:
                # Rank 0's id on every rank: ranks that torchrun or Slurm started each generated their own.
                run = trainer.strategy.broadcast(run, src=0) or run
        except Exception:  # noqa: BLE001
            pass
        rank = int(getattr(trainer, "global_rank", 0) or 0)
        info: dict[str, Any] = {}
        try:
            from monitor.client.identity import framework_meta, resolve_identity

            opts = getattr(trainer, "optimizers", None) or []
            max_steps = getattr(trainer, "max_steps", -1)
            info = framework_meta("lightning", identity=resolve_identity(run, agree=False), model=pl_module,
                                  optimizer=opts[0] if opts else None,
                                  max_steps=max_steps if isinstance(max_steps, int) and max_steps > 0 else None)
        except Exception:  # noqa: BLE001
            pass
        info["framework"] = "lightning"
        info["lightning"] = self._trainer_meta(trainer)
        info.update(self.meta)
        self.reporter = Reporter(run=run, rank=rank, **self.reporter_kwargs)
        self.watch = Watch(None, None, reporter=self.reporter, meta=info, system_interval=self.system_interval,
                           framework="lightning")
        if self._probe_list:
            from probes.probe import ProbeSet

            self.probes = ProbeSet(self._probe_list, self.reporter, tokenizer=self._probe_tokenizer)
        self.run = self.reporter.run
        try:
            self._cuda = pl_module.device.type == "cuda"
        except Exception:  # noqa: BLE001
            self._cuda = False

    @staticmethod
    def _trainer_meta(trainer: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("world_size", "num_nodes", "num_devices", "accumulate_grad_batches", "precision",
                    "gradient_clip_val", "max_epochs"):
            try:
                v = getattr(trainer, key)
                if v is not None:
                    out[key] = v if isinstance(v, (bool, int, float)) else str(v)
            except Exception:  # noqa: BLE001
                pass
        try:
            out["strategy"] = type(trainer.strategy).__name__
        except Exception:  # noqa: BLE001
            pass
        return out

    def _close(self, status: str) -> None:
        w = self.watch
        if w is None:
            return
        self.watch = None
        try:
            w.step_count = self._last_step
            w.close(status)
        except Exception:  # noqa: BLE001
            pass

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Start reporting (after the strategy set up the processes and the optimizers)."""
        try:
            self._ensure(trainer, pl_module)
        except Exception as e:  # noqa: BLE001 - the fit goes on unreported rather than not at all
            log.warning("trainguard: not reporting this fit: %s", e)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Start the step clock at the (possibly restored) global step."""
        try:
            self._ensure(trainer, pl_module)
            self._last_step = int(trainer.global_step)
            self._reset()
            if self.probes:
                self.probes.start(self._last_step, pl_module)  # the baseline, before the first step
            self._t_prev = self._t_step = time.perf_counter()
        except Exception:  # noqa: BLE001
            pass

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """End the run as failed (stopped on a keyboard interrupt)."""
        self._close("stopped" if isinstance(exception, KeyboardInterrupt) else "failed")

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """End the run and deliver what is queued."""
        self._close("completed")

    # -- training steps -----------------------------------------------------------------------------

    def _mark(self) -> list[Any]:
        """A time stamp: perf_counter, and on a GPU a CUDA event (its time is read later, off this thread)."""
        now = [time.perf_counter(), None]
        if self._cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            now[1] = ev
        return now

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Note the wait for this batch and where its compute starts."""
        try:
            start = self._mark()
            if self._t_prev is not None:
                self._data += start[0] - self._t_prev
            self._spans.append([start[0], None, start[1], None])
            s, t = _batch_counts(batch)
            self._samples += s
            self._tokens += t
        except Exception:  # noqa: BLE001
            pass

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        """The forward and the loss are done: the rest of the step waits on the backward's collectives."""
        try:
            if self._spans and self._spans[-1][1] is None and trainer.training:
                end = self._mark()
                self._spans[-1][1], self._spans[-1][3] = end
        except Exception:  # noqa: BLE001
            pass

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Take the global gradient norm before Lightning clips, and the learning rate the step uses."""
        try:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            # Batched torch._foreach_norm kernels; the 0-d result is read on the sender thread.
            norm, _ = grad_norms(params)
            if norm is not None:
                self._norms.append(norm)
            lr = optimizer.param_groups[0].get("lr")
            if lr is not None:
                self._lr = read_later(lr, clone=True)
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
            if scale is not None:
                self._scale = read_later(scale, clone=True)  # the scaler updates it in place after the step
        except Exception:  # noqa: BLE001
            pass

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Add the batch's loss; after an optimizer step, report the step."""
        try:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if loss is not None and hasattr(loss, "detach"):
                self._losses.append(loss.detach())
            now = time.perf_counter()
            self._t_prev = now
            step = int(trainer.global_step)
            if step != self._last_step:
                self._report(trainer, pl_module, step, now)
                if self.probes and self.probes.after_step(step, pl_module):
                    # The probe's time belongs to no step: restart the clocks after it.
                    self._t_prev = self._t_step = time.perf_counter()
        except Exception:  # noqa: BLE001 - never raise into the training loop
            pass

    def _report(self, trainer: Any, pl_module: Any, step: int, now: float) -> None:
        vals: dict[str, Any] = {}
        losses = self._losses
        if losses:
            # Automatic optimisation hands on_train_batch_end the loss divided by accumulate_grad_batches.
            k = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
            scale = k if getattr(pl_module, "automatic_optimization", True) else 1
            if len(losses) == 1 and scale == 1:
                vals["loss"] = read_later(losses[0])
            else:
                import torch

                mean = torch.stack([x.reshape(()) for x in losses]).sum() * (scale / len(losses))
                vals["loss"] = read_later(mean)
        if self._norms:
            # Several optimizers stepping at one global step: the norm over all their gradients.
            vals["grad_norm"] = read_later(self._norms[0] if len(self._norms) == 1 else total_norm(self._norms))
        if self._lr is not None:
            vals["lr"] = self._lr
        if self._scale is not None:
            vals["loss_scale"] = self._scale
        if self._t_step is not None:
            vals["step_time_seconds"] = now - self._t_step
        spans = [sp for sp in self._spans if sp[1] is not None]
        if spans:
            if all(sp[2] is not None and sp[3] is not None for sp in spans):
                vals["compute_time_seconds"] = ElapsedTime([(sp[2], sp[3]) for sp in spans])
            else:
                vals["compute_time_seconds"] = sum(sp[1] - sp[0] for sp in spans)
        vals["data_time_seconds"] = self._data
        if self._samples:
            vals["samples"] = self._samples
        if self._tokens:
            vals["tokens"] = self._tokens
        self._last_step = step
        if self.watch is not None:
            self.watch.step_count = step
        if self.reporter is not None:
            self.reporter.log("train", step, vals)
        self._reset()
        self._t_step = now

    # -- validation ---------------------------------------------------------------------------------

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """Pause the step clock and remember the metrics as they were before this validation."""
        try:
            self._ensure(trainer, pl_module)
            self._t_val = time.perf_counter()
            self._val_before = dict(trainer.callback_metrics)
        except Exception:  # noqa: BLE001
            pass

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Report the metrics this validation logged as an `eval` record at the current global step."""
        try:
            if self._t_val is not None:
                # Validation inside fit is not part of any training step: move the clocks past it.
                paused = time.perf_counter() - self._t_val
                self._t_val = None
                if self._t_prev is not None:
                    self._t_prev += paused
                if self._t_step is not None:
                    self._t_step += paused
            if trainer.sanity_checking or self.reporter is None:
                return
            before = self._val_before
            self._val_before = {}
            vals: dict[str, Any] = {}
            for key, v in trainer.callback_metrics.items():
                if before.get(key) is v:
                    continue  # not logged by this validation
                name = eval_name(key)
                x = _scalar(v)
                if name is not None and x is not None:
                    vals[name] = read_later(x)
            if vals:
                self.reporter.log("eval", int(trainer.global_step), vals)
        except Exception:  # noqa: BLE001
            pass


class TrainGuardCallback(_Hooks, *_callback_bases()):  # type: ignore[misc]
    """A Lightning callback that reports every rank's steps, evaluations and memory to trainguard.

    `run` names the run (else TRAINGUARD_RUN, TORCHELASTIC_RUN_ID, or one generated and shared by all
    ranks); `meta` adds to the `run` record; other keyword arguments go to the Reporter (address,
    record_path, ...).
    """
