"""Hugging Face Accelerate: a tracker for `accelerator.log()` and a per-rank watch for every process.

Example:
    from monitor.integrations.accelerate import TrainGuardTracker

    tracker = TrainGuardTracker(run="my-run")          # or TRAINGUARD_RUN / TRAINGUARD_ADDRESS
    accelerator = Accelerator(log_with=[tracker], gradient_accumulation_steps=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    tracker.watch(accelerator, model, optimizer)       # on every process
    accelerator.init_trackers("my-project", config={"lr": 3e-4})
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            accelerator.log({"train_loss": loss.detach()})   # main process only, like every tracker
    accelerator.log({"eval_loss": val_loss})
    accelerator.end_training()

Two paths report, and each value comes from exactly one of them:

- The tracker (`accelerator.log`, main process only, because Accelerate calls trackers there only):
  the loss and whatever else the script logs. `train_loss`/`loss`/`train/...` become `train` values,
  `eval_*`/`val_*`/`validation_*`/`eval/...` (and a bare `perplexity`) become `eval` records. Without
  `step=` a record takes the number of optimizer steps done so far.
- The watch (`tracker.watch(...)` or `watch(...)`, every process, each under its own rank; built on
  monitor.integrations.loop.Watch): one `train` record per optimizer step with `grad_norm` (global,
  when backward ends: after the all-reduce, before `accelerator.clip_grad_norm_` clips), `lr`,
  `step_time_seconds`, `compute_time_seconds` (forward and loss, before any collective),
  `data_time_seconds`, `samples`, `tokens`; every few seconds the process's memory; and `end` when the
  run ends (`accelerator.end_training()` on the main process, interpreter exit on the others; `failed`
  when an exception ended the script). It reports no loss unless the script hands one to it
  (`auto_step=False` and `mon.step(loss=...)`); then the tracker leaves the logged train loss out, so
  the loss is never reported twice. While a watch is attached, the tracker also leaves out a logged
  `lr`, `grad_norm` and step timings: the watch measures those itself.

Call `watch` on every process: when no run id is given it agrees on rank 0's with one broadcast.
"""

from __future__ import annotations

import atexit
import sys
from typing import Any, Mapping

from accelerate.tracking import GeneralTracker

from monitor.client.reporter import Reporter
from monitor.client.identity import plain
from monitor.integrations.loop import Watch

__all__ = ["AcceleratorWatch", "TrainGuardTracker", "split_values", "watch"]

_EVAL_PREFIXES = ("eval_", "eval/", "evaluation_", "evaluation/", "val_", "val/", "valid_", "valid/",
                  "validation_", "validation/")
_TRAIN_PREFIXES = ("train_", "train/", "training_", "training/")
# Bare names that the Accelerate example scripts log for an evaluation.
_EVAL_BARE = frozenset({"perplexity", "ppl"})
_ALIASES = {"learning_rate": "lr", "acc": "accuracy", "ppl": "perplexity", "gradient_norm": "grad_norm",
            "total_norm": "grad_norm", "grad_norm_pre_clip": "grad_norm"}
# Keys that restate the step rather than measure anything.
_STEP_KEYS = frozenset({"step", "global_step", "completed_steps"})
_MAX_NAME = 128
# Values the per-rank watch reports on its own; a logged copy of them would only report them twice.
_WATCH_OWNS = ("lr", "grad_norm", "step_time_seconds", "compute_time_seconds", "data_time_seconds")


