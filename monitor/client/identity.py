"""Who is reporting: the run id every rank shares, this process's rank, and the `run` record's metadata.

Every integration resolves its identity here, so a job started by torchrun, accelerate launch, the
DeepSpeed launcher, Slurm or mpirun reports under one run id with the right ranks, whatever framework
drives the loop.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from monitor.client.reporter import generate_run_id, sanitize_run_id

log = logging.getLogger("trainguard.client")

# torchrun's static rendezvous (the default without --rdzv-id) passes this placeholder as the run id.
_PLACEHOLDER_RUN_IDS = frozenset({"", "none", "null", "default"})

# The id this process generated, and whether the ranks have agreed on it yet. Module state because the
# agreement is one collective at start-up: a second Watch in the same process must not repeat it.
_generated: str | None = None
_agreed: bool = False


@dataclass(frozen=True)
class Identity:
    """Where a process sits in its job."""

    run: str
    rank: int
    world_size: int
    local_rank: int
    host: str
    restart_count: int
    launcher: str

    def as_dict(self) -> dict[str, Any]:
        """The identity as a plain dict (for the `run` record's meta)."""
        return asdict(self)


def _env_int(*names: str) -> int | None:
    for name in names:
        v = os.environ.get(name)
        if v is not None and v.strip() != "":
            try:
                return int(v)
            except ValueError:
                continue
    return None


def detect_launcher() -> str:
    """The launcher that started this process, judged from the environment it set."""
    env = os.environ
    if "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_DYNAMO_BACKEND" in env:
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in env or "TORCHELASTIC_RESTART_COUNT" in env:
        return "torchrun"
    if "CROSS_RANK" in env and "LOCAL_SIZE" in env:
        return "deepspeed"
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return "mpirun"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    return "python"


def _dist() -> Any:
    """torch.distributed when it is imported, available and initialised, else None (never imports torch)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist
    except Exception:  # noqa: BLE001
        pass
    return None


def rank_and_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torch.distributed when initialised, else the launcher's environment."""
    rank = _env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
    world = _env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
    local = _env_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
    dist = _dist()
    if dist is not None:
        try:
            rank, world = dist.get_rank(), dist.get_world_size()
        except Exception:  # noqa: BLE001
            pass
    rank = rank if rank is not None and rank >= 0 else 0
    world = world if world is not None and world > 0 else 1
    local = local if local is not None and local >= 0 else (rank if world == 1 else 0)
    return rank, max(world, rank + 1), local


_GENERATED_ENV = "TRAINGUARD_RUN_GENERATED"


def _explicit_run(run: str | None) -> str | None:
    if run:
        return run
    env = os.environ.get("TRAINGUARD_RUN")
    # An id this process or its launcher generated is not the user's: it still has to be agreed
    # on, by every rank alike (a rank that skipped the broadcast would leave the others waiting).
    if env and env != _generated and os.environ.get(_GENERATED_ENV) != env:
        return env
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "").strip()
    if elastic.lower() not in _PLACEHOLDER_RUN_IDS:
        return elastic
    return None


def _collective_device(dist: Any) -> Any:
    """Where NCCL should stage the broadcast: this rank's GPU, even before the loop called set_device."""
    try:
        if str(dist.get_backend()).lower() != "nccl":
            return None
        torch = sys.modules["torch"]
        _, _, local = rank_and_world()
        count = torch.cuda.device_count()
        index = local if local < count else torch.cuda.current_device()
        return torch.device("cuda", index)
    except Exception:  # noqa: BLE001
        return None


def _agree_with_rank0(run: str) -> str:
    """Take rank 0's run id; one broadcast, done at most once per process."""
    global _agreed
    dist = _dist()
    if dist is None or _agreed:
        return run
    try:
        if dist.get_world_size() <= 1:
            _agreed = True
            return run
        box = [run]
        dist.broadcast_object_list(box, src=0, device=_collective_device(dist))
        _agreed = True
        got = box[0]
        return got if isinstance(got, str) and got else run
    except Exception:  # noqa: BLE001 - a failed agreement leaves this rank's own id, never an error
        return run


