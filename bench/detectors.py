"""Detector benchmark: every labelled trace set replayed through a real daemon, scored, beside trainpulse.

Each set is a folder with `scenarios.json` (labels, see the trace format's "Labels" section). A trace
is scored as follows:
  - an alert of severity warning or critical that fires in a trace that expects nothing, or before
    the trace's onset, is a false alarm; the rate is per 10,000 healthy steps (all the steps of
    healthy traces and the steps before the onset of the others);
  - an expected alert is detected when its first firing (any severity, right rank if one is named)
    falls in its window; `any_of` traces need one of their alerts;
  - the delay is steps (or seconds for time windows) from the onset to that first firing.

trainpulse (the PyPI package) sees the lead rank's loss, grad_norm, lr and step time of each trace
through its `Monitor.log`; its alerts are mapped to our names by what they watch (its `loss_spike`
counts as LossSpike or LossDivergence, `gradient` as GradientExplosion or VanishingGradient,
`learning_rate` as LearningRateAnomaly, `plateau` as LossPlateau, `step_time` as ThroughputDrop,
`nan_detector` as NonFinite). Every alert it raises counts, as every call of its callback would page.

    python bench/detectors.py                  # real daemon, all sets under tests/data/bench
    python bench/detectors.py --in-process     # the same detectors without gRPC (fast, for tuning)
    python bench/detectors.py --in-process --only LossSpike -v
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import statistics
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, ServeProcess, machine, table, verdict  # noqa: E402
from monitor.records import read_trace  # noqa: E402

DEFAULT_SETS = ROOT / "tests" / "data" / "bench"
# Traces with fewer train steps than this are log excerpts: too short for any detector that needs a
# baseline. They are replayed and reported, but kept out of the targets.
MIN_STEPS = 30
PAGING = ("warning", "critical")
TRAINPULSE_NAMES = {
    "nan_detector": ("NonFinite",), "loss_spike": ("LossSpike", "LossDivergence"),
    "gradient": ("GradientExplosion", "VanishingGradient"), "learning_rate": ("LearningRateAnomaly",),
    "plateau": ("LossPlateau",), "step_time": ("ThroughputDrop",),
}


@dataclass
class Trace:
    """One labelled trace and what the scorer needs to know about it."""

    path: Path
    label: dict[str, Any]
    runs: list[str]
    steps: list[int]  # the lead rank's train steps, in order
    step_t: list[float]  # their event times
    onset_step: int | None = None
    onset_t: float | None = None
    alerts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # system -> alerts

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def short(self) -> bool:
        return len(self.steps) < MIN_STEPS

    @property
    def healthy(self) -> bool:
        return not self.label.get("expect")

    def step_at(self, t: float) -> int | None:
        """The last train step finished at or before event time t."""
        i = bisect.bisect_right(self.step_t, t) - 1
        return self.steps[i] if i >= 0 else None

    def t_of(self, step: int) -> float | None:
        """Event time of the first train step at or after `step`."""
        i = bisect.bisect_left(self.steps, step)
        return self.step_t[i] if i < len(self.steps) else None

    def healthy_steps(self) -> int:
        """Steps that count for the false-alarm rate."""
        if self.healthy:
            return len(self.steps)
        if self.onset_step is not None:
            return bisect.bisect_left(self.steps, self.onset_step)
        if self.onset_t is not None:
            return bisect.bisect_left(self.step_t, self.onset_t)
        return 0


def load_traces(sets: Iterable[Path]) -> list[Trace]:
    """Every trace named in each set's scenarios.json, with its lead rank's step times."""
    out = []
    for d in sets:
        labels = json.loads((d / "scenarios.json").read_text())["traces"]
        for fname, label in sorted(labels.items()):
            path = d / fname
            recs = list(read_trace(str(path)))
            lead = min((r.rank for r in recs if r.kind == "train"), default=0)
            pts = sorted((r.step, r.t) for r in recs if r.kind == "train" and r.rank == lead and r.step is not None)
            steps, ts, seen = [], [], set()
            for s, t in pts:
                if s not in seen:
                    seen.add(s)
                    steps.append(s)
                    ts.append(t)
            tr = Trace(path, label, sorted({r.run for r in recs}), steps, ts,
                       label.get("onset_step"), label.get("onset_t"))
            if tr.onset_t is None and tr.onset_step is not None:
                tr.onset_t = tr.t_of(tr.onset_step)
            out.append(tr)
    return out


# -- the systems under test ------------------------------------------------------------------------

def run_daemon(traces: list[Trace], config: str | None) -> float:
    """Replay every trace through `trainguard serve`; collect each run's alerts. Returns seconds taken."""
    from monitor.replay import replay

    extra = ["--config", config] if config else []
    with ServeProcess(extra) as d:
        t0 = time.monotonic()
        res = replay([str(t.path) for t in traces], d.address, progress=sys.stderr.isatty())
        took = time.monotonic() - t0
        if res.rejected:
            print(f"warning: the daemon rejected {res.rejected} records", file=sys.stderr)
        for tr in traces:
            got = []
            for run in tr.runs:
                q = urllib.parse.urlencode({"run": run, "state": "all"})
                with urllib.request.urlopen(f"{d.url}/api/v1/alerts?{q}", timeout=30) as r:
                    got.extend(json.load(r)["alerts"])
            tr.alerts["trainguard"] = sorted(got, key=lambda a: (a["started_at"] or 0, a["id"]))
    return took


