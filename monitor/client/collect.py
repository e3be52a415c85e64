"""Cheap collectors that add no host-device synchronisation to the training thread.

Everything computed here from device tensors stays on the device: norms are batched foreach
kernels, timings are CUDA events, and values reach the host through an asynchronous copy into
pinned memory that the reporter's sender thread reads once its event has completed. On a CPU the
same code uses perf_counter and plain tensors.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, Sequence

from monitor.client.reporter import Deferred

MAX_GROUPS = 64
_PLAIN = (float, int, bool)


# -- reading device values off the training thread ---------------------------------------------


class DeviceScalar(Deferred):
    """A device scalar being copied into pinned host memory; readable once its CUDA event completed."""

    __slots__ = ("host", "event")

    def __init__(self, host: Any, event: Any):
        super().__init__()
        self.host = host
        self.event = event

    def ready(self) -> bool:
        """Whether the copy has landed (never waits)."""
        try:
            return bool(self.event.query())
        except Exception:  # noqa: BLE001 - a broken event must not keep the record back
            return True

    def __float__(self) -> float:
        if not self.event.query():
            raise RuntimeError("the device has not produced this value yet")
        return float(self.host)


class ElapsedTime(Deferred):
    """Seconds between pairs of CUDA events, summed; readable once the last event completed."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[Any, Any]]):
        super().__init__()
        self.pairs = pairs

    def ready(self) -> bool:
        """Whether every end event has completed (never waits)."""
        try:
            return all(end.query() for _, end in self.pairs)
        except Exception:  # noqa: BLE001
            return True

    def __float__(self) -> float:
        return sum(start.elapsed_time(end) for start, end in self.pairs) / 1000.0


def read_later(v: Any, *, clone: bool = False) -> Any:
    """A value to hand to Reporter.log without waiting on a device.

    Numbers pass through, a CPU tensor is detached (and cloned with `clone=True`, for one the
    training loop will change in place), and a CUDA tensor starts an asynchronous copy into pinned
    host memory behind a CUDA event: the sender thread reads it once the event has completed.
    """
    if type(v) in _PLAIN or not hasattr(v, "detach"):
        return v
    try:
        t = v.detach()
        dev = t.device
        if dev.type == "cpu":
            return t.clone() if clone else t
        if dev.type != "cuda":
            return t
        torch = sys.modules["torch"]
        stream = torch.cuda.current_stream(dev)
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        host.copy_(t, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(stream)
        return DeviceScalar(host, ev)
    except Exception:  # noqa: BLE001 - the caller's value is still readable, just later
        return v


def device_is_cuda(tensors: Iterable[Any]) -> bool:
    """Whether the first tensor among `tensors` lives on a CUDA device."""
    for t in tensors:
        return getattr(getattr(t, "device", None), "type", None) == "cuda"
    return False


# -- norms ---------------------------------------------------------------------------------------


def foreach_norms(tensors: Sequence[Any]) -> list[Any]:
    """The 2-norm of each tensor, batched per device with torch._foreach_norm, kept on the device."""
    torch = sys.modules["torch"]
    by_dev: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dev.setdefault(t.device, []).append(i)
    out: list[Any] = [None] * len(tensors)
    for idx in by_dev.values():
        group = [tensors[i] for i in idx]
        # float32 norms: a bf16 or fp16 norm loses digits and overflows where the gradient does not.
        if all(t.dtype == torch.float32 for t in group):
            norms = torch._foreach_norm(group, 2.0)
        else:
            norms = torch._foreach_norm(group, 2.0, dtype=torch.float32)
        for i, n in zip(idx, norms):
            out[i] = n
    return out


def total_norm(norms: Sequence[Any]) -> Any:
    """The 2-norm of the concatenation of tensors whose own norms are `norms` (a device tensor)."""
    torch = sys.modules["torch"]
    first = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first, non_blocking=True) for n in norms]), 2.0)


