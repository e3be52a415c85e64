"""NonFinite on its own (no I/O): fires at the first bad step, once, and resolves after clean steps."""

from __future__ import annotations

import math

import pytest

from monitor.daemon.detectors import ALERT_SEVERITIES, DETECTORS, build_detectors, check_config
from monitor.daemon.detectors.nonfinite import NonFinite
from monitor.records import Record


def train(step: int, **values: float) -> Record:
    return Record("train", "r", 1_700_000_000.0 + step, 0, step, values)


def feed(det: NonFinite, recs: list[Record]) -> list[tuple[str, int | None]]:
    out = []
    for r in recs:
        out += [(f.action, f.step) for f in det.update(r, None)]
    return out


def test_fires_at_first_nan_loss_and_only_once() -> None:
    det = NonFinite()
    recs = [train(s, loss=2.0, grad_norm=1.0) for s in range(1, 10)]
    recs += [train(s, loss=math.nan, grad_norm=1.0) for s in range(10, 15)]
    assert feed(det, recs) == [("fire", 10)]
    assert det.statistic() == 5.0


@pytest.mark.parametrize("name,value", [("grad_norm", math.inf), ("grad_norm", -math.inf), ("loss", math.inf)])
def test_fires_on_infinite_values(name: str, value: float) -> None:
    det = NonFinite()
    vals = {"loss": 1.0, "grad_norm": 1.0, name: value}
    f = det.update(train(7, **vals), None)
    assert [(x.action, x.step, x.severity, x.labels["metric"]) for x in f] == [("fire", 7, "critical", name)]


def test_ignores_other_values_and_records_without_them() -> None:
    det = NonFinite()
    assert feed(det, [train(1, lr=math.nan), train(2), train(3, loss=1.0)]) == []


def test_resolves_after_configured_clean_steps_then_can_fire_again() -> None:
    det = NonFinite({"resolve_after_steps": 3})
    recs = [train(1, loss=math.nan)] + [train(s, loss=1.0) for s in range(2, 6)] + [train(6, loss=math.nan)]
    assert feed(det, recs) == [("fire", 1), ("resolve", 4), ("fire", 6)]


def test_state_round_trip_keeps_it_from_firing_twice() -> None:
    det = NonFinite()
    det.update(train(1, loss=math.nan), None)
    again = NonFinite()
    again.restore(det.state())
    assert again.update(train(2, loss=math.nan), None) == []


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match=r"detectors.NonFinite: unknown setting\(s\) resolve_after"):
        check_config({"NonFinite": {"resolve_after": 3}})
    with pytest.raises(ValueError, match=r"detectors.NonFinite.severity"):
        check_config({"NonFinite": {"severity": "page"}})
    with pytest.raises(ValueError, match=r"detectors.Nope: unknown detector"):
        check_config({"Nope": {}})
    assert "NonFinite" in {d.name for d in build_detectors({})}
    assert "NonFinite" not in {d.name for d in build_detectors({"NonFinite": {"enabled": False}})}
    assert [d.severity for d in build_detectors({"NonFinite": {"severity": "warning"}})
            if d.name == "NonFinite"] == ["warning"]


def test_every_detector_uses_a_contract_name_and_default_severity() -> None:
    for name, cls in DETECTORS.items():
        assert name in ALERT_SEVERITIES
        assert cls.severity == ALERT_SEVERITIES[name]
