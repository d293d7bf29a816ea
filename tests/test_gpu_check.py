"""``tests/gpu_check.py --cpu --tiny`` (what ``make gpu-check`` runs on a GPU, here on the CPU at the tiny
preset) runs to its JSON line, so the script does not rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_at_the_tiny_preset(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "tests/gpu_check.py"), "--cpu", "--tiny", "--sample-steps", "5",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=240, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[0])
    assert out["ok"] and out["device"] == "cpu" and out["imports_ray"] is False
    train, resume, sample = out["train"], out["resume"], out["sample"]
    assert train["preset"] == "tiny" and train["latents"] == [2, 4, 8, 16, 16] and len(train["step_s"]) == 3
    assert train["parameters"] == train["parameters_by_group"]["total"] and train["estimate_static_gib"] > 0
    # on the CPU, resuming is bitwise: the same step from the restored state
    assert resume["restored_step"] == 2 and resume["state_device_problems"] == []
    assert resume["max_abs_diff"] == {"model": 0.0, "ema": 0.0, "optim": 0.0} and resume["step_update_max"] > 0
    assert sample["frames"] == [8, 64, 64, 3] and sample["uint8"] and sample["steps"] == 5