def top_level_groups(module: Any, max_groups: int = MAX_GROUPS) -> dict[int, str]:
    """id(parameter) -> the name of its top-level submodule; beyond `max_groups` names the rest share 'other'."""
    module = unwrap_model(module, compiled=True)
    out: dict[int, str] = {}
    seen: set[str] = set()
    try:
        for name, p in module.named_parameters():
            g = name.split(".", 1)[0] or "root"
            if g not in seen:
                if len(seen) >= max_groups - 1:
                    g = "other"
                else:
                    seen.add(g)
            out[id(p)] = g
    except Exception:  # noqa: BLE001
        return {}
    return out


def grad_norms(params: Sequence[Any], groups: dict[int, str] | None = None, scale: Any = None
               ) -> tuple[Any, dict[str, Any]]:
    """(global gradient 2-norm, {group: norm}) of the parameters' current grads, as device tensors.

    `scale` (a loss scale, tensor or number) divides the norms, for grads still scaled by a
    GradScaler. Returns (None, {}) when no parameter has a gradient.
    """
    torch = sys.modules["torch"]
    with torch.no_grad():
        grads, owners = [], []
        for p in params:
            g = p.grad
            if g is not None:
                if g.is_sparse:
                    g = g.coalesce()._values()
                grads.append(g)
                owners.append(p)
        if not grads:
            return None, {}
        norms = foreach_norms(grads)
        total = total_norm(norms)
        per: dict[str, Any] = {}
        if groups:
            members: dict[str, list[Any]] = {}
            for p, n in zip(owners, norms):
                members.setdefault(groups.get(id(p), "other"), []).append(n)
            per = {g: total_norm(ns) for g, ns in members.items()}
        if scale is not None:
            total = total / scale
            per = {g: n / scale for g, n in per.items()}
        return total, per


