"""Alert lifecycle on a real store: pending and `for`, held resolves, dedup across ranks, warm-up, silences, restart."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from monitor import wire
from monitor.daemon.alerts import AlertManager, AlertRules, Silences
from monitor.daemon.app import ConfigError, DaemonConfig
from monitor.daemon.detectors import ALERT_SEVERITIES
from monitor.daemon.detectors.base import Finding
from monitor.daemon.store import Store
from monitor.records import Record
from tests.helpers import http_json, metrics, sample, wait_for

T0 = 1_700_000_000.0


class Recorder:
    """A notifier that keeps what it was told, in order."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, int]] = []

    def notify(self, alert: Any, event: str) -> None:
        self.events.append((event, alert.run, alert.name, alert.id))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(str(tmp_path / "alerts.db"))
    s.start()
    yield s
    s.close()


def manager(store: Store, rules: dict[str, Any] | None = None, **kw: Any) -> tuple[AlertManager, Recorder]:
    rec = Recorder()
    am = AlertManager(store, [rec], rules=AlertRules.from_config(rules or {}, ALERT_SEVERITIES),
                      silences=Silences(store, ALERT_SEVERITIES), **kw)
    return am, rec


def fire(name: str, step: int | None, t: float | None = None, rank: int | None = None, **kw: Any) -> Finding:
    kw.setdefault("severity", ALERT_SEVERITIES[name])
    return Finding(name, "fire", T0 + (step or 0) if t is None else t, step=step, rank=rank, **kw)


def clear(name: str, step: int | None, t: float | None = None, summary: str = "") -> Finding:
    return Finding(name, "resolve", T0 + (step or 0) if t is None else t, step=step, summary=summary)


def stored(store: Store, run: str = "r") -> list[tuple[str, str]]:
    store.flush()
    return [(a["name"], a["state"]) for a in store.load_alerts(run=run)]


# -- defaults: no delay, no hold ----------------------------------------------------------------------

def test_default_fires_and_resolves_at_once_and_stores_each_change(store: Store) -> None:
    am, rec = manager(store)
    changed = am.apply("r", [fire("LossSpike", 100, value=9.5, summary="loss 9.5 at step 100, baseline 2.1")])
    assert [(a.state, a.step, a.value) for a in changed] == [("firing", 100, 9.5)]
    assert rec.events == [("firing", "r", "LossSpike", 1)]
    assert stored(store) == [("LossSpike", "firing")]
    am.apply("r", [clear("LossSpike", 110, summary="back under threshold")])
    assert rec.events[-1] == ("resolved", "r", "LossSpike", 1)
    a = am.alerts("r")[0]
    assert (a.state, a.resolved_at, a.labels["resolution"]) == ("resolved", T0 + 110, "back under threshold")
    assert stored(store) == [("LossSpike", "resolved")]
    assert am.known() == [("r", "LossSpike", "warning", False, 1)]


def test_one_alert_per_run_and_name_across_ranks(store: Store) -> None:
    am, rec = manager(store)
    am.apply("r", [fire("StragglerRank", 50, rank=3), fire("StragglerRank", 51, rank=5)])
    am.apply("other", [fire("StragglerRank", 50, rank=1)])
    assert [(a.run, a.rank, a.step) for a in am.alerts()] == [("other", 1, 50), ("r", 3, 50)]
    assert len(rec.events) == 2


def test_numbers_and_runbook_url_pass_through(store: Store) -> None:
    am, _ = manager(store, runbook_url="https://wiki.example/{alert}?run={run}")
    am.apply("team/run-1", [fire("LossSpike", 7, value=4.25,
                                 summary="loss 4.25 at step 7 (baseline 2.0, threshold 3.1)",
                                 labels={"baseline": "2.0", "threshold": "3.1"})])
    api = am.to_api(am.alerts()[0])
    assert api["value"] == 4.25 and api["step"] == 7 and api["silenced"] is False
    assert api["labels"] == {"baseline": "2.0", "threshold": "3.1",
                             "runbook_url": "https://wiki.example/LossSpike?run=team%2Frun-1"}
    assert "threshold 3.1" in api["summary"]


