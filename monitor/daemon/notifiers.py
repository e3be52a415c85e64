"""Where alerts go when they fire or resolve: the daemon's log, Alertmanager, and generic JSON webhooks.

The log notifier is always on. Each network notifier has its own bounded queue and thread, so a slow
or unreachable receiver never holds up ingest: `notify` only queues. Delivery is retried with
exponential backoff; every notification ends up counted as sent, failed (gave up after retries, or
refused by the receiver) or dropped (the queue was full, or the daemon shut down before it could
be sent), and each failure is logged.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

from monitor import __version__

log = logging.getLogger("trainguard.alerts")
MAX_BACKOFF = 30.0  # seconds between attempts at most: a receiver back after an outage hears within that
_LABEL_NAME = re.compile(r"[^A-Za-z0-9_]")


class Notifier(Protocol):
    """Receives alert transitions; must not block (queue and deliver on its own thread)."""

    def notify(self, alert: Any, event: str) -> None:
        """`event` is "firing" or "resolved"."""


class LogNotifier:
    """Writes each transition to the daemon's log."""

    name = "log"

    def notify(self, alert: Any, event: str) -> None:
        """Log one transition."""
        level = logging.WARNING if event == "firing" else logging.INFO
        where = f" rank {alert.rank}" if alert.rank is not None else ""
        step = f" step {alert.step}" if alert.step is not None else ""
        log.log(level, "%s %s [%s] run %s%s%s: %s", "FIRING" if event == "firing" else "RESOLVED",
                alert.name, alert.severity, alert.run, where, step, alert.summary)


class DeliveryError(Exception):
    """A delivery attempt failed; `retry` says whether another attempt may succeed."""

    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


@dataclass
class _Item:
    """One queued delivery: `count` notifications in one request body."""

    count: int
    payload: Any
    resend: bool = False


def post_json(url: str, body: Any, timeout: float) -> None:
    """POST `body` as JSON; raise DeliveryError (retry on connection errors, timeouts, 429 and 5xx)."""
    data = json.dumps(body, allow_nan=False).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"trainguard/{__version__}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
    except urllib.error.HTTPError as e:
        detail = e.read(200).decode(errors="replace").strip()
        raise DeliveryError(f"HTTP {e.code} from {redact(url)}: {detail or e.reason}",
                            retry=e.code == 429 or e.code >= 500) from None
    except (urllib.error.URLError, OSError) as e:
        raise DeliveryError(f"cannot reach {redact(url)}: {getattr(e, 'reason', e)}") from None


def redact(url: str) -> str:
    """The URL without user:password, for logs."""
    p = urllib.parse.urlsplit(url)
    if p.username is None and p.password is None:
        return url
    host = p.hostname or ""
    netloc = f"{host}:{p.port}" if p.port else host
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))


