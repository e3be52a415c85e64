#!/usr/bin/env python3
"""Write the trainguard Grafana dashboards as JSON, from the panel definitions below.

    python grafana/build.py            # write grafana/dashboards/*.json and the Helm chart's copies
    python grafana/build.py --check    # exit 1 if any committed JSON differs from what this script writes

Every panel and query uses the dashboard's `datasource` variable (type datasource, Prometheus), never a fixed
datasource uid, so one file imports into any Grafana. Series recorded by prometheus/rules/
trainguard-recording.rules.yml (names with colons) need those rules loaded. Standard library only; the output
is stable (sorted keys, ids in layout order) so that a diff shows what changed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "grafana" / "dashboards"
HELM_OUT = ROOT / "helm" / "trainguard" / "dashboards"
SCHEMA_VERSION = 39  # Grafana 10.4 writes 39; 11.x and 12.x read it as is
DS = {"type": "prometheus", "uid": "${datasource}"}
TAGS = ["trainguard"]
RUN = 'run=~"$run"'
# Health as run:trainguard_health:max records it, the same words the daemon's /api/v1/runs uses.
HEALTH_MAPPINGS = [{"type": "value", "options": {
    "0": {"text": "ok", "color": "green", "index": 0},
    "1": {"text": "info", "color": "blue", "index": 1},
    "2": {"text": "warning", "color": "orange", "index": 2},
    "3": {"text": "critical", "color": "red", "index": 3},
}}]
HEALTH_THRESHOLDS = {"mode": "absolute", "steps": [
    {"color": "green", "value": None}, {"color": "blue", "value": 1}, {"color": "orange", "value": 2},
    {"color": "red", "value": 3}]}


# -- building blocks ---------------------------------------------------------------------------------------------

def target(expr: str, legend: str = "", instant: bool = False, fmt: str = "time_series") -> dict[str, Any]:
    """One Prometheus query of a panel (refIds are given when the panel is made)."""
    return {"datasource": DS, "editorMode": "code", "expr": expr, "format": fmt, "instant": instant,
            "legendFormat": legend or "__auto", "range": not instant}


def thresholds(*steps: tuple[str, float | None]) -> dict[str, Any]:
    """Absolute threshold steps; the first one's value is None (the base colour)."""
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


