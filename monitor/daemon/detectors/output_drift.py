"""OutputDrift: the model's next-token distributions on fixed prompts move far faster than their own early trend."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._robust import fmt, json_finite as _num, state_float as _float, state_int as _int
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record

# Where the default numbers come from: KL(base || current) of next-token distributions on 32
# fixed prompts, every 20 steps over 800 steps of fine-tuning a 2-layer, d=96 character
# transformer (pretrained on Python source) on licence texts, on a CPU. Six healthy fine-tunes
# (lr 3e-4, 1e-3, 3e-3, a 100-step warm-up, a 50/50 mix with the original data, another seed)
# grew fast and then ever more slowly, KL ~ steps^0.27-0.49 (1.23 with the warm-up) over the
# first 6 drift probes. Two faults from step 400 of the lr-1e-3 run: a 30x learning rate, and
# targets collapsed to one token. The figures below are the extreme over 2 consecutive probes;
# the measured series are in tests/daemon/detectors/test_output_drift.py. Synthetic checks there
# too: concave curves with 10 % noise per probe never fire, and of 200 noisy runs whose KL grows
# in a straight line (not concave) 1 fires.


class OutputDrift(Detector):
    """Drift probes against a power law fitted to the run's own first drift probes.

    Input: `probe` records with a `kl` value (docs/probe-records.md, point 4), one series per
    suite name. The first record of a suite with kl == 0 is the baseline itself and only sets
    the origin of steps (without it the origin is step 0); the next `early_probes` records are
    the early trajectory: log KL against log(steps since the baseline) fitted by least squares,
    the exponent clipped to [`min_exponent`, `max_exponent`]. A healthy fine-tune's KL grows
    fast early and then levels off, so the fitted power law over-predicts it later on. Each
    later probe is judged against the prediction at its step:

    - KL at least `kl_ratio` times the prediction and `min_excess` nats above it, or
    - top-1 agreement at most `top1_ratio` times its early mean while KL is at least
      `top1_kl_ratio` times the prediction (a model that now prefers other tokens on most prompts
      and is moving faster than it did; a slow healthy decline of agreement has KL on trend).

    It fires when a probe and the `confirm` - 1 before it all meet one of them, and resolves
    after `resolve_probes` probes in a row meet neither. A later record with kl == 0 is a new
    baseline (the training job restarted and took it again): the suite learns its trajectory
    afresh.
    """

    name = "OutputDrift"
    severity = "warning"
    kinds = frozenset({"probe"})
    ranks = "lead"
    defaults: ClassVar[Mapping[str, Any]] = {
        # 6 drift probes after the baseline fit the trend. With 4, one healthy run's exponent came
        # out 0.19 from a noisy early stretch, and 33 of the 200 straight-line runs fired; with 6,
        # 0.29 and 1. A fault inside these first probes becomes part of the trend and is missed.
        "early_probes": 6,
        # A floor of 0.5 (KL at least like the square root of steps) keeps a noisy, too-flat early
        # fit from making later healthy growth look like a jump: the largest healthy ratio below is
        # 1.48 without it, 1.05 with it.
        "min_exponent": 0.5,
        # A steep early stretch (lr warm-up) must not predict an explosion: at most KL ~ steps^2.
        "max_exponent": 2.0,
        # KL at twice the prediction. Largest healthy ratio: 1.05; one-token collapse: 14.3;
        # the 30x learning rate: 1.99 (2.42 then 1.99), which the top-1 rule catches instead.
        "kl_ratio": 2.0,
        # ... and 0.05 nats above it: under that the next-token probabilities of the baseline's
        # tokens moved by a few per cent, whatever the ratio (tiny KLs early in a gentle run).
        "min_excess": 0.05,
        # Top-1 agreement halved against its early mean. Lowest healthy level: 0.67 of it;
        # the 30x learning rate: 0.34; the collapse: 0.08.
        "top1_ratio": 0.5,
        # ... while KL is at least 1.75 times its prediction (healthy at most 1.05, the 30x
        # learning rate 1.99): a long healthy run keeps losing agreement slowly, with KL on trend.
        # At 1.5, 12 of the 200 straight-line runs (their agreement falling to a quarter) fired.
        "top1_kl_ratio": 1.75,
        # 2 probes in a row: one odd probe (a checkpoint mid-spike that training recovers from)
        # is not a page.
        "confirm": 2,
        # Resolve after this many probes in a row back on trend.
        "resolve_probes": 2,
        # Drift suites per run (each keeps a few numbers).
        "max_suites": 8,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.early_probes = max(2, int(c["early_probes"]))
        self.min_exponent = float(c["min_exponent"])
        self.max_exponent = max(self.min_exponent, float(c["max_exponent"]))
        self.kl_ratio = float(c["kl_ratio"])
        self.min_excess = float(c["min_excess"])
        self.top1_ratio = float(c["top1_ratio"])
        self.top1_kl_ratio = float(c["top1_kl_ratio"])
        self.confirm = max(1, int(c["confirm"]))
        self.resolve_probes = max(1, int(c["resolve_probes"]))
        self.max_suites = max(1, int(c["max_suites"]))
        # suite -> {"origin": step of the baseline, "early": [[step, kl, top1 | None], ...],
        #           "fit": [mean log x, mean log kl, exponent] | None, "top1": early mean | None,
        #           "hits", "ok", "bad", "ratio", "last_step"}
        self.suites: dict[str, dict[str, Any]] = {}
        self.firing = False
        self.last_ratio: float | None = None

    @staticmethod
    def _fresh(origin: float) -> dict[str, Any]:
        return {"origin": origin, "early": [], "fit": None, "top1": None, "hits": 0, "ok": 0, "bad": False,
                "ratio": None, "last_step": None}

    def _fit(self, st: dict[str, Any]) -> None:
        pts = [(math.log(s - st["origin"]), math.log(max(k, 1e-12))) for s, k, _ in st["early"]]
        n = len(pts)
        mx = sum(x for x, _ in pts) / n
        my = sum(y for _, y in pts) / n
        vx = sum((x - mx) * (x - mx) for x, _ in pts)
        b = sum((x - mx) * (y - my) for x, y in pts) / vx if vx > 0 else self.min_exponent
        b = min(max(b, self.min_exponent), self.max_exponent)
        st["fit"] = [mx, my, b]
        tops = [t for _, _, t in st["early"] if t is not None]
        st["top1"] = sum(tops) / len(tops) if tops else None

    def predict(self, suite: str, step: float) -> float | None:
        """The KL that the suite's early trajectory predicts at `step` (None before it is learnt)."""
        st = self.suites.get(suite)
        if st is None or st["fit"] is None or step <= st["origin"]:
            return None
        mx, my, b = st["fit"]
        # Clamped in log space: a far-off step must give a huge prediction, not an overflow.
        return math.exp(min(700.0, my + b * (math.log(step - st["origin"]) - mx)))

    def update(self, rec: Record, run: Any) -> list[Finding]:
        vals = rec.values
        if not vals or "kl" not in vals or rec.step is None:
            return []
        kl = vals["kl"]
        if not isinstance(kl, (int, float)) or kl != kl:
            return []
        kl = max(float(kl), 0.0)
        t1 = vals.get("top1_agreement")
        top1 = float(t1) if isinstance(t1, (int, float)) and 0.0 <= t1 <= 1.0 else None
        suite = str(rec.suite or "")[:128]
        step = float(rec.step)
        st = self.suites.get(suite)
        if st is None:
            if len(self.suites) >= self.max_suites:
                return []
            if kl == 0.0:  # the baseline itself: it only says where the steps start
                self.suites[suite] = self._fresh(step)
                return []
            st = self.suites[suite] = self._fresh(min(0.0, step - 1.0))
        elif kl == 0.0:  # a new baseline: the job restarted and measures drift from here
            self.suites[suite] = self._fresh(step)
            return self._maybe_resolve(rec)
        if step <= st["origin"]:
            return []
        st["last_step"] = step
        if st["fit"] is None:
            if math.isfinite(kl):
                st["early"].append([step, kl, top1])
                if len(st["early"]) >= self.early_probes:
                    self._fit(st)
            return []
        pred = self.predict(suite, step)
        assert pred is not None
        ratio = kl / pred if pred > 0 else math.inf
        st["ratio"] = ratio
        self.last_ratio = ratio if math.isfinite(ratio) else 1e300
        early_top1 = st["top1"]
        by_kl = ratio >= self.kl_ratio and kl - pred >= self.min_excess
        by_top1 = (top1 is not None and early_top1 is not None and top1 <= self.top1_ratio * early_top1
                   and ratio >= self.top1_kl_ratio)
        if not (by_kl or by_top1):
            st["hits"] = 0
            if st["bad"]:
                st["ok"] += 1
                if st["ok"] >= self.resolve_probes:
                    st["bad"] = False
                    st["ok"] = 0
            return self._maybe_resolve(rec)
        st["ok"] = 0
        st["hits"] += 1
        if st["bad"] or st["hits"] < self.confirm:
            return []
        st["bad"] = True
        if self.firing:
            return []
        self.firing = True
        mx, _, b = st["fit"]
        first, last = st["early"][0][0], st["early"][-1][0]
        why = []
        if by_kl:
            why.append(f"KL {fmt(kl)} nats is {fmt(ratio)}x the {fmt(pred)} its early trajectory predicts")
        if by_top1:
            why.append(f"top-1 agreement {fmt(top1)} is under {fmt(self.top1_ratio)}x its early mean "
                       f"{fmt(early_top1)} while KL {fmt(kl)} is {fmt(ratio)}x its prediction {fmt(pred)}")
        return [Finding(
            alert=self.name, action="fire", t=rec.t, severity=self.severity, step=rec.step, rank=None,
            value=kl,
            summary=(f"output drift {suite!r} at step {rec.step}: " + "; ".join(why) +
                     f", for {st['hits']} probes in a row (trend KL ~ steps^{fmt(b)} since the baseline at step "
                     f"{fmt(st['origin'])}, fitted on the drift probes of steps {fmt(first)}-{fmt(last)}"
                     + (f"; kl_max={fmt(vals['kl_max'])}" if isinstance(vals.get("kl_max"), (int, float)) else "")
                     + ")"),
            description=("The model's next-token distributions on the fixed drift prompts moved away from the "
                         "run's starting point much faster than they did early in the run: a learning-rate "
                         "blow-up, a collapse onto a few tokens, or a data or chat-template change. Compare a "
                         "few generations with the baseline's, and check the loss and the learning rate at this step."),
            labels={"suite": suite},
        )]

    def _maybe_resolve(self, rec: Record) -> list[Finding]:
        if self.firing and not any(s["bad"] for s in self.suites.values()):
            self.firing = False
            return [Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step,
                            summary=f"output drift back on its early trend at step {rec.step}")]
        return []

    def statistic(self) -> float | None:
        return self.last_ratio

    def state(self) -> dict[str, Any]:
        suites = {}
        for name, st in self.suites.items():
            suites[name] = {
                "origin": st["origin"], "early": [[s, k, t] for s, k, t in st["early"]],  # the fit is redone
                "hits": st["hits"], "ok": st["ok"], "bad": st["bad"],
                "ratio": _num(st["ratio"]) if st["ratio"] is not None else None, "last_step": st["last_step"]}
        return {"suites": suites, "firing": self.firing,
                "last_ratio": _num(self.last_ratio) if self.last_ratio is not None else None}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.suites = {}
        raw = state.get("suites") or {}
        if isinstance(raw, Mapping):
            for name, st in list(raw.items())[: self.max_suites]:
                if not isinstance(st, Mapping):
                    continue
                origin = _float(st.get("origin"))
                if origin != origin:
                    continue
                new = self._fresh(origin)
                early = st.get("early")
                for p in (early if isinstance(early, list) else [])[: self.early_probes]:
                    if not isinstance(p, list) or len(p) != 3:
                        continue
                    s, k, t = _float(p[0]), _float(p[1]), _float(p[2])
                    if s == s and s > origin and k == k and k >= 0:
                        new["early"].append([s, k, t if 0.0 <= t <= 1.0 else None])
                if len(new["early"]) >= self.early_probes:
                    self._fit(new)
                new["hits"] = _int(st.get("hits"))
                new["ok"] = _int(st.get("ok"))
                new["bad"] = bool(st.get("bad", False)) and new["fit"] is not None
                r = _float(st.get("ratio"))
                new["ratio"] = r if r == r else None
                ls = _float(st.get("last_step"))
                new["last_step"] = ls if ls == ls else None
                self.suites[str(name)[:128]] = new
        self.firing = bool(state.get("firing", False)) and any(s["bad"] for s in self.suites.values())
        lr = _float(state.get("last_ratio"))
        self.last_ratio = lr if lr == lr else None
