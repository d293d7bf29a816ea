"""Preprocessed sample data for tests that consume the Parquet output (training, data loaders).

    data = preprocess_sample(workdir, ray_address)   # {"output", "models", "sample", "summary"}

Writes ``num_clips`` sample clips (:func:`fdreamer.toy.sample_data.write_sample_data`), the tiny models
with the committed trained VAE (:func:`fdreamer.toy.tiny_models.make_tiny_models`, seed 0) and runs
``pipelines/preprocess.py`` with ``pipelines/configs/tiny.yaml`` on the sample's ``manifest.jsonl``
(so the ``split`` and ``motion`` columns are filled: both ``train`` and ``heldout`` rows exist) as a
subprocess against the given Ray cluster. Output layout: ``<output>/shards/part-*.parquet``,
``null_conditions.safetensors``, ``summary.json``, ``_SUCCESS``, ``duplicates.parquet``,
``quarantine.parquet``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .ray_cluster import REPO, subprocess_env

TINY_PROFILE = REPO / "pipelines" / "configs" / "tiny.yaml"


def preprocess_cmd(address: str, inputs: list[str], models: Path, out: Path | str, *extra: str) -> list[str]:
    """The command line of one preprocessing job with the tiny profile."""
    cmd = [sys.executable, str(REPO / "pipelines" / "preprocess.py"), "--config", str(TINY_PROFILE),
           f"--inputs={json.dumps([str(i) for i in inputs])}", f"--output={out}", f"--models_dir={models}"]
    return cmd + ([f"--ray_address={address}"] if address else []) + list(extra)


def preprocess_sample(workdir: Path, ray_address: str, num_clips: int = 32, timeout_s: float = 600) -> dict[str, Any]:
    """Sample clips + tiny models (trained VAE) + one preprocessing run; see the module docstring."""
    import warnings

    from fdreamer.toy.sample_data import write_sample_data
    from fdreamer.toy.tiny_models import make_tiny_models

    workdir = Path(workdir)
    sample, models, output = workdir / "sample", workdir / "models", workdir / "preprocessed"
    write_sample_data(sample, num_clips, workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        make_tiny_models(models, seed=0)
    proc = subprocess.run(preprocess_cmd(ray_address, [str(sample / "manifest.jsonl")], models, output),
                          check=False, env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"preprocessing the sample failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    summary = json.loads((output / "_SUCCESS").read_text())
    return {"output": output, "models": models, "sample": sample, "summary": summary}
