"""The `trainguard` command line as a user runs it: real subprocesses against a real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from monitor import __version__
from tests.helpers import ROOT, TRACES, free_port, http_json

NONFINITE = TRACES / "cpu" / "cpu-nonfinite-01.jsonl.gz"
HEALTHY = TRACES / "cpu" / "cpu-healthy-01.jsonl.gz"


def tg(*args: Any, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monitor", *map(str, args)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def replayed(daemon: Any) -> Any:
    """The daemon after replaying a healthy and a NaN trace."""
    out = tg("replay", "--quiet", "--address", daemon.grpc_address, HEALTHY, NONFINITE)
    assert out.returncode == 0, out.stderr
    return daemon


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0].split(), [ln.split() for ln in lines[1:]]


# ---------------------------------------------------------------------------------------------
# runs and alerts


def test_runs_table(replayed: Any) -> None:
    out = tg("runs", "--url", replayed.http_url)
    assert out.returncode == 0, out.stderr
    header, rows = _table(out.stdout)
    assert header == ["RUN", "STATUS", "HEALTH", "WORLD_SIZE", "REPORTING", "LAST_STEP", "LAST_SEEN"]
    by = {r[0]: r for r in rows}
    assert set(by) == {"cpu-nonfinite-01", "cpu-healthy-01"}
    assert by["cpu-nonfinite-01"][1:6] == ["failed", "critical", "1", "0", "649"]
    assert by["cpu-healthy-01"][1:3] == ["completed", "ok"]
    assert by["cpu-healthy-01"][5] == "1200"  # the end record carries the last step


def test_runs_json_matches_the_api(replayed: Any) -> None:
    out = tg("runs", "--json", "--url", replayed.http_url)
    assert out.returncode == 0
    assert json.loads(out.stdout) == http_json(replayed.http_url + "/api/v1/runs")["runs"]


def test_one_run_table_and_json(replayed: Any) -> None:
    out = tg("runs", "--run", "cpu-nonfinite-01", "--url", replayed.http_url)
    assert out.returncode == 0, out.stderr
    summary, ranks = out.stdout.split("\n\n")
    header, rows = _table(summary)
    assert header[0] == "RUN" and rows[0][0] == "cpu-nonfinite-01"
    header, rows = _table(ranks)
    assert header == ["RANK", "STATUS", "LAST_STEP", "LAST_SEEN", "STEP_TIME", "RSS_BYTES", "DROPPED"]
    assert len(rows) == 1 and rows[0][:3] == ["0", "failed", "649"]

    out = tg("runs", "--run", "cpu-nonfinite-01", "--json", "--url", replayed.http_url)
    detail = json.loads(out.stdout)
    assert detail == http_json(replayed.http_url + "/api/v1/runs/cpu-nonfinite-01")
    assert detail["records"] == 749 and [a["name"] for a in detail["alerts"]] == ["NonFinite"]


def test_unknown_run_exits_2(daemon: Any) -> None:
    out = tg("runs", "--run", "no-such-run", "--url", daemon.http_url)
    assert out.returncode == 2
    assert "HTTP 404" in out.stderr and "no-such-run" in out.stderr
    assert "Traceback" not in out.stderr


def test_alerts_table(replayed: Any) -> None:
    out = tg("alerts", "--url", replayed.http_url)
    assert out.returncode == 0, out.stderr
    header, rows = _table(out.stdout)
    assert header == ["ID", "RUN", "ALERT", "SEVERITY", "STATE", "RANK", "STEP", "STARTED", "SUMMARY"]
    assert len(rows) == 1
    assert rows[0][:7] == ["1", "cpu-nonfinite-01", "NonFinite", "critical", "firing", "-", "610"]
    assert "loss is nan at step 610" in out.stdout


def test_alerts_json_and_filters(replayed: Any) -> None:
    url = replayed.http_url
    out = tg("alerts", "--json", "--url", url)
    assert out.returncode == 0
    alerts = json.loads(out.stdout)
    assert alerts == http_json(url + "/api/v1/alerts")["alerts"]
    assert [(a["name"], a["step"]) for a in alerts] == [("NonFinite", 610)]
    firing = json.loads(tg("alerts", "--json", "--state", "firing", "--run", "cpu-nonfinite-01", "--url", url).stdout)
    assert firing == alerts
    assert json.loads(tg("alerts", "--json", "--state", "resolved", "--url", url).stdout) == []
    assert json.loads(tg("alerts", "--json", "--run", "cpu-healthy-01", "--url", url).stdout) == []
    out = tg("alerts", "--run", "cpu-healthy-01", "--url", url)
    assert out.returncode == 0 and out.stdout.strip() == "no alerts"


def test_empty_daemon_tables(daemon: Any) -> None:
    assert tg("runs", "--url", daemon.http_url).stdout.strip() == "no live runs"
    assert tg("alerts", "--url", daemon.http_url).stdout.strip() == "no alerts"


def test_url_from_the_environment(replayed: Any) -> None:
    env = dict(os.environ, TRAINGUARD_URL=replayed.http_url)
    out = subprocess.run([sys.executable, "-m", "monitor", "alerts", "--json"], check=False, cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and len(json.loads(out.stdout)) == 1


def test_alerts_bad_state_is_a_usage_error(daemon: Any) -> None:
    out = tg("alerts", "--state", "bogus", "--url", daemon.http_url)
    assert out.returncode == 2
    assert "--state" in out.stderr and "bogus" in out.stderr


@pytest.mark.parametrize("cmd", ["runs", "alerts"])
def test_unreachable_daemon_exits_2(cmd: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = tg(cmd, "--url", url)
    assert out.returncode == 2
    assert f"trainguard {cmd}: error: cannot reach the daemon at {url}" in out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------
# help, version, usage


@pytest.mark.parametrize("cmd", ["serve", "replay", "runs", "alerts", "demo"])
def test_every_command_help_shows_examples(cmd: str) -> None:
    out = tg(cmd, "--help")
    assert out.returncode == 0
    assert f"usage: trainguard {cmd}" in out.stdout
    assert "examples:" in out.stdout
    examples = out.stdout.split("examples:", 1)[1]
    assert f"  trainguard {cmd}" in examples


def test_top_level_help_lists_commands_and_examples() -> None:
    out = tg("--help")
    assert out.returncode == 0
    for cmd in ("serve", "replay", "runs", "alerts", "demo"):
        assert cmd in out.stdout
    assert "examples:" in out.stdout and "trainguard replay run.jsonl.gz" in out.stdout


def test_no_command_prints_help_and_exits_2() -> None:
    out = tg()
    assert out.returncode == 2
    assert "usage: trainguard" in out.stdout


def test_version() -> None:
    out = tg("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"trainguard {__version__}"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "trainguard"
    out = subprocess.run([str(script), "--version"], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and __version__ in out.stdout


# ---------------------------------------------------------------------------------------------
# serve and its config


def _serve(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "tg.toml"
    cfg.write_text(config)
    return tg("serve", "--config", cfg, "--grpc-port", "0", "--http-port", "0", "--db", tmp_path / "t.db",
              timeout=30)


@pytest.mark.parametrize("config,named", [
    ("grpc_prot = 1\n", "grpc_prot"),
    ("[daemon]\nwindow = 10\nbogus_key = true\n", "bogus_key"),
    # a typo beside [daemon] must not be ignored either
    ("[daemon]\nwindow = 10\n[detector.NonFinite]\nenabled = false\n", "detector"),
])
def test_serve_unknown_config_key_exits_2_naming_it(tmp_path: Path, config: str, named: str) -> None:
    out = _serve(tmp_path, config)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("trainguard serve: error: ")
    assert f"unknown setting(s) {named}" in out.stderr
    assert str(tmp_path / "tg.toml") in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "t.db").exists()  # refused before touching anything


@pytest.mark.parametrize("config,named", [
    ("window = 0\n", "window: must be an integer >= 1"),
    ('rank_silent_after = "soon"\n', "rank_silent_after: must be a positive number"),
    ("[detectors.NoSuchAlert]\n", "detectors.NoSuchAlert: unknown detector"),
    ("[detectors.NonFinite]\nresolve_after = 3\n", "detectors.NonFinite: unknown setting(s) resolve_after"),
    ('[detectors.NonFinite]\nseverity = "loud"\n', "detectors.NonFinite.severity"),
    ("this is = not toml ][", "is not valid TOML"),
])
def test_serve_bad_config_values_exit_2(tmp_path: Path, config: str, named: str) -> None:
    out = _serve(tmp_path, config)
    assert out.returncode == 2
    assert named in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_missing_config_file_exits_2(tmp_path: Path) -> None:
    out = tg("serve", "--config", tmp_path / "absent.toml", "--grpc-port", "0", "--http-port", "0", timeout=30)
    assert out.returncode == 2 and "cannot read" in out.stderr and "absent.toml" in out.stderr


def test_serve_bad_port_flag_is_a_usage_error() -> None:
    out = tg("serve", "--grpc-port", "70000")
    assert out.returncode == 2 and "--grpc-port" in out.stderr and "0-65535" in out.stderr


def test_serve_applies_the_detector_config(daemon_process: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "quiet.toml"
    cfg.write_text("[daemon]\nwindow = 64\n\n[detectors.NonFinite]\nenabled = false\n")
    daemon_process.extra = ["--config", str(cfg)]
    dp = daemon_process.start()
    out = tg("replay", "--quiet", "--address", dp.address, NONFINITE)
    assert out.returncode == 0, out.stderr
    assert http_json(dp.url + "/api/v1/runs/cpu-nonfinite-01")["records"] == 749
    assert http_json(dp.url + "/api/v1/alerts")["alerts"] == []  # the detector was switched off
    assert dp.terminate() == 0
    assert "trainguard daemon stopped" in dp.log_text()


# ---------------------------------------------------------------------------------------------
# silences


def test_silence_help_shows_examples_and_durations() -> None:
    out = tg("silence", "--help")
    assert out.returncode == 0 and "usage: trainguard silence" in out.stdout
    examples = out.stdout.split("examples:", 1)[1]
    for line in ("trainguard silence --run my-run --alert LossSpike --for 2h", "trainguard silence --list",
                 "trainguard silence --expire 3"):
        assert line in examples
    assert "30m, 2h, 1d" in out.stdout


def test_parse_duration() -> None:
    from monitor.cli import format_duration, parse_duration

    assert [parse_duration(s) for s in ("90s", "30m", "2h", "1d", "1w", "1h30m", "1.5h", " 2H ")] == \
        [90, 1800, 7200, 86400, 604800, 5400, 5400, 7200]
    for bad in ("", "2", "2x", "h", "1h 30m", "-1h", "0s"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert [format_duration(s) for s in (7200, 5400, 90061, 45)] == ["2h", "1h30m", "1d1h1m1s", "45s"]


def test_silence_create_list_expire(daemon: Any) -> None:
    url = daemon.http_url
    out = tg("silence", "--run", "my-run", "--alert", "LossSpike", "--for", "2h", "--comment", "known bad shard",
             "--by", "ana", "--url", url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("silence 1: run my-run, alert LossSpike, for 2h (until ")
    assert "trainguard silence --expire 1" in out.stdout
    s = http_json(url + "/api/v1/silences")["silences"][0]
    assert (s["run"], s["alert"], s["comment"], s["created_by"]) == ("my-run", "LossSpike", "known bad shard", "ana")
    assert s["ends_at"] - s["starts_at"] == pytest.approx(7200)
    assert tg("silence", "--alert", "MemoryLeak", "--for", "30m", "--url", url).returncode == 0

    out = tg("silence", "--list", "--url", url)
    header, rows = _table(out.stdout)
    assert header == ["ID", "RUN", "ALERT", "STATE", "ENDS", "CREATED_BY", "COMMENT"]
    assert [r[:4] for r in rows] == [["2", "*", "MemoryLeak", "active"], ["1", "my-run", "LossSpike", "active"]]
    assert json.loads(tg("silence", "--list", "--json", "--url", url).stdout) == \
        http_json(url + "/api/v1/silences")["silences"]

    out = tg("silence", "--expire", "1", "--url", url)
    assert out.returncode == 0 and out.stdout.strip() == "silence 1 expired (run my-run, alert LossSpike)"
    assert [r[0] for r in _table(tg("silence", "--list", "--url", url).stdout)[1]] == ["2"]
    rows = _table(tg("silence", "--list", "--all", "--url", url).stdout)[1]
    assert [(r[0], r[3]) for r in rows] == [("2", "active"), ("1", "expired")]


@pytest.mark.parametrize("args,message", [
    (["--run", "r", "--for", "2x"], "argument --for: '2x' is not a duration"),
    (["--run", "r", "--alert", "LosSpike", "--for", "1h"], "HTTP 400: alert: must be an alert name"),
    (["--run", "r"], "give --for DURATION"),
    (["--for", "1h"], "name what to silence: --run RUN and/or --alert NAME"),
    (["--expire", "42"], "HTTP 404: silence 42 does not exist"),
    (["--list", "--expire", "1"], "not allowed with argument --list"),
])
def test_silence_errors_exit_2_with_a_clear_message(daemon: Any, args: list[str], message: str) -> None:
    out = tg("silence", *args, "--url", daemon.http_url)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_silence_unreachable_daemon_exits_2() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = tg("silence", "--list", "--url", url)
    assert out.returncode == 2 and f"cannot reach the daemon at {url}" in out.stderr


def test_serve_refuses_a_bad_alertmanager_url(tmp_path: Path) -> None:
    out = tg("serve", "--alertmanager-url", "http://127.0.0.1:9093", "--alertmanager-url", "am:9093",
             "--grpc-port", "0", "--http-port", "0", "--db", tmp_path / "t.db", timeout=30)
    assert out.returncode == 2
    assert "alertmanager_urls[1]: 'am:9093' is not an http:// or https:// URL" in out.stderr


def test_alerts_table_marks_silenced_alerts() -> None:
    from monitor.cli import format_alerts

    a = {"id": 3, "run": "r", "name": "LossSpike", "severity": "warning", "state": "firing", "rank": None,
         "step": 7, "started_at": 1.7e9, "summary": "loss 9.1 at step 7", "silenced": True}
    _, rows = _table(format_alerts([a, {**a, "id": 2, "silenced": False}]))
    assert [r[4] for r in rows] == ["firing,silenced", "firing"]
