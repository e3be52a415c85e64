"""Alert lifecycle: one alert per run and name, firing -> resolved, stored and announced."""

from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

from monitor.daemon.detectors.base import Finding

log = logging.getLogger("trainguard.alerts")
MAX_ALERTS_PER_RUN = 1000


def json_number(v: float | None) -> Any:
    """A float for JSON: non-finite values as the strings "nan", "inf", "-inf" (as trace readers accept)."""
    if v is None:
        return None
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


@dataclass
class Alert:
    """One alert of one run."""

    id: int
    run: str
    name: str
    severity: str
    state: str  # "firing" or "resolved"
    rank: int | None
    step: int | None
    started_at: float
    resolved_at: float | None = None
    summary: str = ""
    description: str = ""
    value: float | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The alert as stored (floats as they are)."""
        return {"id": self.id, "run": self.run, "name": self.name, "severity": self.severity, "state": self.state,
                "rank": self.rank, "step": self.step, "started_at": self.started_at,
                "resolved_at": self.resolved_at, "summary": self.summary, "description": self.description,
                "value": self.value, "labels": dict(self.labels)}

    def to_api(self) -> dict[str, Any]:
        """The alert as the API returns it (JSON-safe)."""
        d = self.to_dict()
        d["value"] = json_number(self.value)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Alert":
        """Rebuild an alert from its stored form."""
        return cls(**{k: d.get(k) for k in ("id", "run", "name", "severity", "state", "rank", "step", "started_at",
                                              "resolved_at", "summary", "description", "value")},
                   labels=dict(d.get("labels") or {}))


class AlertManager:
    """Turns findings into alerts: deduplicates per run and name, stores and notifies each transition."""

    def __init__(self, store: Any, notifiers: Iterable[Any], runbook_url: str | None = None):
        self.store = store
        self.notifiers = list(notifiers)
        self.runbook_url = runbook_url
        self._lock = threading.Lock()
        self._active: dict[tuple[str, str], Alert] = {}
        self._by_run: dict[str, collections.deque[Alert]] = {}
        self.fired_total: dict[tuple[str, str], int] = {}
        self._ids = itertools.count(1)

    def restore(self, runs: Iterable[str]) -> None:
        """Load the alerts of live runs from the store, so none of them fires a second time."""
        self._ids = itertools.count(self.store.max_alert_id() + 1)
        for run in runs:
            rows = self.store.load_alerts(run=run, limit=MAX_ALERTS_PER_RUN)
            dq = self._by_run.setdefault(run, collections.deque(maxlen=MAX_ALERTS_PER_RUN))
            for row in reversed(rows):  # oldest first
                a = Alert.from_dict(row)
                dq.append(a)
                self.fired_total[(run, a.name)] = self.fired_total.get((run, a.name), 0) + 1
                if a.state == "firing":
                    self._active[(run, a.name)] = a

    def apply(self, run: str, findings: Iterable[Finding], notify: bool = True) -> list[Alert]:
        """Apply detector findings for `run`; return the alerts that changed."""
        changed = []
        with self._lock:
            for f in findings:
                key = (run, f.alert)
                cur = self._active.get(key)
                if f.action == "fire":
                    if cur is not None:
                        continue  # already firing: one alert per run and name
                    labels = dict(f.labels)
                    if self.runbook_url:
                        labels.setdefault("runbook_url", self.runbook_url.format(alert=f.alert, run=run))
                    a = Alert(next(self._ids), run, f.alert, f.severity, "firing", f.rank, f.step, f.t,
                              None, f.summary, f.description, f.value, labels)
                    self._active[key] = a
                    self._by_run.setdefault(run, collections.deque(maxlen=MAX_ALERTS_PER_RUN)).append(a)
                    self.fired_total[key] = self.fired_total.get(key, 0) + 1
                    changed.append((a, "firing"))
                elif f.action == "resolve" and cur is not None:
                    cur.state = "resolved"
                    cur.resolved_at = f.t
                    if f.summary:
                        cur.labels["resolution"] = f.summary
                    del self._active[key]
                    changed.append((cur, "resolved"))
        for a, event in changed:
            self.store.put_alert(a.to_dict())
            if notify:
                for n in self.notifiers:
                    try:
                        n.notify(a, event)
                    except Exception as e:  # noqa: BLE001 - a notifier must never break ingest
                        log.error("notifier %s failed: %s", type(n).__name__, e)
        return [a for a, _ in changed]

    def resolve_run(self, run: str, t: float, reason: str) -> None:
        """Resolve every firing alert of a run (the run expired)."""
        names = [name for (r, name) in list(self._active) if r == run]
        self.apply(run, [Finding(alert=n, action="resolve", t=t, summary=reason) for n in names])

    def forget_run(self, run: str) -> None:
        """Drop a run's alerts from memory (they stay in the store)."""
        with self._lock:
            self._by_run.pop(run, None)
            for key in [k for k in self._active if k[0] == run]:
                del self._active[key]
            for key in [k for k in self.fired_total if k[0] == run]:
                del self.fired_total[key]

    def alerts(self, run: str | None = None, state: str | None = None) -> list[Alert]:
        """Alerts of live runs, newest first."""
        with self._lock:
            runs = [run] if run is not None else list(self._by_run)
            out = [a for r in runs for a in self._by_run.get(r, ())]
        if state is not None:
            out = [a for a in out if a.state == state]
        out.sort(key=lambda a: a.id, reverse=True)
        return out

    def active(self) -> list[Alert]:
        """Firing alerts."""
        with self._lock:
            return list(self._active.values())

    def known(self) -> list[tuple[str, str, str, bool, int]]:
        """(run, name, severity, active, fired_total) for each alert name a live run has had."""
        with self._lock:
            out = []
            for (run, name), count in self.fired_total.items():
                dq = self._by_run.get(run)
                sev = next((a.severity for a in reversed(dq) if a.name == name), "warning") if dq else "warning"
                out.append((run, name, sev, (run, name) in self._active, count))
            return out
