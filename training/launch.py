"""Driver side of the training job: validate, resolve the previous stage, build and run the TorchTrainer."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from fdreamer import checkpoint as model_checkpoint
from fdreamer import checkpoint_store
from fdreamer.config import to_dict
from fdreamer.data import storage
from fdreamer.encoders import EncoderConfig
from training import checkpointing
from training import data as train_data
from training import rows as selection
from training.config import TrainConfig

logger = logging.getLogger(__name__)


def run_dir(cfg: TrainConfig) -> str:
    """``<storage_path>/<name>``: a local folder (absolute) or ``s3://bucket/prefix/<name>``."""
    if storage.is_s3(cfg.storage_path):
        return storage.join(cfg.storage_path, cfg.name)
    return str(Path(cfg.storage_path).resolve() / cfg.name)


def encoder_config(cfg: TrainConfig) -> EncoderConfig:
    """The frozen encoders recorded in checkpoints: ``models_dir`` or the data's ``encoders.yaml``."""
    if cfg.models_dir:
        root = Path(cfg.models_dir).resolve()
        return EncoderConfig(**{n: str(root / n) for n in ("vae", "text_encoder", "tokenizer", "t5", "clip")})
    recorded = Path(cfg.data.path) / "encoders.yaml"  # local data only: with s3:// data pass --models_dir
    if "://" not in cfg.data.path and recorded.is_file():
        from fdreamer.config import load_config

        return load_config(EncoderConfig, recorded)
    return EncoderConfig()