def resolve_identity(run: str | None = None, *, agree: bool = True) -> Identity:
    """This process's identity: run id, rank, world size, local rank, host, restart count, launcher.

    The run id comes from `run`, then TRAINGUARD_RUN, then TORCHELASTIC_RUN_ID (unless torchrun's
    placeholder), else it is generated once per process and written into TRAINGUARD_RUN so that
    processes a launcher spawns later inherit it. A generated id is then agreed on: when
    torch.distributed is initialised, every rank takes rank 0's id with one broadcast_object_list.
    That broadcast is a collective, so with `agree=True` and no run id given, every rank must call
    this (as every rank reporting does); pass a run id or `agree=False` to call it on some ranks only.
    """
    global _generated
    rank, world, local = rank_and_world()
    chosen = _explicit_run(run)
    if chosen is None:
        if _generated is None:
            inherited = os.environ.get("TRAINGUARD_RUN")
            _generated = inherited if inherited and os.environ.get(_GENERATED_ENV) == inherited \
                else generate_run_id()
            os.environ["TRAINGUARD_RUN"] = os.environ[_GENERATED_ENV] = _generated
        chosen = _generated
        if world > 1 and _dist() is None and not _agreed:
            log.warning("trainguard: no run id given and torch.distributed is not initialised yet, so each rank "
                        "generated its own; create the watch after init_process_group, or set TRAINGUARD_RUN")
        if agree and world > 1:
            agreed = _agree_with_rank0(chosen)
            if agreed != chosen:
                _generated = agreed
                os.environ["TRAINGUARD_RUN"] = os.environ[_GENERATED_ENV] = agreed
                chosen = agreed
    chosen = sanitize_run_id(chosen)
    restart = _env_int("TORCHELASTIC_RESTART_COUNT") or 0
    return Identity(run=chosen, rank=rank, world_size=world, local_rank=local, host=socket.gethostname(),
                    restart_count=restart, launcher=detect_launcher())


def package_version(name: str) -> str | None:
    """The installed version of a distribution or imported module, or None."""
    mod = sys.modules.get(name)
    v = getattr(mod, "__version__", None) if mod is not None else None
    if v:
        return str(v)
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def model_meta(model: Any) -> dict[str, Any] | None:
    """Model class and parameter counts (total and trainable), or None for something without parameters."""
    if model is None or not hasattr(model, "parameters"):
        return None
    from monitor.client.collect import unwrap_model

    inner = unwrap_model(model, compiled=True)
    try:
        total = trainable = 0
        for p in model.parameters():
            n = int(p.numel())
            total += n
            if getattr(p, "requires_grad", False):
                trainable += n
        out: dict[str, Any] = {"type": type(inner).__name__, "params": total}
        if inner is not model:
            out["wrapper"] = type(model).__name__
        if trainable != total:
            out["trainable_params"] = trainable
        return out
    except Exception:  # noqa: BLE001
        return None


def plain(v: Any) -> Any:
    """A hyper-parameter or config value as JSON can carry it: tensors become floats, enums their value."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, Mapping):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [plain(x) for x in v]
    value = getattr(v, "value", None)  # enums such as transformers' SchedulerType
    if isinstance(value, (str, int, float)):
        return value
    try:
        return float(v)
    except Exception:  # noqa: BLE001
        return str(v)


def optimizer_meta(optimizer: Any) -> dict[str, Any] | None:
    """Optimizer name and the first param group's main hyper-parameters, or None."""
    if optimizer is None:
        return None
    # Wrappers (accelerate's AcceleratedOptimizer, DeepSpeed's ZeRO optimizers) keep the real one inside.
    inner = getattr(optimizer, "optimizer", None)
    name_src = inner if inner is not None and hasattr(inner, "param_groups") else optimizer
    out: dict[str, Any] = {"name": type(name_src).__name__}
    try:
        groups = getattr(optimizer, "param_groups", None) or []
        if groups:
            g = groups[0]
            for key in ("lr", "weight_decay", "betas", "momentum", "eps"):
                if key in g and g[key] is not None:
                    out[key] = plain(g[key])
            # A scheduler keeps the configured lr as `initial_lr`; `lr` is wherever its warm-up is now.
            if g.get("initial_lr") is not None:
                out["lr"] = plain(g["initial_lr"])
            if len(groups) > 1:
                out["param_groups"] = len(groups)
    except Exception:  # noqa: BLE001
        pass
    return out


def framework_meta(framework: str = "torch", *, identity: Identity | None = None, model: Any = None,
                   optimizer: Any = None, batch_size: int | None = None, max_steps: int | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `run` record's meta: host, pid, restarts, launcher, framework, versions, model and hyper-parameters."""
    ident = identity or resolve_identity(agree=False)
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in ("torch", framework):
        v = package_version(name) if name else None
        if v:
            versions[name] = v
    tg = package_version("trainguard")
    if tg:
        versions["trainguard"] = tg
    meta: dict[str, Any] = {
        "framework": framework, "versions": versions, "host": ident.host, "pid": os.getpid(),
        "launcher": ident.launcher, "restart_count": ident.restart_count, "local_rank": ident.local_rank,
    }
    m = model_meta(model)
    if m is not None:
        meta["model"] = m
    o = optimizer_meta(optimizer)
    if o is not None:
        meta["optimizer"] = o
    if batch_size is not None:
        meta["batch_size"] = int(batch_size)
    if max_steps is not None:
        meta["max_steps"] = int(max_steps)
    if extra:
        meta.update(extra)
    return meta