def check_url(url: Any, setting: str) -> str:
    """Return `url` if it is an http(s) URL with a host; raise ValueError naming `setting` otherwise."""
    if not isinstance(url, str):
        raise ValueError(f"{setting}: expected a URL string, got {url!r}")
    p = urllib.parse.urlsplit(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise ValueError(f"{setting}: {url!r} is not an http:// or https:// URL")
    return url


class QueuedNotifier:
    """Base of network notifiers: a bounded queue, one delivery thread, retries with backoff, counters."""

    kind = "queued"

    def __init__(self, name: str, url: str, queue_size: int = 1000, timeout: float = 5.0, max_attempts: int = 8,
                 backoff: float = 0.5):
        self.name = name
        self.url = url
        self.queue_size = queue_size
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.retries = 0
        self._q: collections.deque[_Item] = collections.deque()
        self._depth = 0  # notifications in the queue (an item may carry several)
        self._drop_logged = (0.0, 0)  # (monotonic time, dropped count) of the last queue-full message
        self._cond = threading.Condition()
        self._busy = False
        self._closing = False
        self._deadline: float | None = None  # monotonic time after which a closing notifier stops trying
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the delivery thread (notifications queued before are delivered then)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"trainguard-notify-{self.name}", daemon=True)
            self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the queue is empty; True if everything was delivered (nothing failed or dropped meanwhile)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            lost = self.failed + self.dropped
            while self._q or self._busy:
                if self._thread is None or not self._thread.is_alive():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            return self.failed + self.dropped == lost

    def close(self, timeout: float = 10.0) -> bool:
        """Deliver what is queued within `timeout`, then stop; what is left is counted as dropped.

        Returns whether everything queued was delivered.
        """
        with self._cond:
            lost = self.failed + self.dropped
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + 1.0)
        with self._cond:
            left = self._depth
            self._q.clear()
            self._depth = 0
        if left:
            self.dropped += left
            log.error("notifier %s: %d notification(s) dropped at shutdown", self.name, left)
        return self.failed + self.dropped == lost

    @property
    def queue_depth(self) -> int:
        """Notifications waiting to be sent."""
        with self._cond:
            return self._depth

    # -- input -----------------------------------------------------------------------------------------

    def notify(self, alert: Any, event: str) -> None:
        """Queue one transition (never blocks)."""
        self._put(self._item(alert, event))

    def _item(self, alert: Any, event: str) -> _Item:
        raise NotImplementedError

    def _put(self, item: _Item) -> None:
        with self._cond:
            if self._closing:
                self.dropped += item.count
                return
            dropped = 0
            # Full: the oldest goes, as the newest says most about the alert's present state.
            while self._q and self._depth + item.count > self.queue_size:
                old = self._q.popleft()
                self._depth -= old.count
                dropped += old.count
            self._q.append(item)
            self._depth += item.count
            self.dropped += dropped
            self._cond.notify_all()
            # One line per 10 s at most: a storm against a hung receiver must not flood the log too.
            when, before = self._drop_logged
            since = self.dropped - before if dropped and time.monotonic() - when >= 10.0 else 0
            if since:
                self._drop_logged = (time.monotonic(), self.dropped)
        if since:
            log.error("notifier %s: queue full (%d waiting), %d notification(s) dropped since the last report",
                      self.name, self.queue_size, since)

    # -- delivery --------------------------------------------------------------------------------------

    def _deliver(self, item: _Item) -> None:
        """Send one item; raise DeliveryError on failure."""
        raise NotImplementedError

    def _idle_wait(self) -> float | None:
        """How long the thread may sleep with nothing queued (None: until woken)."""
        return None

    def _on_idle(self) -> None:
        """Called by the thread each time round, before it takes the next item (without the lock)."""

    def _loop(self) -> None:
        while True:
            self._on_idle()
            with self._cond:
                if not self._q:
                    if self._closing:
                        return  # drained
                    self._cond.wait(self._idle_wait())
                    continue
                item = self._q.popleft()
                self._depth -= item.count
                self._busy = True
            try:
                self._attempt(item)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            with self._cond:
                if self._closing and self._deadline is not None and time.monotonic() >= self._deadline:
                    return

    def _attempt(self, item: _Item) -> None:
        delay = self.backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                self._deliver(item)
            except DeliveryError as e:
                last = not e.retry or attempt >= self.max_attempts
                if not last:
                    with self._cond:
                        if self._closing and self._deadline is not None:
                            last = time.monotonic() + delay >= self._deadline
                if last:
                    self.failed += item.count
                    log.error("notifier %s: gave up on %d notification(s) after %d attempt(s): %s", self.name,
                              item.count, attempt, e)
                    return
                self.retries += 1
                log.warning("notifier %s: attempt %d failed (%s); retrying in %.1fs", self.name, attempt, e, delay)
                with self._cond:
                    # Woken early only by close(); then the deadline check above decides.
                    self._cond.wait_for(lambda: self._closing, timeout=delay)
                delay = min(delay * 2, MAX_BACKOFF)
            except Exception as e:  # noqa: BLE001 - the thread must survive any bug in a payload
                self.failed += item.count
                log.exception("notifier %s: could not send: %s", self.name, e)
                return
            else:
                self.sent += item.count
                return


class WebhookNotifier(QueuedNotifier):
    """POSTs each transition as JSON: the alert as the alerts API shows it, plus `event` (firing or resolved)."""

    kind = "webhook"

    def _item(self, alert: Any, event: str) -> _Item:
        body = alert.to_api() if hasattr(alert, "to_api") else dict(alert)
        body["event"] = event
        return _Item(1, body)

    def _deliver(self, item: _Item) -> None:
        post_json(self.url, item.payload, self.timeout)


