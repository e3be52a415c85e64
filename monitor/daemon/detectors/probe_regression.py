"""ProbeRegression: a probe series scores significantly worse than at the run's first probe or its best checkpoint."""

from __future__ import annotations

import math
import re
from itertools import compress
from operator import gt, lt, mul, sub
from typing import Any, ClassVar, Mapping, Sequence

from monitor.daemon.detectors._robust import fmt, json_finite as _num, state_int as _int, state_float as _float
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record


def binom_sf_half(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exact: the short tail summed term by term until the terms vanish."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if 2 * k <= n:  # this tail holds the mode; its complement, by symmetry, is the short one
        return max(0.0, 1.0 - binom_sf_half(n - k + 1, n))
    term = math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2.0))
    total = 0.0
    for i in range(k, n + 1):
        total += term
        term *= (n - i) / (i + 1)
        if term <= total * 1e-17:
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


def wilcoxon_both(base: Sequence[float], cur: Sequence[float]) -> tuple[float, float, int]:
    """One-sided Wilcoxon signed-rank tests of `cur` against `base`: (p of a drop, p of a gain, non-zero pairs).

    Normal approximation with tie and continuity corrections for 10+ non-zero differences; below
    that the exact sign test, which needs no approximation.
    """
    return _signed_rank([a - b for a, b in zip(base, cur) if a != b])


def _signed_rank(diffs: list[float]) -> tuple[float, float, int]:
    """wilcoxon_both on the non-zero differences base - cur."""
    n = len(diffs)
    if n == 0:
        return 1.0, 1.0, 0
    if n < 10:
        pos = sum(1 for d in diffs if d > 0)
        return binom_sf_half(pos, n), binom_sf_half(n - pos, n), n
    by_size = sorted(diffs, key=abs)
    mags = list(map(abs, by_size))
    ups = list(map((0.0).__lt__, by_size))  # base above cur: a drop
    tie_term = 0.0
    if len(set(mags)) == n:  # no ties, the usual case for continuous scores: ranks are 1..n
        w_plus = float(sum(compress(range(1, n + 1), ups)))
    else:
        w_plus = 0.0
        i = 0
        while i < n:
            j = i
            while j + 1 < n and mags[j + 1] == mags[i]:
                j += 1
            t = j - i + 1
            w_plus += (0.5 * (i + j) + 1.0) * sum(ups[i:j + 1])  # tied pairs share their mean rank
            tie_term += t * t * t - t
            i = j + 1
    w_minus = n * (n + 1) / 2.0 - w_plus
    mean = n * (n + 1) / 4.0
    var = n * (n + 1) * (2 * n + 1) / 24.0 - tie_term / 48.0
    if var <= 0:
        return 1.0, 1.0, n
    sd = math.sqrt(var)
    z_drop = (w_plus - mean - 0.5) / sd
    z_gain = (w_minus - mean - 0.5) / sd
    return 0.5 * math.erfc(z_drop / math.sqrt(2.0)), 0.5 * math.erfc(z_gain / math.sqrt(2.0)), n


def wilcoxon_one_sided(base: Sequence[float], cur: Sequence[float]) -> tuple[float, int]:
    """One-sided Wilcoxon signed-rank test that `cur` is lower than `base`: (p, non-zero pairs)."""
    p_drop, _, n = wilcoxon_both(base, cur)
    return p_drop, n


_ZERO_ONE = frozenset((0.0, 1.0))