def test_default_runbook_url_points_at_the_repository(store: Store) -> None:
    am, _ = manager(store)
    am.apply("r", [fire("NonFinite", 3, value=math.nan)])
    assert am.alerts()[0].labels["runbook_url"] == \
        "https://github.com/trainguard/trainguard/blob/main/docs/runbooks/NonFinite.md"
    assert am.to_api(am.alerts()[0])["value"] == "nan"


# -- for: pending before firing -------------------------------------------------------------------------

def test_for_steps_keeps_an_alert_pending_until_the_condition_held_long_enough(store: Store) -> None:
    am, rec = manager(store, {"LossSpike": {"for_steps": 5}})
    am.apply("r", [fire("LossSpike", 10)])
    assert [a.state for a in am.pending()] == ["pending"] and am.active() == []
    assert am.alerts("r") == [] and [a.step for a in am.alerts("r", "pending")] == [10]
    assert rec.events == [] and stored(store) == [("LossSpike", "pending")]
    assert am.known() == []  # not fired: trainguard_alert_active has nothing to say yet
    am.advance("r", T0 + 14, 14)
    assert rec.events == []
    am.advance("r", T0 + 15, 15)
    assert rec.events == [("firing", "r", "LossSpike", 1)]
    a = am.active()[0]
    # started_at and step say when the condition began, not when the wait ended
    assert (a.state, a.step, a.started_at) == ("firing", 10, T0 + 10)
    assert am.known() == [("r", "LossSpike", "warning", True, 1)]


def test_for_seconds_runs_on_event_time(store: Store) -> None:
    am, rec = manager(store, {"for_seconds": 30})  # the default for every alert
    am.apply("r", [fire("ThroughputDrop", None, t=T0)])
    am.advance("r", T0 + 29.9, None)
    assert am.active() == []
    am.advance("r", T0 + 30, None)
    assert [a.name for a in am.active()] == ["ThroughputDrop"]
    # a finding's own time also counts: a later fire of another alert moves the clock
    am.apply("r", [fire("MemoryLeak", None, t=T0 + 40)])
    am.apply("r", [fire("LossSpike", 71, t=T0 + 71)])
    assert {a.name for a in am.active()} == {"ThroughputDrop", "MemoryLeak"}
    assert len(rec.events) == 2


def test_condition_that_ends_while_pending_never_pages_and_leaves_no_trace(store: Store) -> None:
    am, rec = manager(store, {"LossSpike": {"for_steps": 5}})
    am.apply("r", [fire("LossSpike", 10), clear("LossSpike", 12)])
    am.advance("r", T0 + 100, 100)
    assert rec.events == [] and am.alerts("r") == [] and am.pending() == []
    assert stored(store) == []
    # it can start over later
    am.apply("r", [fire("LossSpike", 200)])
    am.advance("r", T0 + 205, 205)
    assert [(e[0], e[2]) for e in rec.events] == [("firing", "LossSpike")]


def test_a_resolve_in_the_same_batch_is_judged_before_a_later_clock(store: Store) -> None:
    # The findings' own times decide: the condition held 3 of the 5 steps, so it never fired,
    # even though the run's clock is already past the wait when the findings are applied.
    am, rec = manager(store, {"LossSpike": {"for_steps": 5}})
    am.apply("r", [fire("LossSpike", 10), clear("LossSpike", 13)])
    am.advance("r", T0 + 20, 20)
    assert rec.events == []


# -- hysteresis: hold the resolve -------------------------------------------------------------------------

def test_keep_firing_holds_the_resolve_and_a_relapse_is_the_same_alert(store: Store) -> None:
    am, rec = manager(store, {"LossSpike": {"keep_firing_for_steps": 10}})
    am.apply("r", [fire("LossSpike", 10)])
    am.apply("r", [clear("LossSpike", 20, summary="clear at 20")])
    assert [a.state for a in am.alerts("r")] == ["firing"]
    am.apply("r", [fire("LossSpike", 25)])  # back within the hold: no flap, no second page
    am.advance("r", T0 + 100, 100)
    assert [a.state for a in am.alerts("r")] == ["firing"]
    am.apply("r", [clear("LossSpike", 110, summary="clear at 110")])
    am.advance("r", T0 + 119, 119)
    assert am.alerts("r")[0].state == "firing"
    am.advance("r", T0 + 120, 120)
    a = am.alerts("r")[0]
    # resolved_at is when the condition ended; the hold only delays the announcement
    assert (a.id, a.state, a.resolved_at, a.labels["resolution"]) == (1, "resolved", T0 + 110, "clear at 110")
    assert rec.events == [("firing", "r", "LossSpike", 1), ("resolved", "r", "LossSpike", 1)]
    assert am.fired_total[("r", "LossSpike")] == 1


