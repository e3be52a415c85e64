"""Hugging Face Trainer: `attach(trainer)` reports every optimizer step, not only the logging steps.

Example:
    from monitor.integrations.hf import attach

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    attach(trainer, run="my-run")          # or TRAINGUARD_RUN / TRAINGUARD_ADDRESS
    trainer.train()

or, equivalently, `Trainer(..., callbacks=[TrainGuardCallback(run="my-run")])`.

The Trainer only hands callbacks the loss and gradient norm every `logging_steps`, averaged, and with
`logging_nan_inf_filter=True` (the default) a NaN loss is replaced before anyone sees it. So the
callback also taps the Trainer itself (wrappers on the instance, nothing global):

- `training_step` returns each micro-batch's detached loss, already divided by the number of
  accumulation steps; their sum is the optimizer step's mean loss, NaN included;
- `_get_grad_norm` returns the pre-clip global norm that the Trainer computes every optimizer step
  (from `accelerator.clip_grad_norm_`, or from the DeepSpeed engine); when the Trainer lacks it,
  `accelerator.clip_grad_norm_` is tapped instead;
- `get_batch_samples` (the wait for a step's batches) marks where a step begins and gives the data time.

The Watch underneath (monitor.integrations.loop) adds forward hooks on the model for the compute
time (forward + loss), samples and tokens, and samples memory every few seconds. With DeepSpeed the
engine adds skipped steps and, in fp16, the loss scale and overflow (see monitor.integrations.deepspeed).
The lr is the one each step used (read before the scheduler moves on). Evaluations become `eval`
records (`eval_loss` -> `loss`). `end` is sent when train() ends (`failed` if it raised, with attach()).

Tensors go to the reporter as they are and are read on its sender thread: the training thread does
no host-device synchronisation for trainguard. Every rank reports under its own rank.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from transformers import TrainerCallback

from monitor.client.identity import plain
from monitor.integrations.loop import Watch

__all__ = ["TrainGuardCallback", "attach"]

_MARK = "__trainguard_wrapped__"


def _find_trainer() -> Any:
    """The Trainer whose method is calling us, from the call stack (callbacks are not given the Trainer)."""
    try:
        from transformers import Trainer

        f = sys._getframe(1)
        for _ in range(12):
            if f is None:
                break
            obj = f.f_locals.get("self")
            if isinstance(obj, Trainer):
                return obj
            f = f.f_back
    except Exception:  # noqa: BLE001
        pass
    return None


def training_args_meta(args: Any, state: Any = None, trainer: Any = None) -> dict[str, Any]:
    """The main TrainingArguments (and the DeepSpeed ZeRO stage) for the `run` record."""
    out: dict[str, Any] = {}
    for key in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                "num_train_epochs", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "fp16", "bf16",
                "lr_scheduler_type", "optim", "seed", "logging_steps", "logging_nan_inf_filter", "world_size"):
        if hasattr(args, key):
            try:
                out[key] = plain(getattr(args, key))
            except Exception:  # noqa: BLE001
                pass
    if state is not None and getattr(state, "max_steps", 0):
        out["max_steps"] = int(state.max_steps)
    try:
        plugin = getattr(getattr(trainer, "accelerator", None), "state", None)
        plugin = getattr(plugin, "deepspeed_plugin", None)
        if plugin is not None:
            out["deepspeed_stage"] = int(plugin.zero_stage)
    except Exception:  # noqa: BLE001
        pass
    return out


def _eval_values(metrics: dict[str, Any]) -> dict[str, Any]:
    """eval_loss -> loss, eval_runtime -> runtime_seconds; numbers only."""
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if k == "epoch" or isinstance(v, bool):
            continue
        if not isinstance(v, (int, float)) and not hasattr(v, "item"):
            continue
        name = k[5:] if k.startswith("eval_") else k
        if name == "runtime":
            name = "runtime_seconds"
        out[name] = v
    return out


class TrainGuardCallback(TrainerCallback):
    """Reports a Trainer's every optimizer step (loss, pre-clip grad norm, lr, timings), its evals and its end."""

    def __init__(self, trainer: Any = None, *, run: str | None = None, meta: dict[str, Any] | None = None,
                 system_interval: float = 5.0, close_timeout: float = 5.0, **watch_kwargs: Any):
        self.trainer = trainer
        self.run = run
        self.meta = dict(meta or {})
        self.system_interval = system_interval
        self.close_timeout = close_timeout
        if watch_kwargs.get("probes"):
            from probes.probe import check_probes

            watch_kwargs["probes"] = check_probes(watch_kwargs["probes"])  # a wrong entry fails here, not mid-run
        self.watch_kwargs = watch_kwargs
        self.watch: Watch | None = None
        self.engine: Any = None
        self._tap: Any = None
        self._wrapped = False
        self._closed = False
        self._reset_step()

    def _reset_step(self) -> None:
        self._loss: Any = None
        self._grad_norm: Any = None
        self._lr: Any = None
        self._data: float | None = None
        self._step_start: float | None = None

    @property
    def reporter(self) -> Any:
        """The Reporter this callback logs to (None before training starts)."""
        return self.watch.reporter if self.watch is not None else None

    # -- taps on the Trainer instance -----------------------------------------------------------

    def _wrap(self, obj: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
        original = getattr(obj, name, None)
        if original is None or not callable(original):
            return False
        if getattr(original, _MARK, None) is self:
            return True
        wrapper = make(original)
        setattr(wrapper, _MARK, self)
        setattr(obj, name, wrapper)
        return True

    def install(self, trainer: Any) -> None:
        """Tap `trainer` (idempotent). attach() calls it; a callback given to the Trainer does it at train begin."""
        self.trainer = trainer
        if self._wrapped:
            return
        try:
            ok = self._wrap(trainer, "training_step", self._make_training_step)
            self._wrap(trainer, "get_batch_samples", self._make_get_batch_samples)
            if not self._wrap(trainer, "_get_grad_norm", self._make_grad_norm):
                acc = getattr(trainer, "accelerator", None)
                if acc is not None:
                    self._wrap(acc, "clip_grad_norm_", self._make_grad_norm)
            self._wrapped = ok
        except Exception:  # noqa: BLE001 - without taps the logging steps are still reported (on_log)
            pass

    def _make_training_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            try:
                # A detached 0-d tensor: adding keeps it on the device, no synchronisation.
                self._loss = out if self._loss is None else self._loss + out
            except Exception:  # noqa: BLE001
                pass
            return out

        return training_step

    def _make_get_batch_samples(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def get_batch_samples(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                # The Trainer fetches a whole step's micro-batches here, just before the step begins.
                self._step_start = t0
                self._data = time.perf_counter() - t0

        return get_batch_samples

    def _make_grad_norm(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def get_grad_norm(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self._grad_norm = out
            return out

        return get_grad_norm

    # -- the Watch underneath --------------------------------------------------------------------

    def _start(self, args: Any, state: Any, model: Any) -> None:
        trainer = self.trainer
        inner = getattr(trainer, "model", None) if trainer is not None else None
        inner = inner if inner is not None else model
        if self.engine is not None and inner is self.engine:
            from monitor.integrations.deepspeed import engine_module

            inner = engine_module(self.engine)
        meta: dict[str, Any] = {"training_args": training_args_meta(args, state, trainer)}
        try:
            from monitor.client.identity import optimizer_meta
            from monitor.integrations.deepspeed import configured_lr

            opt = getattr(trainer, "optimizer", None)
            o = optimizer_meta(opt)
            if o is not None:
                meta["optimizer"] = configured_lr(o, opt)
            # The schedule's peak and warm-up, where the daemon's lr checks look for them.
            schedule: dict[str, Any] = {"max_lr": float(args.learning_rate)}
            if getattr(state, "max_steps", 0) and hasattr(args, "get_warmup_steps"):
                schedule["warmup_steps"] = int(args.get_warmup_steps(state.max_steps))
            meta["schedule"] = schedule
            if self.engine is not None:
                from monitor.integrations.deepspeed import engine_meta

                meta["deepspeed"] = engine_meta(self.engine)
        except Exception:  # noqa: BLE001
            pass
        meta.update(self.meta)
        kw = dict(self.watch_kwargs)
        kw.setdefault("batch_size", getattr(args, "per_device_train_batch_size", None))
        kw.setdefault("max_steps", getattr(state, "max_steps", None) or None)
        kw["framework"] = "transformers"
        probes, probe_tokenizer = kw.pop("probes", None), kw.pop("probe_tokenizer", None)
        if probes and probe_tokenizer is None and trainer is not None:
            # Probes given no tokenizer use the Trainer's own.
            probe_tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
        # The Trainer computes the pre-clip norm every step (or the DeepSpeed engine does); the
        # Watch computes none of its own, and gets no optimizer so that it reads no lr after the
        # scheduler moved on. Its forward hooks give compute time, samples and tokens.
        kw["grad_norm_at"] = "off"
        self.watch = Watch(inner, None, run=self.run, meta=meta, system_interval=self.system_interval, **kw)
        self.watch.step_count = int(state.global_step)
        if probes:
            self.watch.add_probes(probes, probe_tokenizer)  # the baseline at the step training resumes from
        self._closed = False

    def close(self, status: str = "completed", timeout: float | None = None) -> bool:
        """Report the end of this rank's run and deliver what is queued (waits up to `timeout` seconds)."""
        if self.watch is None or self._closed:
            return True
        self._closed = True
        try:
            return self.watch.close(status, self.close_timeout if timeout is None else timeout)
        except Exception:  # noqa: BLE001
            return False

    def detach(self, status: str = "completed", timeout: float | None = None) -> bool:
        """Close, then take this callback and its taps off the Trainer (it trains on as if never attached)."""
        ok = self.close(status, timeout)
        trainer = self.trainer
        if trainer is not None:
            try:
                trainer.remove_callback(self)
            except Exception:  # noqa: BLE001
                pass
            for obj in (trainer, getattr(trainer, "accelerator", None)):
                for name in ("training_step", "get_batch_samples", "_get_grad_norm", "clip_grad_norm_", "train"):
                    d = getattr(obj, "__dict__", {})
                    if getattr(d.get(name), _MARK, None) is self:
                        del d[name]
        self._wrapped = False
        if self._tap is not None:
            self._tap.remove()
        self._tap = self.engine = None
        return ok

    # -- Trainer events -------------------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            self.trainer = _find_trainer()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        try:
            if self.trainer is None:
                self.trainer = _find_trainer()
            if self.trainer is not None:
                self.install(self.trainer)
                engine = getattr(self.trainer, "deepspeed", None)
                if engine is not None and hasattr(type(engine), "get_global_grad_norm") and engine is not self.engine:
                    from monitor.integrations.deepspeed import GradNormTap

                    if self._tap is not None:
                        self._tap.remove()
                    self.engine, self._tap = engine, GradNormTap(engine)
            self._reset_step()
            if self.watch is None or self._closed:
                self._start(args, state, model)
        except Exception:  # noqa: BLE001 - never raise into training
            pass

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        try:
            if self.watch is None:  # attached while train() was already running
                self.on_train_begin(args, state, control, **kwargs)
            if self._step_start is None:
                self._step_start = time.perf_counter()
            # The rate this step uses: the scheduler moves on after the optimizer step.
            opt = optimizer if optimizer is not None else getattr(self.trainer, "optimizer", None)
            groups = getattr(opt, "param_groups", None)
            if groups:
                lr = groups[0].get("lr")
                self._lr = lr.detach().clone() if hasattr(lr, "detach") else lr
        except Exception:  # noqa: BLE001
            pass

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        try:
            if self.watch is None or self._closed or not self._wrapped:
                return
            vals: dict[str, Any] = {}
            if self._step_start is not None:
                # From fetching the batches to here: evaluation and checkpoints in between steps are not steps.
                vals["step_time_seconds"] = time.perf_counter() - self._step_start
            if self._data is not None:
                vals["data_time_seconds"] = self._data
            gn = self._grad_norm
            if self.engine is not None:
                from monitor.integrations.deepspeed import engine_step_values

                ds = engine_step_values(self.engine, self._tap)
                gn = ds.pop("grad_norm", None if ds.get("overflow") == 1 else gn)
                vals.update(ds)
            else:
                gn = self._amp_values(vals, gn)
            if isinstance(self._lr, (int, float)) or hasattr(self._lr, "detach"):
                vals["lr"] = self._lr
            self.watch.step(loss=self._loss, grad_norm=gn, global_step=int(state.global_step), **vals)
        except Exception:  # noqa: BLE001
            pass
        finally:
            self._reset_step()

    def _amp_values(self, vals: dict[str, Any], gn: Any) -> Any:
        """fp16 with a torch GradScaler: the scale, and whether it skipped this step (then no norm: it is inf)."""
        acc = getattr(self.trainer, "accelerator", None)
        scaler = getattr(acc, "scaler", None)
        if scaler is None:
            return gn
        scale = getattr(scaler, "_scale", None)  # get_scale() would synchronise
        if scale is not None:
            vals["loss_scale"] = scale.detach().clone() if hasattr(scale, "detach") else scale
        skipped = bool(acc.optimizer_step_was_skipped)
        vals["overflow"] = 1 if skipped else 0
        return None if skipped else gn

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        try:
            vals = _eval_values(metrics)
            if not vals or self.watch is None:
                return
            step = int(state.global_step)
            if not self._closed:
                loss = vals.pop("loss", None)
                self.watch.eval(loss, global_step=step, **vals)
                return
            # An evaluation after train() ended (trainer.train(); trainer.evaluate()): the run's
            # reporter is closed, so send this one record on its own and wait for it briefly.
            from monitor.client.reporter import Reporter

            old = self.watch.reporter
            kw = {k: v for k, v in self.watch_kwargs.items() if k in _REPORTER_KWARGS}
            kw["heartbeat_interval"] = 0
            rep = Reporter(run=old.run, rank=old.rank, **kw)
            rep.log("eval", step, vals)
            rep.close(self.close_timeout)
        except Exception:  # noqa: BLE001
            pass

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        # Without taps (a Trainer we could not find), the logging steps are all there is.
        try:
            if self.watch is None or self._closed or self._wrapped or not logs or "loss" not in logs:
                return
            vals = {k: logs[k] for k in ("grad_norm",) if isinstance(logs.get(k), (int, float))}
            if isinstance(logs.get("learning_rate"), (int, float)):
                vals["lr"] = logs["learning_rate"]
            self.watch.step(loss=logs["loss"], global_step=int(state.global_step), **vals)
        except Exception:  # noqa: BLE001
            pass

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # `end` now, not at exit: a process that goes on (saving, pushing) has not stalled.
        self.close("completed")


_REPORTER_KWARGS = frozenset({"address", "record_path", "max_queue", "flush_interval",
                              "timeout", "max_backoff"})


def attach(trainer: Any, **kwargs: Any) -> TrainGuardCallback:
    """Add trainguard to a Trainer (on every rank); keyword arguments go to TrainGuardCallback and Watch."""
    cb = TrainGuardCallback(trainer, **kwargs)
    cb.install(trainer)
    trainer.add_callback(cb)
    original = trainer.train
    if getattr(original, _MARK, None) is None:
        def train(*args: Any, **kw: Any) -> Any:
            try:
                return original(*args, **kw)
            except BaseException as e:
                cb.close("stopped" if isinstance(e, KeyboardInterrupt) else "failed")
                raise

        setattr(train, _MARK, cb)
        trainer.train = train
    return cb
