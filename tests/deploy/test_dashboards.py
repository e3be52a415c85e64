"""The Grafana dashboards: their structure, their sync with grafana/build.py, and every query they make, run
against a real Prometheus that scrapes a real daemon fed with incident traces and a live job."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.deploy.conftest import LIVE_RUN, LOSSY_RUN, RULES, SCRAPE_SECONDS, SLOW_RANK, Stack
from tests.helpers import ROOT, wait_for

DASHBOARDS = ROOT / "grafana" / "dashboards"
HELM_DASHBOARDS = ROOT / "helm" / "trainguard" / "dashboards"
BUILD = ROOT / "grafana" / "build.py"
FILES = sorted(DASHBOARDS.glob("*.json"))
DS = {"type": "prometheus", "uid": "${datasource}"}
EXPECTED = {"trainguard-fleet", "trainguard-run", "trainguard-ranks", "trainguard-daemon"}
# Grafana's own variables, as Grafana fills them for a 1 s scrape interval over a short time range:
# $__rate_interval = max($__interval + scrape interval, 4 x scrape interval).
GLOBALS = {"__rate_interval": f"{4 * SCRAPE_SECONDS}s", "__interval": f"{SCRAPE_SECONDS}s", "__range": "1h"}
QUERY_TIMEOUT = 40.0  # seconds to wait for every query to have data; the first scrape comes ~5.5 s after start


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels_of(d: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones inside collapsed rows included."""
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def variables_of(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in d["templating"]["list"]}


def _variable_query(v: dict[str, Any]) -> str:
    q = v["query"]
    return q["query"] if isinstance(q, dict) else q