class Comparison:
    """One paired comparison of a probe's items with a baseline's (the items finite in both)."""

    __slots__ = ("n", "mean_base", "mean_cur", "drop", "binary", "p_drop", "p_gain", "sd", "test")

    def __init__(self, base: Sequence[float], cur: Sequence[float]):
        if len(base) == len(cur) and _ZERO_ONE.issuperset(base) and _ZERO_ONE.issuperset(cur):
            # The common case, 0/1 items all scored, counted in C: probes run every few hundred
            # steps, but the statistics tests run this hundreds of thousands of times.
            self._binary(len(base), sum(base), sum(cur), sum(map(gt, base, cur)), sum(map(lt, base, cur)))
            return
        sb, sc = sum(base), sum(cur)
        if len(base) == len(cur) and sb - sb == 0.0 and sc - sc == 0.0:  # every item finite: no filtering
            b_vals, c_vals = list(base), list(cur)
        else:
            b_vals, c_vals = [], []
            for a, b in zip(base, cur):
                if a - a == 0.0 and b - b == 0.0:  # both finite (NaN and inf give NaN)
                    b_vals.append(a)
                    c_vals.append(b)
            sb, sc = sum(b_vals), sum(c_vals)
        n = self.n = len(b_vals)
        if not n:
            return
        if _ZERO_ONE.issuperset(b_vals) and _ZERO_ONE.issuperset(c_vals):
            self._binary(n, sb, sc, sum(map(gt, b_vals, c_vals)), sum(map(lt, b_vals, c_vals)))
            return
        self.mean_base, self.mean_cur = sb / n, sc / n
        self.drop = drop = (sb - sc) / n
        self.binary = False
        self.sd = 0.0
        diffs = list(map(sub, b_vals, c_vals))
        self.p_drop, self.p_gain, nz = _signed_rank([d for d in diffs if d != 0.0])
        if n > 1:
            # Products, not **: a huge score overflows to inf here instead of raising.
            dev = [d - drop for d in diffs]
            self.sd = math.sqrt(sum(map(mul, dev, dev)) / (n - 1))
        self.test = f"Wilcoxon signed-rank over {nz} changed items"

    def _binary(self, n: int, sb: float, sc: float, losses: int, gains: int) -> None:
        self.n = n
        self.mean_base, self.mean_cur = sb / n, sc / n
        self.drop = (sb - sc) / n
        self.binary = True
        self.sd = 0.0
        self.p_drop, self.p_gain = binom_sf_half(losses, losses + gains), binom_sf_half(gains, losses + gains)
        self.test = f"exact McNemar: {losses} items lost, {gains} gained"


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    """A suite name as it would be written as a TOML key."""
    return name if _BARE_KEY.match(name) else '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_suites(raw: Any, where: str = "detectors.ProbeRegression.suites") -> dict[str, float]:
    """The per-suite settings table as {series or suite name: min_drop}; ValueError naming the field if wrong."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a table of suite name -> {{min_drop = NUMBER}}, got {raw!r}")
    out: dict[str, float] = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not 1 <= len(name) <= 128:
            raise ValueError(f"{where}: a suite name must be 1-128 characters, got {name!r}")
        at = f"{where}.{_key(name)}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{at}: expected a table such as {{min_drop = 0.05}}, got {entry!r}")
        unknown = sorted(str(k) for k in entry if k != "min_drop")
        if unknown:
            raise ValueError(f"{at}: unknown setting(s) {', '.join(unknown)}; known: min_drop")
        if "min_drop" in entry:
            v = entry["min_drop"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{at}.min_drop: must be a number >= 0 (a drop in mean item score, in the "
                                 f"series' own units), got {v!r}")
            out[name] = float(v)
    return out


def series_labels(series: str) -> tuple[str, str]:
    """(base suite, metric) of a probe series: "S" -> (S, accuracy), "S/gold_logprob" -> (S, gold_logprob)."""
    base, sep, rest = series.partition("/")
    return base, (rest if sep and rest else "accuracy")


def _encode(items: list[float]) -> Any:
    if all(x == 0.0 or x == 1.0 for x in items):
        return "".join("1" if x == 1.0 else "0" for x in items)  # compact for 0/1 items
    return [x if math.isfinite(x) else None for x in items]


def _decode(enc: Any, max_items: int) -> list[float] | None:
    if isinstance(enc, str):
        return [1.0 if ch == "1" else 0.0 for ch in enc[:max_items]] or None
    if isinstance(enc, list):
        return [_float(x) for x in enc[:max_items]] or None
    return None


class ProbeRegression(Detector):
    """Each probe's per-item scores against the run's first probe of the same series, and its best one, paired.

    A series is one probe record stream: "S" (0/1 items of the suite's primary score),
    "S/gold_logprob" (continuous log-probabilities of the gold answers), "S/judge" (pairwise
    preferences against the first probe's answers). 0/1 items: exact one-sided McNemar.
    Continuous items: one-sided Wilcoxon signed-rank. The k-th look at a series is tested at
    alpha / (k (k + 1)), which sums to alpha over any number of looks (alpha spending), so probing
    often does not inflate false alarms.

    Two baselines: the first probe, and the best checkpoint so far, a later probe adopted when it
    is significantly better than the first probe (the one-sided gain test at the level that look
    spends on the first baseline) and has the highest mean so far. Once a best exists each look
    spends half its level on a drop against the first probe and half on a drop against the best,
    so a model that learnt and then lost a skill pages even when it is back at its starting level.

    A significant drop must also be large enough to matter: at least `min_drop` in mean item
    score, taken from the `suites` table of the config (the series' own name, else its base
    suite's), else from the record's own `min_drop` value, else `min_drop` (0/1 items) or
    `min_drop_continuous` (continuous items, in their own units, nats for log-probabilities); and
    for continuous items also `min_effect` standard deviations of the paired differences. Probes
    without `items` carry no per-item evidence and are not judged.
    """

    name = "ProbeRegression"
    severity = "warning"
    kinds = frozenset({"probe"})
    ranks = "lead"
    defaults: ClassVar[Mapping[str, Any]] = {
        # Family-wise false-alarm rate per series over the whole run (alpha spending over looks).
        # Simulated with no true change (tests/daemon/detectors/test_probe_statistics.py, 20 looks
        # a run, best baseline included): 0.47 % of 3,000 runs fire with 0/1 items, 0.65 % of
        # 2,000 with continuous ones. A 5-point drop over 500 items is caught at its first look
        # in 82.5 % of runs.
        "alpha": 0.01,
        # 2 points of accuracy: smaller drops are rarely worth a page, whatever their p-value.
        "min_drop": 0.02,
        # 0: continuous scores have their own units (nats, judge preferences), so by default only
        # the standardised effect below gates them; set a floor per series in `suites`.
        "min_drop_continuous": 0.0,
        # A "small" standardised paired effect (Cohen's d_z 0.2) for continuous scores.
        "min_effect": 0.2,
        # Per-series or per-suite minimum drop, e.g. {arithmetic = {min_drop = 0.05},
        # "arithmetic/gold_logprob" = {min_drop = 0.5}}: the suite owner knows what drop matters.
        "suites": {},
        # Resolve after this many consecutive probes of the series without a significant drop.
        "resolve_probes": 2,
        # Bounds on what is kept: items per baseline (the first ones, in their fixed order) and
        # series per run: 8 suites with their "/gold_logprob" and "/judge" series are 24, plus
        # 8 spare. Two baselines of 4,096 items per series at most.
        "max_items": 4096,
        "max_suites": 32,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.alpha = float(c["alpha"])
        self.min_drop = float(c["min_drop"])
        self.min_drop_continuous = float(c["min_drop_continuous"])
        self.min_effect = float(c["min_effect"])
        self.suite_min_drop = check_suites(c["suites"])
        self.resolve_probes = int(c["resolve_probes"])
        self.max_items = int(c["max_items"])
        self.max_suites = int(c["max_suites"])
        # series -> {"base": [...], "step", "looks", "bad", "ok", "best": [...] | None, "best_step",
        #            "best_mean", "min_drop" (the record's own, or None), "against" ("first" | "best")}
        self.suites: dict[str, dict[str, Any]] = {}
        self.firing = False
        self.last_p: float | None = None

    @staticmethod
    def _fresh(cur: list[float], step: int | None, min_drop: float | None) -> dict[str, Any]:
        return {"base": cur, "step": step, "looks": 0, "bad": False, "ok": 0, "best": None, "best_step": None,
                "best_mean": math.nan, "min_drop": min_drop, "against": "first"}

    def min_drop_for(self, series: str, record_min_drop: float | None, binary: bool) -> tuple[float, str]:
        """The minimum drop that matters for a series, and where it came from (config > record > default)."""
        base, _ = series_labels(series)
        for key in (series, base):
            if key in self.suite_min_drop:
                return self.suite_min_drop[key], f"suites.{_key(key)}"
        if record_min_drop is not None:
            return record_min_drop, "the record's min_drop"
        return (self.min_drop, "min_drop") if binary else (self.min_drop_continuous, "min_drop_continuous")

    def _big(self, cmp: Comparison, min_drop: float) -> bool:
        if cmp.binary:
            return cmp.drop >= min_drop - 1e-12
        return (cmp.drop > 0 and cmp.drop >= min_drop - 1e-12
                and (cmp.sd == 0.0 or cmp.drop / cmp.sd >= self.min_effect))

    def update(self, rec: Record, run: Any) -> list[Finding]:
        items = rec.items
        if not items:
            return []
        series = str(rec.suite or "")[:128]
        cur = list(map(float, items[: self.max_items]))
        md = rec.values.get("min_drop") if rec.values else None
        rec_md = float(md) if isinstance(md, (int, float)) and math.isfinite(md) and md >= 0 else None
        st = self.suites.get(series)
        if st is None or len(st["base"]) != len(cur):
            if st is None and len(self.suites) >= self.max_suites:
                return []
            self.suites[series] = self._fresh(cur, rec.step, rec_md)
            return self._maybe_resolve(rec)
        if rec_md is not None:
            st["min_drop"] = rec_md
        first = Comparison(st["base"], cur)
        if not first.n:
            return []
        st["looks"] += 1
        k = st["looks"]
        level = self.alpha / (k * (k + 1))
        best = st["best"]
        level_first = level / 2 if best is not None else level
        min_drop, md_from = self.min_drop_for(series, st["min_drop"], first.binary)
        down_first = first.p_drop < level_first and self._big(first, min_drop)
        vs_best = Comparison(best, cur) if best is not None else None
        down_best = (vs_best is not None and vs_best.n > 0 and vs_best.p_drop < level / 2
                     and self._big(vs_best, min_drop))
        self.last_p = min(first.p_drop, vs_best.p_drop) if vs_best is not None and vs_best.n else first.p_drop
        if not (down_first or down_best):
            # A new best: significantly above the first probe (the gain side of the same test, at
            # the level this look spends on the first baseline) and above every earlier best.
            if (first.p_gain < level_first and first.mean_cur > first.mean_base
                    and not first.mean_cur <= st["best_mean"]):
                st["best"] = cur
                st["best_step"] = rec.step
                st["best_mean"] = first.mean_cur
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
        st["against"] = "first" if down_first else "best"
        if self.firing:
            return []
        self.firing = True
        cmp = first if down_first else vs_best
        assert cmp is not None
        spent = (f"alpha {fmt(self.alpha)} spent over {k} looks" +
                 (", half on each baseline" if best is not None else ""))
        lvl = level_first if down_first else level / 2
        if down_first:
            against = f"the run's first probe at step {st['step']}"
            if down_best:
                against += f" (and below the best checkpoint, step {st['best_step']}, too)"
        else:
            against = (f"the best checkpoint so far, step {st['best_step']} (significantly above the first "
                       f"probe at step {st['step']}, {fmt(first.mean_base)}; now {fmt(first.mean_cur)})")
        suite, metric = series_labels(series)
        agg = ", ".join(f"{k_}={fmt(v)}" for k_, v in list(rec.values.items())[:4])
        return [Finding(
            alert=self.name, action="fire", t=rec.t, severity=self.severity, step=rec.step, rank=None,
            value=cmp.mean_cur,
            summary=(f"probe series {series!r} at step {rec.step}: mean item score {fmt(cmp.mean_cur)} vs "
                     f"{fmt(cmp.mean_base)} at {against}: drop {fmt(cmp.drop)} (at least {fmt(min_drop)} from "
                     f"{md_from}), {cmp.test}, one-sided p={cmp.p_drop:.3g} < {lvl:.3g} ({spent})"
                     + (f"; {agg}" if agg else "")),
            description=("The model has lost a skill it had earlier in this run (catastrophic forgetting, "
                         "or a data mix that dropped a task). Consider mixing the original data back in (replay), "
                         "a lower learning rate, or rolling back to the checkpoint before the drop"
                         + (" (the best one named above)." if not down_first else ".")),
            labels={"suite": suite, "metric": metric, "series": series, "baseline": st["against"],
                    "baseline_step": str(st["step"] if down_first else st["best_step"])},
        )]

    def _maybe_resolve(self, rec: Record) -> list[Finding]:
        if self.firing and not any(s["bad"] for s in self.suites.values()):
            self.firing = False
            return [Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step,
                            summary=f"no probe series significantly below its baselines at step {rec.step}")]
        return []

    def statistic(self) -> float | None:
        return self.last_p

    def state(self) -> dict[str, Any]:
        suites = {}
        for name, st in self.suites.items():
            best = st["best"]
            suites[name] = {"base": _encode(st["base"]), "step": st["step"], "looks": st["looks"], "bad": st["bad"],
                            "ok": st["ok"], "best": _encode(best) if best is not None else None,
                            "best_step": st["best_step"], "best_mean": _num(st["best_mean"]),
                            "min_drop": st["min_drop"], "against": st["against"]}
        return {"suites": suites, "firing": self.firing}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.suites = {}
        raw = state.get("suites") or {}
        if isinstance(raw, Mapping):
            for name, st in list(raw.items())[: self.max_suites]:
                if not isinstance(st, Mapping):
                    continue
                base = _decode(st.get("base"), self.max_items)
                if not base:
                    continue
                step = st.get("step")
                md = _float(st.get("min_drop"))
                new = self._fresh(base, _int(step) if step is not None else None, md if md >= 0 else None)
                new.update(looks=_int(st.get("looks")), bad=bool(st.get("bad", False)), ok=_int(st.get("ok")),
                           against="best" if st.get("against") == "best" else "first")
                best = _decode(st.get("best"), self.max_items)
                best_mean = _float(st.get("best_mean"))
                if best is not None and len(best) == len(base) and best_mean == best_mean:
                    bs = st.get("best_step")
                    new.update(best=best, best_step=_int(bs) if bs is not None else None, best_mean=best_mean)
                self.suites[str(name)[:128]] = new
        self.firing = bool(state.get("firing", False)) and any(s["bad"] for s in self.suites.values())
