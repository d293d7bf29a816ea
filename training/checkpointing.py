"""Training checkpoints: the model checkpoint of :mod:`fdreamer.checkpoint` plus the training state.

Beside ``model.safetensors`` / ``ema.safetensors`` / configs, a training checkpoint holds::

    optimizer.pt        AdamW state (torch.save)
    trainer_state.json  step, epoch, micro-batches consumed in that epoch, world size, seed, MLflow run id
    rng.pt              torch / numpy / python RNG states of rank 0
    train_config.yaml   the resolved TrainConfig

Ray Train uploads the folder to ``<storage_path>/<name>/checkpoint_*`` and keeps the last k.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdreamer import checkpoint as fck
from fdreamer.config import dump_yaml, load_config
from training.config import TrainConfig


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    consumed: int = 0  # micro-batches of `epoch` already used (per worker)
    world_size: int = 1
    seed: int = 0
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def save_training_checkpoint(
    path: Path, model: torch.nn.Module, optimizer_state: dict, ema_state: dict | None, state: TrainerState,
    cfg: TrainConfig, encoders: Any, meta: dict[str, Any],
) -> Path:
    """Write everything needed to continue (``model`` is the unwrapped video UNet)."""
    fck.save_model(path, model, cfg.schedule, encoders, ema=ema_state,
                   meta={"step": state.step, "stage": cfg.stage, "preset": cfg.preset, **meta})
    torch.save(optimizer_state, path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=2) + "\n")
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               path / "rng.pt")
    (path / "train_config.yaml").write_text(dump_yaml(cfg))
    return path


def read_trainer_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


def load_optimizer_state(path: Path) -> dict:
    return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)


def restore_rng(path: Path) -> None:
    f = path / "rng.pt"
    if f.is_file():
        st = torch.load(f, weights_only=False)
        torch.set_rng_state(st["torch"])
        np.random.set_state(st["numpy"])
        random.setstate(st["python"])


def checkpoint_config(path: Path) -> TrainConfig:
    return load_config(TrainConfig, path / "train_config.yaml")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The resumable checkpoint (one with ``trainer_state.json``) with the highest step under a run folder."""
    return fck.latest_checkpoint(run_dir, requires="trainer_state.json")


__all__ = ["TrainerState", "checkpoint_config", "latest_checkpoint", "load_optimizer_state", "read_trainer_state",
           "restore_rng", "save_training_checkpoint"]