def queries_of(d: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(where, PromQL, instant) for every panel target and annotation of a dashboard."""
    out = []
    for p in panels_of(d):
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"], bool(t.get("instant"))))
    for a in d["annotations"]["list"]:
        out.append((f"annotation {a['name']!r}", a["expr"], False))
    return out


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    assert FILES, f"no dashboards in {DASHBOARDS}"
    return {p.stem: load(p) for p in FILES}


# -- structure -----------------------------------------------------------------------------------------------------

def test_the_four_dashboards_exist(dashboards: dict[str, dict[str, Any]]) -> None:
    assert set(dashboards) == EXPECTED
    assert {d["uid"] for d in dashboards.values()} == EXPECTED  # the uid is the file name: links rely on it


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_structure(path: Path) -> None:
    d = load(path)
    assert 39 <= d["schemaVersion"] <= 41
    assert d["title"].startswith("trainguard / ") and "trainguard" in d["tags"]
    assert d["id"] is None  # so that an import creates a dashboard instead of overwriting one by id
    ids = [p["id"] for p in panels_of(d)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    for p in panels_of(d):
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh"), p["title"]
        assert 1 <= g["w"] <= 24 and g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0 and g["y"] >= 0, p
        if p["type"] == "row":
            assert p.get("collapsed") or not p["panels"], "an open row must not hold panels"
            for inner in p["panels"]:
                assert inner["gridPos"]["y"] > g["y"], (p["title"], inner["title"])
            continue
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS, (p["title"], t["refId"])
            assert t["expr"].strip(), (p["title"], t["refId"])
        assert p["description"], f"panel {p['title']!r} says nothing about what it shows"
    _no_overlaps(d["panels"], path.name)
    for row in (p for p in d["panels"] if p["type"] == "row"):
        _no_overlaps(row["panels"], f"{path.name} row {row['title']!r}")

    v = variables_of(d)
    assert v["datasource"]["type"] == "datasource" and v["datasource"]["query"] == "prometheus"
    assert "run" in v and v["run"]["type"] == "query" and v["run"]["datasource"] == DS
    assert re.fullmatch(r"label_values\(\w+, run\)", _variable_query(v["run"]))
    for var in v.values():
        if var["type"] == "query":
            assert var["datasource"] == DS, var["name"]
            if var["includeAll"]:
                # A regex of every value would grow with the fleet; ".+" matches them all at any size.
                assert var["allValue"] == ".+", var["name"]
    for a in d["annotations"]["list"]:
        assert a["datasource"] == DS, a["name"]


def _no_overlaps(panels: list[dict[str, Any]], where: str) -> None:
    boxes = [(p["title"], p["gridPos"]) for p in panels]
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1:]:
            apart = (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"] or a["y"] + a["h"] <= b["y"]
                     or b["y"] + b["h"] <= a["y"])
            assert apart, f"{where}: {ta!r} overlaps {tb!r}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_no_datasource_is_hard_coded(path: Path) -> None:
    # Anywhere in the document: a datasource named by a string, or by a uid other than the variable, would tie
    # the dashboard to one Grafana.
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "datasource" and v != DS:
                    pytest.fail(f"{path.name} {where}: datasource {v!r}, expected {DS}")
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    d = load(path)
    walk(d, "")
    text = path.read_text()
    uids = set(re.findall(r'"uid": "([^"]*)"', text))
    assert uids == {"${datasource}", d["uid"]}, uids


def test_committed_json_matches_the_generator() -> None:
    out = subprocess.run([sys.executable, str(BUILD), "--check"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    # The Helm chart loads its own copies (.Files.Glob): byte for byte the same files.
    assert sorted(p.name for p in HELM_DASHBOARDS.glob("*.json")) == [p.name for p in FILES]
    for p in FILES:
        assert (HELM_DASHBOARDS / p.name).read_bytes() == p.read_bytes(), p.name


def test_generator_output_is_stable_and_check_catches_drift(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("grafana_build", BUILD)
    assert spec and spec.loader
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.OUT, build.HELM_OUT = tmp_path / "dashboards", tmp_path / "helm"
    assert build.main([]) == 0
    first = {p.name: p.read_bytes() for p in build.OUT.glob("*.json")}
    assert build.main(["--check"]) == 0
    assert build.main([]) == 0 and {p.name: p.read_bytes() for p in build.OUT.glob("*.json")} == first
    for text in first.values():  # sorted keys: the same document written again gives the same bytes
        assert build.render(json.loads(text)) == text.decode()
    victim = build.HELM_OUT / "trainguard-run.json"
    victim.write_text(victim.read_text().replace('"refresh": "30s"', '"refresh": "5s"'))
    assert build.main(["--check"]) == 1
    (build.OUT / "old-dashboard.json").write_text("{}")
    assert build.main(["--check"]) == 1
    assert build.main([]) == 0 and build.main(["--check"]) == 0
    assert not (build.OUT / "old-dashboard.json").exists()


def test_runs_link_to_their_detail(dashboards: dict[str, dict[str, Any]]) -> None:
    fleet = dashboards["trainguard-fleet"]
    links = [link["url"] for p in panels_of(fleet) for o in p["fieldConfig"]["overrides"]
             for prop in o["properties"] if prop["id"] == "links" for link in prop["value"]]
    assert links and all(url.startswith("/d/trainguard-run/") and "var-run=${__value.raw}" in url for url in links)


# -- every query against a real Prometheus ---------------------------------------------------------------------

def _regex(values: list[str]) -> str:
    """A multi-value variable as Grafana writes it into a =~ matcher: escaped values joined by |. The backslash
    is doubled, as inside a PromQL string literal it must be."""
    esc = [re.sub(r"([\\^$*+?.()|\[\]{}/])", r"\\\\\1", v) for v in values]
    return "(" + "|".join(esc) + ")"


def _variable_values(stack: Stack, d: dict[str, Any]) -> dict[str, str]:
    values = dict(GLOBALS)
    for name, v in variables_of(d).items():
        if v["type"] == "custom":
            values[name] = v["current"]["value"]
        elif v["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+), (\w+)\)", _variable_query(v))
            assert m, _variable_query(v)
            found = wait_for(lambda: stack.prom.label_values(m.group(2), m.group(1)), timeout=QUERY_TIMEOUT,
                             interval=SCRAPE_SECONDS, what=f"variable {name}: {_variable_query(v)} to list values")
            values[name] = _regex(found)
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    """Fill in $name and ${name} as Grafana does (longest names first, so $__rate_interval is not $__range...)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr


def _answer(stack: Stack, expr: str, instant: bool) -> tuple[str | None, bool]:
    """(None if the query returned data, else why not; whether waiting could change it)."""
    if instant:
        body = stack.prom.query(expr)
    else:
        body = stack.prom.query_range(expr, max(30.0, time.time() - stack.prom.started_at))
    if body.get("status") != "success":
        return f"{body.get('errorType')}: {body.get('error')}", body.get("errorType") != "bad_data"
    if not body["data"]["result"]:
        return "empty result", True
    return None, False


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_query_returns_data(stack: Stack, dashboards: dict[str, dict[str, Any]], name: str) -> None:
    d = dashboards[name]
    values = _variable_values(stack, d)
    if "run" in values:
        # The run variable lists what was replayed and what reports live.
        listed = set(stack.prom.label_values("run", "trainguard_run_info"))
        assert stack.runs <= listed, stack.runs - listed
    pending = []
    for where, expr, instant in queries_of(d):
        q = substitute(expr, values)
        assert "$" not in q, f"{name} {where}: unknown variable left in {q!r}"
        pending.append((where, q, instant))
    # Counters need two scrapes for rate(), recorded series a rule evaluation after that, ALERTS one more:
    # retry what is still empty until it has data or the time is up.
    deadline = time.monotonic() + QUERY_TIMEOUT
    failures: dict[tuple[str, str, bool], str] = {}
    while pending:
        failures = {}
        for item in pending:
            reason, retry = _answer(stack, item[1], item[2])
            if reason is not None:
                failures[item] = reason
                if not retry:
                    deadline = 0.0  # a query that does not parse will not start to
        if not failures or time.monotonic() > deadline:
            break
        pending = list(failures)
        time.sleep(SCRAPE_SECONDS)
    assert not failures, f"{len(failures)} queries of {name} failed:\n" + "\n".join(
        f"  {where}: {reason}\n    {q}" for (where, q, _), reason in failures.items())


def test_every_metric_a_dashboard_reads_exists(stack: Stack, dashboards: dict[str, dict[str, Any]]) -> None:
    # A query over a misspelt metric could still return data through an `or`; names are checked one by one.
    recorded = set()
    for path in RULES:
        recorded |= set(re.findall(r"^\s*- record: (\S+)$", path.read_text(), re.M))
    exported = stack.metric_names | recorded | {"up", "ALERTS"}
    used = set()
    for d in dashboards.values():
        for _, expr, _ in queries_of(d):
            used |= set(re.findall(r"\b(?:run:)?trainguard_[a-z0-9_]+(?::[a-z0-9_]+)?", expr))
        for v in variables_of(d).values():
            if v["type"] == "query":
                used.add(re.fullmatch(r"label_values\((\w+), \w+\)", _variable_query(v)).group(1))  # type: ignore
    missing = used - exported
    assert not missing, f"dashboards read series that neither the daemon nor the recording rules produce: {missing}"
    # and the stack did exercise the daemon's store timing the Daemon dashboard plots
    assert "trainguard_store_commit_seconds_total" in stack.metric_names
    assert stack.daemon.store.stats.commit_seconds > 0


def test_ranks_dashboard_singles_out_the_slow_rank(stack: Stack) -> None:
    # The question the Ranks dashboard answers, asked of the live job: which rank is slow?
    run = f'run="{LIVE_RUN}"'
    deadline = time.monotonic() + QUERY_TIMEOUT

    def eventually(expr: str) -> list[dict[str, Any]]:
        """The result of `expr` once it has one: a scrape, a recording rule's evaluation or a client's
        heartbeat may not have come yet, each on its own interval."""
        while True:
            result = stack.prom.query(expr)["data"]["result"]
            if result or time.monotonic() > deadline:
                return result
            time.sleep(SCRAPE_SECONDS)

    top = eventually(f"topk(1, trainguard_compute_duration_seconds{{{run}}})")
    assert [r["metric"]["rank"] for r in top] == [str(SLOW_RANK)]
    r = eventually(f"run:trainguard_compute_duration_seconds:max{{{run}}} "
                   f"/ run:trainguard_compute_duration_seconds:median{{{run}}}")
    assert r and float(r[0]["value"][1]) > 2.5
    # ... and the lossy client's drops reach Prometheus, as the Daemon dashboard shows them.
    drops = eventually(f'trainguard_client_dropped_records_total{{run="{LOSSY_RUN}"}} > 0')
    assert drops and float(drops[0]["value"][1]) > 0

