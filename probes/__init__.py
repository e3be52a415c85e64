"""Few-shot evaluation probes run inside the training process (suites, scoring, runner, drift)."""
