"""VanishingGradient: the global gradient norm collapses to (near) zero and stays there."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._robust import RollingMedian, fmt, safe_log, state_int as _int
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record


class VanishingGradient(Detector):
    """grad_norm below `collapse_ratio` times its trailing median (or below `zero`) for `patience` steps.

    The trailing median only learns from steps that are not collapsed, so a collapse that lasts
    is still judged against the level before it. Gradient norms that shrink gradually over a run
    (a decaying learning rate, a converging model) move the median with them and never trip it.
    """

    name = "VanishingGradient"
    severity = "warning"
    kinds = frozenset({"train"})
    ranks = "lead"
    defaults: ClassVar[Mapping[str, Any]] = {
        "window": 100,
        "min_points": 30,
        # 50x below the trailing median. On the healthy cpu runs the smallest single grad norm is
        # 0.125x its trailing median (cpu-replay-01), so 0.02 has 6x headroom before the 25-step
        # patience; a frozen or dead network sits at 0 or ~1e-6x.
        "collapse_ratio": 0.02,
        # A norm at or below this is zero whatever the history (no baseline needed).
        "zero": 1e-12,
        # 25 consecutive collapsed steps: a few near-zero steps happen when a loss scaler skips updates.
        "patience": 25,
        "resolve_steps": 10,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.win = RollingMedian(int(c["window"]), 1e-12)
        self.min_points = int(c["min_points"])
        self.log_ratio = math.log(max(min(float(c["collapse_ratio"]), 1.0), 1e-300))
        self.zero = float(c["zero"])
        self.patience = int(c["patience"])
        self.resolve_steps = int(c["resolve_steps"])
        self.low = 0
        self.ok = 0
        self.firing = False
        self.first_low: int | None = None
        self.last_ratio: float | None = None

    def update(self, rec: Record, run: Any) -> list[Finding]:
        g = rec.values.get("grad_norm")
        if g is None or not math.isfinite(g) or g < 0:
            return []
        win = self.win
        have_base = len(win) >= self.min_points
        med = win.median() if have_base else math.nan
        u = safe_log(g)
        collapsed = g <= self.zero or (have_base and u == u and u - med < self.log_ratio)
        self.last_ratio = math.exp(u - med) if have_base and u == u else (0.0 if g <= self.zero else None)
        if not collapsed:
            if u == u:
                win.push(u)
            self.low = 0
            self.first_low = None
            if self.firing:
                self.ok += 1
                if self.ok >= self.resolve_steps:
                    self.firing = False
                    self.ok = 0
                    return [Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step,
                                    summary=(f"grad_norm {fmt(g)} back for {self.resolve_steps} steps up to "
                                             f"step {rec.step}"))]
            return []
        self.ok = 0
        self.low += 1
        if self.first_low is None:
            self.first_low = rec.step
        if self.firing or self.low < self.patience:
            return []
        self.firing = True
        base = f"{fmt(math.exp(med))} (median of the last {len(win)} steps)" if have_base else "n/a"
        return [Finding(
            alert=self.name, action="fire", t=rec.t, severity=self.severity, step=rec.step, rank=None, value=g,
            summary=(f"grad_norm {fmt(g)} at step {rec.step}, collapsed for {self.low} steps since step "
                     f"{self.first_low}; baseline {base}, threshold {fmt(math.exp(self.log_ratio))}x baseline"),
            description=("The gradient norm has collapsed to almost nothing, so the weights have stopped moving: "
                         "check for frozen parameters, a detached graph, a zero learning-rate scale inside the "
                         "loss, dead activations or a loss scaler stuck skipping steps."),
        )]

    def statistic(self) -> float | None:
        return self.last_ratio

    def state(self) -> dict[str, Any]:
        return {"win": self.win.state(), "low": self.low, "ok": self.ok, "firing": self.firing,
                "first_low": self.first_low}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.win.restore(state.get("win") or [])
        self.low = _int(state.get("low"))
        self.ok = _int(state.get("ok"))
        self.firing = bool(state.get("firing", False))
        fl = state.get("first_low")
        self.first_low = _int(fl) if fl is not None else None