def run_in_process(traces: list[Trace], detector_config: dict[str, Any], only: set[str] | None,
                   chunk: int = 256) -> float:
    """The daemon's per-run state and detectors without gRPC or the store: same findings, much faster."""
    from monitor.daemon.detectors import build_detectors
    from monitor.daemon.state import RunState

    cfg = dict(detector_config)
    if only:
        from monitor.daemon.detectors import DETECTORS

        for name in DETECTORS:
            if name not in only:
                cfg[name] = {**cfg.get(name, {}), "enabled": False}
    t0 = time.monotonic()
    for tr in traces:
        states: dict[str, RunState] = {}
        active: dict[tuple[str, str], dict[str, Any]] = {}
        alerts: list[dict[str, Any]] = []
        recs = list(read_trace(str(tr.path)))
        for i in range(0, len(recs), chunk):
            part = recs[i:i + chunk]
            for run in {r.run for r in part}:
                st = states.get(run)
                if st is None:
                    st = states[run] = RunState(run, 512)
                    st.set_detectors(build_detectors(cfg))
                findings = st.apply([r for r in part if r.run == run], 0.0, True, _raise)
                for f in findings:
                    key = (run, f.alert)
                    if f.action == "fire" and key not in active:
                        a = {"name": f.alert, "severity": f.severity, "step": f.step, "started_at": f.t,
                             "rank": f.rank, "summary": f.summary, "state": "firing"}
                        active[key] = a
                        alerts.append(a)
                    elif f.action == "resolve" and key in active:
                        active.pop(key)["state"] = "resolved"
        tr.alerts["trainguard"] = alerts
    return time.monotonic() - t0


def _raise(det: Any, e: Exception) -> None:
    raise RuntimeError(f"detector {det.name} failed") from e


def run_trainpulse(traces: list[Trace]) -> float:
    """trainpulse's Monitor on the lead rank's train series of each trace."""
    from trainpulse import Monitor

    names = {"loss": "loss", "grad_norm": "grad_norm", "lr": "lr", "step_time_seconds": "step_time"}
    t0 = time.monotonic()
    for tr in traces:
        mon = Monitor()
        alerts = []
        lead = None
        for rec in read_trace(str(tr.path)):
            if rec.kind != "train" or rec.step is None:
                continue
            lead = rec.rank if lead is None else min(lead, rec.rank)
            if rec.rank != lead:
                continue
            for ours, theirs in names.items():
                v = rec.values.get(ours)
                if v is None:
                    continue
                for a in mon.log(theirs, rec.step, float(v)):
                    alerts.append({"name": a.detector, "severity": a.severity.value, "step": a.step,
                                   "started_at": rec.t, "rank": None, "summary": a.message})
        tr.alerts["trainpulse"] = alerts
    return time.monotonic() - t0


# -- scoring ---------------------------------------------------------------------------------------

def _names(system: str, alert: dict[str, Any]) -> tuple[str, ...]:
    if system == "trainpulse":
        return TRAINPULSE_NAMES.get(alert["name"], (alert["name"],))
    return (alert["name"],)


