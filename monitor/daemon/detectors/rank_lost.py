"""RankLost: a rank's records, heartbeats included, stop while other ranks go on. Critical."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._timing import Heard, finite, ints, name_ranks, num
from monitor.daemon.detectors.base import Detector, Finding


class RankLost(Detector):
    """Fires when a rank has sent nothing for `lost_after_s` event seconds while another rank still reports.

    Every client sends a heartbeat each second from its own thread, even while the training
    thread is blocked, so a rank that falls silent for 30 of them has lost its process, its host
    or its network; the rest of the job is usually hung in a collective waiting for it. Silence is
    measured on the run's event clock by `Heard`, so a host whose clock is off cannot fake it. It
    works from `tick` alone (one pass over the ranks per `scan_every_s` of event time, no per-record
    cost) and resolves when every lost rank reports again or has ended.
    """

    name = "RankLost"
    severity = "critical"
    kinds: ClassVar[frozenset[str]] = frozenset()
    ranks = "all"
    defaults: ClassVar[Mapping[str, Any]] = {
        # 30 s: thirty missed 1-s heartbeats (the client's default interval), and the daemon's
        # own `rank_silent_after`; the client's send retries back off at most 5 s, so a live rank
        # behind a slow network is never this late. Detection lands 30-32 s after the last record,
        # inside the 35 s target.
        "lost_after_s": 30.0,
        # One pass over the ranks per event second: O(world size) once a second, not per record.
        "scan_every_s": 1.0,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        self.lost_after = float(self.config["lost_after_s"])
        self.scan_every = float(self.config["scan_every_s"])
        self.heard = Heard()
        self.next_scan = -math.inf
        self.firing = False
        self.lost: list[int] = []
        self.worst = 0.0  # longest silence among running ranks at the last scan

    def tick(self, now: float, run: Any) -> list[Finding]:
        if now < self.next_scan:
            return []
        self.next_scan = now + self.scan_every
        ranks = run.ranks
        heard = self.heard
        heard.scan(ranks, now)
        at = heard.at
        lost = []
        alive = 0
        worst = 0.0
        for r, rs in ranks.items():
            if rs.status is not None:  # sent `end`: gone on purpose
                continue
            quiet = now - at.get(r, now)
            if quiet >= self.lost_after:
                lost.append(r)
            else:
                alive += 1
            if quiet > worst:
                worst = quiet
        self.worst = worst
        if not self.firing:
            if lost and alive:
                return [self._fire(now, run, lost, alive)]
            return []
        still = [r for r in self.lost
                 if r in ranks and ranks[r].status is None and now - at.get(r, now) >= self.lost_after]
        if not still:
            self.firing = False
            back = self.lost
            self.lost = []
            return [Finding(alert=self.name, action="resolve", t=now,
                            summary=f"rank(s) {name_ranks(back)} reporting again or ended")]
        self.lost = still
        return []

    def _fire(self, now: float, run: Any, lost: list[int], alive: int) -> Finding:
        self.firing = True
        self.lost = sorted(lost)[:1024]
        at = self.heard.at
        quiet = max(now - at.get(r, now) for r in lost)
        steps = [run.ranks[r].last_step for r in lost if run.ranks[r].last_step is not None]
        last_step = max(steps) if steps else None
        who = f"rank {lost[0]}" if len(lost) == 1 else f"{len(lost)} ranks ({name_ranks(lost)})"
        at_step = f", last step {last_step}" if last_step is not None else ""
        return Finding(
            alert=self.name, action="fire", t=now, severity=self.severity, step=None,
            rank=lost[0] if len(lost) == 1 else None, value=quiet,
            summary=f"{who} silent for {quiet:.0f} s{at_step}; {alive} rank(s) still reporting",
            description=(f"No record, not even a heartbeat, has come from {who} for {quiet:.0f} s of event time "
                         f"while {alive} other rank(s) kept reporting. The process, its host or its network is "
                         "gone; the other ranks are probably blocked in a collective waiting for it. Check the "
                         "host and the job's logs, then restart from the last checkpoint."),
            labels={"ranks": name_ranks(lost), "lost": str(len(lost))},
        )

    def statistic(self) -> float | None:
        return self.worst

    def state(self) -> dict[str, Any]:
        # The lost ranks' last record times travel too, so that after a restart they still count
        # as silent (and are not resolved and paged again).
        h = self.heard
        seen = [[r, h.last_t[r], h.at[r]] for r in self.lost[:1024] if r in h.at]
        return {"firing": self.firing, "lost": self.lost[:1024], "worst": self.worst, "seen": seen}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.firing = bool(state.get("firing", False))
        self.lost = ints(state.get("lost"), 1024)
        self.worst = num(state, "worst", 0.0)
        if self.firing and not self.lost:
            self.firing = False
        seen = state.get("seen")
        for row in seen[:1024] if isinstance(seen, list) else ():
            if (isinstance(row, (list, tuple)) and len(row) == 3 and isinstance(row[0], int)
                    and finite(row[1]) is not None and finite(row[2]) is not None):
                self.heard.last_t[row[0]] = float(row[1])
                self.heard.at[row[0]] = float(row[2])
