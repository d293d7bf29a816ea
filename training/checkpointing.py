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
    """The checkpoint with the highest step under a Ray Train run folder (or None)."""
    best: tuple[int, Path] | None = None
    for meta in run_dir.glob("**/" + fck.META):
        folder = meta.parent
        if not (folder / "trainer_state.json").is_file():
            continue
        step = read_trainer_state(folder).step
        if best is None or step > best[0]:
            best = (step, folder)
    return best[1] if best else None


def resolve_init(spec: str, tracking_uri: str | None) -> Path:
    """``init_from`` -> a local checkpoint folder.

    Accepts a checkpoint folder, a run folder (its latest checkpoint), or ``runs:/<mlflow run id>``
    (the run's ``fdreamer.checkpoint`` tag, else its logged ``checkpoint`` artifact, downloaded).
    """
    if spec.startswith("runs:/"):
        import mlflow

        run_id = spec[len("runs:/"):].strip("/")
        client = mlflow.tracking.MlflowClient(tracking_uri)
        run = client.get_run(run_id)
        tagged = run.data.tags.get("fdreamer.checkpoint")
        if tagged and fck.is_checkpoint(tagged):
            return Path(tagged)
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint", tracking_uri=tracking_uri)
        return Path(local)
    p = Path(spec)
    if fck.is_checkpoint(p):
        return p
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is not None:
            return found
    raise fck.CheckpointError(f"init_from {spec!r}: not a checkpoint folder, a run folder with checkpoints, "
                              "or runs:/<mlflow run id>")


__all__ = ["TrainerState", "checkpoint_config", "latest_checkpoint", "load_optimizer_state", "read_trainer_state",
           "resolve_init", "restore_rng", "save_training_checkpoint"]
