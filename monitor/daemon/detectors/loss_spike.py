"""LossSpike: the training loss jumps far above its recent level and stays there for several steps."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._robust import (
    MAD_TO_Z, Cusum, RollingMedian, fmt, safe_log, state_int as _int, state_float as _float,
)
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record


class LossSpike(Detector):
    """Robust z of log(loss) against the last `window` steps; pages on persistence, reports outliers at info.

    z = 0.6745 (log loss - median) / MAD over the trailing window (the current step excluded). A
    page (warning) needs the loss to stay high: z > `persist_z` * (1 + rho) in `persist_k` of the
    last `persist_n` steps, or a one-sided CUSUM of clip(z, +-`clip_z`) * sqrt((1 - rho) / (1 + rho))
    above `cusum_h`, where rho is the lag-1 autocorrelation of ordinary residuals (0 for white
    noise: both rules then take their textbook form). A lone outlier, or two in a row, is what a
    single odd batch does in healthy runs (the data order repeats them in every run), so it is
    reported at info only, once per episode. A grad-norm co-spike is named in the finding.
    """

    name = "LossSpike"
    severity = "warning"
    kinds = frozenset({"train"})
    ranks = "lead"  # the loss is run-wide
    defaults: ClassVar[Mapping[str, Any]] = {
        # ~100 steps: long enough for a stable MAD, short enough to follow the loss curve's decline.
        "window": 100,
        # 30 points before judging: the MAD of fewer is too noisy for z > 4 to mean much.
        "min_points": 30,
        # Floor on the MAD of log loss (0.2 % relative): the smallest MAD on the healthy traces is
        # ~0.004 (late nanogpt), so the floor only matters for synthetic, near-constant series.
        "mad_floor": 0.002,
        # Info outlier: the healthy nanogpt runs' one-step outliers reach z 20, so anything smaller
        # than 6 would be a steady trickle of info alerts from ordinary noise (cpu max z 3.5).
        "outlier_z": 6.0,
        # Page: z > 4 in 3 of 5 steps. Healthy max of "min z over 3 consecutive steps" is 2.5
        # (75 nanogpt runs, 5 cpu runs); a two-step outlier (max min-of-2 is 5.5) cannot satisfy it.
        # With the rho-raised bar, the healthy maximum count of high steps in any 5 is 2.
        "persist_z": 4.0,
        "persist_k": 3,
        "persist_n": 5,
        # CUSUM on clip(z, +-3): catches a sustained rise that stays below z 4. With k 1 it needs
        # >= 8 consecutive z >= 3 steps to pass h 15. Healthy maximum of the sum: 5.3 (80 runs,
        # rho-discounted; 7.4 without the discount); with k 0.5 it reached 16.5 on noisy
        # stretches of the 1B nanogpt runs.
        "clip_z": 3.0,
        "cusum_k": 1.0,
        "cusum_h": 15.0,
        # Half-life (steps) of the lag-1 autocorrelation estimate that discounts the CUSUM input.
        "rho_halflife": 200,
        # Before a baseline exists (fewer than min_points steps), a loss this many times the lowest
        # so far is reported at info: short logs such as the quoted BLOOM incidents (3-11 lines,
        # loss x1.4 to x2.5) otherwise say nothing at all.
        "early_ratio": 1.4,
        # Grad-norm z that counts as a co-spike (healthy cpu max 5.6).
        "grad_z": 6.0,
        # An episode ends after this many consecutive steps with z < resolve_z (info: resolve_steps_info).
        "resolve_z": 2.0,
        "resolve_steps": 10,
        "resolve_steps_info": 3,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.win = RollingMedian(int(c["window"]), float(c["mad_floor"]), mad_every=8)
        self.min_points = int(c["min_points"])
        self.outlier_z = float(c["outlier_z"])
        self.persist_z = float(c["persist_z"])
        self.persist_k = int(c["persist_k"])
        self.recent: deque[bool] = deque(maxlen=int(c["persist_n"]))
        self.clip_z = float(c["clip_z"])
        self.cusum = Cusum(float(c["cusum_k"]), float(c["cusum_h"]))
        self.grad_z = float(c["grad_z"])
        self.early_gap = math.log(max(float(c["early_ratio"]), 1.0 + 1e-9))
        self.early_min = math.inf
        self.resolve_z = float(c["resolve_z"])
        self.resolve_steps = int(c["resolve_steps"])
        self.resolve_steps_info = int(c["resolve_steps_info"])
        self.rho_alpha = 1.0 - 0.5 ** (1.0 / float(c["rho_halflife"]))
        self.moments = [0.0, 0.0, 0.0, 0.0]  # weighted count, sum z, sum z^2, sum (z - previous z)^2
        self.prev_z: float | None = None
        self.rho = 0.0
        self.level = ""  # "", "info" or "page": the open episode
        self.calm = 0
        self.last_z = 0.0
        self.peak = 0.0

    def update(self, rec: Record, run: Any) -> list[Finding]:
        vals = rec.values
        u = safe_log(vals.get("loss"))
        if u != u:  # not a positive finite loss: NonFinite's business
            return []
        win = self.win
        if len(win) < self.min_points:
            win.push(u)
            return self._early(rec, u)
        med = win.median()
        z = MAD_TO_Z * (u - med) / win.scale()
        win.push(u)
        self.last_z = z
        cz = max(-self.clip_z, min(self.clip_z, z))
        # Lag-1 autocorrelation of ordinary residuals (|z| < clip_z, outside episodes): with
        # autocorrelated noise a run of same-signed z is normal wander, not a shift, so the CUSUM
        # input is shrunk by the long-run variance factor sqrt((1 - rho) / (1 + rho)).
        # rho = 1 - E[(z_t - z_t-1)^2] / (2 Var z): differences are immune to the slowly varying
        # offset a falling loss curve gives z (the median lags it). Exponentially weighted sums
        # (m = weight, z, z^2, squared difference) so the estimate needs no start-up correction.
        # Frozen while the CUSUM climbs: a level shift would otherwise pass for autocorrelation and
        # discount itself.
        pz = self.prev_z
        ok = -self.clip_z < z < self.clip_z
        mo = self.moments
        if ok and pz is not None and not self.level and self.cusum.s == 0.0:
            keep = 1.0 - self.rho_alpha
            d = z - pz
            mo[0] = mo[0] * keep + 1.0
            mo[1] = mo[1] * keep + z
            mo[2] = mo[2] * keep + z * z
            mo[3] = mo[3] * keep + d * d
        self.prev_z = z if ok else None
        rho = 0.0
        if mo[0] > 20.0:
            mean = mo[1] / mo[0]
            var = mo[2] / mo[0] - mean * mean
            if var > 1e-6:
                rho = 1.0 - 0.5 * (mo[3] / mo[0]) / var
        rho = 0.0 if rho < 0.0 else (0.95 if rho > 0.95 else rho)
        self.rho = rho
        # Autocorrelated residuals stay high by themselves once high, so "3 of 5" is weaker evidence
        # there: the bar rises with rho (x1.65 at the largest rho of the healthy cpu runs, 0.65);
        # white noise (the nanogpt runs, rho ~0) keeps z > 4.
        bar = self.persist_z * (1.0 + rho)
        high = z > bar
        self.recent.append(high)
        # The CUSUM waits for a full window: before that the MAD and rho rest on too few points.
        if len(win) >= win.size:
            self.cusum.update(cz * math.sqrt((1.0 - rho) / (1.0 + rho)) if rho > 0.0 else cz)
        out: list[Finding] = []
        persistent = sum(self.recent) >= self.persist_k
        # The grad-norm z only matters in a finding, so it is computed only when one may follow,
        # from the run's own grad_norm window: nothing to maintain per record.
        gz = _grad_z(rec, run, self.min_points) if high or z > self.outlier_z else 0.0
        if (persistent or self.cusum.alarm) and self.level != "page":
            if self.level == "info":
                out.append(self._resolve(rec, "escalated: the loss stayed high"))
            self.level = "page"
            self.calm = 0
            self.peak = z
            rule = (f"z > {fmt(bar)} in {sum(self.recent)} of the last {len(self.recent)} steps"
                    if persistent else f"CUSUM {fmt(self.cusum.s)} > {fmt(self.cusum.h)}")
            out.append(self._fire(rec, self.severity, u, med, z, gz, rule))
            return out
        if z > self.outlier_z and not self.level:
            self.level = "info"
            self.calm = 0
            self.peak = z
            out.append(self._fire(rec, "info", u, med, z, gz, f"one-step outlier z {fmt(z)} > {fmt(self.outlier_z)}"))
            return out
        if self.level:
            self.peak = max(self.peak, z)
            if z < self.resolve_z and not self.cusum.alarm:
                self.calm += 1
                need = self.resolve_steps if self.level == "page" else self.resolve_steps_info
                if self.calm >= need:
                    self.level = ""
                    self.calm = 0
                    out.append(self._resolve(rec, f"loss back within z {fmt(self.resolve_z)} of its median for "
                                                  f"{need} steps up to step {rec.step} (peak z {fmt(self.peak)})"))
            else:
                self.calm = 0
        return out

    def _early(self, rec: Record, u: float) -> list[Finding]:
        """Info on a large jump above the lowest loss so far while there is too little data for a z."""
        low = self.early_min
        if u < low:
            self.early_min = u
            return []
        if self.level or u - low < self.early_gap:
            if self.level == "info" and u - low < 0.5 * self.early_gap:
                self.level = ""
                return [self._resolve(rec, f"loss {fmt(math.exp(u))} back near its lowest, {fmt(math.exp(low))}")]
            return []
        self.level = "info"
        self.calm = 0
        loss, base = math.exp(u), math.exp(low)
        return [Finding(
            alert=self.name, action="fire", t=rec.t, severity="info", step=rec.step, rank=None, value=loss,
            summary=(f"loss {fmt(loss)} at step {rec.step} is {fmt(loss / base)}x the lowest so far ({fmt(base)}); "
                     f"only {len(self.win)} steps seen, too few for a robust baseline"),
            description="The loss jumped early in the run, before a baseline could be learnt; reported at info.",
            labels={"rule": "early", "co_spike": "false"},
        )]

    def _fire(self, rec: Record, severity: str, u: float, med: float, z: float, gz: float, rule: str) -> Finding:
        loss = math.exp(u)
        base = math.exp(med)
        co = f"; grad_norm co-spike z {fmt(gz)}" if gz > self.grad_z else ""
        return Finding(
            alert=self.name, action="fire", t=rec.t, severity=severity, step=rec.step, rank=None, value=loss,
            summary=(f"loss {fmt(loss)} at step {rec.step} vs median {fmt(base)} of the last {len(self.win) - 1} "
                     f"steps (robust z {fmt(z)}; {rule}){co}"),
            description=("The training loss jumped far above its recent level. A lone outlier is usually one odd "
                         "batch and is reported at info; a loss that stays high for several steps is an "
                         "instability: check the data at these steps, the learning rate and the gradient norm, "
                         "and be ready to roll back to the last good checkpoint."),
            labels={"rule": "outlier" if severity == "info" else "persistent", "co_spike": str(bool(co)).lower()},
        )

    def _resolve(self, rec: Record, why: str) -> Finding:
        return Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step, summary=why)

    def statistic(self) -> float | None:
        return self.last_z

    def state(self) -> dict[str, Any]:
        return {"win": self.win.state(), "recent": [bool(x) for x in self.recent],
                "moments": list(self.moments), "prev_z": self.prev_z,
                "cusum": self.cusum.state(), "level": self.level, "calm": self.calm,
                "last_z": self.last_z if math.isfinite(self.last_z) else 0.0,
                "peak": self.peak if math.isfinite(self.peak) else 0.0,
                "early_min": self.early_min if math.isfinite(self.early_min) else None}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.win.restore(state.get("win") or [])
        self.recent.clear()
        for x in list(state.get("recent") or [])[-(self.recent.maxlen or 1):]:
            self.recent.append(bool(x))
        self.cusum.restore(state.get("cusum"))
        mo = list(state.get("moments") or [])
        self.moments = [_float(x, 0.0) for x in mo[:4]] if len(mo) >= 4 else [0.0, 0.0, 0.0, 0.0]
        if self.moments[0] < 0:
            self.moments = [0.0, 0.0, 0.0, 0.0]
        pz = state.get("prev_z")
        self.prev_z = _float(pz, 0.0) if pz is not None else None
        level = state.get("level")
        self.level = level if level in ("", "info", "page") else ""
        self.calm = _int(state.get("calm"))
        self.last_z = _float(state.get("last_z"), 0.0)
        self.peak = _float(state.get("peak"), 0.0)
        em = state.get("early_min")
        self.early_min = _float(em, 0.0) if em is not None else math.inf


def _grad_z(rec: Record, run: Any, min_points: int) -> float:
    """Robust z of this record's log grad_norm against the rank's grad_norm window (0 when unknown)."""
    g = safe_log(rec.values.get("grad_norm"))
    rs = getattr(run, "ranks", {}).get(rec.rank) if run is not None else None
    if g != g or rs is None:
        return 0.0
    ring = rs.windows.get("grad_norm")
    if ring is None:
        return 0.0
    base = RollingMedian(ring.cap, 0.01)
    pts = ring.points()
    for _t, step, v in pts:
        if step != rec.step:  # the window already holds this record: leave it out of its own baseline
            base.push(safe_log(v))
    return base.z(g) if len(base) >= min_points else 0.0
