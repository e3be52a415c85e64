"""Alert lifecycle: one alert per run and name, pending -> firing -> resolved, silences, and who hears of it.

Detectors report edges: a condition starts (`fire`) and ends (`resolve`). The manager turns them into
alerts with a per-alert `for` (the condition must hold for a number of steps or event seconds before
it fires), a hold before resolving (`keep_firing_for_*`, so that an alert does not flap), and a
warm-up (no paging in the first steps of a run). Every decision is taken on the run's event time,
so a replayed trace gives the same alerts as the live run. Silences use the wall clock: they are
about who gets paged now, not about what the run did.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import re
import string
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from monitor.daemon.detectors.base import Finding

log = logging.getLogger("trainguard.alerts")
MAX_ALERTS_PER_RUN = 1000
DEFAULT_RUNBOOK_URL = "https://github.com/trainguard/trainguard/blob/main/docs/runbooks/{alert}.md"
# A NaN is never start-up noise: it pages from the first step whatever the warm-up says.
NEVER_WARMED_UP = frozenset({"NonFinite"})
RULE_KEYS = ("for_steps", "for_seconds", "keep_firing_for_steps", "keep_firing_for_seconds", "warmup_steps")
_RUN_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
MAX_COMMENT = 1024
MAX_CREATED_BY = 128
# Who created a silence: a user or service name (user, user@host, DOMAIN\user, "ci bot"), never markup or
# control characters, since it is shown in logs, terminals and dashboards.
_CREATED_BY = re.compile(r"[\w .@+:/\\-]*\Z")
MAX_SILENCE_SECONDS = 90 * 86400.0  # a silence longer than a quarter is a disabled detector: say so in config
_SEVERITY_ORDER = {"info": 1, "warning": 2, "critical": 3}


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
    state: str  # "pending", "firing" or "resolved"
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

    def to_api(self, silenced: bool = False) -> dict[str, Any]:
        """The alert as the API returns it (JSON-safe)."""
        d = self.to_dict()
        d["value"] = json_number(self.value)
        d["silenced"] = silenced
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Alert":
        """Rebuild an alert from its stored form."""
        return cls(**{k: d.get(k) for k in ("id", "run", "name", "severity", "state", "rank", "step", "started_at",
                                              "resolved_at", "summary", "description", "value")},
                   labels=dict(d.get("labels") or {}))


# -------------------------------------------------------------------------------------------------
# rules


@dataclass(frozen=True)
class AlertRule:
    """Lifecycle settings of one alert name; every threshold is in event time or steps."""

    for_steps: int = 0
    for_seconds: float = 0.0
    keep_firing_for_steps: int = 0
    keep_firing_for_seconds: float = 0.0
    warmup_steps: int = 0


class AlertRules:
    """Per-alert lifecycle settings: `[alerts]` holds the defaults, `[alerts.<Name>]` overrides them."""

    def __init__(self, default: AlertRule | None = None, per_alert: Mapping[str, AlertRule] | None = None):
        self.default = default or AlertRule()
        self.per_alert = dict(per_alert or {})

    def rule(self, name: str) -> AlertRule:
        """The settings for alert `name`."""
        return self.per_alert.get(name, self.default)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, names: Iterable[str]) -> "AlertRules":
        """Build from the `[alerts]` table; raise ValueError naming the first bad setting."""
        cfg = dict(cfg or {})
        known = set(names)
        if not isinstance(cfg, Mapping):
            raise ValueError("alerts: expected a table")
        base = {k: v for k, v in cfg.items() if k in RULE_KEYS}
        for k, v in cfg.items():
            if k in RULE_KEYS:
                continue
            if k not in known:
                raise ValueError(f"alerts.{k}: neither a setting ({', '.join(RULE_KEYS)}) nor an alert name; "
                                 f"known alerts: {', '.join(sorted(known))}")
            if not isinstance(v, Mapping):
                raise ValueError(f"alerts.{k}: expected a table of settings ({', '.join(RULE_KEYS)})")
        default = _rule(base, "alerts")
        per = {}
        for name, sub in cfg.items():
            if name in RULE_KEYS:
                continue
            unknown = set(sub) - set(RULE_KEYS)
            if unknown:
                raise ValueError(f"alerts.{name}: unknown setting(s) {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(RULE_KEYS)}")
            if name in NEVER_WARMED_UP and sub.get("warmup_steps", 0):
                raise ValueError(f"alerts.{name}.warmup_steps: {name} pages from the first step and is never "
                                 "suppressed during warm-up")
            per[name] = _rule({**base, **sub}, f"alerts.{name}")
        return cls(default, per)


def _rule(values: Mapping[str, Any], where: str) -> AlertRule:
    for k in ("for_steps", "keep_firing_for_steps", "warmup_steps"):
        v = values.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}.{k}: must be a whole number of steps >= 0, got {v!r}")
    for k in ("for_seconds", "keep_firing_for_seconds"):
        v = values.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}.{k}: must be a number of seconds >= 0, got {v!r}")
    return AlertRule(**{k: values[k] for k in RULE_KEYS if k in values})


def check_runbook_url(pattern: str | None) -> None:
    """Raise ValueError unless `pattern` only uses the {alert} and {run} placeholders."""
    if not pattern:
        return
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
    except ValueError as e:
        raise ValueError(f"runbook_url: {e} in {pattern!r}") from None
    bad = fields - {"alert", "run"}
    if bad:
        raise ValueError(f"runbook_url: unknown placeholder(s) {', '.join('{' + b + '}' for b in sorted(bad))}; "
                         "use {alert} and {run}")


# -------------------------------------------------------------------------------------------------
# silences


class SilenceError(ValueError):
    """A silence request is wrong; the message names the field."""


@dataclass
class Silence:
    """No notifications for alerts of `run` named `alert` ("*" matches any) between two wall-clock times."""

    id: int
    run: str
    alert: str
    starts_at: float
    ends_at: float
    comment: str = ""
    created_by: str = ""
    created_at: float = 0.0

    def active(self, now: float) -> bool:
        """Whether the silence holds at wall-clock time `now`."""
        return self.starts_at <= now < self.ends_at

    def matches(self, run: str, name: str) -> bool:
        """Whether the silence covers alert `name` of `run`."""
        return self.run in ("*", run) and self.alert in ("*", name)

    def to_dict(self) -> dict[str, Any]:
        """The silence as stored."""
        return {"id": self.id, "run": self.run, "alert": self.alert, "starts_at": self.starts_at,
                "ends_at": self.ends_at, "comment": self.comment, "created_by": self.created_by,
                "created_at": self.created_at}

    def to_api(self, now: float) -> dict[str, Any]:
        """The silence as the API returns it, with its state at `now`."""
        d = self.to_dict()
        d["state"] = "active" if self.active(now) else ("pending" if now < self.starts_at else "expired")
        return d


class Silences:
    """The silences, kept in memory and in the store so that they survive a restart."""

    def __init__(self, store: Any, alert_names: Iterable[str] = (), max_silences: int = 1000):
        self.store = store
        self.alert_names = frozenset(alert_names)
        self.max_silences = max_silences
        self._lock = threading.Lock()
        self._by_id: dict[int, Silence] = {}
        for row in store.load_silences():
            s = Silence(**row)
            self._by_id[s.id] = s
        self._ids = itertools.count(store.max_silence_id() + 1)
        self._prune(time.time())

    def _prune(self, now: float) -> None:
        """Keep at most max_silences ended silences in memory, the newest (the store keeps them all)."""
        ended = sorted((s.id for s in self._by_id.values() if s.ends_at <= now))
        for sid in ended[:max(0, len(ended) - self.max_silences)]:
            del self._by_id[sid]

    def create(self, body: Mapping[str, Any], now: float | None = None) -> Silence:
        """Validate a request ({run, alert, duration_seconds | ends_at, comment, created_by}) and store it."""
        now = time.time() if now is None else now
        if not isinstance(body, Mapping):
            raise SilenceError("body: expected a JSON object")
        unknown = set(body) - {"run", "alert", "duration_seconds", "ends_at", "comment", "created_by"}
        if unknown:
            key = sorted(unknown)[0]
            # The key is the client's own text: shown as is only when it is a plain name.
            shown = key if re.fullmatch(r"\w{1,64}", key) else repr(key[:64])
            raise SilenceError(f"{shown}: unknown field; known: run, alert, duration_seconds, ends_at, "
                               "comment, created_by")
        if "run" not in body and "alert" not in body:
            raise SilenceError("run: missing; name the run (or \"*\" for every run) and/or the alert (or \"*\"): "
                               "a silence of everything must say so")
        run = body.get("run", "*")
        if not isinstance(run, str) or not (run == "*" or _RUN_ID.match(run)):
            raise SilenceError(f"run: must be a run id (1-128 characters of [A-Za-z0-9._:/-]) or \"*\", got {run!r}")
        alert = body.get("alert", "*")
        if not isinstance(alert, str) or not (alert == "*" or alert in self.alert_names or not self.alert_names):
            raise SilenceError(f"alert: must be an alert name or \"*\", got {alert!r}; known: "
                               f"{', '.join(sorted(self.alert_names))}")
        has_d, has_e = body.get("duration_seconds") is not None, body.get("ends_at") is not None
        if not has_d and not has_e:
            raise SilenceError("duration_seconds: missing; give either duration_seconds or ends_at (Unix seconds)")
        if has_d and has_e:
            raise SilenceError("duration_seconds: give either duration_seconds or ends_at (Unix seconds), not both")
        if has_d:
            d = body["duration_seconds"]
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
                raise SilenceError(f"duration_seconds: must be a positive number, got {d!r}")
            ends = now + float(d)
        else:
            ends = body["ends_at"]
            if isinstance(ends, bool) or not isinstance(ends, (int, float)) or not math.isfinite(ends):
                raise SilenceError(f"ends_at: must be Unix seconds, got {ends!r}")
            if ends <= now:
                raise SilenceError(f"ends_at: {ends} is in the past (now is {now:.0f})")
            ends = float(ends)
        if ends - now > MAX_SILENCE_SECONDS:
            raise SilenceError(f"duration_seconds: at most {MAX_SILENCE_SECONDS / 86400:.0f} days; to turn an alert "
                               "off for good, set [detectors.<Name>] enabled = false")
        comment = body.get("comment", "")
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
            raise SilenceError(f"comment: must be text of at most {MAX_COMMENT} characters")
        by = body.get("created_by", "")
        if not isinstance(by, str) or len(by) > MAX_CREATED_BY or not _CREATED_BY.match(by):
            raise SilenceError(f"created_by: must be a name of at most {MAX_CREATED_BY} letters, digits, spaces "
                               "and . @ + : / \\ - _")
        with self._lock:
            live = sum(1 for x in self._by_id.values() if x.ends_at > now)
            if live >= self.max_silences:
                raise SilenceError(f"silences: {live} silences are in force or waiting to start, the limit is "
                                   f"{self.max_silences} (max_silences); end some first")
            self._prune(now)
            s = Silence(next(self._ids), run, alert, now, ends, comment, by, now)
            self._by_id[s.id] = s
            self.store.put_silence(s.to_dict())
        # Durable before the caller is told the id: a silence that vanishes on restart pages someone.
        self.store.flush(10.0)
        return s

    def expire(self, silence_id: int, now: float | None = None) -> Silence | None:
        """End a silence now (None if there is no such silence); ending an ended one changes nothing."""
        now = time.time() if now is None else now
        with self._lock:
            s = self._by_id.get(silence_id)
            if s is None:
                return None
            if s.ends_at > now:
                s.ends_at = max(now, s.starts_at)
                self.store.put_silence(s.to_dict())
        self.store.flush(10.0)
        return s

    def get(self, silence_id: int) -> Silence | None:
        """One silence by id."""
        with self._lock:
            return self._by_id.get(silence_id)

    def list(self, state: str = "active", now: float | None = None) -> list[Silence]:
        """Silences in `state` (active, expired or all), newest first."""
        now = time.time() if now is None else now
        with self._lock:
            out = list(self._by_id.values())
        if state == "active":
            out = [s for s in out if s.active(now)]
        elif state == "expired":
            out = [s for s in out if s.ends_at <= now]
        return sorted(out, key=lambda s: s.id, reverse=True)

    def matching(self, run: str, name: str, now: float | None = None) -> Silence | None:
        """The active silence covering alert `name` of `run`, if any."""
        now = time.time() if now is None else now
        with self._lock:
            for s in self._by_id.values():
                if s.active(now) and s.matches(run, name):
                    return s
        return None

    def active_count(self, now: float | None = None) -> int:
        """How many silences hold now."""
        now = time.time() if now is None else now
        with self._lock:
            return sum(1 for s in self._by_id.values() if s.active(now))


# -------------------------------------------------------------------------------------------------
# the manager


@dataclass
class _Track:
    """Lifecycle bookkeeping of a pending or firing alert (persisted with it)."""

    alert: Alert
    since_step: int | None  # the step the condition began at (pending)
    warm: bool  # subject to the warm-up
    clear_t: float | None = None  # event time the condition ended, while the hold runs
    clear_step: int | None = None
    clear_summary: str = ""
    announced: bool = False  # notifiers were told it fires

    def lifecycle(self) -> dict[str, Any]:
        return {"since_step": self.since_step, "warm": self.warm, "clear_t": self.clear_t,
                "clear_step": self.clear_step, "clear_summary": self.clear_summary, "announced": self.announced}


class AlertManager:
    """Turns findings into alerts: lifecycle, dedup per run and name, silences; stores and announces each change.

    Every change is stored and handed to the notifiers under one lock, so they see the changes of an
    alert in the order they happened; notifiers only queue (delivery is on their own threads).
    """

    def __init__(self, store: Any, notifiers: Iterable[Any], runbook_url: str | None = DEFAULT_RUNBOOK_URL,
                 rules: AlertRules | None = None, silences: Silences | None = None):
        self.store = store
        self.notifiers = list(notifiers)
        self.runbook_url = runbook_url
        self.rules = rules or AlertRules()
        self.silences = silences
        self._lock = threading.RLock()
        self._active: dict[tuple[str, str], _Track] = {}  # pending and firing
        self._by_run: dict[str, collections.deque[Alert]] = {}
        self._pos: dict[str, tuple[float, int | None]] = {}  # run -> (event time, step) seen so far
        self.fired_total: dict[tuple[str, str], int] = {}
        self._severity: dict[tuple[str, str], str] = {}
        self._ids = itertools.count(1)

    # -- restart -----------------------------------------------------------------------------------

    def restore(self, runs: Iterable[str]) -> None:
        """Load the alerts of live runs from the store, so none of them fires a second time."""
        self._ids = itertools.count(self.store.max_alert_id() + 1)
        with self._lock:
            for run in runs:
                rows = self.store.load_alerts(run=run, limit=MAX_ALERTS_PER_RUN)
                dq = self._by_run.setdefault(run, collections.deque(maxlen=MAX_ALERTS_PER_RUN))
                for row in reversed(rows):  # oldest first
                    a = Alert.from_dict(row)
                    dq.append(a)
                    key = (run, a.name)
                    self._severity[key] = a.severity
                    if a.state != "pending":
                        self.fired_total[key] = self.fired_total.get(key, 0) + 1
                    if a.state in ("pending", "firing"):
                        lc = row.get("lifecycle") or {}
                        tr = _Track(a, lc.get("since_step", a.step), bool(lc.get("warm", False)),
                                    lc.get("clear_t"), lc.get("clear_step"), lc.get("clear_summary", ""),
                                    # Stored before lifecycles were: it fired, so it was announced.
                                    bool(lc.get("announced", a.state == "firing")))
                        self._active[key] = tr

    # -- findings ------------------------------------------------------------------------------------

    def apply(self, run: str, findings: Iterable[Finding], notify: bool = True, replayed: bool = False) -> list[Alert]:
        """Apply detector findings for `run`; return the alerts that changed.

        `replayed`: the findings come from evidence applied again after a restart (batches stored after
        the detectors' state was saved). A fire whose evidence is not newer than an alert of the same
        name already kept for the run is that alert, found a second time: it is skipped, so that an
        alert that fired (and perhaps resolved) before the restart does not fire again.
        """
        changed: list[Alert] = []
        now = time.time()
        with self._lock:
            for f in findings:
                if replayed and f.action == "fire" and self._seen(run, f):
                    continue
                self._observe(run, f.t, f.step)
                # Due promotions and resolutions happen before this evidence is taken into account.
                self._evaluate(run, f.t, f.step, now, notify, changed)
                key = (run, f.alert)
                tr = self._active.get(key)
                if f.action == "fire" and tr is not None and \
                        _SEVERITY_ORDER.get(f.severity, 0) > _SEVERITY_ORDER.get(tr.alert.severity, 0):
                    # An escalation (an info outlier that turned into a page) ends the lesser alert at once,
                    # hold or not, and starts one at the new severity: severity is part of an alert's
                    # identity for Alertmanager, and a held resolve must not swallow the page.
                    if tr.alert.state == "pending":
                        self._drop(tr, changed)
                    else:
                        tr.clear_t = f.t
                        tr.clear_summary = tr.clear_summary or f"escalated to {f.severity}"
                        self._resolve(tr, now, notify, changed)
                    tr = None
                if f.action == "fire":
                    if tr is None:
                        self._start(run, f, now, notify, changed)
                    elif tr.clear_t is not None:
                        # The condition came back while the resolve was held: one alert, no flap.
                        tr.clear_t = tr.clear_step = None
                        tr.clear_summary = ""
                        self._put(tr)
                elif f.action == "resolve" and tr is not None:
                    if tr.alert.state == "pending":
                        self._drop(tr, changed)
                    elif tr.clear_t is None:
                        tr.clear_t = f.t
                        tr.clear_step = f.step
                        tr.clear_summary = f.summary
                        self._put(tr)
                        self._evaluate(run, f.t, f.step, now, notify, changed)
        return changed

    def advance(self, run: str, t: float, step: int | None, notify: bool = True) -> list[Alert]:
        """Move the run's event clock to `t` and `step`: fire pending alerts and resolve held ones that are due."""
        changed: list[Alert] = []
        with self._lock:
            self._observe(run, t, step)
            t, step = self._pos[run]
            self._evaluate(run, t, step, time.time(), notify, changed)
        return changed

    def sweep(self, now: float | None = None) -> list[Alert]:
        """Announce firing alerts whose silence ended; hand the resendable set to notifiers that resend."""
        now = time.time() if now is None else now
        announced = []
        with self._lock:
            live = []
            for tr in self._active.values():
                a = tr.alert
                if a.state != "firing" or self._silenced(a, now):
                    continue
                if not tr.announced:
                    tr.announced = True
                    self._put(tr)
                    self._notify(a, "firing")
                    announced.append(a)
                live.append(a)
            for n in self.notifiers:
                sync = getattr(n, "sync", None)
                if sync is not None:
                    try:
                        sync(live)
                    except Exception as e:  # noqa: BLE001 - a notifier must never break the daemon
                        log.error("notifier %s failed: %s", getattr(n, "name", type(n).__name__), e)
        return announced

    def resolve_run(self, run: str, t: float, reason: str) -> None:
        """Resolve every firing alert of a run at once, hold or not, and drop its pending ones (the run expired)."""
        changed: list[Alert] = []
        now = time.time()
        with self._lock:
            for key in [k for k in self._active if k[0] == run]:
                tr = self._active[key]
                if tr.alert.state == "pending":
                    self._drop(tr, changed)
                else:
                    if tr.clear_t is None:
                        tr.clear_t, tr.clear_summary = t, reason
                    self._resolve(tr, now, True, changed)

    def forget_run(self, run: str) -> None:
        """Drop a run's alerts from memory (they stay in the store)."""
        with self._lock:
            self._by_run.pop(run, None)
            self._pos.pop(run, None)
            for d in (self._active, self.fired_total, self._severity):
                for key in [k for k in d if k[0] == run]:
                    del d[key]

    # -- queries -------------------------------------------------------------------------------------

    def alerts(self, run: str | None = None, state: str | None = None) -> list[Alert]:
        """Alerts of live runs, newest first: `state` None means every alert that fired (pending ones excluded)."""
        with self._lock:
            runs = [run] if run is not None else list(self._by_run)
            out = [a for r in runs for a in self._by_run.get(r, ())]
        if state is None:
            out = [a for a in out if a.state != "pending"]
        else:
            out = [a for a in out if a.state == state]
        out.sort(key=lambda a: a.id, reverse=True)
        return out

    def is_silenced(self, alert: Alert, now: float | None = None) -> bool:
        """Whether an active silence covers this pending or firing alert."""
        return alert.state != "resolved" and self._silenced(alert, time.time() if now is None else now)

    def to_api(self, alert: Alert, now: float | None = None) -> dict[str, Any]:
        """The alert as the API returns it, with `silenced`."""
        return alert.to_api(self.is_silenced(alert, now))

    def active(self) -> list[Alert]:
        """Firing alerts (silenced ones included; pending ones not)."""
        with self._lock:
            return [tr.alert for tr in self._active.values() if tr.alert.state == "firing"]

    def pending(self) -> list[Alert]:
        """Alerts waiting for their `for` or the end of the warm-up."""
        with self._lock:
            return [tr.alert for tr in self._active.values() if tr.alert.state == "pending"]

    def known(self) -> list[tuple[str, str, str, bool, int]]:
        """(run, name, severity, firing, fired_total) for each alert name a live run has fired."""
        with self._lock:
            out = []
            for key, count in self.fired_total.items():
                tr = self._active.get(key)
                firing = tr is not None and tr.alert.state == "firing"
                out.append((key[0], key[1], self._severity.get(key, "warning"), firing, count))
            return out

    # -- internals (caller holds the lock) -------------------------------------------------------------

    def _silenced(self, a: Alert, now: float) -> bool:
        return self.silences is not None and self.silences.matching(a.run, a.name, now) is not None

    def _seen(self, run: str, f: Finding) -> bool:
        """Whether an alert named as `f` that started from evidence at or after f.t is kept for `run`."""
        return any(a.name == f.alert and a.started_at >= f.t for a in self._by_run.get(run, ()))

    def _observe(self, run: str, t: float, step: int | None) -> None:
        pt, ps = self._pos.get(run, (t, step))
        if step is not None and (ps is None or step > ps):
            ps = step
        self._pos[run] = (max(pt, t), ps)

    def _start(self, run: str, f: Finding, now: float, notify: bool, changed: list[Alert]) -> None:
        labels = {str(k): str(v) for k, v in f.labels.items()}
        for extra in ("baseline", "threshold"):  # numbers a detector may carry beside its value
            v = getattr(f, extra, None)
            if v is not None:
                labels.setdefault(extra, f"{v:.6g}" if isinstance(v, float) else str(v))
        if self.runbook_url:
            labels.setdefault("runbook_url", self.runbook_url.format(
                alert=f.alert, run=urllib.parse.quote(run, safe="")))
        rule = self.rules.rule(f.alert)
        # Step settings (for_steps, keep_firing_for_steps, warm-up) apply to findings with a step only:
        # a stall or a lost rank is about steps not coming, so counting steps would hold it forever,
        # and a job that hangs in its first steps must still page.
        warm = rule.warmup_steps > 0 and f.step is not None and f.alert not in NEVER_WARMED_UP
        a = Alert(next(self._ids), run, f.alert, f.severity, "pending", f.rank, f.step, f.t, None, f.summary,
                  f.description, f.value, labels)
        tr = _Track(a, f.step, warm)
        key = (run, f.alert)
        self._active[key] = tr
        self._severity[key] = a.severity
        self._by_run.setdefault(run, collections.deque(maxlen=MAX_ALERTS_PER_RUN)).append(a)
        if self._due_to_fire(tr, rule, f.t, f.step):
            self._fire(tr, now, notify, changed)
        else:
            self._put(tr)
            changed.append(a)
            log.info("PENDING %s [%s] run %s step %s: %s", a.name, a.severity, run, a.step, a.summary)

    def _evaluate(self, run: str, t: float, step: int | None, now: float, notify: bool,
                  changed: list[Alert]) -> None:
        for key in [k for k in self._active if k[0] == run]:
            tr = self._active[key]
            rule = self.rules.rule(tr.alert.name)
            if tr.alert.state == "pending":
                if self._due_to_fire(tr, rule, t, step):
                    self._fire(tr, now, notify, changed)
            elif tr.clear_t is not None and self._due_to_resolve(tr, rule, t, step):
                self._resolve(tr, now, notify, changed)

    @staticmethod
    def _due_to_fire(tr: _Track, rule: AlertRule, t: float, step: int | None) -> bool:
        a = tr.alert
        if t < a.started_at + rule.for_seconds:
            return False
        if rule.for_steps and tr.since_step is not None and (step is None or step < tr.since_step + rule.for_steps):
            return False
        if tr.warm and (step is None or step < rule.warmup_steps):
            return False
        return True

    @staticmethod
    def _due_to_resolve(tr: _Track, rule: AlertRule, t: float, step: int | None) -> bool:
        assert tr.clear_t is not None
        if t < tr.clear_t + rule.keep_firing_for_seconds:
            return False
        if rule.keep_firing_for_steps and tr.clear_step is not None and \
                (step is None or step < tr.clear_step + rule.keep_firing_for_steps):
            return False
        return True

    def _fire(self, tr: _Track, now: float, notify: bool, changed: list[Alert]) -> None:
        a = tr.alert
        a.state = "firing"
        key = (a.run, a.name)
        self.fired_total[key] = self.fired_total.get(key, 0) + 1
        silence = self.silences.matching(a.run, a.name, now) if self.silences is not None else None
        if silence is None and notify:
            tr.announced = True
            self._notify(a, "firing")
        elif silence is not None:
            log.info("FIRING %s [%s] run %s step %s (silenced by silence %d, not notified): %s", a.name, a.severity,
                     a.run, a.step, silence.id, a.summary)
        elif not notify:
            tr.announced = True  # replayed on restore: it was announced before
        self._put(tr)
        if a not in changed:
            changed.append(a)

    def _resolve(self, tr: _Track, now: float, notify: bool, changed: list[Alert]) -> None:
        a = tr.alert
        a.state = "resolved"
        a.resolved_at = tr.clear_t
        if tr.clear_summary:
            a.labels["resolution"] = tr.clear_summary
        del self._active[(a.run, a.name)]
        self.store.put_alert({**a.to_dict(), "lifecycle": None})
        if tr.announced and notify and not self._silenced(a, now):
            self._notify(a, "resolved")
        if a not in changed:
            changed.append(a)

    def _drop(self, tr: _Track, changed: list[Alert]) -> None:
        """A pending alert whose condition ended before it was due: it never fired, so it leaves no trace."""
        a = tr.alert
        del self._active[(a.run, a.name)]
        dq = self._by_run.get(a.run)
        if dq is not None and a in dq:
            dq.remove(a)
        self.store.delete_alert(a.id)
        log.info("CLEARED %s run %s while pending (step %s)", a.name, a.run, a.step)
        if a in changed:
            changed.remove(a)

    def _put(self, tr: _Track) -> None:
        self.store.put_alert({**tr.alert.to_dict(), "lifecycle": tr.lifecycle()})

    def _notify(self, a: Alert, event: str) -> None:
        for n in self.notifiers:
            try:
                n.notify(a, event)
            except Exception as e:  # noqa: BLE001 - a notifier must never break ingest
                log.error("notifier %s failed: %s", getattr(n, "name", type(n).__name__), e)
