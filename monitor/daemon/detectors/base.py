"""The detector interface: one detector per file, no I/O, driven by records and the run's event time."""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from monitor.records import Record, RecordBlock

SEVERITIES = ("info", "warning", "critical")


@dataclass
class Finding:
    """What a detector concluded: an alert starts (`fire`) or ends (`resolve`)."""

    alert: str
    action: str  # "fire" or "resolve"
    t: float  # event time of the evidence
    severity: str = "warning"
    step: int | None = None
    rank: int | None = None
    value: float | None = None
    summary: str = ""
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)


class Detector:
    """Base class. A detector instance watches one run.

    `update` sees every record of the kinds in `kinds` (from the ranks that `ranks` names), in
    arrival order; `tick` is called with the run's event-time clock after each batch, for rules
    about time passing (a stall, a lost rank); it must be cheap, or rate-limit itself in event time.
    Both return findings; neither may do I/O or read the wall clock. `state`/`restore` let the
    daemon persist what the detector has learnt across a restart.
    """

    name: ClassVar[str] = ""
    severity: ClassVar[str] = "warning"
    kinds: ClassVar[frozenset[str]] = frozenset()
    # Which ranks' records `update` sees: "lead" (the run's lowest reporting rank, enough for
    # run-wide series such as the loss, and it keeps ingest cost independent of the world size)
    # or "all" (every rank's records, for per-rank causes). Per-rank windows are also readable in
    # `tick` through `run.ranks[r].windows` without subscribing to every record.
    ranks: ClassVar[str] = "lead"
    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, config: Mapping[str, Any] | None = None):
        unknown = set(config or {}) - set(self.defaults) - {"severity", "enabled"}
        if unknown:
            raise ValueError(f"detectors.{self.name}: unknown setting(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(self.defaults))}")
        for key, v in (config or {}).items():
            if key in self.defaults:
                _check_type(f"detectors.{self.name}.{key}", v, self.defaults[key])
        merged = {**self.defaults, **(config or {})}
        self.config = merged
        self.severity = merged.get("severity", type(self).severity)
        if self.severity not in SEVERITIES:
            raise ValueError(f"detectors.{self.name}.severity: {self.severity!r} is not one of {', '.join(SEVERITIES)}")

    def update(self, rec: Record, run: Any) -> list[Finding]:
        """Consume one record; return findings (usually none)."""
        return []

    def update_block(self, block: RecordBlock, run: Any) -> list[Finding]:
        """Consume a block of records (ranks = "all" only, for ranks other than the lead).

        The default takes the records one by one; a detector that reads every rank should
        override it with a column-at-a-time check, since blocks are how busy ranks report.
        """
        out: list[Finding] = []
        for rec in block.records():
            found = self.update(rec, run)
            if found:
                out.extend(found)
        return out

    def tick(self, now: float, run: Any) -> list[Finding]:
        """Called with the run's event time after each batch."""
        return []

    def statistic(self) -> float | None:
        """How close the run is to a page, on the detector's own scale (None if not meaningful)."""
        return None

    def state(self) -> dict[str, Any]:
        """What to persist across a daemon restart."""
        return {}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take back what `state` returned."""


def _check_type(where: str, v: Any, default: Any) -> None:
    """Raise ValueError unless `v` has the JSON type of the setting's default (numbers: int where the default is).

    Settings come from a config file: a string, table or list where a number belongs would
    otherwise surface as a TypeError deep inside a detector.
    """
    if default is None:
        return
    if isinstance(default, bool):
        ok, what = isinstance(v, bool), "true or false"
    elif isinstance(default, int):
        ok, what = isinstance(v, int) and not isinstance(v, bool), "a whole number"
    elif isinstance(default, float):
        ok, what = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v), "a number"
    elif isinstance(default, str):
        ok, what = isinstance(v, str), "a string"
    elif isinstance(default, (list, tuple)):
        ok, what = isinstance(v, (list, tuple)), "a list"
        if ok and default:
            for i, x in enumerate(v):
                _check_type(f"{where}[{i}]", x, default[0])
    elif isinstance(default, Mapping):
        ok, what = isinstance(v, Mapping), "a table"
    else:
        return
    if not ok:
        raise ValueError(f"{where}: expected {what} (the default is {default!r}), got {v!r}")
