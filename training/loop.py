"""The per-worker training loop that Ray Train runs (``TorchTrainer(train_loop_per_worker=...)``).

Every worker builds the same model (same seed, same initial weights), restores the latest checkpoint
when Ray hands one over (``ray.train.get_checkpoint()``: after a worker failure or on ``--resume``),
wraps the model for DDP/FSDP (``ray.train.torch.prepare_model``) and streams its data shard
(``ray.train.get_dataset_shard('train').iter_torch_batches``). Each optimizer step accumulates
``global_batch / (workers x micro_batch)`` micro-batches. Rank 0 validates, logs to MLflow and writes
checkpoints; all ranks call ``ray.train.report`` together.

Joint image-video batches (``data.image_ratio``): each micro-batch takes ``video_micro_batch`` clips
from the ``train`` stream and ``image_micro_batch`` images from the ``images`` stream
(:class:`~fdreamer.data.batching.JointBatch`). The clip stream drives the epochs as before (a partial step
at the end of an epoch is dropped); the image stream cycles on its own, its position kept in the
trainer state (``extra.images``) so a resume continues it exactly. With ``image_ratio = 1`` the
``train`` stream holds the images.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fdreamer import checkpoint as fck
from fdreamer.data.batching import JointBatch, TrainBatch, null_from_tensors
from fdreamer.config import load_config
from fdreamer.encoders import EncoderConfig
from fdreamer.models import FactorizedDreamerUNet
from fdreamer.schedule import NoiseSchedule
from fdreamer.train.step import (
    EMA,
    lr_at,
    make_optimizer,
    optimizer_step,
    validation_loss,
)
from training import checkpointing as ck
from training import data as tdata
from training.config import TrainConfig


def build_model(cfg: TrainConfig, init_from: str | None) -> FactorizedDreamerUNet:
    """The stage's model: SD weights (or the preset's random init), then the previous stage's weights."""
    if cfg.pretrained_unet:
        model = FactorizedDreamerUNet.from_pretrained_unet(cfg.pretrained_unet, cfg.model)
    else:
        model = FactorizedDreamerUNet.from_preset(cfg.preset, cfg.model, seed=cfg.seed)
    if init_from:
        fck.load_weights_into(model, init_from)  # PredictNet added from the up path when new (stage 3)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing(True)
    return model


def _num_samples(mb: TrainBatch | JointBatch) -> int:
    return mb.num_samples if isinstance(mb, JointBatch) else mb.latents.shape[0]


def _unwrap(model: torch.nn.Module) -> FactorizedDreamerUNet:
    return getattr(model, "module", model)