class UpdateRatio:
    """param_norm and update_ratio (|delta theta| / |theta| over one optimizer step), all on the device.

    `before()` copies the parameters (at most `max_bytes` of them, so a large model is measured on a
    fixed subset rather than doubling its memory); `after()` computes the norms.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._chosen: list[Any] = []
        self._before: list[Any] = []

    def before(self, params: Sequence[Any]) -> None:
        """Snapshot the parameters just before the optimizer changes them."""
        torch = sys.modules["torch"]
        chosen, used = [], 0
        for p in params:
            if not getattr(p, "requires_grad", True):
                continue
            size = p.numel() * p.element_size()
            if used + size > self.max_bytes and chosen:
                continue
            chosen.append(p)
            used += size
        with torch.no_grad():
            self._chosen = chosen
            self._before = [p.detach().clone() for p in chosen] if chosen else []

    def after(self, params: Sequence[Any]) -> dict[str, Any]:
        """{'param_norm', 'update_ratio'} as device tensors (empty without a snapshot)."""
        torch = sys.modules["torch"]
        chosen, before = self._chosen, self._before
        self._chosen, self._before = [], []
        with torch.no_grad():
            live = [p.detach() for p in params if getattr(p, "requires_grad", True)]
            if not live:
                return {}
            out: dict[str, Any] = {"param_norm": total_norm(foreach_norms(live))}
            if chosen:
                now = [p.detach() for p in chosen]
                delta = torch._foreach_sub(now, before)
                out["update_ratio"] = total_norm(foreach_norms(delta)) / total_norm(foreach_norms(now))
            return out


# -- forward timing and batch size ---------------------------------------------------------------


_DATA_PARALLEL = ("DistributedDataParallel", "DataParallel")


def unwrap_model(module: Any, *, compiled: bool = False) -> Any:
    """The module inside DistributedDataParallel / DataParallel (and torch.compile's wrapper with `compiled`).

    Hooks go on the module inside DDP, whose own forward may run collectives (buffer broadcast),
    but stay on torch.compile's wrapper, outside the compiled region.
    """
    for _ in range(4):
        name = type(module).__name__
        if name in _DATA_PARALLEL:
            inner = getattr(module, "module", None)
        elif compiled and name == "OptimizedModule":
            inner = getattr(module, "_orig_mod", None)
        else:
            return module
        if inner is None:
            return module
        module = inner
    return module


def _first_grad_tensor(out: Any, depth: int = 0) -> Any:
    """The first tensor in a forward's output that autograd will flow through (loss first)."""
    if hasattr(out, "requires_grad") and hasattr(out, "register_hook"):
        return out if out.requires_grad else None
    if depth > 2:
        return None
    if isinstance(out, dict):
        items = ([out["loss"]] if out.get("loss") is not None else []) + list(out.values())
    elif isinstance(out, (list, tuple)):
        items = list(out)
    else:
        return None
    for item in items:
        t = _first_grad_tensor(item, depth + 1)
        if t is not None:
            return t
    return None


def _batch_tensor(args: tuple, kwargs: dict | None) -> Any:
    if kwargs:
        for key in ("input_ids", "inputs_embeds", "pixel_values", "input", "x"):
            v = kwargs.get(key)
            if v is not None and hasattr(v, "shape"):
                return v
    for a in args:
        if hasattr(a, "shape"):
            return a
        if isinstance(a, dict):
            v = a.get("input_ids")
            if hasattr(v, "shape"):
                return v
            for v in a.values():
                if hasattr(v, "shape"):
                    return v
        break
    if kwargs:
        for v in kwargs.values():
            if hasattr(v, "shape"):
                return v
    return None


class ForwardProbe:
    """Forward hooks on the model: this rank's forward+loss time, the wait for its batch, its batch size.

    compute time runs from the model's forward pre-hook to the moment backward reaches the model's
    output (that is, forward plus the loss), summed over the forwards of a step. Under DDP the
    gradient all-reduce happens later, in backward, so a slow rank shows here while its step time is
    equalised with the others. Timed with CUDA events on a GPU (read later, off the training thread)
    and with perf_counter on a CPU. `on_backward_end` is called once at the end of each backward
    that went through the model, after DDP has reduced the gradients.
    """

    def __init__(self, module: Any, *, on_backward_end: Callable[[], None] | None = None):
        import torch

        self._torch = torch
        self.module = unwrap_model(module)
        self.on_backward_end = on_backward_end
        self._cuda = device_is_cuda(self.module.parameters())
        self._handles = [
            self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.module.register_forward_hook(self._post),
        ]
        self._graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
        self._queue_callback = torch.autograd.Variable._execution_engine.queue_callback
        self.reset(time.perf_counter())

    def reset(self, step_end: float) -> None:
        """Start a new step; `step_end` is when the previous step finished (perf_counter)."""
        self._step_end = step_end
        self._first: float | None = None
        self._spans: list[list[Any]] = []
        self._open: list[Any] | None = None
        self._samples = 0
        self._tokens = 0
        # A backward that raised never runs its end-of-backward callbacks: do not wait for them forever.
        self._bwd_queued = False

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def take(self) -> dict[str, Any]:
        """This step's data_time_seconds, compute_time_seconds, samples and tokens (what was seen)."""
        out: dict[str, Any] = {}
        if self._first is not None:
            out["data_time_seconds"] = max(0.0, self._first - self._step_end)
        spans = [s for s in self._spans if s[1] is not None]
        if spans:
            if self._cuda and all(s[2] is not None and s[3] is not None for s in spans):
                out["compute_time_seconds"] = ElapsedTime([(s[2], s[3]) for s in spans])
            else:
                out["compute_time_seconds"] = sum(s[1] - s[0] for s in spans)
        if self._samples:
            out["samples"] = self._samples
        if self._tokens:
            out["tokens"] = self._tokens
        return out

    def _counts(self, module: Any) -> bool:
        torch = self._torch
        if not module.training or not torch.is_grad_enabled():
            return False
        # A forward re-run inside backward (activation checkpointing) is not a new forward.
        return self._graph_task_id is None or self._graph_task_id() == -1

    def _pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        try:
            if not self._counts(module):
                return None
            now = time.perf_counter()
            if self._first is None:
                self._first = now
            span: list[Any] = [now, None, None, None]
            if self._cuda:
                ev = self._torch.cuda.Event(enable_timing=True)
                ev.record()
                span[2] = ev
            self._open = span
            x = _batch_tensor(args, kwargs)
            if x is not None and x.dim() >= 1:
                b = int(x.shape[0])
                self._samples += b
                if x.dim() == 2 and not x.is_floating_point():
                    self._tokens += b * int(x.shape[1])
        except Exception:  # noqa: BLE001 - never raise into the model's forward
            pass
        return None

    def _post(self, module: Any, args: tuple, output: Any) -> None:
        try:
            span = self._open
            if span is None:
                return None
            self._open = None
            self._mark(span)
            self._spans.append(span)
            out = _first_grad_tensor(output)
            if out is not None:
                out.register_hook(functools.partial(self._backward_start, span))
        except Exception:  # noqa: BLE001
            pass
        return None

    def _mark(self, span: list[Any]) -> None:
        span[1] = time.perf_counter()
        if self._cuda:
            ev = self._torch.cuda.Event(enable_timing=True)
            ev.record()
            span[3] = ev

    def _backward_start(self, span: list[Any], grad: Any) -> None:
        try:
            # The loss is computed and backward has just reached the model: no collective yet.
            self._mark(span)
            if self.on_backward_end is not None and not self._bwd_queued:
                self._bwd_queued = True
                self._queue_callback(self._end_of_backward)
        except Exception:  # noqa: BLE001
            pass
        return None

    def _end_of_backward(self) -> None:
        # DDP queues its own end-of-backward callback (which waits for the all-reduce and writes the
        # averaged grads) after ours; queueing a second one puts us behind it.
        try:
            self._queue_callback(self._after_reduction)
        except Exception:  # noqa: BLE001
            self._after_reduction()

    def _after_reduction(self) -> None:
        self._bwd_queued = False
        try:
            if self.on_backward_end is not None:
                self.on_backward_end()
        except Exception:  # noqa: BLE001 - never raise into backward()
            pass


# -- system sampling -----------------------------------------------------------------------------


def host_rss_bytes() -> float | None:
    """Resident set size of this process, or None when psutil cannot tell."""
    try:
        import psutil

        return float(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # noqa: BLE001
        return None


def gpu_memory(device: int | None = None) -> dict[str, float]:
    """CUDA caching-allocator figures for `device` (default: the current one); empty without a GPU.

    These read host-side counters of the allocator; none of them waits for the GPU.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return {}
        dev = torch.cuda.current_device() if device is None else device
        stats: dict[str, Any] = torch.cuda.memory_stats(dev)
        out = {
            "gpu_memory_allocated_bytes": float(stats.get("allocated_bytes.all.current", 0)),
            "gpu_memory_reserved_bytes": float(stats.get("reserved_bytes.all.current", 0)),
            "gpu_memory_peak_bytes": float(stats.get("allocated_bytes.all.peak", 0)),
            "num_alloc_retries": float(stats.get("num_alloc_retries", 0)),
            "num_ooms": float(stats.get("num_ooms", 0)),
        }
        out["gpu_memory_total_bytes"] = float(torch.cuda.get_device_properties(dev).total_memory)
        return out
    except Exception:  # noqa: BLE001
        return {}


class Nvml:
    """Utilisation, temperature and power of one GPU through NVML; nothing (and no retry) when absent."""

    def __init__(self, device: int | None = None):
        self.device = device
        self._handle: Any = None
        self._nvml: Any = None
        self.available: bool | None = None  # None: not tried yet

    def _open(self) -> None:
        self.available = False
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
        dev = torch.cuda.current_device() if self.device is None else self.device
        props = torch.cuda.get_device_properties(dev)
        handle = None
        # Look the GPU up by its identity rather than its index: CUDA_VISIBLE_DEVICES renumbers devices.
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid:
            try:
                full = uuid if uuid.startswith(("GPU-", "MIG-")) else "GPU-" + uuid
                handle = pynvml.nvmlDeviceGetHandleByUUID(full.encode())
            except Exception:  # noqa: BLE001
                handle = None
        if handle is None and hasattr(props, "pci_bus_id"):
            try:
                bus = f"{getattr(props, 'pci_domain_id', 0):08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
                handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
            except Exception:  # noqa: BLE001
                handle = None
        if handle is None and not os.environ.get("CUDA_VISIBLE_DEVICES"):
            handle = pynvml.nvmlDeviceGetHandleByIndex(dev)
        if handle is not None:
            self._nvml, self._handle, self.available = pynvml, handle, True

    def values(self) -> dict[str, float]:
        """gpu_utilization_ratio, gpu_temperature_celsius, gpu_power_watts (whichever NVML gives)."""
        if self.available is None:
            try:
                self._open()
            except Exception:  # noqa: BLE001 - no driver, no library: report nothing, try no more
                self.available = False
        if not self.available:
            return {}
        nv, h = self._nvml, self._handle
        out: dict[str, float] = {}
        for name, read in (
            ("gpu_utilization_ratio", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
            ("gpu_temperature_celsius", lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))),
            ("gpu_power_watts", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
        ):
            try:
                out[name] = float(read())
            except Exception:  # noqa: BLE001
                pass
        return out


class HostCpu:
    """This process's CPU use (cores busy) and the whole host's (0..1), between two samples."""

    def __init__(self) -> None:
        self._proc: Any = None
        self._primed = False
        try:
            import psutil

            self._psutil = psutil
            self._proc = psutil.Process(os.getpid())
            self._proc.cpu_percent(None)
            psutil.cpu_percent(None)
        except Exception:  # noqa: BLE001
            self._proc = None

    def values(self) -> dict[str, float]:
        """process_cpu_ratio and host_cpu_utilization_ratio since the previous call."""
        if self._proc is None:
            return {}
        try:
            return {"process_cpu_ratio": self._proc.cpu_percent(None) / 100.0,
                    "host_cpu_utilization_ratio": self._psutil.cpu_percent(None) / 100.0}
        except Exception:  # noqa: BLE001
            return {}


def system_values(device: int | None = None, nvml: Nvml | None = None, cpu: HostCpu | None = None
                  ) -> dict[str, float]:
    """Everything the system sampler reports: host memory and CPU, CUDA allocator figures, NVML readings."""
    vals = gpu_memory(device)
    rss = host_rss_bytes()
    if rss is not None:
        vals["host_rss_bytes"] = rss
    if cpu is not None:
        vals.update(cpu.values())
    if nvml is not None and vals.get("gpu_memory_total_bytes") is not None:
        vals.update(nvml.values())
    return vals


class SystemSampler:
    """A thread that logs a `system` record every `interval` seconds."""

    def __init__(self, reporter: Any, interval: float = 5.0, *, device: int | None = None,
                 step: Callable[[], int | None] = lambda: None):
        self.reporter = reporter
        self.interval = interval
        self.device = device
        self._step = step
        self._nvml = Nvml(device)
        self._cpu = HostCpu()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict[str, float]:
        """One set of system values, now."""
        return system_values(self.device, self._nvml, self._cpu)

    def _emit(self) -> None:
        try:
            vals = self.sample()
            if vals:
                self.reporter.log("system", self._step(), vals)
        except Exception:  # noqa: BLE001
            pass

    def _loop(self) -> None:
        self._emit()
        while not self._stop.wait(self.interval):
            self._emit()

    def start(self) -> "SystemSampler":
        """Start the sampling thread (a first sample is taken at once)."""
        if self._thread is None and self.interval and self.interval > 0:
            self._thread = threading.Thread(target=self._loop, name="trainguard-system", daemon=True)
            self._thread.start()
        return self

    def flush(self, timeout: float = 1.0) -> bool:
        """Log one sample now."""
        self._emit()
        return True

    def close(self, timeout: float = 2.0) -> bool:
        """Stop the thread; True when it has ended."""
        self._stop.set()
        th = self._thread
        if th is not None and th.is_alive() and th is not threading.current_thread():
            th.join(timeout)
            return not th.is_alive()
        return True