def test_keep_firing_for_seconds(store: Store) -> None:
    am, rec = manager(store, {"keep_firing_for_seconds": 60})
    am.apply("r", [fire("TrainingStalled", None, t=T0), clear("TrainingStalled", None, t=T0 + 10)])
    am.advance("r", T0 + 69, None)
    assert am.active()
    am.advance("r", T0 + 70, None)
    assert not am.active() and rec.events[-1][0] == "resolved"


def test_an_expired_run_resolves_at_once_and_drops_its_pending_alerts(store: Store) -> None:
    am, rec = manager(store, {"LossSpike": {"keep_firing_for_steps": 100}, "MemoryLeak": {"for_steps": 100}})
    am.apply("r", [fire("LossSpike", 1), clear("LossSpike", 2), fire("MemoryLeak", 3)])
    am.resolve_run("r", T0 + 10, "run expired")
    assert [(a.name, a.state) for a in am.alerts("r")] == [("LossSpike", "resolved")]
    assert am.pending() == [] and rec.events[-1][0] == "resolved"
    assert stored(store) == [("LossSpike", "resolved")]


# -- warm-up ---------------------------------------------------------------------------------------------------

def test_warmup_holds_step_alerts_but_never_a_nan_or_a_stall(store: Store) -> None:
    am, rec = manager(store, {"warmup_steps": 20})
    am.apply("r", [fire("LossSpike", 5), fire("NonFinite", 6, value=math.nan),
                   fire("TrainingStalled", None, t=T0 + 7)])
    assert {a.name for a in am.active()} == {"NonFinite", "TrainingStalled"}
    assert [a.name for a in am.pending()] == ["LossSpike"]
    am.advance("r", T0 + 19, 19)
    assert [a.name for a in am.pending()] == ["LossSpike"]
    am.advance("r", T0 + 20, 20)  # still there at the end of the warm-up: it pages
    assert {a.name for a in am.active()} == {"NonFinite", "TrainingStalled", "LossSpike"}
    # a start-up blip that clears during the warm-up never pages
    am.apply("r2", [fire("GradientExplosion", 3), clear("GradientExplosion", 4)])
    am.advance("r2", T0 + 50, 50)
    assert am.alerts("r2") == [] and len(rec.events) == 3


def test_rules_config_errors_name_the_setting() -> None:
    names = ALERT_SEVERITIES
    with pytest.raises(ValueError, match=r"alerts.LossSpike.for_steps: must be a whole number"):
        AlertRules.from_config({"LossSpike": {"for_steps": -1}}, names)
    with pytest.raises(ValueError, match=r"alerts.for_seconds: must be a number of seconds"):
        AlertRules.from_config({"for_seconds": "soon"}, names)
    with pytest.raises(ValueError, match=r"alerts.LossSpike: unknown setting\(s\) for"):
        AlertRules.from_config({"LossSpike": {"for": 3}}, names)
    with pytest.raises(ValueError, match=r"alerts.LosSpike: neither a setting"):
        AlertRules.from_config({"LosSpike": {"for_steps": 3}}, names)
    with pytest.raises(ValueError, match=r"alerts.NonFinite.warmup_steps: NonFinite pages from the first step"):
        AlertRules.from_config({"NonFinite": {"warmup_steps": 5}}, names)
    rules = AlertRules.from_config({"for_steps": 2, "warmup_steps": 10, "LossSpike": {"for_steps": 0}}, names)
    assert (rules.rule("LossSpike").for_steps, rules.rule("LossSpike").warmup_steps) == (0, 10)
    assert rules.rule("MemoryLeak").for_steps == 2


