"""TrainingStalled: the ranks are alive (heartbeats keep coming) but no rank finishes a step. Critical."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._timing import Heard, median, name_ranks, num
from monitor.daemon.detectors.base import Detector, Finding


class TrainingStalled(Detector):
    """Fires when the run's largest finished step has not moved for the stall threshold of event time.

    The threshold is the largest of `min_stall_s`, `step_factor` times the median step time, and
    `pause_factor` times the longest pause the run already came back from (a periodic checkpoint
    that takes a minute is not a hang the second time). Progress is read from each rank's last
    train step and heartbeat step, so a rank that logs every tenth step still shows it is moving.
    Nothing is judged before the first step after the detector started (compilation, data
    download), nor after the run ended. When a rank has also gone silent the page belongs to
    RankLost, so this one waits. Runs from `tick` only: O(1) per scan while the lead rank moves,
    one pass over the ranks per scan while it does not.
    """

    name = "TrainingStalled"
    severity = "critical"
    kinds: ClassVar[frozenset[str]] = frozenset()
    ranks = "all"
    defaults: ClassVar[Mapping[str, Any]] = {
        # 30 s: beyond any healthy gap between steps in the labelled traces (longest: 10.8 s, a
        # recompilation in a modded-nanogpt record) and short enough to page within 35 s.
        "min_stall_s": 30.0,
        # 10 x the median step time: a slow model (a 100 s step, as in BLOOM-176B) is not stalled
        # after 30 s; ten steps' worth of no progress is far outside step-time noise (p99/median
        # is under 10 in every healthy trace).
        "step_factor": 10.0,
        # 1.5 x the longest pause already survived (a checkpoint save, a long eval); capped so that
        # one very long pause cannot blind the detector for the rest of the run.
        "pause_factor": 1.5,
        "max_learned_pause_s": 900.0,
        # A rank not heard from for this long makes the stall RankLost's page (half its 30 s).
        "silent_after_s": 15.0,
        "scan_every_s": 1.0,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.min_stall = float(c["min_stall_s"])
        self.step_factor = float(c["step_factor"])
        self.pause_factor = float(c["pause_factor"])
        self.max_pause = float(c["max_learned_pause_s"])
        self.silent_after = float(c["silent_after_s"])
        self.scan_every = float(c["scan_every_s"])
        self.heard = Heard()
        self.next_scan = -math.inf
        self.lead_step: int | None = None  # the lead rank's finished step at the last scan
        self.scan_max: int | None = None  # the largest finished step at the last pass over the ranks
        self.progress: int | None = None  # the run's largest finished step
        self.progress_t: float | None = None  # event time it was first seen
        self.armed = False  # the step moved at least once since the detector started
        self.longest_pause = 0.0
        self.firing = False
        self.gap = 0.0

    @staticmethod
    def _step(rs: Any) -> int | None:
        a, b = rs.last_step, rs.heartbeat_step
        if a is None:
            return b
        return a if b is None or a >= b else b

    def tick(self, now: float, run: Any) -> list[Finding]:
        if now < self.next_scan:
            return []
        self.next_scan = now + self.scan_every
        ranks = run.ranks
        if not ranks:
            return []
        # Progress is any change of a rank's finished step (a restart from a checkpoint goes back).
        # The lead rank is checked first, so a moving run costs O(1) per scan.
        lead = ranks.get(run.lead) if run.lead is not None else None
        moved = False
        s = self._step(lead) if lead is not None else None
        if s is not None and s != self.lead_step:
            moved = self.lead_step is not None
            self.lead_step = s
            self.scan_max = None
        if not moved:
            # The lead did not move: one pass over the ranks, for progress elsewhere and for who is
            # still heard from (a silent rank makes this RankLost's page).
            self.heard.scan(ranks, now)
            best = None
            for rs in ranks.values():
                v = self._step(rs)
                if v is not None and (best is None or v > best):
                    best = v
            if best is not None:
                if self.scan_max is not None and best != self.scan_max:
                    moved = True
                self.scan_max = best
                if self.progress is None:
                    self.progress = best
                    self.progress_t = now
        if moved:
            self._advance(now, s)
            if self.firing:
                self.firing = False
                return [Finding(alert=self.name, action="resolve", t=now,
                                summary=f"step {self.progress} finished after {self.gap:.0f} s")]
            return []
        if self.progress_t is None or not self.armed:
            return []
        self.gap = gap = now - self.progress_t
        if self.firing:
            if run.status != "running":
                self.firing = False
                return [Finding(alert=self.name, action="resolve", t=now, summary=f"run {run.status}")]
            return []
        if gap < self.min_stall or run.status != "running":
            return []
        limit = self._limit(run)
        if gap < limit:
            return []
        running = [r for r, rs in ranks.items() if rs.status is None]
        if not running or any(self.heard.silent_for(r, now) >= self.silent_after for r in running):
            return []
        return [self._fire(now, run, gap, limit, running)]

    def _advance(self, now: float, lead_step: int | None) -> None:
        if self.progress_t is not None:
            self.armed = True
            pause = now - self.progress_t
            if pause > self.longest_pause:
                self.longest_pause = min(pause, self.max_pause)
        best = self.scan_max
        self.progress = best if lead_step is None or (best is not None and best > lead_step) else lead_step
        self.progress_t = now

    def _limit(self, run: Any) -> float:
        limit = self.min_stall
        lead = run.ranks.get(run.lead) if run.lead is not None else None
        if lead is not None:
            w = lead.windows.get("step_time_seconds")
            if w is not None and len(w):
                vs = [v for v in w.values()[-128:] if v == v and 0.0 < v < math.inf]
                if vs:
                    limit = max(limit, self.step_factor * median(vs))
        return max(limit, self.pause_factor * self.longest_pause)

    def _fire(self, now: float, run: Any, gap: float, limit: float, running: list[int]) -> Finding:
        self.firing = True
        ranks = run.ranks
        steps = {r: self._step(ranks[r]) for r in running}
        known = [s for s in steps.values() if s is not None]
        low = min(known) if known else None
        behind = sorted(r for r, s in steps.items() if s is not None and low is not None and s == low
                        and (max(known) > low))
        if behind:
            who = f"rank {behind[0]} is" if len(behind) == 1 else f"ranks {name_ranks(behind)} are"
            cause = f"; {who} one step behind the others"
        else:
            cause = f"; all {len(running)} running rank(s) are at step {self.progress}"
        labels = {"ranks_alive": str(len(running)), "threshold_s": f"{limit:.0f}"}
        if behind:
            labels["ranks_behind"] = name_ranks(behind)
        return Finding(
            alert=self.name, action="fire", t=now, severity=self.severity, step=None,
            rank=behind[0] if len(behind) == 1 else None, value=gap,
            summary=(f"no step finished for {gap:.0f} s (threshold {limit:.0f} s), stuck after step "
                     f"{self.progress}{cause}"),
            description=(f"Every running rank still sends heartbeats, but the run's last finished step has been "
                         f"{self.progress} for {gap:.0f} s of event time (threshold {limit:.0f} s: the largest of "
                         f"{self.min_stall:.0f} s, {self.step_factor:g} median step times and "
                         f"{self.pause_factor:g}x the longest pause the run came back from). Usually a hung "
                         "collective (NCCL), a deadlock in the data loader, or a blocked filesystem; take stack "
                         "traces of the ranks (py-spy dump) before restarting."),
            labels=labels,
        )

    def statistic(self) -> float | None:
        return self.gap

    def state(self) -> dict[str, Any]:
        return {"progress": self.progress, "progress_t": self.progress_t, "armed": self.armed,
                "longest_pause": self.longest_pause, "firing": self.firing, "gap": self.gap}

    def restore(self, state: Mapping[str, Any]) -> None:
        p = state.get("progress")
        self.progress = p if isinstance(p, int) and not isinstance(p, bool) else None
        pt = num(state, "progress_t", math.nan)
        self.progress_t = pt if self.progress is not None and math.isfinite(pt) else None
        self.armed = bool(state.get("armed", False)) and self.progress_t is not None
        self.longest_pause = min(max(num(state, "longest_pause", 0.0), 0.0), self.max_pause)
        self.firing = bool(state.get("firing", False)) and self.progress_t is not None
        self.gap = num(state, "gap", 0.0)
