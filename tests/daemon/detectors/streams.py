"""Synthetic streams and trace readers for the detector tests: records in, findings out."""

from __future__ import annotations

import json
import math
import random
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from monitor.daemon.detectors.base import Detector, Finding
from monitor.daemon.state import RunState
from monitor.records import Record, read_trace

BENCH = Path(__file__).resolve().parents[2] / "data" / "bench"
T0 = 1_700_000_000.0

# A sample of the healthy traces: the nanogpt runs with the largest one-step outliers and the
# noisiest late stretches (the 1B and FP4 runs), a few ordinary ones, and every healthy cpu run.
HEALTHY_SAMPLE = (
    "healthy-nanogpt/2024-10-20-ScaleUp1B-ad8d7ae5.jsonl.gz",
    "healthy-nanogpt/2024-10-20-ScaleUp1B-c0078066.jsonl.gz",
    "healthy-nanogpt/2024-10-20-ScaleUp1B-87bd51fd.jsonl.gz",
    "healthy-nanogpt/2024-11-14-QuantizedFP4-932bbe0e.jsonl.gz",
    "healthy-nanogpt/2024-11-10-ScaleShortcuts-4897c987.jsonl.gz",
    "healthy-nanogpt/2024-10-09-SOAP-5bdc3988.jsonl.gz",
    "healthy-nanogpt/2024-11-24-WindowWarmup-3151f69a.jsonl.gz",
    "healthy-nanogpt/2024-12-04-ValueEmbed-385d2312.jsonl.gz",
    "cpu/cpu-healthy-01.jsonl.gz",
    "cpu/cpu-healthy-02.jsonl.gz",
    "cpu/cpu-healthy-03.jsonl.gz",
    "cpu/cpu-replay-01.jsonl.gz",
)


def train(step: int, t: float | None = None, rank: int = 0, **values: float) -> Record:
    """One train record at `step` (event time one second per step unless given)."""
    return Record("train", "syn", T0 + step if t is None else t, rank, step, dict(values))


def eval_rec(step: int, **values: float) -> Record:
    """One eval record at `step`."""
    return Record("eval", "syn", T0 + step + 0.5, 0, step, dict(values))


def probe(step: int, items: Sequence[float], suite: str = "arith") -> Record:
    """One probe record with per-item scores."""
    items = list(items)
    return Record("probe", "syn", T0 + step + 0.25, 0, step, {"accuracy": sum(items) / max(len(items), 1)},
                  suite=suite, items=items)


def train_series(**series: Sequence[float]) -> list[Record]:
    """Train records from parallel value series, steps 1..n: train_series(loss=[...], grad_norm=[...])."""
    n = max(len(v) for v in series.values())
    return [train(i + 1, **{k: v[i] for k, v in series.items() if i < len(v)}) for i in range(n)]


def clean_loss(n: int, seed: int = 0, start: float = 4.0, end: float = 2.0, noise: float = 0.02) -> list[float]:
    """A decaying loss curve with multiplicative (lognormal) noise of `noise` in log units."""
    rng = random.Random(seed)
    return [(end + (start - end) * math.exp(-i / (n / 5))) * math.exp(rng.gauss(0.0, noise)) for i in range(n)]


def ar1(n: int, seed: int = 0, level: float = 2.0, phi: float = 0.9, sigma: float = 0.02) -> list[float]:
    """Level times exp(x) with x an AR(1) process of coefficient `phi` and stationary sd `sigma`."""
    rng = random.Random(seed)
    x = 0.0
    innov = sigma * math.sqrt(1.0 - phi * phi)
    out = []
    for _ in range(n):
        x = phi * x + rng.gauss(0.0, innov)
        out.append(level * math.exp(x))
    return out


def noisy_norm(n: int, seed: int = 0, level: float = 1.0, sigma: float = 0.15, growth: float = 0.0) -> list[float]:
    """A grad-norm series: lognormal noise around a level that may grow slowly (`growth` per step, log)."""
    rng = random.Random(seed)
    return [level * math.exp(growth * i + rng.gauss(0.0, sigma)) for i in range(n)]


def with_outliers(series: Sequence[float], at: Iterable[int], factor: float) -> list[float]:
    """The series with the values at indices `at` multiplied by `factor`."""
    out = list(series)
    for i in at:
        out[i] *= factor
    return out


def run_state(meta: dict[str, Any] | None = None) -> RunState:
    """A RunState for the synthetic run, with `meta` as its run record's meta."""
    st = RunState("syn", window_cap=256)
    st.meta = dict(meta or {})
    return st


def replay(det: Detector, records: Iterable[Record], meta: dict[str, Any] | None = None,
           batch: int = 256) -> list[Finding]:
    """Feed records through a RunState (lead-rank dispatch, ticks) to one detector; return its findings."""
    st = run_state(meta)
    st.set_detectors([det])
    recs = list(records)
    out: list[Finding] = []
    for i in range(0, len(recs), batch):
        out += st.apply(recs[i:i + batch], 0.0)
    return out


def fires(findings: Iterable[Finding], paging: bool = False) -> list[Finding]:
    """The `fire` findings (only warning/critical ones when `paging`)."""
    return [f for f in findings if f.action == "fire" and (not paging or f.severity in ("warning", "critical"))]


@lru_cache(maxsize=None)
def labels(bench_set: str) -> dict[str, Any]:
    """scenarios.json of a bench set."""
    return json.loads((BENCH / bench_set / "scenarios.json").read_text())["traces"]


@lru_cache(maxsize=64)
def trace(rel: str) -> tuple[Record, ...]:
    """The records of a bench trace (path relative to tests/data/bench), read once per pytest run."""
    return tuple(read_trace(str(BENCH / rel)))


def label(rel: str) -> dict[str, Any]:
    """The scenarios.json entry of a bench trace."""
    bench_set, name = rel.split("/", 1)
    return labels(bench_set)[name]