def test_daemon_config_reads_the_alerts_table() -> None:
    cfg = DaemonConfig.from_mapping({"daemon": {"alertmanager_urls": ["http://am:9093"]},
                                     "alerts": {"warmup_steps": 20, "LossSpike": {"for_steps": 3}},
                                     "detectors": {"NonFinite": {"resolve_after_steps": 5}}}).validate()
    assert cfg.alert_rules().rule("LossSpike").for_steps == 3 and cfg.alertmanager_urls == ["http://am:9093"]
    with pytest.raises(ConfigError, match=r"alerts.LossSpike.for_seconds"):
        DaemonConfig.from_mapping({"alerts": {"LossSpike": {"for_seconds": -5}}}).validate()
    with pytest.raises(ConfigError, match=r"alertmanager_urls\[0\]: 'am:9093' is not an http"):
        DaemonConfig(alertmanager_urls=["am:9093"]).validate()
    with pytest.raises(ConfigError, match=r"runbook_url: unknown placeholder\(s\) \{name\}"):
        DaemonConfig(runbook_url="https://wiki/{name}").validate()
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) alert"):
        DaemonConfig.from_mapping({"daemon": {}, "alert": {}}).validate()


# -- silences -------------------------------------------------------------------------------------------------

def test_silenced_alert_is_listed_but_announced_only_when_the_silence_ends(store: Store) -> None:
    am, rec = manager(store)
    now = time.time()
    s = am.silences.create({"run": "r", "alert": "LossSpike", "duration_seconds": 3600, "comment": "bad shard"}, now)
    other = am.silences.create({"run": "*", "alert": "MemoryLeak", "duration_seconds": 60}, now)
    am.apply("r", [fire("LossSpike", 10)])
    am.apply("r", [fire("MemoryLeak", 11)])
    am.apply("r2", [fire("LossSpike", 12)])  # another run: not covered
    assert rec.events == [("firing", "r2", "LossSpike", 3)]
    a = next(a for a in am.alerts("r") if a.name == "LossSpike")
    assert a.state == "firing" and am.to_api(a)["silenced"] is True
    assert ("r", "LossSpike", "warning", True, 1) in am.known()  # trainguard_alert_active stays 1
    am.sweep(now + 1)
    assert len(rec.events) == 1  # still silenced
    am.silences.expire(s.id, now + 2)
    am.sweep(now + 3)
    assert rec.events[-1] == ("firing", "r", "LossSpike", 1)
    am.sweep(now + 4)
    assert len(rec.events) == 2  # announced once
    am.sweep(now + 61)  # the other silence ran out by itself
    assert rec.events[-1] == ("firing", "r", "MemoryLeak", 2)
    # A resolve of an alert that was never announced is not announced either.
    am.silences.create({"run": "r3", "duration_seconds": 60}, time.time())
    am.apply("r3", [fire("LossSpike", 1), clear("LossSpike", 2)])
    assert all(e[1] != "r3" for e in rec.events)
    assert other.id == 2


def test_alerts_and_held_resolves_survive_a_restart(store: Store, tmp_path: Path) -> None:
    rules = {"LossSpike": {"for_steps": 5}, "MemoryLeak": {"keep_firing_for_steps": 10}}
    am, rec = manager(store, rules)
    am.apply("r", [fire("LossSpike", 10), fire("MemoryLeak", 11), clear("MemoryLeak", 12)])
    store.flush()
    again, rec2 = manager(store, rules)
    again.restore(["r"])
    assert [a.name for a in again.pending()] == ["LossSpike"]
    assert [a.name for a in again.active()] == ["MemoryLeak"]
    again.advance("r", T0 + 22, 22)
    assert {(a.name, a.state) for a in again.alerts("r")} == {("LossSpike", "firing"), ("MemoryLeak", "resolved")}
    # MemoryLeak was announced before the restart, so its resolution is announced; it is not fired again
    assert sorted(rec2.events) == [("firing", "r", "LossSpike", 1), ("resolved", "r", "MemoryLeak", 2)]
    assert again.fired_total == {("r", "LossSpike"): 1, ("r", "MemoryLeak"): 1}


# -- through a real daemon ----------------------------------------------------------------------------------

def _send(d: Any, run: str, recs: list[Record], seq: int) -> None:
    with grpc.insecure_channel(d.grpc_address) as ch:
        ch.unary_unary(wire.REPORT_METHOD)(wire.encode_batch(run, 0, "inc", seq, recs), timeout=10)


