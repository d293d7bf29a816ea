"""Training checkpoints: the model checkpoint of :mod:`fdreamer.checkpoint` plus the training state.

Beside ``model.safetensors`` / ``ema.safetensors`` / configs, a training checkpoint holds::

    optimizer.pt        AdamW state (torch.save)
    trainer_state.json  step, epoch, micro-batches consumed in that epoch, world size, seed, MLflow run id
    rng.pt              torch / numpy / python RNG states of rank 0
    train_config.yaml   the resolved TrainConfig

Ray Train uploads the folder to ``<storage_path>/<name>/checkpoint_*`` and keeps the last k; with an
``s3://`` storage path the folders live in the bucket, and resume / ``init_from`` fetch the one they need
into the node's local cache (:func:`local_checkpoint`, :mod:`fdreamer.checkpoint_store`).

FSDP (``scaling.parallel: fsdp``) checkpoints are sharded instead (:func:`save_sharded`): no weights are
gathered; each rank writes its own shard of the model and optimizer with ``torch.distributed.checkpoint``
(DCP) and reports its own folder to Ray Train, which merges them into one checkpoint folder::

    dcp/.metadata               DCP metadata (rank 0): every tensor's shards, which file holds them
    dcp/__<rank>_0.distcp       rank <rank>'s shards of the model ("model.*") and AdamW state ("optim.*")
    save_stats_rank<rank>.json  what writing it cost that rank: bytes, seconds blocking / in all, sync | async
    trainer_state.json, rng.pt, train_config.yaml, fdreamer_checkpoint.json ("weights": "dcp"),
    model.yaml, unet_config.json, schedule.yaml, encoders.yaml      (rank 0, as for DDP)
    model.safetensors           the final checkpoint only: full weights gathered on rank 0 (consumers)

A sharded checkpoint without ``model.safetensors`` becomes a full one with :func:`consolidate` (no process
group needed; ``init_from`` does it by itself); :func:`load_sharded_model` loads it into a plain model.
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
from fdreamer import checkpoint_store
from fdreamer.data import storage
from fdreamer.config import dump_yaml, load_config
from training.config import TrainConfig


class CheckpointIncomplete(fck.CheckpointError):
    """A training checkpoint lacks a file that resuming it needs (``optimizer.pt``, ``ema.safetensors`` for a
    run with an EMA, ``rng.pt``, ``trainer_state.json``): resuming without it would silently continue from
    a different state (e.g. an EMA restarted from the current weights)."""


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
    _save_trainer_files(path, state, cfg)
    return path


def _save_trainer_files(path: Path, state: TrainerState, cfg: TrainConfig) -> None:
    (path / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=2) + "\n")
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               path / "rng.pt")
    (path / "train_config.yaml").write_text(dump_yaml(cfg))


# ------------------------------------------------------------------ sharded (FSDP) checkpoints

DCP_DIR = "dcp"


def _holds(path: str | Path, rel: str, s3_endpoint: str | None = None) -> bool:
    fs, base = storage.resolve(str(path), s3_endpoint)
    return storage.exists(fs, storage.join(base, rel))


def is_sharded(path: str | Path, s3_endpoint: str | None = None) -> bool:
    """Whether ``path`` (a folder or ``s3://`` prefix) holds a DCP (FSDP) checkpoint."""
    return _holds(path, f"{DCP_DIR}/.metadata", s3_endpoint)


def check_resumable(path: str | Path, parallel: str, s3_endpoint: str | None = None) -> None:
    """A checkpoint resumes only under the parallelism that wrote it (the optimizer state differs)."""
    sharded = is_sharded(path, s3_endpoint)
    if parallel == "fsdp" and not sharded:
        raise fck.CheckpointError(f"{path} was written with scaling.parallel=ddp (no {DCP_DIR}/): resume it with ddp, or "
                         "start a new stage from it with init_from")
    if parallel != "fsdp" and sharded and not _holds(path, "optimizer.pt", s3_endpoint):
        raise fck.CheckpointError(f"{path} is a sharded checkpoint of scaling.parallel=fsdp: resume it with fsdp, or start "
                         "a new stage from it with init_from")


def save_sharded_files(path: Path, model: torch.nn.Module, state: TrainerState, cfg: TrainConfig, encoders: Any,
                       meta: dict[str, Any]) -> None:
    """Rank 0's part of a sharded checkpoint: everything but the weights (configs, meta, trainer state, RNG)."""
    from fdreamer.encoders import EncoderConfig

    path.mkdir(parents=True, exist_ok=True)
    (path / "unet_config.json").write_text(json.dumps(dict(model.unet.config), indent=2, default=str) + "\n")
    (path / "model.yaml").write_text(dump_yaml(model.cfg))
    (path / "schedule.yaml").write_text(dump_yaml(cfg.schedule))
    (path / "encoders.yaml").write_text(dump_yaml(encoders or EncoderConfig()))
    info = {"format": fck.FORMAT_VERSION, "step": state.step, "stage": cfg.stage, "preset": cfg.preset, **meta,
            "weights": DCP_DIR}
    (path / fck.META).write_text(json.dumps(info, indent=2, default=str) + "\n")
    _save_trainer_files(path, state, cfg)


def save_full_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """``model.safetensors`` from a full (gathered) state dict, as :func:`fdreamer.checkpoint.save_model` writes it."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / "model.safetensors"))


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # DTensor shards, keyed by parameter name
    return {"model": model_state, "optim": optim_state}


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 process_group: Any = None, use_async: bool = False) -> Any:
    """This rank's shards into ``path/dcp`` (collective). ``use_async``: ``dcp.async_save`` (the state is
    copied to CPU memory before it returns, the files are written by a background thread that runs its
    collectives on ``process_group``; returns the Future); else ``dcp.save`` (returns None)."""
    import torch.distributed.checkpoint as dcp

    state, target = _sharded_state(model, optimizer), str(path / DCP_DIR)
    if use_async:
        return dcp.async_save(state, checkpoint_id=target, process_group=process_group)
    dcp.save(state, checkpoint_id=target)
    return None


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load ``path/dcp`` into an FSDP-sharded model and its optimizer (collective; any number of ranks can
    read what any number wrote, but the data position needs the same world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _sharded_state(model, optimizer)  # the layout to fill (the optimizer state is created empty)
    dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_sharded_model(path: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The checkpoint's video UNet with the weights of its DCP shards, in this process, without any process
    group (``dcp.load(no_dist=True)`` reads every rank's file)."""
    import torch.distributed.checkpoint as dcp

    model = fck.build_empty(path, device=device)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR), no_dist=True)
    model.load_state_dict(state["model"])
    return model


