"""LossScaleCollapse: the fp16 dynamic loss scale keeps halving (overflowing steps) down to a useless size."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._robust import fmt, state_int as _int, state_float as _float
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record


class LossScaleCollapse(Detector):
    """Fires when the reported `loss_scale` reaches `min_scale`, or backs off `max_skips` times in `window` steps.

    A dynamic loss scaler halves the scale and skips the update on every overflowing step, and
    grows it back after a quiet interval (1,000-2,000 steps in PyTorch, DeepSpeed, Megatron). So a
    healthy run backs off about once per growth interval; many back-offs in a short span, or a
    scale driven down to its floor, mean most updates are skipped and the run is not training.
    Back-offs are counted from the scale going down, or from a reported `skipped_iterations`
    count (Megatron logs it per logging interval). A run whose scale never exceeded `min_scale`
    (bf16, which reports a constant 1) is never judged on the floor rule. The first `settle_steps`
    are ignored: scalers start high on purpose (DeepSpeed 2^32, PyTorch 2^16) and halve their
    way down to a workable scale in the first tens of steps.
    """

    name = "LossScaleCollapse"
    severity = "warning"
    kinds = frozenset({"train"})
    ranks = "lead"
    defaults: ClassVar[Mapping[str, Any]] = {
        # DeepSpeed's and Megatron's min_loss_scale default: at 1 an overflow can no longer be absorbed.
        "min_scale": 1.0,
        # 10 back-offs in 200 steps: a healthy scaler backs off about once per 1,000-2,000 steps.
        "max_skips": 10,
        "window": 200,
        # Steps ignored at the start while an initial scale of up to 2^32 settles (32 halvings at most).
        "settle_steps": 50,
        # Resolve after this many consecutive steps without a back-off and above the floor.
        "resolve_steps": 200,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.min_scale = float(c["min_scale"])
        self.max_skips = int(c["max_skips"])
        self.window = int(c["window"])
        self.settle = int(c["settle_steps"])
        self.resolve_steps = int(c["resolve_steps"])
        self.skips: deque[int] = deque(maxlen=max(1, self.max_skips))  # steps of recent back-offs
        self.n = 0
        self.prev: float | None = None
        self.peak = 0.0
        self.quiet = 0
        self.firing = False

    def update(self, rec: Record, run: Any) -> list[Finding]:
        vals = rec.values
        s = vals.get("loss_scale")
        skipped = vals.get("skipped_iterations")
        if s is None and skipped is None:
            return []
        self.n += 1
        step = rec.step if rec.step is not None else self.n
        backoffs = 0
        if skipped is not None and math.isfinite(skipped) and skipped > 0:
            backoffs = int(min(skipped, self.max_skips))
        elif s is not None and self.prev is not None and math.isfinite(s) and s < self.prev:
            backoffs = 1
        if s is not None and math.isfinite(s) and s > 0:
            self.prev = s
            if s > self.peak:
                self.peak = s
        settled = self.n > self.settle
        if settled:
            for _ in range(backoffs):
                self.skips.append(step)
        # The deque holds the last max_skips back-offs: full, with its oldest inside the window,
        # means at least max_skips back-offs in the window (O(1) per record).
        sk = self.skips
        window_skips = len(sk) if len(sk) >= self.max_skips and sk[0] > step - self.window else 0
        at_floor = s is not None and (not math.isfinite(s) or s <= self.min_scale) and self.peak > self.min_scale
        bad = settled and (at_floor or window_skips >= self.max_skips)
        if self.firing:
            if backoffs or at_floor:
                self.quiet = 0
                return []
            self.quiet += 1
            if self.quiet >= self.resolve_steps:
                self.firing = False
                self.quiet = 0
                return [Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step,
                                summary=(f"loss scale {fmt(s)} stable for {self.resolve_steps} steps up to step "
                                         f"{rec.step}"))]
            return []
        if not bad:
            return []
        self.firing = True
        self.quiet = 0
        if at_floor:
            rule = f"at or below the floor {fmt(self.min_scale)} (peak {fmt(self.peak)})"
        else:
            rule = (f"{window_skips} back-offs (skipped steps) since step {sk[0]}, within {self.window} steps; "
                    f"threshold {self.max_skips}, peak scale {fmt(self.peak)}")
        return [Finding(
            alert=self.name, action="fire", t=rec.t, severity=self.severity, step=rec.step, rank=None,
            value=s if s is not None else float(window_skips),
            summary=f"loss scale {fmt(s)} at step {rec.step}: {rule}",
            description=("The fp16 loss scale keeps backing off, so most optimizer steps overflow and are skipped. "
                         "Something produces huge or non-finite gradients every step: look for a diverging loss, "
                         "an unstable layer (attention logits, a norm), or switch to bf16."),
        )]

    def statistic(self) -> float | None:
        return float(len(self.skips))

    def state(self) -> dict[str, Any]:
        return {"skips": list(self.skips), "n": self.n, "prev": self.prev, "peak": self.peak,
                "quiet": self.quiet, "firing": self.firing}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.skips.clear()
        for v in list(state.get("skips") or [])[-(self.skips.maxlen or 1):]:
            try:
                self.skips.append(int(v))
            except (TypeError, ValueError, OverflowError):
                continue
        self.n = _int(state.get("n"))
        p = _float(state.get("prev"), math.nan)
        self.prev = p if p == p and p > 0 else None
        self.peak = max(0.0, _float(state.get("peak"), 0.0))
        self.quiet = _int(state.get("quiet"))
        self.firing = bool(state.get("firing", False))
