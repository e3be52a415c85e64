"""ProbeRegression: a probe suite scores significantly worse than at the run's first probe (forgetting)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

from monitor.daemon.detectors._robust import fmt, state_int as _int, state_float as _float
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record


def binom_sf_half(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exact (summed in log space, stopping once terms vanish)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_half_n = -n * math.log(2.0)
    lg_n1 = math.lgamma(n + 1)
    total = 0.0
    for i in range(k, n + 1):
        term = math.exp(lg_n1 - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n)
        total += term
        if i > n / 2 and term < total * 1e-17:
            break
    return min(1.0, total)


def mcnemar_one_sided(base: Sequence[float], cur: Sequence[float]) -> tuple[float, int, int]:
    """Exact one-sided McNemar test that `cur` (0/1 items) is worse than `base`: (p, losses, gains)."""
    losses = gains = 0
    for a, b in zip(base, cur):
        if a > b:
            losses += 1
        elif b > a:
            gains += 1
    return binom_sf_half(losses, losses + gains), losses, gains


def wilcoxon_one_sided(base: Sequence[float], cur: Sequence[float]) -> tuple[float, int]:
    """One-sided Wilcoxon signed-rank test that `cur` is lower than `base`: (p, non-zero pairs).

    Normal approximation with tie and continuity corrections for 10+ non-zero differences; below
    that the exact sign test, which needs no approximation.
    """
    diffs = [a - b for a, b in zip(base, cur) if a != b]
    n = len(diffs)
    if n == 0:
        return 1.0, 0
    if n < 10:
        return binom_sf_half(sum(1 for d in diffs if d > 0), n), n
    order = sorted(range(n), key=lambda i: abs(diffs[i]))
    ranks = [0.0] * n
    tie_term = 0.0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(diffs[order[j + 1]]) == abs(diffs[order[i]]):
            j += 1
        r = 0.5 * (i + j) + 1.0
        for k in range(i, j + 1):
            ranks[order[k]] = r
        t = j - i + 1
        tie_term += t * t * t - t
        i = j + 1
    w_plus = sum(r for r, d in zip(ranks, diffs) if d > 0)  # base above cur: a drop
    mean = n * (n + 1) / 4.0
    var = n * (n + 1) * (2 * n + 1) / 24.0 - tie_term / 48.0
    if var <= 0:
        return 1.0, n
    z = (w_plus - mean - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2.0)), n


class ProbeRegression(Detector):
    """Each probe's per-item scores against the run's first probe of the same suite, paired.

    0/1 items: exact one-sided McNemar. Continuous items: one-sided Wilcoxon signed-rank. The
    k-th comparison of a suite is tested at alpha / (k (k + 1)), which sums to alpha over any
    number of looks (alpha spending), so probing often does not inflate false alarms. A
    significant drop must also be large enough to matter: `min_drop` in mean score for 0/1 items,
    `min_effect` standard deviations of the paired differences for continuous ones. Probes
    without `items` carry no per-item evidence and are not judged.
    """

    name = "ProbeRegression"
    severity = "warning"
    kinds = frozenset({"probe"})
    ranks = "lead"
    defaults: ClassVar[Mapping[str, Any]] = {
        # Family-wise false-alarm rate per suite over the whole run.
        "alpha": 0.01,
        # 2 points of accuracy: smaller drops are rarely worth a page, whatever their p-value.
        "min_drop": 0.02,
        # A "small" standardised paired effect (Cohen's d_z 0.2) for continuous scores.
        "min_effect": 0.2,
        # Resolve after this many consecutive probes of the suite without a significant drop.
        "resolve_probes": 2,
        # Bounds on what is kept: items per suite baseline (the first ones, in their fixed order)
        # and suites per run.
        "max_items": 4096,
        "max_suites": 16,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.alpha = float(c["alpha"])
        self.min_drop = float(c["min_drop"])
        self.min_effect = float(c["min_effect"])
        self.resolve_probes = int(c["resolve_probes"])
        self.max_items = int(c["max_items"])
        self.max_suites = int(c["max_suites"])
        # suite -> {"base": [...], "step": int, "looks": int, "bad": bool, "ok": int}
        self.suites: dict[str, dict[str, Any]] = {}
        self.firing = False
        self.last_p: float | None = None

    def update(self, rec: Record, run: Any) -> list[Finding]:
        items = rec.items
        if not items:
            return []
        suite = str(rec.suite or "")[:128]
        cur = [float(x) for x in items[: self.max_items]]
        st = self.suites.get(suite)
        if st is None or len(st["base"]) != len(cur):
            if st is None and len(self.suites) >= self.max_suites:
                return []
            self.suites[suite] = {"base": cur, "step": rec.step, "looks": 0, "bad": False, "ok": 0}
            return self._maybe_resolve(rec)
        base = st["base"]
        pairs = [(a, b) for a, b in zip(base, cur) if math.isfinite(a) and math.isfinite(b)]
        if not pairs:
            return []
        st["looks"] += 1
        k = st["looks"]
        level = self.alpha / (k * (k + 1))
        b_vals = [a for a, _ in pairs]
        c_vals = [b for _, b in pairs]
        n = len(pairs)
        drop = (sum(b_vals) - sum(c_vals)) / n
        binary = all(x == 0.0 or x == 1.0 for x in b_vals) and all(x == 0.0 or x == 1.0 for x in c_vals)
        if binary:
            p, losses, gains = mcnemar_one_sided(b_vals, c_vals)
            big = drop >= self.min_drop
            test = f"exact McNemar: {losses} items lost, {gains} gained"
        else:
            p, nz = wilcoxon_one_sided(b_vals, c_vals)
            d = [a - b for a, b in pairs]
            # Products, not **: a huge score overflows to inf here instead of raising.
            sd = math.sqrt(sum((x - drop) * (x - drop) for x in d) / (n - 1)) if n > 1 else 0.0
            big = drop > 0 and (sd == 0.0 or drop / sd >= self.min_effect)
            test = f"Wilcoxon signed-rank over {nz} changed items"
        self.last_p = p
        regressed = p < level and big
        if not regressed:
            if st["bad"]:
                st["ok"] += 1
                if st["ok"] >= self.resolve_probes:
                    st["bad"] = False
                    st["ok"] = 0
            return self._maybe_resolve(rec)
        st["ok"] = 0
        if st["bad"]:
            return []
        st["bad"] = True
        if self.firing:
            return []
        self.firing = True
        base_mean = sum(b_vals) / n
        cur_mean = sum(c_vals) / n
        agg = ", ".join(f"{k_}={fmt(v)}" for k_, v in list(rec.values.items())[:4])
        return [Finding(
            alert=self.name, action="fire", t=rec.t, severity=self.severity, step=rec.step, rank=None,
            value=cur_mean,
            summary=(f"probe suite {suite!r} at step {rec.step}: mean item score {fmt(cur_mean)} vs {fmt(base_mean)} "
                     f"at step {st['step']} (drop {fmt(drop)}), {test}, one-sided p={p:.3g} < {level:.3g} "
                     f"(alpha {fmt(self.alpha)} spent over {k} looks)" + (f"; {agg}" if agg else "")),
            description=("The model has lost a skill it had at the start of this run (catastrophic forgetting, "
                         "or a data mix that dropped a task). Consider mixing the original data back in (replay), "
                         "a lower learning rate, or rolling back to the checkpoint before the drop."),
            labels={"suite": suite, "baseline_step": str(st["step"])},
        )]

    def _maybe_resolve(self, rec: Record) -> list[Finding]:
        if self.firing and not any(s["bad"] for s in self.suites.values()):
            self.firing = False
            return [Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step,
                            summary=f"no probe suite significantly below its baseline at step {rec.step}")]
        return []

    def statistic(self) -> float | None:
        return self.last_p

    def state(self) -> dict[str, Any]:
        suites = {}
        for name, st in self.suites.items():
            base = st["base"]
            if all(x == 0.0 or x == 1.0 for x in base):
                enc: Any = "".join("1" if x == 1.0 else "0" for x in base)  # compact for 0/1 items
            else:
                enc = [x if math.isfinite(x) else None for x in base]
            suites[name] = {"base": enc, "step": st["step"], "looks": st["looks"], "bad": st["bad"], "ok": st["ok"]}
        return {"suites": suites, "firing": self.firing}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.suites = {}
        raw = state.get("suites") or {}
        if isinstance(raw, Mapping):
            for name, st in list(raw.items())[: self.max_suites]:
                if not isinstance(st, Mapping):
                    continue
                enc = st.get("base")
                if isinstance(enc, str):
                    base = [1.0 if ch == "1" else 0.0 for ch in enc[: self.max_items]]
                elif isinstance(enc, list):
                    base = [_float(x) for x in enc[: self.max_items]]
                else:
                    continue
                if not base:
                    continue
                step = st.get("step")
                self.suites[str(name)[:128]] = {
                    "base": base, "step": _int(step) if step is not None else None,
                    "looks": _int(st.get("looks")), "bad": bool(st.get("bad", False)), "ok": _int(st.get("ok"))}
        self.firing = bool(state.get("firing", False)) and any(s["bad"] for s in self.suites.values())
