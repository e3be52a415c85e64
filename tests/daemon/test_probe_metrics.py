"""Probe series on /metrics: trainguard_probe_score and trainguard_probe_baseline_delta, through a real daemon."""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest

from monitor import wire
from monitor.daemon.state import MAX_PROBE_SERIES, RunState
from monitor.records import Record
from tests.helpers import metrics, sample

T0 = 1_700_000_000.0
RUN = "probe-run"


def probes(step: int, acc: float, lp: float, kl: float, top1: float) -> list[Record]:
    """What one probe round of suite "arith" with gold log-probabilities and a drift probe sends."""
    t = T0 + step
    return [
        Record("probe", RUN, t, 0, step, {"accuracy": acc, "exact_match": acc - 0.1, "gold_logprob": lp,
                                          "items_scored": 4.0, "items_total": 4.0, "seconds": 1.5, "min_drop": 0.05},
               suite="arith", items=[1.0, 0.0, 1.0, 1.0]),
        Record("probe", RUN, t, 0, step, {"gold_logprob": lp}, suite="arith/gold_logprob",
               items=[lp, lp, lp, lp]),
        Record("probe", RUN, t, 0, step, {"kl": kl, "kl_max": 2 * kl, "top1_agreement": top1, "prompts": 32.0},
               suite="drift"),
    ]


def send(daemon: Any, recs: list[Record], seq: int) -> None:
    ch = grpc.insecure_channel(daemon.grpc_address)
    try:
        call = ch.unary_unary(wire.REPORT_METHOD)
        resp = wire.decode_response(call(wire.encode_batch(RUN, 0, "inc", seq, recs), timeout=30))
        assert resp.accepted == len(recs) and resp.rejected == 0
    finally:
        ch.close()


def test_probe_scores_and_their_change_since_the_first_probe(daemon: Any) -> None:
    send(daemon, [Record("run", RUN, T0, 0, world_size=1)] + probes(0, 0.75, -1.25, 0.0, 1.0), 1)
    m = metrics(daemon)
    assert sample(m, "trainguard_probe_score", run=RUN, suite="arith", metric="accuracy") == 0.75
    assert sample(m, "trainguard_probe_baseline_delta", run=RUN, suite="arith", metric="accuracy") == 0.0

    send(daemon, probes(100, 0.5, -2.0, 0.25, 0.75), 2)
    send(daemon, probes(200, 0.625, -1.5, 0.5, 0.5), 3)
    m = metrics(daemon)
    want = {("arith", "accuracy"): (0.625, -0.125), ("arith", "exact_match"): (0.525, -0.125),
            ("arith", "gold_logprob"): (-1.5, -0.25), ("arith/gold_logprob", "gold_logprob"): (-1.5, -0.25),
            ("drift", "kl"): (0.5, 0.5), ("drift", "kl_max"): (1.0, 1.0), ("drift", "top1_agreement"): (0.5, -0.5)}
    for (suite, metric), (score, delta) in want.items():
        labels = {"run": RUN, "suite": suite, "metric": metric}
        assert sample(m, "trainguard_probe_score", **labels) == pytest.approx(score), (suite, metric)
        assert sample(m, "trainguard_probe_baseline_delta", **labels) == pytest.approx(delta), (suite, metric)
    # Bookkeeping values are not scores.
    exported = {dict(labels)["metric"] for name, labels in m if name == "trainguard_probe_score"}
    assert exported == {"accuracy", "exact_match", "gold_logprob", "kl", "kl_max", "top1_agreement"}
    # The probe series carry no step and no rank label.
    for name, labels in m:
        if name.startswith("trainguard_probe_"):
            assert set(dict(labels)) == {"run", "suite", "metric"}
    assert sample(m, "trainguard_probe_series_dropped_total", run=RUN) is None


def test_probe_series_are_bounded_and_drops_counted() -> None:
    st = RunState("r", window_cap=8)
    for i in range(MAX_PROBE_SERIES + 10):
        st.observe(Record("probe", "r", T0 + i, 0, i, {"accuracy": 0.5}, suite=f"s{i}"), 0.0)
    assert len(st.probe_series) == MAX_PROBE_SERIES and st.probe_series_dropped == 10
    # Non-finite values keep neither end of a series; another rank's copy of a suite does not move it.
    st.observe(Record("probe", "r", T0, 0, 1, {"accuracy": math.nan}, suite="s0"), 0.0)
    st.observe(Record("probe", "r", T0, 1, 1, {"accuracy": 0.9}, suite="s0"), 0.0)
    assert st.probe_series[("s0", "accuracy")][:2] == [0.5, 0.5]