def _before_onset(tr: Trace, a: dict[str, Any]) -> bool:
    if tr.healthy:
        return True
    if a.get("step") is not None and tr.onset_step is not None:
        return a["step"] < tr.onset_step
    if tr.onset_t is not None and a.get("started_at") is not None:
        return a["started_at"] < tr.onset_t
    return False


def score(traces: list[Trace], system: str) -> dict[str, Any]:
    """False alarms, recall per alert type and delays for one system (short traces apart)."""
    short = [t for t in traces if t.short]
    traces = [t for t in traces if not t.short]
    short_hits = sum(any(_first_in_window(t, system, t.alerts.get(system, []), e)[0] for e in t.label.get("expect", []))
                     for t in short if t.label.get("expect"))
    short_incidents = sum(1 for t in short if t.label.get("expect"))
    healthy_steps = sum(t.healthy_steps() for t in traces)
    false_alarms: list[tuple[str, dict[str, Any]]] = []
    by_type: dict[str, dict[str, Any]] = {}
    incidents = detected = 0
    details = []
    for tr in traces:
        alerts = tr.alerts.get(system, [])
        fa = [a for a in alerts if a["severity"] in PAGING and _before_onset(tr, a)]
        false_alarms.extend((tr.name, a) for a in fa)
        outcomes = []
        for exp in tr.label.get("expect", []):
            hit, delay = _first_in_window(tr, system, alerts, exp)
            outcomes.append((exp["alert"], hit, delay))
        if outcomes:
            incidents += 1
            ok = any(h for _, h, _ in outcomes) if tr.label.get("any_of") else all(h for _, h, _ in outcomes)
            detected += ok
            for name, hit, delay in outcomes:
                t = by_type.setdefault(name, {"expected": 0, "detected": 0, "delays": [], "unit": ""})
                t["expected"] += 1
                t["detected"] += bool(hit)
                if hit and delay is not None:
                    t["delays"].append(delay[0])
                    t["unit"] = delay[1]
        details.append((tr, fa, outcomes))
    return {"healthy_steps": healthy_steps, "false_alarms": false_alarms,
            "fa_per_10k": 1e4 * len(false_alarms) / healthy_steps if healthy_steps else float("nan"),
            "incidents": incidents, "detected": detected, "by_type": by_type, "details": details,
            "short_incidents": short_incidents, "short_detected": short_hits}


def _first_in_window(tr: Trace, system: str, alerts: list[dict[str, Any]],
                     exp: dict[str, Any]) -> tuple[bool, tuple[float, str] | None]:
    """Whether the expected alert's first firing falls in its window, and its delay from the onset."""
    cands = [a for a in alerts if exp["alert"] in _names(system, a)
             and (exp.get("rank") is None or a.get("rank") == exp["rank"])]
    if not cands:
        return False, None
    a = min(cands, key=lambda a: (a.get("started_at") or 0))
    if "from_step" in exp:
        step = a.get("step")
        if step is None and a.get("started_at") is not None:
            step = tr.step_at(a["started_at"])
        if step is None:
            return False, None
        hit = exp["from_step"] <= step <= exp["to_step"]
        onset = tr.onset_step if tr.onset_step is not None else exp["from_step"]
        return hit, (step - onset, "steps")
    if tr.onset_t is None or a.get("started_at") is None:
        return False, None
    off = a["started_at"] - tr.onset_t
    return exp["from_t_offset"] <= off <= exp["to_t_offset"], (off, "s")