def _number(v: Any) -> Any:
    """The value as the Reporter takes it (a number or a detached one-element tensor), or None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    if hasattr(v, "detach"):
        try:
            return v.detach() if v.numel() == 1 else None
        except Exception:  # noqa: BLE001
            return None
    if hasattr(v, "item") and getattr(v, "size", 1) == 1:  # numpy scalars
        return v
    return None


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "/"))
        else:
            out[name] = v
    return out


def split_values(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Map `accelerator.log()` keys onto (train values, eval values), named as the trace format names them."""
    train: dict[str, Any] = {}
    ev: dict[str, Any] = {}
    for key, raw in _flatten(values).items():
        v = _number(raw)
        if v is None or key in _STEP_KEYS:
            continue
        name, dest = key, train
        low = key.lower()
        for p in _EVAL_PREFIXES:
            if low.startswith(p):
                name, dest = key[len(p):], ev
                break
        else:
            for p in _TRAIN_PREFIXES:
                if low.startswith(p):
                    name = key[len(p):]
                    break
            else:
                if low in _EVAL_BARE:
                    dest = ev
        name = _ALIASES.get(name.lower(), name)
        if name and len(name) <= _MAX_NAME:
            dest[name] = v
    return train, ev


class _Process:
    """What this process reports through: one Reporter and at most one watch, shared by the tracker."""

    reporter: Reporter | None = None
    watch: "AcceleratorWatch | None" = None
    owner_meta: dict[str, Any] | None = None  # meta of the tracker's own `run` record
    owner_world = 1
    announced = False  # whether the tracker's own `run` record went out
    config: dict[str, Any] | None = None  # hyper-parameters from init_trackers
    hooked = False


_proc = _Process()
# Watch options; every other keyword argument configures the Reporter.
_WATCH_OPTIONS = frozenset({"grad_norm_at", "norms_every", "group_norms_every", "batch_size", "max_steps", "probes",
                            "probe_tokenizer"})


def _install_exit_hook() -> None:
    """End the run at interpreter exit on every process; failed when an exception escaped the script."""
    if not _proc.hooked:
        _proc.hooked = True
        # Registered after the Reporter's and Watch's own exit handlers, so this runs first (atexit is
        # LIFO): the tracker's reporter gets its `end` too, and the final flush still delivers it.
        atexit.register(_close_at_exit)


def _announce() -> None:
    """Send the tracker's own `run` record (with any config) once, unless a watch announced the run."""
    if _proc.watch is not None or _proc.announced or _proc.reporter is None or _proc.owner_meta is None:
        return
    _proc.announced = True
    meta = dict(_proc.owner_meta)
    if _proc.config:
        meta["config"] = _proc.config
    _proc.reporter.run_started(world_size=_proc.owner_world, meta=meta)


def _close_at_exit() -> None:
    # The interpreter sets sys.last_value when an uncaught exception ended the script.
    status = "failed" if getattr(sys, "last_value", None) is not None else "completed"
    try:
        if _proc.watch is not None:
            _proc.watch.close(status, timeout=5.0)
        elif _proc.reporter is not None and not _proc.reporter._closed:
            _announce()
            _proc.reporter.end(status)
            _proc.reporter.close(timeout=5.0)
    except Exception:  # noqa: BLE001
        pass


