"""Overfitting: the eval loss keeps rising above its best while the training loss keeps falling."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._robust import (
    RollingMedian, fmt, safe_log, state_int as _int, state_float as _float, json_finite as _num,
)
from monitor.daemon.detectors._timing import median
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record

EVAL_KEYS = ("loss", "eval_loss", "val_loss")


def mann_kendall_up(xs: list[float]) -> float:
    """One-sided p-value of the Mann-Kendall test for an upward trend (normal approximation, continuity-corrected)."""
    n = len(xs)
    if n < 3:
        return 1.0
    s = 0
    for i in range(n - 1):
        xi = xs[i]
        for j in range(i + 1, n):
            d = xs[j] - xi
            s += (d > 0) - (d < 0)
    var = n * (n - 1) * (2 * n + 5) / 18.0
    if s <= 0:
        return 1.0
    z = (s - 1) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


class Overfitting(Detector):
    """The eval level stays above its best by more than its noise for `patience` evals, train loss still falling.

    The eval level is the median of the last `smooth` eval losses, in log space. The noise of one
    eval is 1.4826 * MAD / sqrt 2 of the changes between consecutive evals (after the first
    `skip_evals`, where the curve is steep), and nothing is judged before `noise_samples` such
    changes exist; the margin is the larger of `margin` and `noise_k` times that noise. "Still
    falling" means the median train loss of the last `train_window` steps is at least
    `train_drop` (log) below its value at the best eval: a run whose eval and train losses rise
    together is diverging, not overfitting. Last, the raw evals must trend upward over the last
    `trend_evals` (Mann-Kendall), so the minimum of a noisy but flat eval series does not pass
    for a rise.
    """

    name = "Overfitting"
    severity = "warning"
    kinds = frozenset({"train", "eval"})
    ranks = "lead"
    defaults: ClassVar[Mapping[str, Any]] = {
        # 1 % in log loss. Healthy cpu evals never rose above their best at all; the noisiest
        # labelled eval series (cpu-forgetting-01, +-3 %) rose 3.8 % above its best once, for one eval.
        "margin": 0.01,
        # The margin is at least 3 single-eval noise sds (with 2, 1 run in 100 of the flat noisy
        # synthetic evals below fired; with 3, none).
        "noise_k": 3.0,
        # Median of the last 3 evals: one noisy eval (cpu-divergence-01 rose 5.5 % once before its
        # onset and came back at the next eval) moves the level by nothing.
        "smooth": 3,
        # 2 consecutive evals with the level above the margin.
        "patience": 2,
        # ... and an upward trend over the last 10 evals, Mann-Kendall one-sided p < 0.001 (at most
        # 4 of the 45 pairs out of order). Flat evals with 3 % noise (synthetic, 100 runs of 60
        # evals) pass the level rule alone in 1 run in 4; the trend test is what keeps them quiet.
        "trend_evals": 10,
        "trend_p": 0.001,
        # Evals ignored by the noise estimate: the steep start of the curve is trend, not noise.
        "skip_evals": 3,
        # Evals before anything is judged, and changes between evals before the noise is trusted
        # (with the defaults the first judgement is at the 9th eval).
        "min_evals": 4,
        "noise_samples": 5,
        "train_window": 50,
        "train_drop": 0.01,
        # Resolve after this many consecutive evals back within the margin of the best.
        "resolve_evals": 2,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.margin = float(c["margin"])
        self.noise_k = float(c["noise_k"])
        self.patience = int(c["patience"])
        self.skip = int(c["skip_evals"])
        self.min_evals = int(c["min_evals"])
        self.noise_samples = max(1, int(c["noise_samples"]))
        # Raw recent train losses; their median is only needed at an eval, so no sorted window per step.
        self.train: deque[float] = deque(maxlen=max(1, int(c["train_window"])))
        self.train_drop = float(c["train_drop"])
        self.resolve_evals = int(c["resolve_evals"])
        self.diffs = RollingMedian(20)  # change between consecutive evals
        self.last_evals: deque[float] = deque(maxlen=max(1, int(c["smooth"])))
        self.recent: deque[float] = deque(maxlen=max(3, int(c["trend_evals"])))
        self.trend_p = float(c["trend_p"])
        self.evals = 0
        self.prev: float | None = None
        self.best = math.inf
        self.best_step: int | None = None
        self.train_at_best = math.nan
        self.above = 0
        self.back = 0
        self.firing = False
        self.excess = 0.0

    def update(self, rec: Record, run: Any) -> list[Finding]:
        vals = rec.values
        if rec.kind == "train":
            u = safe_log(vals.get("loss"))
            if u == u:
                self.train.append(u)
            return []
        v = None
        for key in EVAL_KEYS:
            if key in vals:
                v = vals[key]
                break
        raw = safe_log(v)
        if raw != raw:
            return []
        self.evals += 1
        if self.prev is not None and self.evals > self.skip + 1:
            self.diffs.push(raw - self.prev)
        self.prev = raw
        self.recent.append(raw)
        # The level is the median of the last `smooth` evals: the minimum of single noisy evals
        # sits ~2 sigma below the curve, which would make every later eval look worse than the best.
        last = self.last_evals
        last.append(raw)
        e = median(last)
        tr = median(self.train)
        if e < self.best:
            self.best = e
            self.best_step = rec.step
            self.train_at_best = tr
        # MAD of the signed changes around their median: a steadily falling curve is trend, not noise.
        judged = len(self.diffs) >= self.noise_samples
        noise = 1.4826 * self.diffs.mad() / math.sqrt(2.0) if judged else 0.0
        margin = max(self.margin, self.noise_k * noise)
        self.excess = ex = e - self.best
        if self.firing:
            if ex <= margin:
                self.back += 1
                if self.back >= self.resolve_evals:
                    self.firing = False
                    self.back = 0
                    self.above = 0
                    return [Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step,
                                    summary=(f"eval loss {fmt(math.exp(e))} at step {rec.step} back within "
                                             f"{fmt(100 * margin)} % of its best {fmt(math.exp(self.best))}"))]
            else:
                self.back = 0
            return []
        self.above = self.above + 1 if judged and ex > margin else 0
        if self.evals < self.min_evals or self.above < self.patience:
            return []
        falling = tr == tr and self.train_at_best == self.train_at_best and tr < self.train_at_best - self.train_drop
        if not falling or len(self.recent) < (self.recent.maxlen or 3):
            return []
        p_trend = mann_kendall_up(list(self.recent))
        if p_trend >= self.trend_p:
            return []
        self.firing = True
        self.back = 0
        gap_then = math.exp(self.best) - math.exp(self.train_at_best)
        gap_now = math.exp(e) - math.exp(tr)
        return [Finding(
            alert=self.name, action="fire", t=rec.t, severity=self.severity, step=rec.step, rank=None,
            value=math.exp(raw),
            summary=(f"eval loss {fmt(math.exp(raw))} at step {rec.step}; the median of the last {len(last)} evals, "
                     f"{fmt(math.exp(e))}, is {fmt(100 * (math.exp(ex) - 1))} % above its "
                     f"best {fmt(math.exp(self.best))} (step {self.best_step}) for {self.above} evals (margin "
                     f"{fmt(100 * margin)} %) while the train loss fell from {fmt(math.exp(self.train_at_best))} "
                     f"to {fmt(math.exp(tr))}; generalisation gap {fmt(gap_then)} -> {fmt(gap_now)}; rising over "
                     f"the last {len(self.recent)} evals (Mann-Kendall p={p_trend:.2g})"),
            description=("The model is fitting the training data at the expense of held-out data. The best "
                         "checkpoint is the one near the best eval; consider early stopping, more data or "
                         "regularisation (dropout, weight decay), or a lower learning rate."),
            labels={"best_step": str(self.best_step)},
        )]

    def statistic(self) -> float | None:
        return self.excess

    def state(self) -> dict[str, Any]:
        return {"train": list(self.train), "diffs": self.diffs.state(), "last": list(self.last_evals),
                "recent": list(self.recent),
                "evals": self.evals,
                "prev": self.prev, "best": _num(self.best), "best_step": self.best_step,
                "train_at_best": _num(self.train_at_best), "above": self.above, "back": self.back,
                "firing": self.firing}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.train.clear()
        for x in list(state.get("train") or [])[-(self.train.maxlen or 1):]:
            f = _float(x, math.nan)
            if f == f:
                self.train.append(f)
        self.diffs.restore(state.get("diffs") or [])
        self.last_evals.clear()
        for x in list(state.get("last") or [])[-(self.last_evals.maxlen or 1):]:
            f = _float(x, math.nan)
            if f == f:
                self.last_evals.append(f)
        self.recent.clear()
        for x in list(state.get("recent") or [])[-(self.recent.maxlen or 1):]:
            f = _float(x, math.nan)
            if f == f:
                self.recent.append(f)
        self.evals = _int(state.get("evals"))
        p = _float(state.get("prev"), math.nan)
        self.prev = p if p == p else None
        self.best = _float(state.get("best"), math.inf)
        bs = state.get("best_step")
        self.best_step = _int(bs) if bs is not None else None
        self.train_at_best = _float(state.get("train_at_best"), math.nan)
        self.above = _int(state.get("above"))
        self.back = _int(state.get("back"))
        self.firing = bool(state.get("firing", False))