def test_daemon_shows_pending_then_firing_and_exports_detector_statistics(daemon_factory: Any) -> None:
    d = daemon_factory(alert_eval_interval=0.05, alerts={"NonFinite": {"for_steps": 3}})
    recs = [Record("train", "p", T0 + s, 0, s, {"loss": math.nan if s >= 5 else 1.0}) for s in range(1, 7)]
    _send(d, "p", recs, 1)
    url = d.http_url + "/api/v1/alerts?run=p"
    pending = http_json(url + "&state=pending")["alerts"]
    assert [(a["name"], a["state"], a["step"], a["silenced"]) for a in pending] == [("NonFinite", "pending", 5, False)]
    assert http_json(url)["alerts"] == [] and http_json(url + "&state=all")["alerts"] == []
    assert http_json(d.http_url + "/api/v1/runs/p")["health"] == "ok"
    m = metrics(d)
    assert sample(m, "trainguard_alert_active", run="p", alert="NonFinite", severity="critical") is None
    assert sample(m, "trainguard_detector_statistic", run="p", detector="NonFinite") == 2.0
    _send(d, "p", [Record("train", "p", T0 + s, 0, s, {"loss": math.nan}) for s in range(7, 9)], 2)
    firing = wait_for(lambda: http_json(url + "&state=firing")["alerts"], timeout=5, what="the alert to fire")
    assert [(a["state"], a["step"], a["started_at"]) for a in firing] == [("firing", 5, T0 + 5)]
    m = metrics(d)
    assert sample(m, "trainguard_alert_active", run="p", alert="NonFinite", severity="critical") == 1
    assert sample(m, "trainguard_alerts_fired_total", run="p", alert="NonFinite") == 1
    assert sample(m, "trainguard_detector_statistic", run="p", detector="NonFinite") == 4.0


def test_an_escalation_replaces_the_lesser_alert_even_while_a_resolve_is_held(store: Store) -> None:
    # LossSpike reports a one-step outlier at info, then escalates to a page if the loss stays high:
    # it resolves the info alert and fires a warning in the same breath.
    am, rec = manager(store, {"LossSpike": {"keep_firing_for_steps": 50}})
    am.apply("r", [fire("LossSpike", 100, severity="info")])
    am.apply("r", [clear("LossSpike", 103, summary="escalated: the loss stayed high"),
                   fire("LossSpike", 103, severity="warning")])
    got = [(a.id, a.severity, a.state) for a in am.alerts("r")]
    assert got == [(2, "warning", "firing"), (1, "info", "resolved")]
    assert rec.events == [("firing", "r", "LossSpike", 1), ("resolved", "r", "LossSpike", 1),
                          ("firing", "r", "LossSpike", 2)]
    am.apply("r", [fire("LossSpike", 104, severity="info")])  # a lesser one never replaces a page
    assert [a.id for a in am.active()] == [2] and am.known() == [("r", "LossSpike", "warning", True, 2)]


def test_step_settings_do_not_hold_alerts_without_a_step(store: Store) -> None:
    # A stall is about steps not coming: counting steps would hold it (and its resolve) forever.
    am, rec = manager(store, {"for_steps": 5, "keep_firing_for_steps": 5, "TrainingStalled": {"for_seconds": 10}})
    am.advance("r", T0 + 100, 100)
    am.apply("r", [fire("RankLost", None, t=T0 + 101), fire("TrainingStalled", None, t=T0 + 101)])
    assert [a.name for a in am.active()] == ["RankLost"]
    am.advance("r", T0 + 111, 100)
    assert {a.name for a in am.active()} == {"RankLost", "TrainingStalled"}
    am.apply("r", [clear("RankLost", None, t=T0 + 112)])
    assert [a.name for a in am.active()] == ["TrainingStalled"]


def test_every_alert_has_a_runbook_listing_its_settings() -> None:
    from monitor.daemon.detectors import DETECTORS
    from tests.helpers import ROOT

    for name, severity in ALERT_SEVERITIES.items():
        path = ROOT / "docs" / "runbooks" / f"{name}.md"
        assert path.exists(), f"the default runbook_url points at {path.relative_to(ROOT)}, which is missing"
        text = path.read_text()
        for section in ("## What it means", "## Likely causes", "## What to check first", "## How to silence",
                        "## Settings", f"trainguard silence --run RUN --alert {name}", f"**{severity}**"):
            assert section in text, f"{path.name}: no {section!r}"
        cls = DETECTORS.get(name)
        for key in (cls.defaults if cls else ()):
            assert f"| `{key}` |" in text, f"{path.name}: detector setting {key!r} is not in its settings table"