def _accelerator_meta(accelerator: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("distributed_type", "mixed_precision", "gradient_accumulation_steps", "num_processes"):
        try:
            v = getattr(accelerator, key)
            out[key] = v if isinstance(v, (bool, int, float)) else str(getattr(v, "value", v))
        except Exception:  # noqa: BLE001
            pass
    return out


def _agree_on_run(accelerator: Any, run: str) -> str:
    """Rank 0's run id on every process: one broadcast that every process makes, so none waits alone."""
    try:
        if accelerator.num_processes <= 1:
            return run
        from accelerate.utils import broadcast_object_list

        box = broadcast_object_list([run], from_process=0)
        return box[0] if isinstance(box[0], str) and box[0] else run
    except Exception:  # noqa: BLE001 - without agreement this process keeps its own id
        return run


class AcceleratorWatch:
    """Per-rank reporting for one Accelerate process: a `train` record at every optimizer step.

    Built on monitor.integrations.loop.Watch, hooked on the prepared model and on the torch optimizer
    inside Accelerate's wrapper, so the record carries what Watch measures: the gradient norm when
    backward ends (after DDP's all-reduce, before clipping, unscaled under fp16), lr, step, compute
    and data time, samples and tokens, param_norm and update_ratio every `norms_every` steps.

    With `auto_step=True` (the default) the optimizer's step hook sends the record, so the loop needs
    no extra line, and steps that gradient accumulation skips are no steps; `note(...)` adds values to
    the step in progress. With `auto_step=False` call `step(loss=...)` after `optimizer.step()` on
    every micro-batch: it adds the micro-batch and sends the record once the optimizer has stepped.
    """

    def __init__(self, accelerator: Any, model: Any = None, optimizer: Any = None, *, run: str | None = None,
                 meta: dict[str, Any] | None = None, system_interval: float = 5.0, auto_step: bool = True,
                 **kwargs: Any):
        self.accelerator = accelerator
        self.auto_step = auto_step
        self.rank = int(getattr(accelerator, "process_index", 0) or 0)
        self.world_size = int(getattr(accelerator, "num_processes", 1) or 1)
        watch_opts = {k: v for k, v in kwargs.items() if k in _WATCH_OPTIONS}
        reporter_kwargs = {k: v for k, v in kwargs.items() if k not in _WATCH_OPTIONS}
        explicit = run is not None
        ident = None
        try:
            from monitor.client.identity import resolve_identity

            ident = resolve_identity(run, agree=False)
            run = ident.run
        except Exception:  # noqa: BLE001 - the Reporter falls back to the environment itself
            pass
        if run is not None and not explicit:
            # A run id from the environment may have been generated by this process alone (the
            # tracker on the main process starts first): every process takes rank 0's.
            run = _agree_on_run(accelerator, run)
        # The torch optimizer inside AcceleratedOptimizer: its step hooks run only when parameters
        # really change, not on the micro-batches that gradient accumulation skips.
        self._optimizer = getattr(optimizer, "optimizer", None) or optimizer
        self.meta = self._meta(ident, model, self._optimizer, meta)
        self.reports_loss = False
        self.steps_hooked = False  # whether the optimizer's step hook reports each step
        self._closed = False
        self._pending = 0
        self._handle: Any = None
        self._reset()
        previous = _proc.watch
        if previous is not None:
            previous.close("completed")  # a second watch in one process replaces the first
        rep = _proc.reporter
        if rep is None or rep._closed or (run is not None and rep.run != run):
            rep = Reporter(run=run, rank=self.rank, **reporter_kwargs)
            _proc.reporter = rep
        self.reporter = rep
        self.watch = Watch(model, self._optimizer, reporter=rep, meta=self.meta, system_interval=system_interval,
                           scaler=getattr(accelerator, "scaler", None), framework="accelerate", **watch_opts)
        try:
            if self._optimizer is not None and hasattr(self._optimizer, "register_step_post_hook"):
                # Registered after Watch's own hooks, so its update ratio is ready when this reports.
                self._handle = self._optimizer.register_step_post_hook(self._after_optimizer_step)
                self.steps_hooked = True
        except Exception:  # noqa: BLE001
            pass
        _proc.watch = self
        _install_exit_hook()

    def _meta(self, ident: Any, model: Any, optimizer: Any, meta: dict[str, Any] | None) -> dict[str, Any]:
        info: dict[str, Any] = {}
        try:
            from monitor.client.identity import framework_meta

            inner = model
            try:
                inner = self.accelerator.unwrap_model(model) if model is not None else None
            except Exception:  # noqa: BLE001
                pass
            info = framework_meta("accelerate", identity=ident, model=inner, optimizer=optimizer)
        except Exception:  # noqa: BLE001
            pass
        info["framework"] = "accelerate"
        info["accelerate"] = _accelerator_meta(self.accelerator)
        if _proc.config:
            info["config"] = _proc.config
        info.update(meta or {})
        return info

    @property
    def step_count(self) -> int:
        """Optimizer steps reported so far."""
        return self.watch.step_count

    def _reset(self) -> None:
        self._loss: Any = None
        self._n_loss = 0
        self._grad_norm: Any = None
        self._tokens: int | None = None
        self._samples: int | None = None
        self._values: dict[str, Any] = {}

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        try:
            if self.auto_step:
                self._report()
            else:
                self._pending += 1
        except Exception:  # noqa: BLE001
            pass

    def note(self, loss: Any = None, *, grad_norm: Any = None, tokens: int | None = None,
             samples: int | None = None, **values: Any) -> None:
        """Add values to the optimizer step in progress (losses are averaged, tokens and samples summed)."""
        try:
            if loss is not None:
                d = loss.detach() if hasattr(loss, "detach") else loss
                self._loss = d if self._loss is None else self._loss + d
                self._n_loss += 1
                self.reports_loss = True
            if grad_norm is not None:
                self._grad_norm = grad_norm
            # Counts given here win over what the forward hook saw in the batches.
            if tokens is not None:
                self._tokens = (self._tokens or 0) + int(tokens)
            if samples is not None:
                self._samples = (self._samples or 0) + int(samples)
            self._values.update(values)
        except Exception:  # noqa: BLE001
            pass

    def step(self, loss: Any = None, *, grad_norm: Any = None, tokens: int | None = None,
             samples: int | None = None, **values: Any) -> None:
        """Count one micro-batch (call after `optimizer.step()`); once the optimizer stepped, report the step.

        With `auto_step=True` the optimizer's hook sends the record and this only adds values to it.
        """
        try:
            self.note(loss, grad_norm=grad_norm, tokens=tokens, samples=samples, **values)
            if not self.auto_step and self._pending > 0:
                self._report(self.watch.step_count + self._pending)
                self._pending = 0
        except Exception:  # noqa: BLE001 - never raise into the training loop
            pass

    def _report(self, global_step: int | None = None) -> None:
        loss = self._loss
        if loss is not None and self._n_loss > 1:
            loss = loss / self._n_loss
        self.watch.step(loss, grad_norm=self._grad_norm, tokens=self._tokens, samples=self._samples,
                        global_step=global_step, **self._values)
        self._reset()

    def eval(self, loss: Any = None, **metrics: Any) -> None:
        """Report an evaluation from this rank at the current optimizer step."""
        self.watch.eval(loss, **metrics)

    def close(self, status: str = "completed", timeout: float = 10.0) -> bool:
        """Remove the hooks, report the end of the run and deliver what is queued."""
        if self._closed:
            return True
        self._closed = True
        self.steps_hooked = False
        if _proc.watch is self:
            _proc.watch = None
        try:
            if self._handle is not None:
                self._handle.remove()
        except Exception:  # noqa: BLE001
            pass
        try:
            return self.watch.close(status, timeout)
        except Exception:  # noqa: BLE001
            return False

    def __enter__(self) -> "AcceleratorWatch":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close("failed" if exc_type is not None else "completed")


def watch(accelerator: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> AcceleratorWatch:
    """Attach per-rank reporting to a prepared model and optimizer; call on every process (see AcceleratorWatch)."""
    return AcceleratorWatch(accelerator, model, optimizer, **kwargs)


class TrainGuardTracker(GeneralTracker):
    """An Accelerate tracker: `Accelerator(log_with=[TrainGuardTracker()])` sends `accelerator.log()` values.

    Accelerate calls trackers on the main process only; `watch()` adds the per-rank path.
    """

    name = "trainguard"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, run: str | None = None, *, meta: dict[str, Any] | None = None,
                 system_interval: float = 5.0, **reporter_kwargs: Any):
        """`run` names the run; `meta` adds to the `run` record; the rest configures the Reporter and Watch."""
        super().__init__()
        self.run = run
        self.meta = dict(meta or {})
        self.system_interval = system_interval
        self.reporter_kwargs = reporter_kwargs
        self._steps = 0
        self._finished = False

    @property
    def tracker(self) -> Reporter | None:
        """The Reporter this process sends through (None until something was sent)."""
        return _proc.reporter

    def _reporter(self) -> Reporter | None:
        """This process's Reporter, made on first use; None once the tracker finished."""
        if self._finished:
            return None
        rep = _proc.reporter
        if rep is not None and not rep._closed:
            return rep
        ident = None
        run = self.run
        try:
            from monitor.client.identity import framework_meta, resolve_identity

            # Only the main process gets here: no collective, so no process can wait on another.
            ident = resolve_identity(run, agree=False)
            run = ident.run
            meta = framework_meta("accelerate", identity=ident)
        except Exception:  # noqa: BLE001
            meta = {}
        meta["framework"] = "accelerate"
        meta.update(self.meta)
        reporter_kwargs = {k: v for k, v in self.reporter_kwargs.items() if k not in _WATCH_OPTIONS}
        rep = Reporter(run=run, rank=ident.rank if ident else None, **reporter_kwargs)
        _proc.reporter = rep
        _proc.owner_world = ident.world_size if ident else 1
        _proc.owner_meta = meta
        _proc.announced = False
        _install_exit_hook()
        return rep

    def start(self) -> None:
        """Open the connection (Accelerate calls this from `init_trackers`)."""
        try:
            self._reporter()
        except Exception:  # noqa: BLE001
            pass

    def store_init_configuration(self, values: dict) -> None:
        """Keep the hyper-parameters in the run's metadata (`meta.config`)."""
        try:
            _proc.config = plain(dict(values))
            w = _proc.watch
            if w is not None and not w._closed:
                w.meta["config"] = _proc.config
                w.reporter.run_started(world_size=w.world_size, meta=w.meta)
            elif self._reporter() is not None and _proc.announced:
                # Announced already: say it again with the config. Otherwise the first log() (or a
                # watch attached meanwhile) announces the run, config included.
                _proc.announced = False
                _announce()
        except Exception:  # noqa: BLE001
            pass

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        """Send logged values: train values as a `train` record, eval values as an `eval` record."""
        try:
            rep = self._reporter()
            if rep is None:
                return
            _announce()
            train, ev = split_values(values)
            w = _proc.watch
            if step is None:
                given = values.get("step") if isinstance(values, Mapping) else None
                if isinstance(given, int) and not isinstance(given, bool):
                    step = given
                elif w is not None:
                    step = w.step_count
                else:
                    step = self._steps + (1 if train else 0)
            if w is not None and not w._closed:
                if w.steps_hooked:
                    # The watch on this process measures these itself, at the step they belong to.
                    for key in _WATCH_OWNS:
                        train.pop(key, None)
                if w.reports_loss:
                    train.pop("loss", None)
            if train:
                self._steps = max(self._steps, int(step))
                rep.log("train", int(step), train)
            if ev:
                rep.log("eval", int(step), ev)
        except Exception:  # noqa: BLE001 - logging must never break the training script
            pass

    def finish(self) -> None:
        """End the run and deliver what is queued (Accelerate calls this from `end_training`)."""
        if self._finished:
            return
        self._finished = True
        try:
            if _proc.watch is not None:
                _proc.watch.close("completed")
            elif _proc.reporter is not None and not _proc.reporter._closed:
                _announce()
                _proc.reporter.end("completed", self._steps or None)
                _proc.reporter.close()
        except Exception:  # noqa: BLE001
            pass
        # A later run in this process (a notebook, a sweep) starts from nothing.
        _proc.config = _proc.owner_meta = None
        _proc.announced = False

    def watch(self, accelerator: Any, model: Any = None, optimizer: Any = None, *, auto_step: bool = True,
              meta: dict[str, Any] | None = None) -> AcceleratorWatch:
        """Attach the per-rank path on this process (call on every process, after `accelerator.prepare`)."""
        merged = dict(self.meta)
        merged.update(meta or {})
        return AcceleratorWatch(accelerator, model, optimizer, run=self.run, meta=merged,
                                system_interval=self.system_interval, auto_step=auto_step,
                                **self.reporter_kwargs)
