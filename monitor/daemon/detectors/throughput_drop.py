"""ThroughputDrop: the run's tokens/s (or steps/s) falls and stays below its own recent baseline. Warning."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar, Mapping

from monitor.daemon.detectors._timing import finite, floats, mad, median, num
from monitor.daemon.detectors.base import Detector, Finding
from monitor.records import Record


class ThroughputDrop(Detector):
    """Fires when the median throughput of the last `window` steps is far below the run's baseline.

    Throughput is log(tokens / step_time_seconds) of the lead rank, or -log(step_time_seconds)
    when the run reports no tokens (so a batch-size ramp that lengthens steps in proportion is not
    a drop). Every `stride` steps the median of the last `window` steps is compared with the
    baseline: the median of up to `baseline_blocks` earlier such medians, kept only while the run
    looked normal and lagging the recent window, so a drop cannot drag its own reference down. It
    fires when the drop is at least `min_drop` and `z` robust deviations of those medians, on
    `confirm` evaluations in a row. Medians make one slow step (an eval, a checkpoint save, a
    recompilation) invisible, and the step right after an eval is not counted at all. It resolves
    when the drop is back under half of `min_drop` for `confirm` evaluations.
    """

    name = "ThroughputDrop"
    severity = "warning"
    kinds: ClassVar[frozenset[str]] = frozenset({"train", "eval", "run"})
    ranks = "lead"  # every rank runs at the pace of the slowest in synchronous training
    defaults: ClassVar[Mapping[str, Any]] = {
        # 32-step median: up to 15 slow steps in a row (an eval, a checkpoint, the recompilation
        # after one) cannot move it; in the healthy labelled traces steps over 1.5x the median come
        # in runs of at most 3 (up to 10 % of all steps in some modded-nanogpt records).
        "window": 32,
        "stride": 8,
        # Baseline of 64 x 8 = 512 steps: long enough to be stable, short enough to follow the
        # healthy slow drift of step time (+13 % over 1,750 steps in the attention-window warmup
        # records of modded-nanogpt).
        "baseline_blocks": 64,
        "min_blocks": 8,
        # 20 % slower: more than twice the largest drop against this baseline in any healthy
        # labelled trace (8.5 %, early in cpu-healthy-02; 3.6 % in the modded-nanogpt records);
        # the labelled slowdown (45 % fewer tokens/s) and straggler (25 %) are above it.
        "min_drop": 0.20,
        # and 5 robust z of the baseline's block medians, for runs whose step time swings a lot.
        "z": 5.0,
        # A floor on that spread (2 % in log throughput) so a very steady run's tiny MAD does not
        # make every small change "significant".
        "min_spread": 0.02,
        "confirm": 3,
    }

    def __init__(self, config: Mapping[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.window = max(3, int(c["window"]))
        self.stride = max(1, int(c["stride"]))
        self.blocks_max = max(2, int(c["baseline_blocks"]))
        self.min_blocks = max(2, int(c["min_blocks"]))
        self.min_drop = -math.log1p(-min(max(float(c["min_drop"]), 1e-6), 0.99))  # as a log ratio
        self.z = float(c["z"])
        self.min_spread = float(c["min_spread"])
        self.confirm = max(1, int(c["confirm"]))
        # The recent window in log throughput; block medians waiting to age past it; the baseline.
        self.recent: deque[float] = deque(maxlen=self.window)
        self.pending: deque[tuple[float, bool]] = deque()
        self.blocks: deque[float] = deque(maxlen=self.blocks_max)
        self.lag = -(-self.window // self.stride)  # blocks that still overlap the recent window
        self.count = 0
        self.tokens: bool | None = None
        self.eval_step: int | None = None
        self.hits = 0
        self.clear = 0
        self.firing = False
        self.drop = 0.0
        self.base: float | None = None
        self.spread = 0.0

    def update(self, rec: Record, run: Any) -> list[Finding]:
        kind = rec.kind
        if kind == "eval":
            self.eval_step = rec.step
            return []
        if kind == "run":
            if self.count:
                self._reset()  # a restarted job may have a new configuration: learn it again
            return []
        if self.eval_step is not None and rec.step == self.eval_step + 1:
            return []  # the step after an eval pays for it (cache refill, recompilation)
        vals = rec.values
        st = finite(vals.get("step_time_seconds"))
        if st is None or st <= 0.0:
            return []
        tok = finite(vals.get("tokens"))
        use_tokens = tok is not None and tok > 0.0
        if self.tokens is None:
            self.tokens = use_tokens
        elif use_tokens != self.tokens:
            self._reset()
            self.tokens = use_tokens
        # A difference of logs: tokens / step time can underflow to 0 (or overflow) where the logs do not.
        x = math.log(tok) - math.log(st) if use_tokens else -math.log(st)  # type: ignore[arg-type]
        self.recent.append(x)
        self.count += 1
        if self.count % self.stride or len(self.recent) < self.window:
            return []
        return self._evaluate(rec)

    def _evaluate(self, rec: Record) -> list[Finding]:
        m = median(self.recent)
        blocks = self.blocks
        base = None
        if len(blocks) >= self.min_blocks:
            base = median(blocks)
            spread = max(1.4826 * mad(blocks), self.min_spread)
            self.base = base
            self.spread = spread
            self.drop = drop = base - m
        # A block median joins the baseline only once it no longer overlaps the recent window,
        # and only if it looked normal then: an unfolding drop must not become its own reference.
        normal = base is None or (self.drop < 0.5 * self.min_drop and not self.firing)
        self.pending.append((m, normal))
        while len(self.pending) > self.lag:
            v, ok = self.pending.popleft()
            if ok:
                blocks.append(v)
        if base is None:
            return []
        bad = drop >= self.min_drop and drop >= self.z * spread
        if not self.firing:
            self.hits = self.hits + 1 if bad else 0
            if self.hits >= self.confirm:
                self.firing = True
                self.clear = 0
                return [self._fire(rec, base, m, drop, spread)]
            return []
        self.clear = self.clear + 1 if drop < 0.5 * self.min_drop else 0
        if self.clear >= self.confirm:
            self.firing = False
            self.hits = 0
            return [Finding(alert=self.name, action="resolve", t=rec.t, step=rec.step,
                            summary=(f"throughput back to {100 * math.exp(-drop):.0f} % of its baseline "
                                     f"at step {rec.step}"))]
        return []

    def _fire(self, rec: Record, base: float, m: float, drop: float, spread: float) -> Finding:
        frac = 1.0 - math.exp(-drop)
        if self.tokens:
            now_s, base_s, what = f"{math.exp(m):,.0f} tokens/s", f"{math.exp(base):,.0f} tokens/s", "tokens/s"
        else:
            now_s, base_s, what = f"{math.exp(-m):.3g} s/step", f"{math.exp(-base):.3g} s/step", "step time"
        return Finding(
            alert=self.name, action="fire", t=rec.t, severity=self.severity, step=rec.step, rank=None,
            value=frac,
            summary=(f"throughput down {100 * frac:.0f} % at step {rec.step}: {now_s} over the last "
                     f"{self.window} steps vs {base_s} before"),
            description=(f"The median {what} of the last {self.window} steps is {100 * frac:.0f} % below the run's "
                         f"baseline (median of the {len(self.blocks) * self.stride} steps before, robust z "
                         f"{drop / spread:.1f}). Eval steps and single slow steps do not count. Look for a slow or "
                         "throttled node (see StragglerRank), a data loader that cannot keep up "
                         "(DataLoaderBottleneck), host memory pressure, or a change in the job's configuration."),
            labels={"metric": what, "drop_ratio": f"{frac:.3f}"},
        )

    def _reset(self) -> None:
        self.recent.clear()
        self.pending.clear()
        self.blocks.clear()
        self.count = 0
        self.tokens = None
        self.hits = 0
        self.base = None

    def statistic(self) -> float | None:
        return 1.0 - math.exp(-self.drop) if self.base is not None else None

    def state(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "pending": [[v, ok] for v, ok in self.pending],
                "blocks": list(self.blocks), "count": self.count, "tokens": self.tokens, "hits": self.hits,
                "clear": self.clear, "firing": self.firing, "drop": self.drop}

    def restore(self, state: Mapping[str, Any]) -> None:
        self._reset()
        self.recent.extend(floats(state.get("recent"), self.window))
        for row in (state.get("pending") or [])[-self.lag:] if isinstance(state.get("pending"), list) else ():
            if isinstance(row, (list, tuple)) and len(row) == 2 and finite(row[0]) is not None:
                self.pending.append((float(row[0]), bool(row[1])))
        self.blocks.extend(floats(state.get("blocks"), self.blocks_max))
        self.count = max(0, int(num(state, "count", 0.0)))
        tok = state.get("tokens")
        self.tokens = tok if isinstance(tok, bool) else None
        self.hits = max(0, int(num(state, "hits", 0.0)))
        self.clear = max(0, int(num(state, "clear", 0.0)))
        self.firing = bool(state.get("firing", False))
        self.drop = num(state, "drop", 0.0)