def _panel(kind: str, title: str, targets: list[dict[str, Any]], description: str, w: int, h: int,
           defaults: dict[str, Any] | None = None, options: dict[str, Any] | None = None,
           overrides: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    p = {"type": kind, "title": title, "description": description, "datasource": DS, "targets": targets,
         "fieldConfig": {"defaults": defaults or {}, "overrides": overrides or []}, "options": options or {},
         "gridPos": {"w": w, "h": h}}
    p.update(extra)
    return p


def timeseries(title: str, targets: list[dict[str, Any]], description: str, unit: str = "short", w: int = 12,
               h: int = 8, log: int | None = None, th: dict[str, Any] | None = None, stack: bool = False,
               minimum: float | None = None, overrides: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A time series panel; `th` draws threshold lines (a detector's page level, a target)."""
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                              "showPoints": "never", "spanNulls": False, "axisSoftMin": minimum,
                              "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                              "thresholdsStyle": {"mode": "line" if th else "off"}}
    if log:
        custom["scaleDistribution"] = {"type": "log", "log": log}
    if minimum is None:
        del custom["axisSoftMin"]
    defaults = {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"}}
    if th:
        defaults["thresholds"] = th
    return _panel("timeseries", title, targets, description, w, h, defaults,
                  {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                   "tooltip": {"mode": "multi", "sort": "desc"}}, overrides)


def stat(title: str, targets: list[dict[str, Any]], description: str, unit: str = "short", w: int = 4, h: int = 4,
         th: dict[str, Any] | None = None, mappings: list[dict[str, Any]] | None = None, text_mode: str = "auto",
         color_mode: str = "value", decimals: int | None = None,
         overrides: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A single-number panel showing the latest value of each series."""
    defaults: dict[str, Any] = {"unit": unit, "thresholds": th or thresholds(("text", None)),
                                "mappings": mappings or [], "color": {"mode": "thresholds"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return _panel("stat", title, targets, description, w, h, defaults,
                  {"colorMode": color_mode, "graphMode": "none", "justifyMode": "auto", "orientation": "auto",
                   "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "textMode": text_mode, "showPercentChange": False, "wideLayout": True}, overrides)


def table(title: str, targets: list[dict[str, Any]], description: str, w: int = 12, h: int = 8,
          rename: dict[str, str] | None = None, hide: tuple[str, ...] = (), overrides: list[dict[str, Any]] | None
          = None, sort: tuple[str, bool] | None = None, unit: str = "short") -> dict[str, Any]:
    """Instant queries merged on their labels into one row per series, e.g. one row per run or per rank."""
    transformations: list[dict[str, Any]] = [{"id": "merge", "options": {}}]
    transformations.append({"id": "organize", "options": {
        "excludeByName": {name: True for name in ("Time", "__name__", "job", "instance", *hide)},
        "indexByName": {}, "renameByName": rename or {}}})
    options: dict[str, Any] = {"cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"], "fields": ""},
                               "showHeader": True}
    if sort:
        options["sortBy"] = [{"displayName": sort[0], "desc": sort[1]}]
    return _panel("table", title, targets, description, w, h,
                  {"unit": unit, "custom": {"align": "auto", "cellOptions": {"type": "auto"}, "filterable": True},
                   "thresholds": thresholds(("text", None))}, options, overrides,
                  transformations=transformations)


def heatmap(title: str, targets: list[dict[str, Any]], description: str, unit: str, calculate: bool,
            w: int = 12, h: int = 9) -> dict[str, Any]:
    """A heatmap: `calculate` buckets the values of all series (ranks) per time slot; without it each series is
    one row (a rank per row), coloured by its value."""
    options: dict[str, Any] = {
        "calculate": calculate,
        "cellGap": 0 if calculate else 1,
        "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5, "steps": 64,
                  "fill": "dark-orange", "reverse": False},
        "exemplars": {"color": "rgba(255,0,255,0.7)"},
        "filterValues": {"le": 1e-9},
        "legend": {"show": True},
        "rowsFrame": {"layout": "auto"},
        "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": False},
        "yAxis": {"axisPlacement": "left", "reverse": False, "unit": unit if calculate else "short"},
        "cellValues": {"unit": unit},
    }
    if calculate:
        # Log-spaced buckets: step times across ranks span a few milliseconds to many seconds.
        options["calculation"] = {"yBuckets": {"scale": {"type": "log", "log": 2}}}
    return _panel("heatmap", title, targets, description, w, h, {"custom": {"scaleDistribution": {"type": "linear"}}},
                  options)


def state_timeline(title: str, targets: list[dict[str, Any]], description: str, w: int = 24,
                   h: int = 8) -> dict[str, Any]:
    """One coloured band per series over time, here a run's health."""
    return _panel("state-timeline", title, targets, description, w, h,
                  {"mappings": HEALTH_MAPPINGS, "thresholds": HEALTH_THRESHOLDS, "color": {"mode": "thresholds"},
                   "custom": {"fillOpacity": 80, "lineWidth": 0}},
                  {"alignValue": "left", "mergeValues": True, "rowHeight": 0.9, "showValue": "never",
                   "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
                   "tooltip": {"mode": "single", "sort": "none"}})


def bargauge(title: str, targets: list[dict[str, Any]], description: str, unit: str = "short", w: int = 12,
             h: int = 8) -> dict[str, Any]:
    """Horizontal bars, one per series, for a ranking at the end of the time range."""
    return _panel("bargauge", title, targets, description, w, h,
                  {"unit": unit, "thresholds": thresholds(("blue", None)), "color": {"mode": "thresholds"}},
                  {"displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True,
                   "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "valueMode": "color", "namePlacement": "auto", "sizing": "auto", "minVizHeight": 16,
                   "minVizWidth": 8, "maxVizHeight": 300})


def row(title: str, collapsed: bool = False, panels: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A row header; a collapsed row carries its panels inside it, and Grafana queries them only when opened."""
    return {"type": "row", "title": title, "collapsed": collapsed, "panels": panels or [],
            "gridPos": {"w": 24, "h": 1}}


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Place panels left to right in lines 24 units wide and number them in that order (ids unique per dashboard,
    the panels inside collapsed rows included)."""
    ids = itertools.count(1)

    def flow(items: list[dict[str, Any]], y: int) -> int:
        x = line_h = 0
        for p in items:
            w, h = p["gridPos"]["w"], p["gridPos"]["h"]
            if x + w > 24:
                y, x, line_h = y + line_h, 0, 0
            p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
            p["id"] = next(ids)
            x, line_h = x + w, max(line_h, h)
        return y + line_h

    y = 0
    pending: list[dict[str, Any]] = []
    for p in panels:
        if p["type"] != "row":
            pending.append(p)
            continue
        y, pending = flow(pending, y), []
        p["gridPos"] = {"x": 0, "y": y, "w": 24, "h": 1}
        p["id"] = next(ids)
        y += 1
        if p["collapsed"]:
            # Its panels get the places they take when the row opens; the dashboard goes on under the header.
            flow(p["panels"], y)
    flow(pending, y)
    return panels


def datasource_variable() -> dict[str, Any]:
    """The Prometheus datasource to read from: picked in the dashboard, so no datasource uid is hard-coded."""
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
            "regex": "", "skipUrlSync": False}


def query_variable(name: str, label: str, query: str, multi: bool, description: str) -> dict[str, Any]:
    """A variable whose values come from label_values(...); with multi, "All" matches every value by regex."""
    # The query as a string: every Grafana since 7 reads it, and newer ones convert it for their editor.
    v = {"name": name, "label": label, "type": "query", "datasource": DS, "definition": query, "query": query,
         "current": {}, "description": description, "hide": 0, "includeAll": multi, "multi": multi,
         "options": [], "refresh": 2, "regex": "", "skipUrlSync": False, "sort": 1}
    if multi:
        # ".+" rather than a regex listing every value: the list of thousands of runs would make every query huge.
        v["allValue"] = ".+"
    return v


def run_variable(multi: bool) -> dict[str, Any]:
    """The runs to show: every live run the daemon exports (trainguard_run_info has one series per run)."""
    return query_variable("run", "Run", "label_values(trainguard_run_info, run)", multi,
                          "Runs the daemon knows (finished runs stay for an hour by default).")


def custom_variable(name: str, label: str, values: list[str], default: str, description: str) -> dict[str, Any]:
    """A fixed list of values, e.g. how many ranks a top-k table lists."""
    return {"name": name, "label": label, "type": "custom", "query": ",".join(values),
            "current": {"selected": True, "text": default, "value": default}, "description": description,
            "hide": 0, "includeAll": False, "multi": False, "skipUrlSync": False,
            "options": [{"selected": v == default, "text": v, "value": v} for v in values]}


def annotation(name: str, expr: str, title: str, text: str, color: str, enable: bool = True) -> dict[str, Any]:
    """Alerts drawn on every time series panel: a region while the query returns a series."""
    return {"name": name, "datasource": DS, "enable": enable, "hide": False, "iconColor": color, "expr": expr,
            "step": "60s", "titleFormat": title, "textFormat": text, "tagKeys": "run,alert,severity",
            "useValueForTime": False}


def dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]],
              variables: list[dict[str, Any]], annotations: list[dict[str, Any]],
              time_from: str = "now-6h") -> dict[str, Any]:
    """A whole dashboard with links to the other trainguard dashboards (keeping time range and variables)."""
    return {
        "annotations": {"list": annotations},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,  # a shared crosshair: a spike in one panel lines up with the others
        "id": None,
        "links": [{"asDropdown": True, "icon": "external link", "includeVars": True, "keepTime": True,
                   "tags": TAGS, "targetBlank": False, "title": "trainguard", "type": "dashboards", "tooltip": "",
                   "url": ""}],
        "liveNow": False,
        "panels": layout(panels),
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": TAGS,
        "templating": {"list": [datasource_variable(), *variables]},
        "time": {"from": time_from, "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


def link_to_run(title: str = "Run detail") -> list[dict[str, Any]]:
    """A data link from a run's cell to its Run detail dashboard."""
    return [{"title": title, "url": "/d/trainguard-run/trainguard-run?var-run=${__value.raw}&"
                                    "${datasource:queryparam}&${__url_time_range}"}]


def by_name(name: str, **props: Any) -> dict[str, Any]:
    """A field override matched by the field's display name."""
    return {"matcher": {"id": "byName", "options": name},
            "properties": [{"id": k, "value": v} for k, v in props.items()]}


ALERT_ANNOTATIONS = [
    annotation("trainguard alerts", f"max by (run, alert, severity) (trainguard_alert_active{{{RUN}}}) == 1",
               "{{alert}} ({{severity}})", "run {{run}}", "red"),
    # The same alerts through Prometheus' own rules (prometheus/rules/trainguard-alerts.rules.yml), for setups
    # that page from Prometheus: off by default, since it repeats the line above.
    annotation("Prometheus alerts", f'ALERTS{{alertstate="firing", via="prometheus", {RUN}}}',
               "{{alertname}} ({{severity}})", "run {{run}}, from Prometheus", "purple", enable=False),
]

# -- Fleet overview ------------------------------------------------------------------------------------------------


def fleet() -> dict[str, Any]:
    """Every run with its health, step, throughput and active alerts."""
    health = f"run:trainguard_health:max{{{RUN}}}"
    runs_table = table(
        "Runs", [
            target(f"max by (run) ({health})", instant=True, fmt="table"),
            target(f"max by (run, status, framework) (trainguard_run_info{{{RUN}}})", instant=True, fmt="table"),
            target(f"max by (run) (trainguard_step{{{RUN}}})", instant=True, fmt="table"),
            target(f"sum by (run) (trainguard_tokens_per_second{{{RUN}}})", instant=True, fmt="table"),
            target(f"max by (run) (trainguard_run_ranks_reporting{{{RUN}}})", instant=True, fmt="table"),
            target(f"max by (run) (trainguard_run_world_size{{{RUN}}})", instant=True, fmt="table"),
            target(f"max by (run) (run:trainguard_alerts_active:count{{{RUN}}})", instant=True, fmt="table"),
            target(f"time() - max by (run) (trainguard_last_seen_timestamp_seconds{{{RUN}}})", instant=True,
                   fmt="table"),
        ],
        "One row per run: its health (the highest severity among its firing alerts), status, the step it reached, "
        "throughput over all ranks, ranks reporting out of the job's world size, firing alerts, and how long ago "
        "(wall clock) its newest record was made. Click a run for its detail.",
        w=24, h=10, sort=("health", True),
        rename={"Value #A": "health", "Value #C": "step", "Value #D": "tokens/s", "Value #E": "ranks reporting",
                "Value #F": "world size", "Value #G": "alerts firing", "Value #H": "last record"},
        hide=("Value #B",),
        overrides=[
            by_name("run", links=link_to_run()),
            by_name("health", mappings=HEALTH_MAPPINGS, thresholds=HEALTH_THRESHOLDS,
                    **{"custom.cellOptions": {"type": "color-background"}}),
            by_name("tokens/s", unit="short", decimals=0),
            by_name("last record", unit="s", decimals=0),
            by_name("alerts firing", thresholds=thresholds(("green", None), ("orange", 1)),
                    **{"custom.cellOptions": {"type": "color-text"}}),
        ])
    panels = [
        stat("Runs", [target(f"count(max by (run) (trainguard_run_info{{{RUN}}}))")],
             "Runs the daemon keeps: running, and finished within the last hour (expire_finished_after)."),
        stat("Runs by status", [target(f"count by (status) (max by (run, status) (trainguard_run_info{{{RUN}}}))",
                                       "{{status}}")],
             "running until every rank sent its end record; then completed, failed or the status the job gave.",
             w=6, text_mode="value_and_name"),
        stat("Runs by health", [
            target(f"sum({health} == bool 3)", "critical"), target(f"sum({health} == bool 2)", "warning"),
            target(f"sum({health} == bool 1)", "info"), target(f"sum({health} == bool 0)", "ok")],
             "How many runs have a firing alert of each severity at most (ok: none).", w=8,
             text_mode="value_and_name",
             overrides=[by_name(name, color={"mode": "fixed", "fixedColor": colour})
                        for name, colour in (("critical", "red"), ("warning", "orange"), ("info", "blue"),
                                             ("ok", "green"))]),
        stat("Alerts firing", [target(f"sum(run:trainguard_alerts_active:count{{{RUN}}})")],
             "Firing alerts over all shown runs, silenced ones included (a silence stops notifications only).",
             w=3, th=thresholds(("green", None), ("orange", 1))),
        stat("Throughput", [target(f"sum(trainguard_tokens_per_second{{{RUN}}})")],
             "Tokens per second over all shown runs and ranks.", unit="short", w=3, decimals=0),
        runs_table,
        table("Alerts firing now", [
            target(f"max by (run, alert, severity) (trainguard_alert_active{{{RUN}}}) == 1", instant=True,
                   fmt="table")],
              "Every firing alert with its run and severity. The step, value and rank at fault are on the daemon: "
              "`trainguard alerts --run RUN`.", hide=("Value",),
              overrides=[by_name("run", links=link_to_run())]),
        bargauge("Alerts started in the time range", [
            target(f"sort_desc(sum by (alert) (increase(trainguard_alerts_fired_total{{{RUN}}}[$__range])))",
                   "{{alert}}", instant=True)],
                 "How often each alert name started firing over the dashboard's time range, all shown runs."),
        state_timeline("Health over time", [target(health, "{{run}}")],
                       "Each run's health through the time range: green ok, blue info, orange warning, red "
                       "critical."),
        timeseries("Step", [target(f"max by (run) (trainguard_step{{{RUN}}})", "{{run}}")],
                   "The largest optimizer step any rank of the run finished.", w=8),
        timeseries("Throughput (tokens/s)", [
            target(f"sum by (run) (trainguard_tokens_per_second{{{RUN}}})", "{{run}}")],
                   "Tokens per second over recent steps, all ranks of the run.", w=8),
        timeseries("Train loss", [target(f"max by (run) (trainguard_train_loss{{{RUN}}})", "{{run}}")],
                   "The lead rank's latest training loss.", w=8, log=10),
        timeseries("Slowest rank / median rank (step time)", [
            target(f"max by (run) (run:trainguard_step_duration_seconds:max{{{RUN}}}) "
                   f"/ max by (run) (run:trainguard_step_duration_seconds:median{{{RUN}}})", "{{run}}")],
                   "The run's slowest rank's step time over its median rank's: 1 is an even job; a straggler "
                   "or a rank waiting on its data shows as a rise. The Ranks dashboard names the rank.", w=8,
                   unit="none", minimum=1),
        timeseries("Lowest straggler score", [
            target(f"min by (run) (run:trainguard_straggler_score:min{{{RUN}}})", "{{run}}")],
                   "StragglerRank's score of the run's slowest rank (the fastest ranks' compute time over its "
                   "own; 1 is as fast). It pages below 0.75.", w=8, unit="none",
                   th=thresholds(("green", None), ("red", 0.75)), minimum=0),
        timeseries("Quietest rank's silence", [
            target(f"max by (run) (run:trainguard_last_seen_timestamp_seconds:max{{{RUN}}}) "
                   f"- min by (run) (run:trainguard_last_seen_timestamp_seconds:min{{{RUN}}})", "{{run}}")],
                   "Seconds between the run's freshest and stalest rank's latest record, on the job's own clock: "
                   "a rank silent for 30 s while others report pages as RankLost.", w=8, unit="s",
                   th=thresholds(("green", None), ("red", 30))),
    ]
    return dashboard("trainguard-fleet", "trainguard / Fleet overview",
                     "Every training run the trainguard daemon watches: health, step, throughput, alerts.",
                     panels, [run_variable(multi=True)], ALERT_ANNOTATIONS)


# -- Run detail ----------------------------------------------------------------------------------------------------

# (detector, what its statistic is, unit, page threshold(s) with their colours, log scale base or None).
# The levels are the detectors' defaults (docs/detectors.md); a daemon config can move them, and some
# detectors widen them with the run's own noise, so the line is where a default run pages.
DETECTORS: tuple[tuple[str, str, str, tuple[tuple[str, float | None], ...], int | None], ...] = (
    ("NonFinite", "NaN or infinite loss or gradient norm records seen; any pages.", "none",
     (("green", None), ("red", 1)), None),
    ("LossSpike", "Robust z of the latest log loss against the trailing 100 steps; above 4 in 3 of 5 steps pages "
     "(widened by the loss's autocorrelation), one step above 6 is an info outlier.", "none",
     (("green", None), ("orange", 4), ("red", 6)), None),
    ("LossDivergence", "How far the smoothed loss sits above its best, in units of the margin; 1 held for 5 steps "
     "pages.", "none", (("green", None), ("red", 1)), None),
    ("GradientExplosion", "Gradient norm over its 100-step median; 5 or more (with z > 6) in 3 of 5 steps pages.",
     "none", (("green", None), ("red", 5)), 10),
    ("VanishingGradient", "Gradient norm over its trailing median; below 0.02 for 25 steps pages.", "none",
     (("red", None), ("green", 0.02)), 10),
    ("Overfitting", "Smoothed log eval loss above its best; above the margin (1 %, or 3 noise sd) for 2 evals, "
     "with a rising trend while the train loss falls, pages.", "none", (("green", None), ("red", 0.01)), None),
    ("LossPlateau", "Improvement of the block-median log loss over 4 blocks of 100 steps; below 0.01 while the "
     "learning rate is high is an info alert.", "none", (("blue", None), ("green", 0.01)), None),
    ("LearningRateAnomaly", "Learning rate over the previous step's; a drop below 0.01 or a rise above 4 in one "
     "step pages.", "none", (("red", None), ("green", 0.01), ("red", 4)), 10),
    ("ProbeRegression", "Latest one-sided p-value of a probe's drop against its baseline; it pages below the level "
     "spent at that look (0.005 at the first look, less later).", "none", (("red", None), ("green", 0.005)), 10),
    ("OutputDrift", "Latest drift KL over its early trend's prediction; 2 or more (and 0.05 nats above) on 2 "
     "probes in a row pages.", "none", (("green", None), ("red", 2)), None),
    ("StragglerRank", "The slowest rank's score (fastest ranks' compute time over its own); below 0.75 pages.",
     "none", (("red", None), ("green", 0.75)), None),
    ("ThroughputDrop", "Fractional drop of throughput below its baseline; 0.2 or more (and 5 robust z) on 3 checks "
     "pages.", "percentunit", (("green", None), ("red", 0.2)), None),
    ("TrainingStalled", "Seconds since any rank finished a step while heartbeats come; above the stall threshold "
     "(at least 30 s, more for slow or pausing runs) pages.", "s", (("green", None), ("red", 30)), None),
    ("RankLost", "Longest silence of a running rank in seconds while others report; 30 s pages.", "s",
     (("green", None), ("red", 30)), None),
    ("MemoryLeak", "Growth of the last leaking memory window as a fraction of its level; 5 % with a steady trend "
     "pages.", "percentunit", (("green", None), ("red", 0.05)), None),
    ("MemoryPressure", "Highest GPU reserved / total memory among the ranks; 97 % for 3 records (or an OOM) pages.",
     "percentunit", (("green", None), ("red", 0.97)), None),
    ("DataLoaderBottleneck", "Median share of step time spent waiting for data; 25 % is an info alert.",
     "percentunit", (("green", None), ("blue", 0.25)), None),
    ("LossScaleCollapse", "fp16 loss-scale back-offs in the last 200 steps; 10 pages.", "none",
     (("green", None), ("red", 10)), None),
)


def detector_panels() -> list[dict[str, Any]]:
    """One panel per detector: its statistic for the run against the level at which it pages."""
    return [timeseries(name, [target(f'trainguard_detector_statistic{{{RUN}, detector="{name}"}}', "{{run}}")],
                       f"{what} Line: the default page level.", unit=unit, w=6, h=6, log=log,
                       th=thresholds(*steps))
            for name, what, unit, steps, log in DETECTORS]


def run_detail() -> dict[str, Any]:
    """One run: losses, gradients, learning rate, throughput, probes, memory, detectors, alerts."""
    panels = [
        stat("Health", [target(f"max(run:trainguard_health:max{{{RUN}}})")],
             "The highest severity among the run's firing alerts.", w=3, mappings=HEALTH_MAPPINGS,
             th=HEALTH_THRESHOLDS, color_mode="background"),
        stat("Status", [target(f"max by (status) (trainguard_run_info{{{RUN}}})", "{{status}}")],
             "running until every rank sent its end record.", w=3, text_mode="name"),
        stat("Step", [target(f"max(trainguard_step{{{RUN}}})")], "The largest step any rank finished.", w=3),
        stat("Throughput", [target(f"sum(trainguard_tokens_per_second{{{RUN}}})")],
             "Tokens per second over recent steps, all ranks.", w=3, decimals=0),
        stat("Ranks reporting", [target(f"max(trainguard_run_ranks_reporting{{{RUN}}})", "reporting"),
                                 target(f"max(trainguard_run_world_size{{{RUN}}})", "world size")],
             "Ranks with a record in the last 30 s of the job's time, and the job's world size.", w=4,
             text_mode="value_and_name"),
        stat("Alerts firing", [target(f"max(run:trainguard_alerts_active:count{{{RUN}}})")],
             "Firing alerts of the run (silenced ones included).", w=4,
             th=thresholds(("green", None), ("orange", 1))),
        stat("Last record", [target(f"time() - max(trainguard_last_seen_timestamp_seconds{{{RUN}}})")],
             "Wall-clock seconds since the run's newest record was made (the job's clock against Prometheus').",
             unit="s", w=4, decimals=0),
        row("Training"),
        timeseries("Loss", [target(f"trainguard_train_loss{{{RUN}}}", "train {{run}}"),
                            target(f"trainguard_eval_loss{{{RUN}}}", "eval {{run}}")],
                   "The lead rank's latest training loss and evaluation loss.", log=2),
        timeseries("Gradient norm", [target(f"trainguard_grad_norm{{{RUN}}}", "{{run}}")],
                   "Global gradient norm before clipping.", log=10),
        timeseries("Learning rate", [target(f"trainguard_learning_rate{{{RUN}}}", "{{run}}")],
                   "The learning rate the job reported.", unit="none", w=8),
        timeseries("Throughput (tokens/s)", [target(f"sum by (run) (trainguard_tokens_per_second{{{RUN}}})",
                                                    "{{run}}")],
                   "Tokens per second over recent steps, all ranks.", w=8),
        timeseries("Step time across ranks", [
            target(f"run:trainguard_step_duration_seconds:max{{{RUN}}}", "slowest rank"),
            target(f"run:trainguard_step_duration_seconds:median{{{RUN}}}", "median rank"),
            target(f"run:trainguard_step_duration_seconds:min{{{RUN}}}", "fastest rank")],
                   "Latest step time of the slowest, median and fastest rank; the Ranks dashboard names them.",
                   unit="s", w=8),
        row("Probes"),
        timeseries("Probe scores", [target(f"trainguard_probe_score{{{RUN}}}", "{{suite}} {{metric}}")],
                   "Latest value of each aggregate score of each probe series (accuracy, gold log-probability, "
                   "judge rates, drift KL and top-1 agreement).", unit="none"),
        timeseries("Probe scores against the run's first probe", [
            target(f"trainguard_probe_baseline_delta{{{RUN}}}", "{{suite}} {{metric}}")],
                   "Each score minus its value at the series' first probe: below 0 the model lost ground on "
                   "that probe (ProbeRegression judges it with a paired test, see Detectors).", unit="none",
                   th=thresholds(("red", None), ("green", 0))),
        row("Memory"),
        timeseries("Host memory (RSS)", [
            target(f"run:trainguard_host_memory_rss_bytes:max{{{RUN}}}", "largest rank"),
            target(f"run:trainguard_host_memory_rss_bytes:median{{{RUN}}}", "median rank")],
                   "Resident memory of the largest and the median rank's process.", unit="bytes", w=8),
        timeseries("GPU memory", [
            target(f"run:trainguard_gpu_memory_allocated_bytes:max{{{RUN}}}", "allocated, largest rank"),
            target(f"run:trainguard_gpu_memory_reserved_bytes:max{{{RUN}}}", "reserved, largest rank")],
                   "GPU memory allocated by tensors and reserved by the caching allocator, largest rank.",
                   unit="bytes", w=8),
        timeseries("Data wait", [target(f"max by (run) (trainguard_data_wait_seconds{{{RUN}}})", "longest rank")],
                   "Time the slowest-fed rank's latest step waited for its batch.", unit="s", w=8),
        row("Alerts"),
        table("Alerts firing now", [
            target(f"max by (run, alert, severity) (trainguard_alert_active{{{RUN}}}) == 1", instant=True,
                   fmt="table")],
              "Firing alerts of the run. `trainguard alerts --run RUN` gives their step, value and rank.",
              hide=("Value",)),
        bargauge("Alerts started in the time range", [
            target(f"sort_desc(sum by (alert) (increase(trainguard_alerts_fired_total{{{RUN}}}[$__range])))",
                   "{{alert}}", instant=True)],
                 "How often each alert started firing for the run over the time range."),
        row("Detectors: each statistic against its page level", collapsed=True, panels=detector_panels()),
    ]
    return dashboard("trainguard-run", "trainguard / Run detail",
                     "One training run: losses, gradients, learning rate, throughput, probes, memory, detector "
                     "statistics against their thresholds, and its alerts as annotations.",
                     panels, [run_variable(multi=False)], ALERT_ANNOTATIONS)


# -- Ranks ---------------------------------------------------------------------------------------------------------

def ranks() -> dict[str, Any]:
    """Per-rank timing, straggler scores, memory and silence, built to single out one rank among thousands."""
    behind = (f"run:trainguard_last_seen_timestamp_seconds:max{{{RUN}}} "
              f"- on (run) group_right trainguard_last_seen_timestamp_seconds{{{RUN}}}")
    panels = [
        stat("Ranks reporting", [target(f"max(trainguard_run_ranks_reporting{{{RUN}}})", "reporting"),
                                 target(f"max(trainguard_run_world_size{{{RUN}}})", "world size")],
             "Ranks with a record in the last 30 s of the job's time, and the job's world size.", w=6,
             text_mode="value_and_name"),
        stat("Slowest / median step time", [
            target(f"max(run:trainguard_step_duration_seconds:max{{{RUN}}}) "
                   f"/ max(run:trainguard_step_duration_seconds:median{{{RUN}}})")],
             "1 for an even job; collectives make every rank wait for the slowest.", unit="none", w=4,
             th=thresholds(("green", None), ("orange", 1.25), ("red", 1.5)), decimals=2),
        stat("Lowest straggler score", [target(f"min(run:trainguard_straggler_score:min{{{RUN}}})")],
             "StragglerRank pages below 0.75.", unit="none", w=4,
             th=thresholds(("red", None), ("orange", 0.75), ("green", 0.85)), decimals=2),
        stat("Ranks silent 30 s", [target(f"sum(({behind}) > bool 30)")],
             "Ranks whose latest record is 30 s or more older than the freshest rank's (RankLost pages).", w=4,
             th=thresholds(("green", None), ("red", 1))),
        stat("Longest silence", [target(f"max({behind})")],
             "Seconds the quietest rank is behind the freshest one, on the job's own clock.", unit="s", w=6,
             th=thresholds(("green", None), ("orange", 15), ("red", 30)), decimals=0),
        row("Timing"),
        heatmap("Step time by rank", [target(f"trainguard_step_duration_seconds{{{RUN}}}", "{{rank}}")],
                "One row per rank, coloured by its latest step time: a straggler is a dark row, a stall a gap.",
                "s", calculate=False),
        heatmap("Step time distribution across ranks", [target(f"trainguard_step_duration_seconds{{{RUN}}}",
                                                               "{{rank}}")],
                "How many ranks fall in each step-time bucket at each moment: a healthy job is one narrow band; "
                "stragglers form a second band above it.", "s", calculate=True),
        heatmap("Compute time by rank", [target(f"trainguard_compute_duration_seconds{{{RUN}}}", "{{rank}}")],
                "Forward and loss time of each rank's latest step, before collectives: unlike step time (which "
                "evens out in collectives) it singles out the slow rank itself.", "s", calculate=False),
        timeseries("Compute time: quantiles across ranks", [
            target(f"run:trainguard_compute_duration_seconds:max{{{RUN}}}", "max"),
            target(f"quantile by (run) (0.9, trainguard_compute_duration_seconds{{{RUN}}})", "p90"),
            target(f"run:trainguard_compute_duration_seconds:median{{{RUN}}}", "median"),
            target(f"run:trainguard_compute_duration_seconds:min{{{RUN}}}", "min")],
                   "Spread of compute time over the run's ranks; a max far above p90 is one or a few stragglers.",
                   unit="s", h=9),
        row("Stragglers"),
        timeseries("Straggler score, slowest ranks", [
            target(f"bottomk($top, trainguard_straggler_score{{{RUN}}})", "rank {{rank}}")],
                   "StragglerRank's score for the $top lowest-scoring ranks (the fastest ranks' compute time over "
                   "each rank's own; 1 is as fast). Below 0.75 pages.", unit="none",
                   th=thresholds(("red", None), ("green", 0.75)), minimum=0),
        table("Slowest ranks now", [
            target(f"bottomk($top, trainguard_straggler_score{{{RUN}}})", instant=True, fmt="table"),
            target(f"trainguard_compute_duration_seconds{{{RUN}}} "
                   f"and on (run, rank) bottomk($top, trainguard_straggler_score{{{RUN}}})", instant=True,
                   fmt="table"),
            target(f"trainguard_step_duration_seconds{{{RUN}}} "
                   f"and on (run, rank) bottomk($top, trainguard_straggler_score{{{RUN}}})", instant=True,
                   fmt="table")],
              "The $top ranks with the lowest straggler score, with their latest compute and step time.",
              rename={"Value #A": "straggler score", "Value #B": "compute time", "Value #C": "step time"},
              sort=("straggler score", False),
              overrides=[by_name("compute time", unit="s"), by_name("step time", unit="s"),
                         by_name("straggler score", decimals=2, thresholds=thresholds(("red", None), ("green", 0.75)),
                                 **{"custom.cellOptions": {"type": "color-text"}})]),
        timeseries("Step time, slowest ranks", [
            target(f"topk($top, trainguard_step_duration_seconds{{{RUN}}})", "rank {{rank}}")],
                   "Latest step time of the $top slowest ranks at each moment.", unit="s"),
        timeseries("Data wait, slowest-fed ranks", [
            target(f"topk($top, trainguard_data_wait_seconds{{{RUN}}})", "rank {{rank}}")],
                   "Time the $top longest-waiting ranks' latest step waited for its batch.", unit="s"),
        row("Silence"),
        table("Silent ranks", [
            target(f"topk($top, {behind})", instant=True, fmt="table"),
            target(f"time() - trainguard_last_seen_timestamp_seconds{{{RUN}}} and on (run, rank) "
                   f"topk($top, {behind})", instant=True, fmt="table")],
              "The $top ranks whose latest record is oldest: seconds behind the run's freshest rank (the job's "
              "clock, immune to skew) and since it was made (wall clock).",
              rename={"Value #A": "behind freshest rank", "Value #B": "age"}, sort=("behind freshest rank", True),
              overrides=[by_name("behind freshest rank", unit="s", decimals=1,
                                 thresholds=thresholds(("green", None), ("orange", 15), ("red", 30)),
                                 **{"custom.cellOptions": {"type": "color-text"}}),
                         by_name("age", unit="s", decimals=0)]),
        timeseries("Seconds behind the freshest rank", [target(f"topk($top, {behind})", "rank {{rank}}")],
                   "The $top quietest ranks; RankLost pages at 30 s.", unit="s",
                   th=thresholds(("green", None), ("red", 30))),
        row("Memory"),
        timeseries("Host memory (RSS), largest ranks", [
            target(f"topk($top, trainguard_host_memory_rss_bytes{{{RUN}}})", "rank {{rank}}"),
            target(f"run:trainguard_host_memory_rss_bytes:median{{{RUN}}}", "median rank")],
                   "Resident memory of the $top largest ranks, and the median rank for comparison: one rank "
                   "climbing away from the median is a leak or an uneven shard.", unit="bytes", w=8),
        timeseries("GPU memory allocated, largest ranks", [
            target(f"topk($top, trainguard_gpu_memory_allocated_bytes{{{RUN}}})", "rank {{rank}}")],
                   "GPU memory allocated by tensors on the $top largest ranks.", unit="bytes", w=8),
        timeseries("GPU memory reserved, largest ranks", [
            target(f"topk($top, trainguard_gpu_memory_reserved_bytes{{{RUN}}})", "rank {{rank}}")],
                   "GPU memory the caching allocator reserved on the $top largest ranks.", unit="bytes", w=8),
    ]
    top = custom_variable("top", "Ranks listed", ["5", "10", "20", "50"], "10",
                          "How many ranks the top-k and bottom-k panels list.")
    return dashboard("trainguard-ranks", "trainguard / Ranks",
                     "Per-rank step and compute time, straggler scores, memory and silence of one run: the slow "
                     "or silent rank among thousands.", panels, [run_variable(multi=False), top],
                     ALERT_ANNOTATIONS, time_from="now-1h")


# -- Daemon --------------------------------------------------------------------------------------------------------

def daemon() -> dict[str, Any]:
    """The daemon itself: ingest, rejections, client drops, store, notifiers."""
    inst = 'instance=~"$instance"'
    rate = "[$__rate_interval]"
    panels = [
        stat("Up", [target(f'up{{job=~".*trainguard.*", {inst}}}', "{{instance}}")],
             "Whether Prometheus could scrape each daemon.", w=4, color_mode="background", text_mode="value_and_name",
             th=thresholds(("red", None), ("green", 1)),
             mappings=[{"type": "value", "options": {"0": {"text": "down", "color": "red", "index": 0},
                                                     "1": {"text": "up", "color": "green", "index": 1}}}]),
        stat("Version", [target(f"max by (instance, version) (trainguard_build_info{{{inst}}})", "{{version}}")],
             "trainguard version of each daemon.", w=4, text_mode="name"),
        stat("Live runs", [target(f"sum(trainguard_runs{{{inst}}})")], "Runs the daemons keep in memory.", w=4),
        stat("Records/s", [target(f"sum(rate(trainguard_ingest_records_total{{{inst}}}{rate}))")],
             "Records applied per second, all kinds.", w=4, decimals=0),
        stat("Silences", [target(f"sum(trainguard_silences_active{{{inst}}})")],
             "Silences in force: their alerts fire but notify nobody.", w=4),
        stat("Store writer busy", [target(f"max(rate(trainguard_store_commit_seconds_total{{{inst}}}{rate}))")],
             "Share of the time the SQLite writer spends in transactions; near 100 % it falls behind.",
             unit="percentunit", w=4, th=thresholds(("green", None), ("orange", 0.5), ("red", 0.8))),
        row("Ingest"),
        timeseries("Records applied by kind", [
            target(f"sum by (kind) (rate(trainguard_ingest_records_total{{{inst}}}{rate}))", "{{kind}}")],
                   "Records per second the daemon applied, by kind.", unit="short", w=8, stack=True),
        timeseries("Batches", [
            target(f"sum by (instance) (rate(trainguard_ingest_batches_total{{{inst}}}{rate}))",
                   "applied {{instance}}"),
            target(f"sum by (instance) (rate(trainguard_ingest_duplicate_batches_total{{{inst}}}{rate}))",
                   "resends recognised {{instance}}")],
                   "Batches per second applied, and resent batches recognised and not applied twice (clients "
                   "resend what was not acknowledged, e.g. across a daemon restart).", w=8),
        timeseries("Rejections", [
            target(f"sum by (field) (rate(trainguard_ingest_rejected_records_total{{{inst}}}{rate}))",
                   "records: {{field}}"),
            target(f"sum by (field) (rate(trainguard_ingest_rejected_batches_total{{{inst}}}{rate}))",
                   "batches: {{field}}")],
                   "Records and whole batches refused per second, by the field at fault; the daemon's log and "
                   "the client's warning give the reason.", w=8),
        row("Clients"),
        timeseries("Records dropped by clients", [
            target(f"sum by (run) (rate(trainguard_client_dropped_records_total{{{RUN}, {inst}}}{rate}))",
                   "{{run}}")],
                   "Records per second the training processes' clients dropped because their queue was full "
                   "(reported with each heartbeat).", w=8),
        timeseries("Client queue depth, fullest ranks", [
            target(f"topk(10, trainguard_client_queue_depth{{{RUN}, {inst}}})", "{{run}} rank {{rank}}")],
                   "Records waiting in the clients' queues: a rising queue drops records once full.", w=8),
        timeseries("Client retries and refusals", [
            target(f"sum by (run) (rate(trainguard_client_retries_total{{{RUN}, {inst}}}{rate}))",
                   "retries {{run}}"),
            target(f"sum by (run) (rate(trainguard_client_rejected_records_total{{{RUN}, {inst}}}{rate}))",
                   "refused {{run}}"),
            target(f"sum by (run) (rate(trainguard_client_invalid_values_total{{{RUN}, {inst}}}{rate}))",
                   "unreadable values {{run}}")],
                   "Send attempts the clients retried, records the daemon refused them, and values they could not "
                   "read as numbers, per second.", w=8),
        row("Store"),
        timeseries("Store commit latency", [
            target(f"sum by (instance) (rate(trainguard_store_commit_seconds_total{{{inst}}}{rate})) "
                   f"/ sum by (instance) (rate(trainguard_store_commits_total{{{inst}}}{rate}))", "{{instance}}")],
                   "Mean time of one SQLite transaction (group commit of whatever was queued).", unit="s", w=8),
        timeseries("Store throughput", [
            target(f"sum by (instance) (rate(trainguard_store_records_written_total{{{inst}}}{rate}))",
                   "records/s {{instance}}"),
            target(f"sum by (instance) (rate(trainguard_store_commits_total{{{inst}}}{rate}))",
                   "commits/s {{instance}}")],
                   "Records and transactions committed per second.", w=8),
        timeseries("Store queue and errors", [
            target(f"sum by (instance) (trainguard_store_queue_depth{{{inst}}})", "queued writes {{instance}}"),
            target(f"sum by (instance) (increase(trainguard_store_write_errors_total{{{inst}}}{rate}))",
                   "failed transactions {{instance}}"),
            target(f"sum by (instance) (increase(trainguard_ingest_errors_total{{{inst}}}{rate}))",
                   "failed batches {{instance}}")],
                   "Writes waiting for the store thread, and failures (each one pages TrainguardStoreFailing).",
                   w=8),
        row("Notifications"),
        timeseries("Notifications by outcome", [
            target(f"sum by (notifier, outcome) (rate(trainguard_notifications_total{{{inst}}}{rate}))",
                   "{{notifier}} {{outcome}}")],
                   "Alert notifications per second to each receiver: sent, failed (refused, or given up after "
                   "retries) or dropped (queue full). Failed or dropped ones are pages nobody got.", w=8,
                   overrides=[{"matcher": {"id": "byRegexp", "options": ".*(failed|dropped)"},
                               "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}]}]),
        timeseries("Notification retries", [
            target(f"sum by (notifier) (rate(trainguard_notification_retries_total{{{inst}}}{rate}))",
                   "{{notifier}}")],
                   "Delivery attempts that failed and were retried, per second.", w=8),
        timeseries("Notification queue", [
            target(f"sum by (notifier) (trainguard_notifier_queue_depth{{{inst}}})", "{{notifier}}")],
                   "Notifications waiting to be delivered to each receiver.", w=8),
        row("Runs"),
        timeseries("Live runs", [target(f"sum by (instance) (trainguard_runs{{{inst}}})", "{{instance}}")],
                   "Runs each daemon keeps in memory.", w=12),
        timeseries("Runs expired", [
            target(f"sum by (instance) (increase(trainguard_runs_expired_total{{{inst}}}{rate}))", "{{instance}}")],
                   "Runs forgotten after they finished or fell silent long enough (their data stays in the store).",
                   w=12),
    ]
    instance = query_variable("instance", "Daemon", "label_values(trainguard_build_info, instance)", True,
                              "The trainguard daemons Prometheus scrapes.")
    daemon_alerts = [annotation("Daemon alerts", 'ALERTS{alertstate="firing", alertname=~"Trainguard.+"}',
                                "{{alertname}}", "{{instance}} {{notifier}} {{run}}", "red")]
    return dashboard("trainguard-daemon", "trainguard / Daemon",
                     "The trainguard daemon itself: ingest, rejections, client drops, store latency, notifiers.",
                     panels, [instance, run_variable(multi=True)], daemon_alerts, time_from="now-3h")


DASHBOARDS = {"trainguard-fleet.json": fleet, "trainguard-run.json": run_detail, "trainguard-ranks.json": ranks,
              "trainguard-daemon.json": daemon}


def render(d: dict[str, Any]) -> str:
    """Stable JSON: sorted keys, two-space indent, a final newline."""
    return json.dumps(d, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def outputs() -> dict[Path, str]:
    """Every file this script writes, with its content (the chart gets byte-identical copies)."""
    out = {}
    for name, build in DASHBOARDS.items():
        text = render(build())
        out[OUT / name] = text
        out[HELM_OUT / name] = text
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a file is stale")
    args = ap.parse_args(argv)
    files = outputs()
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    # A dashboard removed here must not live on in a folder that provisions every JSON file in it.
    extra = sorted((set(OUT.glob("*.json")) | set(HELM_OUT.glob("*.json"))) - set(files))
    if args.check:
        for p in stale + extra:
            print(f"stale: {_shown(p)}", file=sys.stderr)
        if stale or extra:
            print("run `python grafana/build.py` and commit the result", file=sys.stderr)
            return 1
        return 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(files[p])
        print(f"wrote: {_shown(p)}")
    for p in extra:
        p.unlink()
        print(f"removed: {_shown(p)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
