"""LossDivergence: the training loss has risen well above the best level it reached, and stays there."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._robust import (
    RollingMedian, fmt, meta_number, safe_log, state_int as _int, state_float as _float, json_finite as _num,
)
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record

# Where clients put the vocabulary size in the run record's meta (first match wins).
VOCAB_KEYS = ("vocab_size", "vocabulary_size", "model.vocab_size", "model.vocabulary_size", "n_vocab",
              "model.n_vocab", "tokenizer.vocab_size")


class LossDivergence(Detector):
    """The median of the last `window` log losses stays above its best value by `margin` for `patience` steps.

    The level is a running median (robust to the one-step outliers of healthy runs), compared
    with the lowest such median seen since `min_steps`; the margin widens with the loss noise
    (`noise_k` standard errors of that median) so a noisy small-batch run is judged on its own
    scale. Two backstops fire at once, without waiting for the level: the recent median reaching
    ln(vocabulary size) (uniform guessing) once the loss had been well below it, and the loss
    reaching `early_factor` times the highest loss of the first `min_steps` steps.
    """

    name = "LossDivergence"
    severity = "critical"
    kinds = frozenset({"train"})
    ranks = "lead"
    defaults: ClassVar[Mapping[str, Any]] = {
        # Median of the last 25 steps: ignores the 1-2 step outliers of healthy runs.
        "window": 25,
        # Steps before the best level is tracked: the first steps of a run can rise as warm-up starts.
        "min_steps": 50,
        # 0.2 in log loss = 22 % above the best level. Healthy maximum of the excess sustained for 5
        # steps: 0.100 (80 healthy runs; 1B nanogpt late in training), so 2x headroom; the injected
        # divergence on the cpu set sits at 0.45.
        "margin": 0.2,
        # The margin is at least this many standard deviations of the level (measured from its
        # lagged differences), for runs noisier than the healthy ones. Healthy maximum of the
        # sustained excess in these units: 10.8 (80 runs); AR(1) loss noise of 10 % with
        # autocorrelation 0.5-0.95: 8-11.6. 16 keeps the 0.2 floor in charge on every real trace here.
        "noise_k": 16.0,
        # Lagged differences of the level needed before the level rule judges (5 x 25 steps).
        "noise_samples": 5,
        # Consecutive steps above the margin before firing (with 10 the healthy maximum is 0.096,
        # hardly lower, and the alert comes 5 steps later).
        "patience": 5,
        # Consecutive steps back below half the margin before resolving.
        "resolve_steps": 50,
        # Backstop: the loss at 10x the early maximum is a blown-up run whatever the noise.
        "early_factor": 10.0,
        # Backstop: median of the last `fast_window` steps at ln(V) once the best level was below
        # `vocab_armed` * ln(V).
        "fast_window": 5,
        "vocab_armed": 0.75,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.level = RollingMedian(int(c["window"]))
        self.fast: deque[float] = deque(maxlen=max(1, int(c["fast_window"])))
        # The level's own noise: level now - level `window` steps ago, sampled every `window`
        # steps (independent differences), the last 40 of them. Differences ignore a slow trend,
        # and the spread of the level itself carries whatever autocorrelation the loss has, which
        # a standard error computed from the raw loss would not.
        self.lagged: deque[float] = deque(maxlen=int(c["window"]) + 1)
        self.noise = RollingMedian(40, 1e-9)
        self.min_steps = int(c["min_steps"])
        self.margin = float(c["margin"])
        self.noise_k = float(c["noise_k"])
        self.patience = int(c["patience"])
        self.noise_samples = max(1, int(c["noise_samples"]))
        self.resolve_steps = int(c["resolve_steps"])
        self.early_gap = math.log(max(float(c["early_factor"]), 1.0 + 1e-9))
        self.vocab_armed = float(c["vocab_armed"])
        self.n = 0
        self.best = math.inf
        self.best_step: int | None = None
        self.early_max = -math.inf
        self.above = 0
        self.below = 0
        self.firing = False
        self.excess = 0.0
        self.cur_margin = self.margin
        self._meta: Any = None
        self._vocab: float | None = None

    def update(self, rec: Record, run: Any) -> list[Finding]:
        u = safe_log(rec.values.get("loss"))
        if u != u:
            return []
        self.n += 1
        self.level.push(u)
        self.fast.append(u)
        m = self.level.median()
        lagged = self.lagged
        lagged.append(m)
        if len(lagged) == lagged.maxlen and self.n % (lagged.maxlen - 1) == 0:
            self.noise.push(m - lagged[0])
        if self.n <= self.min_steps:
            if u > self.early_max:
                self.early_max = u
            return []
        if m < self.best:
            self.best = m
            self.best_step = rec.step
        # sd of the level from its lagged differences: 1.4826 * MAD / sqrt 2. The MAD is taken
        # around the differences' median, so the steady fall of a young run is not counted as noise.
        # The level rule waits for `noise_samples` differences (125 steps with the defaults), so a
        # noisy run is not judged on the floor margin alone before its noise is known.
        judged = len(self.noise) >= self.noise_samples
        sigma = 1.0484 * self.noise.mad() if judged else 0.0
        self.cur_margin = margin = max(self.margin, self.noise_k * sigma)
        self.excess = ex = m - self.best
        if self.firing:
            if ex < 0.5 * margin:
                self.below += 1
                if self.below >= self.resolve_steps:
                    self.firing = False
                    self.above = self.below = 0
                    return [Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step,
                                    summary=(f"loss median {fmt(math.exp(m))} back within "
                                             f"{fmt(100 * (math.exp(0.5 * margin) - 1))} % of its best for "
                                             f"{self.resolve_steps} steps up to step {rec.step}"))]
            else:
                self.below = 0
            return []
        self.above = self.above + 1 if judged and ex > margin else 0
        rule = ""
        if self.above >= self.patience:
            rule = (f"median of the last {len(self.level)} steps {fmt(math.exp(m))} is "
                    f"{fmt(100 * (math.exp(ex) - 1))} % above its best {fmt(math.exp(self.best))} "
                    f"(step {self.best_step}) for {self.above} steps; threshold {fmt(100 * (math.exp(margin) - 1))} %")
        elif u >= self.backstop_floor(run):
            # The backstops need the median of the last few losses above a threshold, so the
            # current loss must be above it too: checked only then (rarely), not per record.
            srt = sorted(self.fast)
            k = len(srt)
            fm = srt[k // 2] if k & 1 else 0.5 * (srt[k // 2 - 1] + srt[k // 2])
            if self.early_max > -math.inf and fm >= self.early_max + self.early_gap:
                rule = (f"median of the last {len(self.fast)} steps {fmt(math.exp(fm))} is >= "
                        f"{fmt(math.exp(self.early_gap))}x the early maximum {fmt(math.exp(self.early_max))}")
            else:
                vocab = self._vocab
                if vocab and vocab > 1:
                    lnv = math.log(math.log(vocab))
                    if self.best < lnv + math.log(self.vocab_armed) and fm >= lnv:
                        rule = (f"median of the last {len(self.fast)} steps {fmt(math.exp(fm))} is >= "
                                f"ln(vocabulary {int(vocab)}) = {fmt(math.exp(lnv))}, the loss of uniform guessing")
        if not rule:
            return []
        self.firing = True
        self.below = 0
        loss = math.exp(u)
        return [Finding(
            alert=self.name, action="fire", t=rec.t, severity=self.severity, step=rec.step, rank=None, value=loss,
            summary=f"loss diverging at step {rec.step}: {rule}",
            description=("The training loss has risen well above the best level it reached and has not come back. "
                         "The run is unlikely to recover by itself: stop it or roll back to a checkpoint from "
                         "before the rise, and lower the learning rate or check the data from that point."),
            labels={"best_step": str(self.best_step)},
        )]

    def backstop_floor(self, run: Any) -> float:
        """The lowest log loss that could trip a backstop (the smaller of the two thresholds)."""
        meta = getattr(run, "meta", None)
        if meta is not self._meta:  # read once per meta object, not per record
            self._meta = meta
            self._vocab = meta_number(meta, *VOCAB_KEYS)
        floor = self.early_max + self.early_gap
        v = self._vocab
        if v and v > 1 and self.best < math.log(math.log(v)) + math.log(self.vocab_armed):
            floor = min(floor, math.log(math.log(v)))
        return floor

    def statistic(self) -> float | None:
        return self.excess / self.cur_margin if self.cur_margin > 0 else None

    def state(self) -> dict[str, Any]:
        return {"level": self.level.state(), "fast": list(self.fast), "noise": self.noise.state(),
                "lagged": list(self.lagged), "n": self.n,
                "best": _num(self.best), "best_step": self.best_step, "early_max": _num(self.early_max),
                "above": self.above, "below": self.below, "firing": self.firing}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.level.restore(state.get("level") or [])
        self.fast.clear()
        for v in list(state.get("fast") or [])[-(self.fast.maxlen or 1):]:
            f = _float(v, math.nan)
            if f == f:
                self.fast.append(f)
        self.noise.restore(state.get("noise") or [])
        self.lagged.clear()
        for v in list(state.get("lagged") or [])[-(self.lagged.maxlen or 1):]:
            f = _float(v, math.nan)
            if f == f:
                self.lagged.append(f)
        self.n = _int(state.get("n"))
        self.best = _float(state.get("best"), math.inf)
        bs = state.get("best_step")
        self.best_step = _int(bs) if bs is not None else None
        self.early_max = _float(state.get("early_max"), -math.inf)
        self.above = _int(state.get("above"))
        self.below = _int(state.get("below"))
        self.firing = bool(state.get("firing", False))
