"""CUDA: what the CPU tests cannot catch (``gpu`` marker; skipped without CUDA, see ``tests/conftest.py``).

- save -> restore -> 1 step equals the uninterrupted run on CUDA (fused AdamW, bf16 autocast);
- after a restore every AdamW state tensor (the fused optimizer's ``step`` too) and every EMA tensor is on
  the parameter's CUDA device, and a step runs;
- ``tests/gpu_check.py --tiny`` on CUDA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import resume as R

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(cfg, tmp_path: Path) -> dict:
    batches = [R.synthetic_batch(cfg, i) for i in range(3)]
    worker = R.new_worker(cfg, "cuda")
    R.step(worker, batches[0])
    R.step(worker, batches[1])
    path = R.save(worker, tmp_path / "checkpoint_step_2")
    before = R.snapshot(worker)
    R.step(worker, batches[2])
    after = R.snapshot(worker)
    resumed = R.new_worker(cfg, "cuda", source=path)
    devices = [(k, v.device) for p, st in resumed.optimizer.state.items() for k, v in st.items()
               if isinstance(v, torch.Tensor) and v.device != p.device]
    devices += [(k, v.device) for k, v in resumed.ema.shadow.items() if v.device.type != "cuda"]
    fused = resumed.optimizer.param_groups[0]["fused"]
    R.step(resumed, batches[2])
    return {"update": R.max_abs_diff(before, after), "diff": R.max_abs_diff(after, R.snapshot(resumed)),
            "devices": devices, "fused": fused, "resumed": resumed}


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_cuda_save_restore_step_equals_the_uninterrupted_run(tmp_path: Path, mixed_precision: str) -> None:
    """The resumed step 3 equals the uninterrupted step 3 up to CUDA's non-deterministic kernels: the largest
    difference is under 1% of the largest change that step made (a resume without the AdamW moments
    differs by about the whole change)."""
    cfg = R.train_config("tiny", optim={"ema_decay": 0.9, "lr": 1e-3}, mixed_precision=mixed_precision)
    out = _run(cfg, tmp_path)
    for part in ("model", "ema", "optim"):
        assert out["diff"][part] <= 0.01 * out["update"][part] + 1e-7, (part, out)


def test_cuda_restore_puts_every_state_tensor_on_the_gpu(tmp_path: Path) -> None:
    from fdreamer.train.step import state_device_problems

    cfg = R.train_config("tiny", optim={"ema_decay": 0.9, "lr": 1e-3}, mixed_precision="bf16")
    out = _run(cfg, tmp_path)
    assert out["fused"] is True and out["devices"] == []
    resumed = out["resumed"]
    assert all(p.is_cuda for p in resumed.model.parameters())
    assert state_device_problems(resumed.model, resumed.optimizer, resumed.ema) == []
    assert all(st["step"].is_cuda for st in resumed.optimizer.state.values())  # fused: the step counter too


def test_gpu_check_tiny_on_cuda(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "tests/gpu_check.py"), "--tiny", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[0])
    assert out["ok"] and out["tf32"] and out["train"]["adamw_fused"] and out["sample"]["dtype"] == "bfloat16"
    assert out["train"]["peak_gib"] > 0 and out["train"]["fits"]
