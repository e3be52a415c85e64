"""trainguard: a training-health monitor. The client API here imports neither torch nor the daemon."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from monitor.client.reporter import Reporter  # noqa: E402
from monitor.client.security import ClientSecurity  # noqa: E402
from monitor.records import Record  # noqa: E402


def watch(model: Any = None, optimizer: Any = None, **kwargs: Any) -> Any:
    """Attach trainguard to a plain PyTorch loop; returns an object with `step(loss=...)`.

    Example:
        mon = monitor.watch(model, optimizer, run="my-run")
        for batch in data:
            loss = model(batch); loss.backward(); optimizer.step(); optimizer.zero_grad()
            mon.step(loss=loss)
        mon.close()
    """
    from monitor.integrations.loop import watch as _watch

    return _watch(model, optimizer, **kwargs)


__all__ = ["ClientSecurity", "Record", "Reporter", "__version__", "watch"]
