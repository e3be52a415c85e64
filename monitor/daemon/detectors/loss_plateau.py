"""LossPlateau: the training loss has stopped improving while the learning rate is still high."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._robust import fmt, safe_log, state_int as _int, state_float as _float
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record


class LossPlateau(Detector):
    """No block of the last `patience` has a median log loss `min_improvement` below the block before them.

    Judged once per block (cheap: one sort of `block` values every `block` steps). A plateau is
    only reported while the lr is at least `lr_high` of its peak so far, or zero: with a decayed
    lr a flat loss is a converged run; with a high lr it is wasted compute or a learning rate too
    high to make progress; with a zero lr nothing can improve. Info by default: worth a look,
    never a page.
    """

    name = "LossPlateau"
    severity = "info"
    kinds = frozenset({"train"})
    ranks = "lead"
    defaults: ClassVar[Mapping[str, Any]] = {
        # 100-step blocks: the median of 100 noisy losses moves by well under 0.5 % on the healthy runs.
        "block": 100,
        # Less than 1 % lower (in log loss) over `patience` blocks counts as no progress. Healthy
        # nanogpt runs progress by ~0.5 % per 300 steps late in training (no lr reported there to
        # tell convergence from a plateau), so they get an occasional info alert.
        "min_improvement": 0.01,
        # 4 blocks (400 steps) without progress: with 3 the slow late progress of the nanogpt runs
        # gave an info alert every few hundred steps.
        "patience": 4,
        # Blocks before anything is judged: the steep start of training.
        "min_blocks": 2,
        # Only while the lr is at least half its peak so far (or not reported).
        "lr_high": 0.5,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.block = max(1, int(c["block"]))
        self.min_improvement = float(c["min_improvement"])
        self.patience = int(c["patience"])
        self.min_blocks = int(c["min_blocks"])
        self.lr_high = float(c["lr_high"])
        self.buf: list[float] = []
        self.blocks = 0
        self.medians: deque[float] = deque(maxlen=self.patience + 1)
        self.lr = math.nan
        self.lr_peak = 0.0
        self.firing = False
        self.improvement = 0.0

    def update(self, rec: Record, run: Any) -> list[Finding]:
        vals = rec.values
        lr = vals.get("lr")
        if lr is not None and math.isfinite(lr):
            self.lr = lr
            if lr > self.lr_peak:
                self.lr_peak = lr
        u = safe_log(vals.get("loss"))
        if u != u:
            return []
        buf = self.buf
        buf.append(u)
        if len(buf) < self.block:
            return []
        buf.sort()
        h = len(buf) // 2
        m = buf[h] if len(buf) & 1 else 0.5 * (buf[h - 1] + buf[h])
        buf.clear()
        self.blocks += 1
        meds = self.medians
        meds.append(m)
        if len(meds) <= self.patience or self.blocks <= self.min_blocks + self.patience:
            return []
        ref = meds[0]
        recent = min(list(meds)[1:])
        self.improvement = progress = ref - recent
        # Hysteresis: an open plateau resolves only on twice the progress that would have
        # prevented it, so a run hovering at the threshold does not flap.
        if progress >= self.min_improvement * (2.0 if self.firing else 1.0):
            if self.firing:
                self.firing = False
                return [Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step,
                                summary=(f"loss improving again: {fmt(100 * (1 - math.exp(-progress)))} % lower over "
                                         f"the last {self.patience * self.block} steps, at step {rec.step}"))]
            return []
        lr, peak = self.lr, self.lr_peak
        # A flat loss under a decayed lr is convergence; under a high lr, or a zero one, it is a problem.
        lr_ok = lr != lr or lr == 0.0 or (peak > 0 and lr >= self.lr_high * peak)
        if self.firing or not lr_ok or progress >= self.min_improvement:
            return []
        self.firing = True
        if lr != lr:
            lr_note = ""
        elif lr == 0.0:
            lr_note = "; the lr is zero"
        else:
            lr_note = f"; lr {fmt(lr)} is {fmt(100 * lr / peak)} % of its peak"
        return [Finding(
            alert=self.name, action="fire", t=rec.t, severity=self.severity, step=rec.step, rank=None,
            value=math.exp(m),
            summary=(f"no progress over the {self.patience * self.block} steps up to step {rec.step}: loss median "
                     f"{fmt(math.exp(recent))} vs {fmt(math.exp(ref))} before, "
                     f"{fmt(abs(100 * (1 - math.exp(-progress))))} % {'lower' if progress >= 0 else 'higher'} "
                     f"(progress needed: "
                     f"{fmt(100 * (1 - math.exp(-self.min_improvement)))} % lower){lr_note}"),
            description=("The training loss has stopped improving although the learning rate is still high (or "
                         "zero). If that is not expected, check the learning rate (too high to make progress, "
                         "zero, or not reaching the parameters), the data pipeline (repeating batches) and "
                         "frozen parameters."),
        )]

    def statistic(self) -> float | None:
        return self.improvement

    def state(self) -> dict[str, Any]:
        return {"buf": list(self.buf[-self.block:]), "blocks": self.blocks, "medians": list(self.medians),
                "lr": self.lr if math.isfinite(self.lr) else None, "lr_peak": self.lr_peak,
                "firing": self.firing}

    def restore(self, state: Mapping[str, Any]) -> None:
        buf = []
        for v in list(state.get("buf") or [])[-self.block:]:
            f = _float(v, math.nan)
            if f == f:
                buf.append(f)
        self.buf = buf[: self.block - 1]
        self.blocks = _int(state.get("blocks"))
        self.medians.clear()
        for v in list(state.get("medians") or [])[-(self.patience + 1):]:
            f = _float(v, math.nan)
            if f == f:
                self.medians.append(f)
        self.lr = _float(state.get("lr"), math.nan)
        self.lr_peak = max(0.0, _float(state.get("lr_peak"), 0.0))
        self.firing = bool(state.get("firing", False))
