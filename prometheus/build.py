#!/usr/bin/env python3
"""Write the per-alert Prometheus rules and their unit tests, and copy every rule file into the Helm chart.

    python prometheus/build.py            # write prometheus/rules/trainguard-alerts.rules.yml, its test, the copies
    python prometheus/build.py --check    # exit 1 if any of those files differs from what this script writes
    python prometheus/build.py --runbook-url 'https://wiki.example.com/trainguard/{alert}'   # your own runbooks

Each trainguard alert name gets one rule that turns `trainguard_alert_active{alert="X"} == 1` into a Prometheus
alert of the same name, so that routes, silences and inhibitions written for the daemon's own Alertmanager
notifications match these too. The hand-written rule files (daemon health, recording rules) are only copied.
Standard library only: this runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "prometheus" / "rules"
TESTS = ROOT / "prometheus" / "tests"
HELM_RULES = ROOT / "helm" / "trainguard" / "rules"
ALERT_RULES = RULES / "trainguard-alerts.rules.yml"
ALERT_TESTS = TESTS / "trainguard-alerts.test.yml"
# The daemon's default (monitor/daemon/alerts.py DEFAULT_RUNBOOK_URL): both paths link to the same page.
DEFAULT_RUNBOOK_URL = "https://github.com/trainguard/trainguard/blob/main/docs/runbooks/{alert}.md"
# Alerts raised by these rules carry this label, so that Alertmanager can tell them from the daemon's own
# notifications of the same alert (see docs/prometheus.md: avoiding double pages).
VIA_LABEL = ("via", "prometheus")

# Every alert name of the contract with its default severity (monitor/daemon/detectors ALERT_SEVERITIES) and what
# it means, from the first lines of its runbook. The severity label itself comes from the daemon's series, which
# follows the daemon's config and escalations (a LossSpike outlier is info, a sustained spike warning).
ALERTS: tuple[tuple[str, str, str], ...] = (
    ("NonFinite", "critical", "A training record's loss or gradient norm was NaN or infinite; the weights or the "
     "optimizer state may already be corrupt."),
    ("LossSpike", "warning", "The training loss jumped far above its recent level (a robust z-score of log loss "
     "against the trailing window); at severity info a lone outlier, at warning a loss that stays high."),
    ("LossDivergence", "critical", "The training loss rose well above the best level it had reached and stayed "
     "there: the run is un-learning."),
    ("GradientExplosion", "warning", "The global gradient norm ran far above its recent median in several of the "
     "last steps; it usually comes before a loss spike or a NaN."),
    ("VanishingGradient", "warning", "The global gradient norm collapsed to (near) zero against its trailing "
     "median and stayed there: the model is no longer learning."),
    ("Overfitting", "warning", "The evaluation loss kept rising above its best value for several evaluations "
     "while the training loss kept falling."),
    ("LossPlateau", "info", "The training loss has not improved over several blocks of steps while the learning "
     "rate is still high, or is zero."),
    ("LearningRateAnomaly", "warning", "The reported learning rate did something no schedule does: an abrupt "
     "drop, a jump, a long stretch at zero after warm-up, a value above the configured peak, or a bad value."),
    ("ProbeRegression", "warning", "A few-shot probe series scores significantly worse than at the run's first "
     "probe or its best checkpoint so far (a paired test over the same items)."),
    ("OutputDrift", "warning", "The model's next-token distributions on the drift prompts moved away from the "
     "run's baseline much faster than their own early trajectory predicts."),
    ("StragglerRank", "warning", "One rank (or a few) computes markedly slower than its peers; collectives make "
     "every rank wait for it."),
    ("ThroughputDrop", "warning", "The run's throughput fell and stayed well below its own recent baseline."),
    ("TrainingStalled", "critical", "The ranks are alive (heartbeats keep coming) but no rank has finished a step "
     "for longer than the stall threshold: a hung job, typically a collective waiting forever."),
    ("RankLost", "critical", "A rank has sent nothing, heartbeats included, for 30 seconds while other ranks still "
     "report: its process, host or network is gone."),
    ("MemoryLeak", "warning", "A rank's host RSS or GPU allocated memory grows steadily, by at least 5 % of its "
     "level."),
    ("MemoryPressure", "critical", "A rank ran out of GPU memory or is about to: an OOM, repeated allocator "
     "retries, or reserved memory at nearly all of the device."),
    ("DataLoaderBottleneck", "info", "The training loop spends a large share of each step waiting for its next "
     "batch."),
    ("LossScaleCollapse", "warning", "The fp16 dynamic loss scale collapsed: it reached its floor, or the scaler "
     "backed off many times in a short span, so most updates are skipped."),
)
WRAP = 100  # folded strings are wrapped here so that generated files stay within the project's 120 columns


# -- a YAML writer for the small subset these files use (block mappings and lists, scalar strings) ----------------

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]*$")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}


def _scalar(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        raise TypeError(f"unsupported scalar {v!r}")
    if isinstance(v, (int, float)):
        return json.dumps(v)
    if _PLAIN.match(v) and v.lower() not in _RESERVED:
        return v
    if v.isprintable() and "\\" not in v:
        return "'" + v.replace("'", "''") + "'"  # single quotes: PromQL's double quotes stay as they are
    return json.dumps(v)  # a JSON string is a valid YAML double-quoted scalar


def _wrap(text: str, width: int) -> list[str]:
    # A template such as {{ $labels.run }} stays on one line, so that the file reads as it will be expanded.
    glued = re.sub(r"\{\{.*?\}\}", lambda m: m.group(0).replace(" ", "\0"), text)
    lines = textwrap.wrap(glued, width, break_long_words=False, break_on_hyphens=False)
    return [line.replace("\0", " ") for line in lines]


def _emit(obj: Any, indent: int, out: list[str]) -> None:
    pad = " " * indent
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{k}:")
                _emit(v, indent + 2, out)
            elif isinstance(v, (dict, list)):
                out.append(f"{pad}{k}: {'{}' if isinstance(v, dict) else '[]'}")
            elif isinstance(v, str) and ("\n" in v or len(pad) + len(k) + len(v) > WRAP):
                # `|-` keeps PromQL's line breaks; `>-` folds prose back into one line when read.
                style = "|-" if "\n" in v else ">-"
                lines = v.split("\n") if "\n" in v else _wrap(v, WRAP - indent)
                out.append(f"{pad}{k}: {style}")
                out.extend(f"{pad}  {line}" for line in lines)
            else:
                out.append(f"{pad}{k}: {_scalar(v)}")
    elif isinstance(obj, list):
        for item in obj:
            sub: list[str] = []
            if isinstance(item, (dict, list)):
                _emit(item, indent + 2, sub)
            else:
                sub.append(f"{pad}  {_scalar(item)}")
            first = sub[0]
            out.append(f"{pad}- {first[indent + 2:]}")
            out.extend(sub[1:])
    else:
        raise TypeError(f"unsupported node {obj!r}")


def to_yaml(obj: Any, header: str) -> str:
    """A YAML document of `obj`, after a comment header."""
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    _emit(obj, 0, out)
    return "\n".join(out) + "\n"


# -- the rules and their tests -----------------------------------------------------------------------------------

HEADER = ("Generated by prometheus/build.py from its ALERTS table: edit that and run `python prometheus/build.py`\n"
          "(tests/deploy/test_rules.py fails while this file and the script disagree).\n")


def annotations(name: str, meaning: str, runbook_url: str, run: str = "{{ $labels.run }}",
                severity: str = "{{ $labels.severity }}") -> dict[str, str]:
    """The annotations of one alert; with run and severity given, as Prometheus expands them."""
    return {
        "summary": f"{name} in run {run} ({severity})",
        # The daemon's metric has no rank, step or value: the daemon's alert, one command away, has them.
        "description": f"{meaning} The daemon's alert gives the step, the value and the rank at fault: "
                       f"`trainguard alerts --run {run}` or /api/v1/alerts?run={run} on the daemon.",
        "runbook_url": runbook_url.format(alert=name, run=run),
    }


def alert_rules(runbook_url: str) -> dict[str, Any]:
    """The rule file: one alert per trainguard alert name."""
    rules = []
    for name, _severity, meaning in ALERTS:
        rules.append({
            "alert": name,
            # max by: two daemons scraped for the same run (or a restart's overlap) give one alert, and the
            # alert's labels are the daemon's (run, severity) rather than the scrape target's.
            "expr": f'max by (run, severity) (trainguard_alert_active{{alert="{name}"}}) == 1',
            "labels": dict([VIA_LABEL]),
            "annotations": annotations(name, meaning, runbook_url),
        })
    return {"groups": [{"name": "trainguard-alerts", "rules": rules}]}


def _series(run: str, alert: str, severity: str, instance: str = "trainguard-0:9750") -> str:
    return (f'trainguard_alert_active{{job="trainguard", instance="{instance}", run="{run}", alert="{alert}", '
            f'severity="{severity}"}}')


def alert_tests(runbook_url: str) -> dict[str, Any]:
    """promtool unit tests: each alert fires while its series is 1, never for another alert's series, and resolves."""
    rel = Path("..") / ALERT_RULES.relative_to(ROOT / "prometheus")
    tests = []
    for i, (name, severity, meaning) in enumerate(ALERTS):
        other = ALERTS[(i + 1) % len(ALERTS)][0]
        run = f"run-{name.lower()}"
        expected = {"exp_labels": {"run": run, "severity": severity, VIA_LABEL[0]: VIA_LABEL[1]},
                    "exp_annotations": annotations(name, meaning, runbook_url, run=run, severity=severity)}
        tests.append({
            "interval": "1m",
            "input_series": [
                # pending or resolved (0), firing (1) at 2m and 3m, resolved again at 4m
                {"series": _series(run, name, severity), "values": "0 0 1 1 0"},
                # another alert firing in another run all along must not raise this one
                {"series": _series("run-other", other, "warning"), "values": "1 1 1 1 1"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": name, "exp_alerts": []},
                {"eval_time": "2m", "alertname": name, "exp_alerts": [expected]},
                {"eval_time": "3m", "alertname": name, "exp_alerts": [expected]},
                {"eval_time": "4m", "alertname": name, "exp_alerts": []},
            ],
        })
    # Two daemons exporting the same run (a restart's overlap, or two replicas) raise one alert, not two.
    run = "run-twice"
    tests.append({
        "interval": "1m",
        "input_series": [{"series": _series(run, "NonFinite", "critical", instance=inst), "values": "1 1"}
                         for inst in ("trainguard-0:9750", "trainguard-1:9750")],
        "alert_rule_test": [{"eval_time": "1m", "alertname": "NonFinite", "exp_alerts": [
            {"exp_labels": {"run": run, "severity": "critical", VIA_LABEL[0]: VIA_LABEL[1]},
             "exp_annotations": annotations("NonFinite", ALERTS[0][2], runbook_url, run=run, severity="critical")}]}],
    })
    # An escalation (an info outlier that becomes a sustained spike) resolves the info alert and fires a warning.
    run = "run-escalates"
    meaning = dict((n, m) for n, _, m in ALERTS)["LossSpike"]
    tests.append({
        "interval": "1m",
        "input_series": [{"series": _series(run, "LossSpike", "info"), "values": "1 1 0 0"},
                         {"series": _series(run, "LossSpike", "warning"), "values": "_ _ 1 1"}],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "LossSpike", "exp_alerts": [
                {"exp_labels": {"run": run, "severity": "info", VIA_LABEL[0]: VIA_LABEL[1]},
                 "exp_annotations": annotations("LossSpike", meaning, runbook_url, run=run, severity="info")}]},
            {"eval_time": "3m", "alertname": "LossSpike", "exp_alerts": [
                {"exp_labels": {"run": run, "severity": "warning", VIA_LABEL[0]: VIA_LABEL[1]},
                 "exp_annotations": annotations("LossSpike", meaning, runbook_url, run=run, severity="warning")}]},
        ],
    })
    return {"rule_files": [str(rel)], "evaluation_interval": "1m", "tests": tests}