def check_init_compatible(cfg: TrainConfig, init: Path) -> None:
    """Fail on the driver, before any worker starts, when ``init`` cannot load into this stage's model."""
    import torch
    from safetensors import safe_open

    from training.loop import preset_model

    model = preset_model(cfg, cfg.model.with_(predictnet=False), device="meta")
    with safe_open(str(init / "model.safetensors"), "pt") as f:  # shapes only, no weights read
        saved = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()  # noqa: SIM118 - safe_open is not a dict
                 if not k.startswith("predictnet.")}
    problems = model_checkpoint.state_mismatch(model.state_dict(), saved)
    if problems:
        raise model_checkpoint.CheckpointError(f"init_from {init}: checkpoint from an incompatible model config: "
                                  f"{'; '.join(problems)}")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute: workers run in other directories (and on other nodes)."""
    def fix(p: str | None) -> str | None:
        return p if not p or "://" in p else str(Path(p).resolve())

    return replace(cfg, data=replace(cfg.data, path=fix(cfg.data.path), image_path=fix(cfg.data.image_path)),
                   storage_path=fix(cfg.storage_path),
                   models_dir=fix(cfg.models_dir), pretrained_unet=fix(cfg.pretrained_unet))


def prepare(cfg: TrainConfig) -> dict[str, Any]:
    """Every driver-side check; returns the ``train_loop_config`` for the workers."""
    cfg.check_ready()
    cfg = absolute_paths(cfg)
    fs, files = selection.shard_files(cfg.data.path, cfg.s3_endpoint)
    selection.check_schema(fs, files)
    train_data.load_null(cfg.data.path, cfg.s3_endpoint)
    blocks = train_data.plan_blocks(cfg)
    rows = blocks["train"].total
    per_worker = rows // cfg.scaling.num_workers
    if per_worker < cfg.micro_batch * cfg.accumulation:
        raise selection.DataError(
            f"{cfg.data.path}: {rows} training rows after filters ({selection.train_rule(cfg.data).describe()}, "
            f"motion score / frame filters of data.*): {per_worker} per worker, fewer than one optimizer step "
            f"needs (micro_batch {cfg.micro_batch} x accumulation {cfg.accumulation}); rows per split value in the "
            f"data: {selection.split_counts(fs, files)} (set data.split to one of them, or null for every row not "
            f"in data.heldout_split={cfg.data.heldout_split!r})")
    init = None
    if cfg.init_from:
        remote = storage.is_s3(cfg.init_from)
        found = (checkpoint_store.latest(cfg.init_from, cfg.s3_endpoint) if remote else
                 str(model_checkpoint.resolve_checkpoint(cfg.init_from, cfg.tracking.tracking_uri)[0]))
        if found is None:
            raise model_checkpoint.CheckpointError(f"init_from {cfg.init_from}: no checkpoint under this S3 prefix")
        if not remote and checkpointing.is_sharded(found) and not (Path(found) / "model.safetensors").is_file():
            logger.warning("init_from %s: a sharded (FSDP) checkpoint without full weights: consolidating its "
                           "shards into model.safetensors", found)
        check_init_compatible(cfg, checkpointing.local_checkpoint(found, cfg.s3_endpoint))
        init = found  # a folder, or an s3:// checkpoint that every worker fetches into its node's cache
    out = run_dir(cfg)
    latest = checkpointing.latest_resumable(out, cfg.s3_endpoint)
    if not cfg.resume and latest is not None:
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --name")
    if cfg.resume and latest is not None:
        checkpointing.check_resumable(latest, cfg.scaling.parallel if cfg.scaling.num_workers > 1 else "ddp",
                                      cfg.s3_endpoint)
    encoders = encoder_config(cfg)
    return {"cfg": to_dict(cfg), "init_from": init, "encoders": to_dict(encoders),
            "run_dir": str(out), "meta": clip_profile_meta(fs, files[0], encoders), "rows": rows,
            "blocks": {name: b.to_dict() for name, b in blocks.items()}}


def clip_profile_meta(fs: Any, shard: str, encoders: EncoderConfig) -> dict[str, Any]:
    """Frame count, fps, latent size and ``t5_caption`` (the text T5 read) of the training clips, plus their pixel size = latent size x the
    VAE's downsample factor (read from the VAE's config) when a VAE is configured: the defaults of the
    inference pipeline recorded in checkpoints (without ``size`` it falls back to ``schedule.height/width``)."""
    import pyarrow.parquet as pq

    from fdreamer.data.schema import shard_t5_caption

    table = pq.read_table(shard, filesystem=fs, columns=["num_frames", "fps", "latents_shape"])
    rows = table.slice(0, 1).to_pylist()
    if not rows:
        return {}
    latent_size = int(rows[0]["latents_shape"][-1])
    meta = {"num_frames": int(rows[0]["num_frames"]), "fps": float(rows[0]["fps"]), "latent_size": latent_size,
            "t5_caption": shard_t5_caption(table.schema.metadata)}  # what T5 read: inference gives it the same
    if encoders.vae is not None:
        from fdreamer.encoders import vae_downsample_factor

        try:
            meta["size"] = latent_size * vae_downsample_factor(encoders.vae)
        except FileNotFoundError as exc:  # e.g. the models live on the worker nodes only
            logger.warning("no clip size recorded in the checkpoints (inference uses schedule.height/width): %s", exc)
    return meta


def fit(cfg: TrainConfig, loop_config: dict[str, Any] | None = None) -> Any:
    """Run the stage on the connected Ray cluster; returns the ``ray.train.Result``.

    ``loop_config``: what :func:`prepare` returned for this ``cfg`` (else it runs here)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.loop import train_loop_per_worker

    cfg = absolute_paths(cfg)
    loop_config = dict(loop_config) if loop_config is not None else prepare(cfg)
    out = run_dir(cfg)
    if cfg.resume:  # Ray Train V2 has no resume_from_checkpoint: the workers load this one themselves
        latest = checkpointing.latest_resumable(out, cfg.s3_endpoint)
        if latest is None:
            logger.warning("--resume: no checkpoint under %s, starting from scratch", out)
        else:
            loop_config["resume_from"] = latest
            step = checkpointing.read_trainer_state(latest, cfg.s3_endpoint).step
            print(f"resuming from {latest} (step {step})", flush=True)
    # Ray Train takes an s3:// storage path as the bucket/prefix on a filesystem with the job's endpoint
    fs, base = storage.resolve(cfg.storage_path, cfg.s3_endpoint)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo",
                                 timeout_s=cfg.scaling.collective_timeout_s),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
            placement_strategy=cfg.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=base, storage_filesystem=fs if storage.is_s3(cfg.storage_path) else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep)),
    )
    result = trainer.fit()
    final = checkpointing.latest_resumable(out, cfg.s3_endpoint)
    summary = {"name": cfg.name, "stage": cfg.stage, "checkpoint": final,
               "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}}
    if final is not None:
        summary["mlflow_run_id"] = checkpointing.read_trainer_state(final, cfg.s3_endpoint).mlflow_run_id
    print(json.dumps(summary), flush=True)
    return result
