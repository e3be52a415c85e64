"""Raw DeepSpeed engines: `watch(engine)` and `mon.step(loss=loss)` after every `engine.step()`.

Example:
    from monitor.integrations import deepspeed as tg_deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    mon = tg_deepspeed.watch(engine, run="my-run")
    for batch in loader:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        mon.step(loss=loss)        # every micro-batch; one `train` record per optimizer step
    mon.eval(loss=val_loss)
    mon.close()

Each optimizer step reports the mean micro-batch loss, the engine's global gradient norm before
clipping (`engine.get_global_grad_norm()`, or trainguard's own when the engine keeps none: fp32
without ZeRO), the learning rate the step used, skipped steps, the fp16 loss scale and overflow,
step/compute/data times, tokens and samples. Nothing here reads a tensor on the training thread.
"""

from __future__ import annotations

from typing import Any

from monitor.client.collect import grad_norms
from monitor.integrations.loop import Watch

__all__ = ["DeepSpeedWatch", "GradNormTap", "configured_lr", "engine_meta", "engine_module", "engine_optimizer",
           "engine_step_values", "watch"]


def _call(engine: Any, name: str, default: Any = None) -> Any:
    """engine.name() or `default`; DeepSpeedEngine forwards unknown attributes to the module, so be strict."""
    try:
        fn = getattr(type(engine), name, None)
        return fn(engine) if callable(fn) else default
    except Exception:  # noqa: BLE001
        return default


class GradNormTap:
    """The pre-clip gradient norm for engines that keep none (fp32, no ZeRO): `engine._global_grad_norm` is None.

    ZeRO, fp16 and bf16 optimizers compute the global norm themselves (a 0-d tensor or a float) and the
    engine returns it from `get_global_grad_norm()`; this adds no work for them. With the plain torch
    optimizer the engine clips with `clip_fp32_gradients()` (when `gradient_clipping` > 0) and discards
    the norm, so the tap computes it just before clipping, or just before `optimizer.step()` otherwise.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.value: Any = None
        self._handle: Any = None
        self._wrapped = False
        self.active = False
        try:
            if (_call(engine, "zero_optimization", False) or _call(engine, "fp16_enabled", False)
                    or _call(engine, "bfloat16_enabled", False)):
                return
            opt = engine_optimizer(engine)
            self._params = [p for p in engine_module(engine).parameters() if p.requires_grad]
            if (_call(engine, "gradient_clipping", 0.0) or 0.0) > 0.0:
                original = engine.clip_fp32_gradients

                def clip_fp32_gradients(*args: Any, **kwargs: Any) -> Any:
                    self._take()
                    return original(*args, **kwargs)

                # nn.Module.__setattr__ stores a plain function in the instance dict, shadowing the method.
                engine.clip_fp32_gradients = clip_fp32_gradients
                self._wrapped = True
                self.active = True
            elif opt is not None and hasattr(opt, "register_step_pre_hook"):
                self._handle = opt.register_step_pre_hook(lambda *_: self._take())
                self.active = True
        except Exception:  # noqa: BLE001 - without a tap the record simply has no grad_norm
            self.active = False

    def _take(self) -> None:
        try:
            self.value = grad_norms(self._params)[0]
        except Exception:  # noqa: BLE001
            self.value = None

    def pop(self) -> Any:
        """The norm of the latest optimizer step (once), or None."""
        v, self.value = self.value, None
        return v

    def remove(self) -> None:
        """Undo the hook or the wrapper."""
        try:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            if self._wrapped:
                self.engine.__dict__.pop("clip_fp32_gradients", None)
                self._wrapped = False
        except Exception:  # noqa: BLE001
            pass


def _loss_scale(engine: Any) -> Any:
    opt = engine_optimizer(engine)
    cfg = getattr(opt, "loss_scale_config", None)
    if cfg is not None and getattr(cfg, "cur_scale", None) is not None:
        return cfg.cur_scale
    return getattr(opt, "cur_scale", None)


def engine_step_values(engine: Any, tap: GradNormTap | None = None) -> dict[str, Any]:
    """What the engine knows about the optimizer step it just finished: grad_norm, skipped_steps, fp16 scale.

    Call right after a step at a gradient-accumulation boundary. On an fp16 overflow the step was
    skipped on purpose by the dynamic loss scaler, so its (infinite) norm is left out and `overflow`
    is 1; in fp32 and bf16 an overflow is a real fault and its non-finite norm is reported.
    """
    vals: dict[str, Any] = {}
    fp16 = bool(_call(engine, "fp16_enabled", False))
    applied = _call(engine, "was_step_applied", True)
    gn = _call(engine, "get_global_grad_norm", None)
    if gn is None and tap is not None:
        gn = tap.pop()
    elif tap is not None:
        tap.pop()
    if gn is not None and not (fp16 and not applied):
        vals["grad_norm"] = gn.detach() if hasattr(gn, "detach") else gn
    skipped = getattr(engine, "skipped_steps", None)
    if isinstance(skipped, int):
        vals["skipped_steps"] = skipped
    if fp16:
        scale = _loss_scale(engine)
        if scale is not None:
            vals["loss_scale"] = scale.detach().clone() if hasattr(scale, "detach") else scale
        vals["overflow"] = 0 if applied else 1
    return vals


def engine_meta(engine: Any) -> dict[str, Any]:
    """The engine's configuration worth keeping in the `run` record."""
    out: dict[str, Any] = {}
    for key, name in (("zero_stage", "zero_optimization_stage"), ("fp16", "fp16_enabled"),
                      ("bf16", "bfloat16_enabled"), ("gradient_clipping", "gradient_clipping"),
                      ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                      ("train_micro_batch_size_per_gpu", "train_micro_batch_size_per_gpu"),
                      ("train_batch_size", "train_batch_size")):
        v = _call(engine, name, None)
        if isinstance(v, (bool, int, float)):
            out[key] = v
    return out


