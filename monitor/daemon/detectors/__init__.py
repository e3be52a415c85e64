"""Detectors, one per file. `DETECTORS` maps each alert name to its detector class."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping

from monitor.daemon.detectors.base import Detector, Finding


def _discover() -> dict[str, type[Detector]]:
    """Every Detector subclass with a name in this package's modules (files starting with _ are helpers)."""
    found: dict[str, type[Detector]] = {}
    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if mod.startswith("_") or mod == "base":
            continue
        module = importlib.import_module(f"{__name__}.{mod}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Detector) and obj.name and obj.__module__ == module.__name__:
                found[obj.name] = obj
    return dict(sorted(found.items()))


DETECTORS: dict[str, type[Detector]] = _discover()

# Every alert name of the contract, with its default severity (DESIGN.md). Detectors not written
# yet still have their names reserved here so that configs and dashboards can refer to them.
ALERT_SEVERITIES: dict[str, str] = {
    "NonFinite": "critical", "LossSpike": "warning", "LossDivergence": "critical",
    "GradientExplosion": "warning", "VanishingGradient": "warning", "Overfitting": "warning",
    "LossPlateau": "info", "LearningRateAnomaly": "warning", "ProbeRegression": "warning",
    "OutputDrift": "warning", "StragglerRank": "warning", "ThroughputDrop": "warning",
    "TrainingStalled": "critical", "RankLost": "critical", "MemoryLeak": "warning",
    "MemoryPressure": "critical", "DataLoaderBottleneck": "info", "LossScaleCollapse": "warning",
}


def build_detectors(config: Mapping[str, Mapping[str, Any]] | None = None) -> list[Detector]:
    """One fresh instance of each enabled detector for a new run."""
    config = config or {}
    out = []
    for name, cls in DETECTORS.items():
        cfg = dict(config.get(name, {}))
        if cfg.pop("enabled", True) is False:
            continue
        out.append(cls(cfg))
    return out


def check_config(config: Mapping[str, Any]) -> None:
    """Raise ValueError naming the setting if the detectors section of a config is wrong."""
    for name, cfg in config.items():
        if name not in ALERT_SEVERITIES:
            raise ValueError(f"detectors.{name}: unknown detector; known: {', '.join(sorted(ALERT_SEVERITIES))}")
        if not isinstance(cfg, Mapping):
            raise ValueError(f"detectors.{name}: expected a table of settings")
        if name in DETECTORS:
            c = dict(cfg)
            c.pop("enabled", None)
            try:
                DETECTORS[name](c)
            except ValueError:
                raise
            except (TypeError, ArithmeticError, LookupError, AttributeError) as e:
                # A value of the right type that a detector still cannot use (an infinite count, ...).
                raise ValueError(f"detectors.{name}: a setting cannot be used ({type(e).__name__}: {e})") from None


__all__ = ["ALERT_SEVERITIES", "DETECTORS", "Detector", "Finding", "build_detectors", "check_config"]