def consolidate(path: Path) -> Path:
    """Write ``model.safetensors`` (full weights) beside the DCP shards of ``path`` (a no-op when present), so
    every consumer of :mod:`fdreamer.checkpoint` (serving, evaluation, ``init_from``) can read it."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        save_full_weights(path, load_sharded_model(path).state_dict())
    return path


def read_trainer_state(path: str | Path, s3_endpoint: str | None = None) -> TrainerState:
    fs, base = storage.resolve(str(path), s3_endpoint)
    return TrainerState(**json.loads(storage.read_bytes(fs, storage.join(base, "trainer_state.json"))))


def check_complete(path: Path, *, sharded: bool, ema: bool) -> None:
    """:class:`CheckpointIncomplete` naming every file a resume of ``path`` needs and does not find: the trainer
    state and RNG always, ``optimizer.pt`` (DDP) or ``dcp/.metadata`` (FSDP), ``ema.safetensors`` when the
    run keeps an EMA (``ema``)."""
    path = Path(path)
    needed = ["trainer_state.json", "rng.pt", f"{DCP_DIR}/.metadata" if sharded else "optimizer.pt"]
    if ema:
        needed.append("ema.safetensors")
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        why = (" (the run has optim.ema_decay > 0: was the checkpoint written with ema_decay 0? resume with the "
               "same optim.ema_decay, or start a new stage from it with init_from)" if "ema.safetensors" in missing
               else "")
        raise CheckpointIncomplete(f"{path}: cannot resume, the checkpoint lacks {missing}{why}")


def load_optimizer_state(path: Path) -> dict:
    """``optimizer.pt`` read onto the CPU (:func:`restore_training_state` loads it into an optimizer, whose
    ``load_state_dict`` moves every state tensor to its parameter's device)."""
    f = Path(path) / "optimizer.pt"
    if not f.is_file():
        raise CheckpointIncomplete(f"{path}: cannot resume, the checkpoint lacks optimizer.pt")
    return torch.load(f, map_location="cpu", weights_only=False)


def restore_training_state(path: Path, optimizer: torch.optim.Optimizer, ema: Any | None) -> None:
    """Load a (DDP / one-worker) checkpoint's optimizer state and EMA into ``optimizer`` and ``ema``, which
    must already be built over the PLACED parameters (the model on its device and wrapped): the AdamW
    moments then land on each parameter's device (``Optimizer.load_state_dict`` casts them there) and the
    EMA is copied into its shadow tensors, which live beside the parameters. Loading before the model is
    moved leaves them on the CPU beside CUDA parameters: the first ``optimizer.step()`` raises a device
    mismatch. A missing ``ema.safetensors`` (``ema`` given) raises :class:`CheckpointIncomplete`."""
    from safetensors.torch import load_file

    path = Path(path)
    saved = load_optimizer_state(path)
    # Loading replaces each group's settings with the saved ones: keep the implementation chosen for THIS run's
    # device (fused on CUDA, foreach on the CPU), whatever wrote the checkpoint; load_state_dict then puts the
    # `step` counters where that implementation needs them (fused: on the parameter's device).
    impl = ("fused", "foreach", "capturable")
    saved["param_groups"] = [{**sg, **{k: g[k] for k in impl if k in g}}
                             for sg, g in zip(saved["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict(saved)
    if ema is not None:
        f = path / "ema.safetensors"
        if not f.is_file():
            raise CheckpointIncomplete(f"{path}: cannot resume the EMA, the checkpoint lacks ema.safetensors")
        ema.load_state_dict(load_file(str(f)))


def restore_rng(path: Path) -> None:
    """The torch / numpy / python RNG states of ``rng.pt`` (:class:`CheckpointIncomplete` when absent)."""
    f = Path(path) / "rng.pt"
    if not f.is_file():
        raise CheckpointIncomplete(f"{path}: cannot resume, the checkpoint lacks rng.pt")
    st = torch.load(f, weights_only=False)
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])


def checkpoint_config(path: Path) -> TrainConfig:
    return load_config(TrainConfig, path / "train_config.yaml")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The resumable checkpoint (one with ``trainer_state.json``) with the highest step under a run folder."""
    return fck.latest_checkpoint(run_dir, requires="trainer_state.json")


def latest_resumable(run_dir: str, s3_endpoint: str | None = None) -> str | None:
    """:func:`latest_checkpoint` of a local run folder or an ``s3://`` one (listed there, nothing fetched)."""
    if storage.is_s3(run_dir):
        return checkpoint_store.latest(run_dir, s3_endpoint, requires="trainer_state.json")
    found = latest_checkpoint(Path(run_dir))
    return str(found) if found else None


def checkpoint_uri(checkpoint: Any) -> str:
    """A ``ray.train.Checkpoint``'s folder as this module's specs take it: a local path, or ``s3://bucket/key``
    (Ray keeps the filesystem and the bucket-relative path apart)."""
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return str(checkpoint.path)
    if checkpoint.filesystem.type_name != "s3":
        raise fck.CheckpointError(f"checkpoint on a {checkpoint.filesystem.type_name} filesystem: only local and s3:// are supported")
    return f"s3://{checkpoint.path}"


def local_checkpoint(spec: str, s3_endpoint: str | None = None, *, resume: bool = False) -> Path:
    """A checkpoint folder (path or ``s3://``) as a local folder with full weights: an S3 one fetched into this
    node's cache (everything when ``resume``, else what loading the model reads); a sharded one without
    ``model.safetensors`` consolidated (:func:`consolidate`)."""
    path = checkpoint_store.fetch(spec, s3_endpoint, model_only=not resume) if storage.is_s3(spec) else Path(spec)
    if not resume and is_sharded(path) and not (path / "model.safetensors").is_file():
        consolidate(path)
    return path


__all__ = ["DCP_DIR", "CheckpointIncomplete", "TrainerState", "check_complete", "check_resumable", "checkpoint_config", "checkpoint_uri", "consolidate", "is_sharded",
           "latest_checkpoint", "latest_resumable", "load_optimizer_state", "local_checkpoint", "load_sharded", "load_sharded_model", "read_trainer_state",
           "restore_rng", "restore_training_state", "save_full_weights", "save_sharded", "save_sharded_files", "save_training_checkpoint"]