def _lr_of(optimizer: Any) -> Any:
    groups = getattr(optimizer, "param_groups", None)
    if groups:
        lr = groups[0].get("lr")
        if isinstance(lr, (int, float)):
            return lr
        if hasattr(lr, "detach"):
            return lr.detach().clone()
    return None


def configured_lr(meta: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """Put the scheduler's base lr (`initial_lr`) in the optimizer meta, not the warm-up's current fraction of it."""
    try:
        groups = getattr(optimizer, "param_groups", None) or []
        base = groups[0].get("initial_lr") if groups else None
        if isinstance(base, (int, float)) and not isinstance(base, bool):
            meta["lr"] = float(base)
    except Exception:  # noqa: BLE001
        pass
    return meta


def engine_module(engine: Any) -> Any:
    """The user's model inside a DeepSpeed engine (the engine itself when it has none)."""
    mod = getattr(engine, "__dict__", {}).get("_modules", {}).get("module")
    return mod if mod is not None else engine


def engine_optimizer(engine: Any) -> Any:
    """The engine's optimizer (ZeRO or fp16 wrapper, or the torch optimizer itself)."""
    d = getattr(engine, "__dict__", {})
    return d["optimizer"] if "optimizer" in d else getattr(engine, "optimizer", None)


class DeepSpeedWatch:
    """Reports one DeepSpeed engine. Call `step(loss=...)` after every `engine.step()`.

    Micro-batches between two optimizer steps are accumulated: the loss reported for a step is the
    mean of the losses given, and samples/tokens (from the model's forward inputs) are summed. A step
    is recognised by `engine.global_steps` moving on, so calling `step()` only once per optimizer
    step (or with `engine.train_batch()`) works as well.
    """

    def __init__(self, engine: Any, *, run: str | None = None, meta: dict[str, Any] | None = None,
                 system_interval: float = 5.0, **watch_kwargs: Any):
        self.engine = engine
        module = engine_module(engine)
        info: dict[str, Any] = {"deepspeed": engine_meta(engine)}
        try:
            from monitor.client.identity import optimizer_meta

            opt = engine.__dict__.get("client_optimizer") or engine_optimizer(engine)
            o = optimizer_meta(opt)
            if o is not None:
                info["optimizer"] = configured_lr(o, opt)
        except Exception:  # noqa: BLE001
            pass
        info.update(meta or {})
        watch_kwargs.setdefault("framework", "deepspeed")
        watch_kwargs.setdefault("batch_size", _call(engine, "train_batch_size", None))
        # The engine's own norm (or the tap's) is the pre-clip global one; the Watch computes none.
        watch_kwargs["grad_norm_at"] = "off"
        self._watch = Watch(module, None, run=run, meta=info, system_interval=system_interval, **watch_kwargs)
        self.reporter = self._watch.reporter
        self.tap = GradNormTap(engine)
        self.step_count = int(getattr(engine, "global_steps", 0) or 0)
        self._watch.step_count = self.step_count
        self._loss: Any = None
        self._n = 0
        self._tokens: int | None = None
        self._samples: int | None = None
        # The lr the next step will use: read after the previous step, once the scheduler moved on.
        self._lr = _lr_of(engine_optimizer(engine))
        self._closed = False

    def step(self, loss: Any = None, *, tokens: int | None = None, samples: int | None = None,
             **values: Any) -> None:
        """Count one micro-batch (call after `engine.step()`); at an optimizer step, report it."""
        try:
            if loss is not None:
                d = loss.detach() if hasattr(loss, "detach") else loss
                self._loss = d if self._loss is None else self._loss + d
                self._n += 1
            if tokens is not None:
                self._tokens = (self._tokens or 0) + tokens
            if samples is not None:
                self._samples = (self._samples or 0) + samples
            gs = int(getattr(self.engine, "global_steps", 0) or 0)
            if gs == self.step_count:
                return  # inside gradient accumulation
            self._report(gs, values)
        except Exception:  # noqa: BLE001 - never raise into the training loop
            pass

    def _report(self, gs: int, values: dict[str, Any]) -> None:
        vals = engine_step_values(self.engine, self.tap)
        gn = vals.pop("grad_norm", None)
        if self._lr is not None:
            vals["lr"] = self._lr
        vals.update(values)
        loss = self._loss / self._n if self._loss is not None and self._n > 1 else self._loss
        self.step_count = gs
        self._watch.step(loss=loss, grad_norm=gn, tokens=self._tokens, samples=self._samples, global_step=gs,
                         **vals)
        self._loss, self._n, self._tokens, self._samples = None, 0, None, None
        self._lr = _lr_of(engine_optimizer(self.engine))

    def eval(self, loss: Any = None, **metrics: Any) -> None:
        """Report an evaluation at the current optimizer step."""
        self._watch.eval(loss, global_step=self.step_count, **metrics)

    def close(self, status: str = "completed", timeout: float = 10.0) -> bool:
        """Remove the hooks, report the end of the run and deliver what is queued."""
        if self._closed:
            return True
        self._closed = True
        self.tap.remove()
        self._watch.step_count = self.step_count
        return self._watch.close(status, timeout)

    def __enter__(self) -> "DeepSpeedWatch":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close("failed" if exc_type is not None else "completed")


def watch(engine: Any, run: str | None = None, **kwargs: Any) -> DeepSpeedWatch:
    """Attach trainguard to a DeepSpeed engine; call `.step(loss=loss)` after every `engine.step()`."""
    return DeepSpeedWatch(engine, run=run, **kwargs)