def report(traces: list[Trace], systems: list[str], verbose: bool) -> dict[str, dict[str, Any]]:
    """Print the comparison table (and per-trace lines with verbose); return the scores."""
    scores = {s: score(traces, s) for s in systems}
    if verbose:
        for s in systems:
            print(f"\n== {s}: per trace")
            for tr, fa, outcomes in scores[s]["details"]:
                got = ", ".join(f"{a['name']}[{a['severity'][0]}]@{a.get('step')}" for a in tr.alerts.get(s, [])[:8])
                more = len(tr.alerts.get(s, [])) - 8
                want = "; ".join(f"{n}: {'hit' if h else 'MISS'}{'' if d is None else f' {d[0]:+.0f}{d[1]}'}"
                                 for n, h, d in outcomes)
                print(f"{tr.name:58s} fa={len(fa):<3d} {want or 'healthy':40s} {got}{f' (+{more})' if more > 0 else ''}")
    print()
    print(f"{len(traces)} traces, {scores[systems[0]]['healthy_steps']:,} healthy steps; {machine()}")
    rows = [["false alarms per 10k healthy steps"] + [f"{scores[s]['fa_per_10k']:.2f} ({len(scores[s]['false_alarms'])})"
                                                     for s in systems],
            ["incidents detected in window"] + [f"{scores[s]['detected']}/{scores[s]['incidents']}" for s in systems]]
    types = sorted({n for s in systems for n in scores[s]["by_type"]})
    for n in types:
        row = [f"  {n}"]
        for s in systems:
            t = scores[s]["by_type"].get(n)
            if not t:
                row.append("-")
                continue
            d = f", median delay {statistics.median(t['delays']):.0f} {t['unit']}" if t["delays"] else ""
            row.append(f"{t['detected']}/{t['expected']}{d}")
        rows.append(row)
    if scores[systems[0]]["short_incidents"]:
        rows.append([f"log excerpts (< {MIN_STEPS} steps), any alert"] +
                    [f"{scores[s]['short_detected']}/{scores[s]['short_incidents']}" for s in systems])
    print(table(["", *systems], rows))
    return scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="*", type=Path, default=None,
                    help="trace set folders (default: every folder with scenarios.json under tests/data/bench)")
    ap.add_argument("--in-process", action="store_true", help="feed the detectors directly instead of a daemon")
    ap.add_argument("--only", nargs="*", default=None, metavar="ALERT", help="enable only these detectors (in-process)")
    ap.add_argument("--config", default=None, help="daemon config file (TOML) with [detectors.*] settings")
    ap.add_argument("--no-trainpulse", action="store_true", help="skip the trainpulse comparison")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per trace")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the scores as JSON")
    args = ap.parse_args(argv)

    sets = args.sets or sorted(p.parent for p in DEFAULT_SETS.glob("*/scenarios.json"))
    traces = load_traces(sets)
    if args.in_process:
        detector_config: dict[str, Any] = {}
        if args.config:
            from monitor.daemon.app import load_config_file

            detector_config = load_config_file(args.config).get("detectors", {})
        took = run_in_process(traces, detector_config, set(args.only) if args.only else None)
        print(f"trainguard (in process): {took:.1f} s", file=sys.stderr)
    else:
        took = run_daemon(traces, args.config)
        print(f"trainguard (daemon, replay): {took:.1f} s", file=sys.stderr)
    systems = ["trainguard"]
    if not args.no_trainpulse:
        took = run_trainpulse(traces)
        print(f"trainpulse: {took:.1f} s", file=sys.stderr)
        systems.append("trainpulse")
    scores = report(traces, systems, args.verbose)
    ours = scores["trainguard"]
    print()
    print(verdict("no paging false alarm", not ours["false_alarms"],
                  f"{len(ours['false_alarms'])} on {ours['healthy_steps']:,} healthy steps"))
    print(verdict("every incident in its window", ours["detected"] == ours["incidents"],
                  f"{ours['detected']}/{ours['incidents']}"))
    if "trainpulse" in scores:
        tp = scores["trainpulse"]
        better = (ours["fa_per_10k"] < tp["fa_per_10k"] or not ours["false_alarms"]) and ours["detected"] > tp["detected"]
        print(verdict("better than trainpulse on false alarms and recall", better,
                      f"{ours['fa_per_10k']:.2f} vs {tp['fa_per_10k']:.2f} per 10k; "
                      f"{ours['detected']} vs {tp['detected']} of {ours['incidents']}"))
    if ours["false_alarms"]:
        print("\nfalse alarms:")
        for name, a in ours["false_alarms"][:30]:
            print(f"  {name}: {a['name']} [{a['severity']}] step {a.get('step')}: {a.get('summary', '')}")
    if args.json:
        out = {s: {k: v for k, v in sc.items() if k not in ("details", "false_alarms")}
               | {"false_alarms": len(sc["false_alarms"])} for s, sc in scores.items()}
        Path(args.json).write_text(json.dumps(out, indent=1, default=_json_default))
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


if __name__ == "__main__":
    raise SystemExit(main())
