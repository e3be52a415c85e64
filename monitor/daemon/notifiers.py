"""Where alerts go when they fire or resolve. The log notifier is always on."""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger("trainguard.alerts")


class Notifier(Protocol):
    """Receives alert transitions; must not block (queue and deliver on its own thread)."""

    def notify(self, alert: Any, event: str) -> None:
        """`event` is "firing" or "resolved"."""


class LogNotifier:
    """Writes each transition to the daemon's log."""

    def notify(self, alert: Any, event: str) -> None:
        level = logging.WARNING if event == "firing" else logging.INFO
        where = f" rank {alert.rank}" if alert.rank is not None else ""
        step = f" step {alert.step}" if alert.step is not None else ""
        log.log(level, "%s %s [%s] run %s%s%s: %s", "FIRING" if event == "firing" else "RESOLVED",
                alert.name, alert.severity, alert.run, where, step, alert.summary)