def rfc3339(t: float) -> str:
    """Unix seconds as an RFC 3339 UTC timestamp with milliseconds."""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def alertmanager_alert(a: dict[str, Any], event: str, now: float, valid_for: float,
                       generator_url: str) -> dict[str, Any]:
    """One alert in Alertmanager's v2 `postableAlert` shape.

    Labels identify the alert to Alertmanager (so only the run, the name, the severity and the rank
    at fault); everything else, numbers included, goes into annotations, which Alertmanager replaces
    with the latest it received.
    """
    labels = {"alertname": a["name"], "run": a["run"], "severity": a["severity"]}
    if a.get("rank") is not None:
        labels["rank"] = str(a["rank"])
    ann = {_LABEL_NAME.sub("_", str(k)) or "_": str(v) for k, v in (a.get("labels") or {}).items()}
    for k in ("step", "value"):
        if a.get(k) is not None:
            ann[k] = str(a[k])
    ann["summary"] = a.get("summary") or f"{a['name']} in run {a['run']}"
    if a.get("description"):
        ann["description"] = a["description"]
    # Event time can run ahead of this machine's clock; Alertmanager refuses an end before the start.
    starts = min(float(a["started_at"]), now)
    ends = now + valid_for if event == "firing" else now
    return {"labels": labels, "annotations": ann, "startsAt": rfc3339(starts), "endsAt": rfc3339(max(ends, starts)),
            "generatorURL": generator_url}


class AlertmanagerNotifier(QueuedNotifier):
    """Pushes alerts to one Alertmanager through its v2 API (POST /api/v2/alerts).

    Alertmanager expects a client to keep sending what still fires: each firing alert carries an
    `endsAt` of `valid_for` ahead (4 resend intervals, as Prometheus does), and every
    `resend_interval` seconds all firing alerts are sent again. A resolved alert is sent once with
    `endsAt` = now, retried until it is delivered.
    """

    kind = "alertmanager"

    def __init__(self, name: str, url: str, resend_interval: float = 60.0, external_url: str = "", **kw: Any):
        base = url.rstrip("/")
        if not base.endswith("/api/v2/alerts"):
            base += "/api/v2/alerts"
        super().__init__(name, base, **kw)
        self.resend_interval = resend_interval
        self.valid_for = 4 * resend_interval
        self.external_url = external_url
        self._firing: dict[tuple[str, str], dict[str, Any]] = {}
        self._next_resend = time.monotonic() + resend_interval

    def _item(self, alert: Any, event: str) -> _Item:
        a = alert.to_api() if hasattr(alert, "to_api") else dict(alert)
        with self._cond:
            if event == "firing":
                self._firing[(a["run"], a["name"])] = a
            else:
                self._firing.pop((a["run"], a["name"]), None)
        return _Item(1, [(a, event)])

    def sync(self, alerts: Iterable[Any]) -> None:
        """Replace the set of alerts to keep re-sending (firing, announced, not silenced)."""
        snap = {}
        for alert in alerts:
            a = alert.to_api() if hasattr(alert, "to_api") else dict(alert)
            snap[(a["run"], a["name"])] = a
        with self._cond:
            self._firing = snap

    def _idle_wait(self) -> float | None:
        return max(0.01, self._next_resend - time.monotonic())

    def _on_idle(self) -> None:
        if self._closing or time.monotonic() < self._next_resend:
            return
        self._next_resend = time.monotonic() + self.resend_interval
        with self._cond:
            batch = [(a, "firing") for a in self._firing.values()]
            if not batch or any(it.resend for it in self._q):
                return
            # Queued under the same lock as the snapshot: a resolve that comes in between would
            # otherwise be queued first and then undone by this stale "firing".
            self._put(_Item(len(batch), batch, resend=True))

    def generator_url(self, a: dict[str, Any]) -> str:
        """The link back to this daemon's alerts of the run."""
        base = self.external_url.rstrip("/") if self.external_url else "http://localhost:9750"
        return f"{base}/api/v1/alerts?{urllib.parse.urlencode({'run': a['run']})}"

    def _deliver(self, item: _Item) -> None:
        now = time.time()
        body = [alertmanager_alert(a, event, now, self.valid_for, self.generator_url(a)) for a, event in item.payload]
        post_json(self.url, body, self.timeout)