def _full_state_ctx(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Gather full (unsharded) state dicts on FSDP; a no-op for DDP / single process."""
    from torch.distributed.fsdp import (
        FullStateDictConfig,
        FullyShardedDataParallel,
        StateDictType,
    )

    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.state_dict_type(
            model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True))
    return contextlib.nullcontext()


class _DataLog:
    """Optional per-rank record of the clip ids of every step (``<run dir>/data_order/rank<r>.jsonl``)."""

    def __init__(self, folder: str | None, rank: int) -> None:
        self.file = None
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.file = Path(folder) / f"rank{rank}.jsonl"

    def write(self, step: int, epoch: int, ids: list[str]) -> None:
        if self.file is not None:
            with self.file.open("a") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, "clip_ids": ids, "pid": os.getpid()}) + "\n")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    cfg = load_config(TrainConfig, data=config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.scaling.torch_threads))
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()

    model = build_model(cfg, config.get("init_from"))
    schedule = NoiseSchedule(cfg.schedule)
    optimizer = make_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
    ema = EMA(model, cfg.optim.ema_decay, cfg.optim.ema_start) if cfg.optim.ema_decay > 0 else None
    state = ck.TrainerState(world_size=world, seed=cfg.seed)
    saved_optimizer = None

    # After a worker failure Ray hands over the run's latest checkpoint; on --resume the driver names it.
    restored = ray.train.get_checkpoint()
    if restored is None and config.get("resume_from"):
        restored = ray.train.Checkpoint.from_directory(config["resume_from"])
    if restored is not None:
        with restored.as_directory() as d:
            d = Path(d)
            state = ck.read_trainer_state(d)
            if state.world_size != world:
                raise ValueError(f"checkpoint was written by {state.world_size} workers, this run has {world}: "
                                 "the data position would not be exact; use the same num_workers")
            fck.load_weights_into(model, d)
            saved_optimizer = ck.load_optimizer_state(d)
            if cfg.scaling.parallel != "fsdp":
                optimizer.load_state_dict(saved_optimizer)
            if ema is not None and (d / "ema.safetensors").is_file():
                from safetensors.torch import load_file

                ema.load_state_dict(load_file(str(d / "ema.safetensors")))
            ck.restore_rng(d)

    model.to(device)
    if ema is not None:
        ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}
    fsdp = world > 1 and cfg.scaling.parallel == "fsdp"
    if world > 1:
        kwargs = {"use_orig_params": True} if fsdp else None
        model = ray.train.torch.prepare_model(model, parallel_strategy=cfg.scaling.parallel,
                                              parallel_strategy_kwargs=kwargs)
        if fsdp:  # FSDP shards the parameters: the optimizer must be built on the wrapped ones
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            optimizer = make_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
            if saved_optimizer is not None:  # a full (rank-0 gathered) optimizer state -> this rank's shard
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, saved_optimizer))
    model.train()
    no_sync = getattr(model, "no_sync", None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and cfg.mixed_precision == "bf16" else None)

    null = null_from_tensors(tdata.load_null(cfg.data.path))
    null = type(null)(*(None if v is None else v.to(device) for v in
                        (null.text_tokens, null.image_embed, null.first_frame, null.t5_tokens, null.t5_mask)))
    drop = (cfg.objective.drop_text, cfg.objective.drop_image, cfg.objective.drop_both)
    gamma = cfg.objective.gamma
    with_flow = cfg.model.predictnet
    n_video, n_image = cfg.video_micro_batch, cfg.image_micro_batch
    primary = tdata.ShardStream(ray.train.get_dataset_shard("train"), n_video or n_image, cfg,
                                tdata.make_collate(with_flow, image=n_video == 0, **tdata.conditions_for(cfg)))
    images = None
    if n_video and n_image:  # joint batches: a second, cycling stream of images
        pos = state.extra.get("images", {})
        images = tdata.ShardStream(ray.train.get_dataset_shard("images"), n_image, cfg,
                                   tdata.make_collate(False, image=True), epoch=int(pos.get("epoch", 0)),
                                   consumed=int(pos.get("consumed", 0)), seed_offset=5_003)

    def as_micro(mb: TrainBatch) -> TrainBatch | JointBatch:
        if images is None:
            return mb.to(device)
        return JointBatch(mb, images.next_cycling()).to(device)

    datalog = _DataLog(str(Path(config["run_dir"]) / "data_order") if cfg.data.log_order else None, rank)

    node = ray.get_runtime_context().get_node_id()
    nodes = [node] * world
    if world > 1:  # where every rank runs (logged: placement over the cluster's nodes is visible in MLflow)
        torch.distributed.all_gather_object(nodes, node)
    tracker = heldout = heldout_images = None
    if rank == 0:
        from training.tracking import Tracker

        tracker = Tracker(cfg, state.mlflow_run_id)
        state.mlflow_run_id = tracker.run_id
        tracker.set_tag("ray.worker_nodes", json.dumps(nodes))
        tracker.set_tag("ray.num_nodes", len(set(nodes)))
        heldout = tdata.heldout_batch(cfg)
        if heldout is not None:
            heldout = heldout.to(device)
        if n_image:
            heldout_images = tdata.heldout_batch(cfg, tdata.IMAGE)
            heldout_images = heldout_images.to(device) if heldout_images is not None else None
    encoders = load_config(EncoderConfig, data=config["encoders"]) if config.get("encoders") else EncoderConfig()

    def full_params() -> contextlib.AbstractContextManager:
        """FSDP: every rank gathers the full parameters (collective) so rank 0 can run the plain module."""
        if not fsdp:
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(model, writeback=False)

    def evaluate(step: int, do_validate: bool, do_samples: bool) -> dict[str, float]:
        """Validation loss and/or sample videos on rank 0 (called by every rank: FSDP gathers collectively)."""
        if not (do_validate or do_samples):
            return {}
        val: dict[str, float] = {}
        with full_params():
            if rank == 0 and do_validate and heldout is not None:
                val = validation_loss(_unwrap(model), schedule, heldout, cfg.objective.validation_timesteps, cfg.seed)
                tracker.log_metrics(val, step=step)
            if rank == 0 and do_validate and heldout_images is not None:
                val_img = validation_loss(_unwrap(model), schedule, heldout_images,
                                          cfg.objective.validation_timesteps, cfg.seed)
                tracker.log_metrics(val_img, step=step)
                val.update(val_img)
            if rank == 0 and do_samples:
                from training.samples import log_samples

                log_samples(tracker, _unwrap(model), cfg, encoders, heldout, step)
        return val

    def save_and_report(metrics: dict[str, Any], final: bool = False) -> None:
        name = f"checkpoint_step_{state.step:08d}"
        with tempfile.TemporaryDirectory() as tmp, _full_state_ctx(model):
            ckpt = None
            if fsdp:  # collectives on every rank: full model and optimizer state gathered on rank 0
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

                full, optim_state = model.state_dict(), FSDP.optim_state_dict(model, optimizer)
            else:
                full, optim_state = None, optimizer.state_dict()
            if rank == 0:
                if fsdp:  # write the gathered state through a plain (unsharded) copy of the model
                    target = build_model(cfg, None)
                    target.load_state_dict(full)
                else:
                    target = _unwrap(model)
                ck.save_training_checkpoint(
                    Path(tmp), target, optim_state, ema.state_dict() if ema else None, state, cfg,
                    encoders, meta=config.get("meta", {}))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                if final:
                    tracker.log_artifacts(tmp, "checkpoint")
                    tracker.set_tag("fdreamer.checkpoint", Path(config["run_dir"]) / name)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    if state.step == 0:
        evaluate(0, do_validate=True, do_samples=False)

    window = {"t0": time.perf_counter(), "wait": 0.0, "samples": 0}
    while state.step < cfg.steps:
        primary.start(state.epoch, state.consumed)
        exhausted = False
        while state.step < cfg.steps and not exhausted:
            t_wait = time.perf_counter()
            micro: list[TrainBatch | JointBatch] = []
            for _ in range(cfg.accumulation):
                mb = primary.next()
                if mb is None:
                    exhausted = True
                    break
                micro.append(as_micro(mb))
            window["wait"] += time.perf_counter() - t_wait
            if exhausted:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state.step, cfg.optim.lr, cfg.optim.warmup_steps)
            res = optimizer_step(model, optimizer, schedule, micro, null=null, drop_probs=drop, gamma=gamma,
                                 grad_clip=cfg.optim.grad_clip, seed=cfg.seed, rank=rank, step=state.step,
                                 no_sync=no_sync, autocast=autocast, image_weight=cfg.objective.image_loss_weight)
            datalog.write(state.step, state.epoch, [i for mb in micro for i in mb.clip_ids])
            state.step += 1
            state.consumed += len(micro)
            if images is not None:
                state.extra["images"] = images.position()
            window["samples"] += sum(_num_samples(mb) for mb in micro) * world
            if ema is not None:
                ema.update(model, state.step)
            if rank == 0 and (state.step % cfg.tracking.log_every == 0 or state.step == cfg.steps):
                elapsed = time.perf_counter() - window["t0"]
                tracker.log_metrics({
                    "loss": res.loss, "l_df": res.l_df, "l_flow": res.l_flow, "grad_norm": res.grad_norm,
                    **({"l_df_video": res.l_df_video, "l_df_image": res.l_df_image} if n_image else {}),
                    "lr": optimizer.param_groups[0]["lr"], "samples_per_s": window["samples"] / max(elapsed, 1e-9),
                    "data_wait_fraction": window["wait"] / max(elapsed, 1e-9), "epoch": state.epoch,
                }, step=state.step)
                window = {"t0": time.perf_counter(), "wait": 0.0, "samples": 0}
            if state.step < cfg.steps:
                t = cfg.tracking
                evaluate(state.step, do_validate=t.validate_every > 0 and state.step % t.validate_every == 0,
                         do_samples=t.sample_every > 0 and state.step % t.sample_every == 0)
            if state.step % cfg.checkpoint.every == 0 and state.step < cfg.steps:
                save_and_report({"step": state.step, "loss": res.loss})
        if exhausted:
            if state.consumed == 0:
                raise ValueError(f"worker {rank} got no batch in epoch {state.epoch}: the data shard has fewer rows "
                                 f"than {primary.batch_size} per micro-batch x accumulation {cfg.accumulation}")
            state.epoch += 1
            state.consumed = 0
    final_metrics: dict[str, Any] = {"step": state.step}
    final_metrics.update(evaluate(state.step, do_validate=True, do_samples=cfg.tracking.sample_every >= 0))
    save_and_report(final_metrics, final=True)
    if rank == 0 and tracker is not None:
        tracker.finish()
