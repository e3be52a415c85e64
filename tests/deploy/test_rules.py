"""The Prometheus rule files: promtool's checks and unit tests, one rule per trainguard alert name, the chart's
copies, and the rules evaluated by a real Prometheus against a real daemon."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor.daemon.alerts import DEFAULT_RUNBOOK_URL
from monitor.daemon.detectors import ALERT_SEVERITIES
from tests.deploy.conftest import LOSSY_RUN, SCRAPE_SECONDS, Stack
from tests.helpers import IN_CI, ROOT

PROM = ROOT / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM / "tests").glob("*.yml"))
HELM_RULES = ROOT / "helm" / "trainguard" / "rules"
PROMTOOL = shutil.which("promtool")
# The alert names of the contract (DESIGN.md), each with its default severity.
DESIGN_ALERTS = {
    "NonFinite": "critical", "LossSpike": "warning", "LossDivergence": "critical", "GradientExplosion": "warning",
    "VanishingGradient": "warning", "Overfitting": "warning", "LossPlateau": "info",
    "LearningRateAnomaly": "warning", "ProbeRegression": "warning", "OutputDrift": "warning",
    "StragglerRank": "warning", "ThroughputDrop": "warning", "TrainingStalled": "critical", "RankLost": "critical",
    "MemoryLeak": "warning", "MemoryPressure": "critical", "DataLoaderBottleneck": "info",
    "LossScaleCollapse": "warning",
}
# Outside CI a machine without promtool skips these; in CI promtool() below fails, naming what is missing.
needs_promtool = pytest.mark.skipif(PROMTOOL is None and not IN_CI, reason="promtool is not installed (Debian "
                                    "package prometheus; `make system-deps` installs it)")


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool is not installed (Debian package prometheus; `make system-deps`)"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def rules_of(path: Path) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def alert_rules() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in RULE_FILES:
        for r in rules_of(path):
            if "alert" in r:
                assert r["alert"] not in out, f"alert {r['alert']} defined twice"
                out[r["alert"]] = r
    return out


# -- promtool --------------------------------------------------------------------------------------------------

@needs_promtool
def test_promtool_checks_the_rule_files() -> None:
    out = promtool("check", "rules", *map(str, RULE_FILES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(RULE_FILES)


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    # Run from elsewhere: each test file names its rule files relative to its own folder.
    out = promtool("test", "rules", *map(str, TEST_FILES), cwd=Path("/"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(TEST_FILES)


@needs_promtool
def test_promtool_checks_the_example_config(tmp_path: Path) -> None:
    # Rule paths in prometheus.yml are relative to the config file, so this works from any directory.
    out = promtool("check", "config", str(PROM / "prometheus.yml"), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in out.stdout
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9750"]
    assert sorted(config["rule_files"]) == sorted(f"rules/{p.name}" for p in RULE_FILES)


@needs_promtool
def test_promtool_fails_a_broken_rule(tmp_path: Path) -> None:
    # The checks above would pass vacuously if promtool accepted anything.
    bad = tmp_path / "bad.rules.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: max by (run (up)\n")
    assert promtool("check", "rules", str(bad)).returncode != 0


# -- what the rules say ------------------------------------------------------------------------------------------

def test_every_trainguard_alert_name_has_a_rule() -> None:
    assert ALERT_SEVERITIES == DESIGN_ALERTS  # the daemon's list is the contract's
    rules = alert_rules()
    for name in DESIGN_ALERTS:
        r = rules.get(name)
        assert r is not None, f"no Prometheus rule for {name}"
        # Exactly this alert's series, firing (1), and labelled as the daemon labels its own notifications.
        assert re.fullmatch(rf'max by \(run, severity\) \(trainguard_alert_active\{{alert="{name}"\}}\) == 1',
                            r["expr"]), r["expr"]
        assert r["labels"] == {"via": "prometheus"}  # severity comes from the daemon's series
        assert set(r["annotations"]) == {"summary", "description", "runbook_url"}
        assert "{{ $labels.run }}" in r["annotations"]["summary"]
        # The same runbook link as the daemon's default, to a runbook that exists.
        assert r["annotations"]["runbook_url"] == DEFAULT_RUNBOOK_URL.format(alert=name)
        assert (ROOT / "docs" / "runbooks" / f"{name}.md").is_file()


def test_generator_severities_match_the_daemon() -> None:
    spec = importlib.util.spec_from_file_location("prometheus_build", PROM / "build.py")
    assert spec and spec.loader
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert {name: sev for name, sev, _ in build.ALERTS} == ALERT_SEVERITIES
    assert build.DEFAULT_RUNBOOK_URL == DEFAULT_RUNBOOK_URL


def test_daemon_alerts_have_severity_and_documented_runbooks() -> None:
    doc = (ROOT / "docs" / "prometheus.md").read_text()
    daemon_rules = [r for r in rules_of(PROM / "rules" / "trainguard-daemon.rules.yml") if "alert" in r]
    assert {r["alert"] for r in daemon_rules} >= {"TrainguardDaemonDown", "TrainguardDaemonAbsent",
                                                 "TrainguardNotIngesting", "TrainguardClientDroppingRecords",
                                                 "TrainguardRejectingRecords", "TrainguardNotifierFailing",
                                                 "TrainguardStoreFailing"}
    for r in daemon_rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert set(r["annotations"]) == {"summary", "description", "runbook_url"}, r["alert"]
        anchor = r["alert"].lower()
        assert r["annotations"]["runbook_url"].endswith(f"/docs/prometheus.md#{anchor}"), r["alert"]
        assert re.search(rf"^### {r['alert']}$", doc, re.M), f"docs/prometheus.md has no section {r['alert']}"


def test_recording_rules_follow_the_naming_convention() -> None:
    for r in rules_of(PROM / "rules" / "trainguard-recording.rules.yml"):
        assert re.fullmatch(r"[a-z_]+:trainguard_[a-z0-9_]+:[a-z0-9_]+", r["record"]), r["record"]


def test_every_alert_rule_is_tested_firing_and_silent() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for path in TEST_FILES:
        for t in yaml.safe_load(path.read_text())["tests"]:
            for case in t.get("alert_rule_test", []):
                (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = set(alert_rules())
    assert names - fires == set(), "never tested firing"
    assert names - silent == set(), "never tested not firing"


def test_generated_rules_and_chart_copies_are_current() -> None:
    out = subprocess.run([sys.executable, str(PROM / "build.py"), "--check"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    # The chart loads its own copies (.Files.Glob "rules/*.yml"): byte for byte the same files.
    assert sorted(p.name for p in HELM_RULES.glob("*.yml")) == [p.name for p in RULE_FILES]
    for p in RULE_FILES:
        assert (HELM_RULES / p.name).read_bytes() == p.read_bytes(), p.name


# -- the rules against a real daemon -------------------------------------------------------------------------------

def _until_equal(get: Any, want: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = get()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(SCRAPE_SECONDS)


def test_prometheus_raises_what_the_daemon_raises(stack: Stack) -> None:
    def daemon_firing() -> set[tuple[str, str, str]]:
        return {(a["name"], a["run"], a["severity"]) for a in stack.daemon.list_alerts(state="firing")}

    def prometheus_firing() -> set[tuple[str, str, str]]:
        res = stack.prom.query('ALERTS{alertstate="firing", via="prometheus"}')["data"]["result"]
        return {(r["metric"]["alertname"], r["metric"]["run"], r["metric"]["severity"]) for r in res}

    want = daemon_firing()
    assert {"NonFinite", "ProbeRegression", "RankLost", "TrainingStalled", "StragglerRank"} <= {n for n, _, _ in want}
    # The live job keeps going meanwhile and may start another alert: compare with the daemon's view each time.
    deadline = time.monotonic() + 30
    while (got := prometheus_firing()) != (want := daemon_firing()) and time.monotonic() < deadline:
        time.sleep(SCRAPE_SECONDS)
    assert got == want, (got - want, want - got)


def test_daemon_health_alerts_fire_on_what_the_stack_does(stack: Stack) -> None:
    # The stack's daemon pushes to an Alertmanager that is not there, is sent bogus batches, and has a client that
    # drops records; nothing else is wrong with it.
    def firing() -> set[tuple[str, str]]:
        res = stack.prom.query('ALERTS{alertstate="firing", alertname=~"Trainguard.+"}')["data"]["result"]
        return {(r["metric"]["alertname"], r["metric"].get("run", "")) for r in res}

    want = {("TrainguardNotifierFailing", ""), ("TrainguardRejectingRecords", ""),
            ("TrainguardClientDroppingRecords", LOSSY_RUN)}
    assert _until_equal(firing, want) == want