def outputs(runbook_url: str) -> dict[Path, str]:
    """Every file this script owns, with its content."""
    out = {
        ALERT_RULES: to_yaml(alert_rules(runbook_url), HEADER),
        ALERT_TESTS: to_yaml(alert_tests(runbook_url), HEADER),
    }
    # The chart loads its rules with .Files.Glob from its own folder, so it gets byte-identical copies.
    for src in sorted(RULES.glob("*.yml")) + ([ALERT_RULES] if not ALERT_RULES.exists() else []):
        out[HELM_RULES / src.name] = out.get(src) or src.read_text()
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a file is stale")
    ap.add_argument("--runbook-url", default=DEFAULT_RUNBOOK_URL,
                    help="runbook link pattern; {alert} is the alert name (default: %(default)s)")
    args = ap.parse_args(argv)
    if "{alert}" not in args.runbook_url:
        ap.error("--runbook-url: the pattern needs an {alert} placeholder")
    stale = []
    for path, text in outputs(args.runbook_url).items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    # Copies of rule files that no longer exist would still be loaded by the chart.
    extra = sorted(set(HELM_RULES.glob("*.yml")) - {HELM_RULES / p.name for p in RULES.glob("*.yml")})
    for path in extra:
        stale.append(path)
        if not args.check:
            path.unlink()
    for path in stale:
        verb = "stale" if args.check else "wrote"
        print(f"{verb}: {_shown(path)}", file=sys.stderr if args.check else sys.stdout)
    if args.check and stale:
        print("run `python prometheus/build.py` and commit the result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
