"""`trainguard demo`, the README's main job: a real training run whose NaN the daemon catches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_demo_fires_nonfinite_at_the_injected_step(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "monitor", "demo", "--seconds", "8", "--db", str(tmp_path / "d.db")],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "/metrics" in text and "/api/v1/runs" in text
    injected = int(text.split("before step ")[1].split()[0])
    assert f"!!! ALERT NonFinite [critical] fired at step {injected}" in text
    assert f"NonFinite fired at step {injected}, the first step after the injection." in text


def test_forgetting_demo_fires_probe_regression(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "monitor", "demo", "--scenario", "forgetting", "--pretrain-steps", "500",
                          "--finetune-steps", "50", "--probe-every", "25", "--db", str(tmp_path / "d.db")],
                         cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    base = float(text.split("baseline probe arithmetic: accuracy ")[1].split()[0])
    assert base >= 0.1, text  # pre-training taught some arithmetic: there is something to forget
    assert "!!! ALERT ProbeRegression [warning] fired at step 25" in text
    assert "ProbeRegression fired at step 25: the fine-tune is forgetting arithmetic." in text
    assert "NonFinite" not in text and "LossSpike" not in text
