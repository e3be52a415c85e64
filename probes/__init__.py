"""Few-shot evaluation probes run inside the training process (suites, scoring, runner, drift).

Example:
    from probes import Probe, Drift
    mon = monitor.watch(model, optimizer, probes=[Probe("arithmetic", tokenizer, every_steps=200),
                                                  Drift(tokenizer=tokenizer)])

Importing this package is cheap: torch is imported only when a probe runs.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Probe": "probes.probe", "ProbeSet": "probes.probe", "Drift": "probes.drift",
    "PairwiseJudge": "probes.judge", "CausalLMAdapter": "probes.runner", "run_suite": "probes.runner",
    "Suite": "probes.suite", "Item": "probes.suite", "Example": "probes.suite", "load_suite": "probes.suite",
    "load_suites": "probes.suite", "builtin": "probes.builtin", "BUILTIN": "probes.builtin",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'probes' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)


__all__ = sorted(_LAZY)
