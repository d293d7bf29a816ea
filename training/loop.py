"""The per-worker training loop that Ray Train runs (``TorchTrainer(train_loop_per_worker=...)``).

:func:`train_loop_per_worker` is a thin wrapper over :class:`TrainWorker`, one object per worker:

1. **build and restore**: every worker builds the same model (same seed, same initial weights) and
   restores the latest checkpoint when Ray hands one over (``ray.train.get_checkpoint()``: after a
   worker failure) or the driver names one (``--resume``);
2. **distribute**: wraps the model for DDP (``ray.train.torch.prepare_model``) or shards it with FSDP2
   (``training.parallel.apply_fsdp``: ``fully_shard`` on CPU/gloo and GPU/NCCL alike);
3. **data streams**: reads its rows of the epoch (:func:`training.data.open_stream`: a seeded block order
   per epoch, its own range, shuffle windows) from the saved position, without replaying a batch; each optimizer step accumulates ``global_batch / (workers x micro_batch)``
   micro-batches;
4. **validate / sample / save / report**: rank 0 validates, renders sample videos, logs to MLflow and
   writes checkpoints; all ranks call ``ray.train.report`` together. With FSDP every rank writes its shards
   (``torch.distributed.checkpoint``, by default asynchronously: reported after the next step) and rank 0
   validates and samples on a plain copy of the model loaded with the gathered full state dict
   (the saving part: :mod:`training.saving`).

Joint image-video batches (``data.image_ratio``): each micro-batch takes ``video_micro_batch`` clips
from the ``train`` stream and ``image_micro_batch`` images from the ``images`` stream
(:class:`~fdreamer.data.batching.JointBatch`). The clip stream drives the epochs (a partial step at the
end of an epoch is dropped); the image stream cycles on its own, its position kept in the trainer state
(``extra.images``) so a resume continues it exactly. With ``image_ratio = 1`` the ``train`` stream holds
the images.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fdreamer import checkpoint as model_checkpoint
from fdreamer.config import load_config
from fdreamer.data.batching import JointBatch, TrainBatch, null_from_tensors
from fdreamer.device import enable_tf32, to_device
from fdreamer.encoders import EncoderConfig
from fdreamer.models import FactorizedDreamerUNet
from fdreamer.schedule import NoiseSchedule
from fdreamer.train.step import (EMA, StepResult, lr_at, make_optimizer, optimizer_step, state_device_problems,
                                 validation_loss)
from training import checkpointing
from training import data as train_data
from training import parallel
from training.config import TrainConfig
from training.rows import DataError
from training.saving import CheckpointSaving, PendingCheckpoint

MicroBatch = TrainBatch | JointBatch


def preset_model(cfg: TrainConfig, model_cfg: Any, *, device: str | None = None,
                 seed: int | None = None) -> FactorizedDreamerUNet:
    """The preset's randomly initialised model, with ``cfg.unet_overrides`` applied to its spatial UNet."""
    if not cfg.unet_overrides:
        return FactorizedDreamerUNet.from_preset(cfg.preset, model_cfg, device=device, seed=seed)
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):  # as from_preset
        if seed is not None:
            torch.manual_seed(seed)
        return FactorizedDreamerUNet(UNet2DConditionModel(**cfg.unet_kwargs()), model_cfg)


def build_model(cfg: TrainConfig, init_from: str | None) -> FactorizedDreamerUNet:
    """The stage's model: SD weights (or the preset's random init), then the previous stage's weights."""
    if cfg.pretrained_unet:
        model = FactorizedDreamerUNet.from_pretrained_unet(cfg.pretrained_unet, cfg.model)
    else:
        model = preset_model(cfg, cfg.model, seed=cfg.seed)
    if init_from:  # a local folder, or s3:// (fetched into this node's cache)
        init = checkpointing.local_checkpoint(init_from, cfg.s3_endpoint)
        model_checkpoint.load_weights_into(model, init)  # PredictNet added from the up path when new (stage 3)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing(True)
    return model


def _num_samples(micro_batch: MicroBatch) -> int:
    return micro_batch.num_samples if isinstance(micro_batch, JointBatch) else micro_batch.latents.shape[0]


class DataOrderLog:
    """Optional per-rank record of the clip ids of every step (``<run dir>/data_order/rank<r>.jsonl``)."""

    def __init__(self, folder: str | None, rank: int) -> None:
        self.file = None
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.file = Path(folder) / f"rank{rank}.jsonl"

    def write(self, step: int, epoch: int, clip_ids: list[str]) -> None:
        if self.file is not None:
            with self.file.open("a") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, "clip_ids": clip_ids, "pid": os.getpid()}) + "\n")


@dataclass
class ThroughputWindow:
    """Wall time, data-wait time and samples (all ranks) since the last logged step."""

    started: float = field(default_factory=time.perf_counter)
    data_wait_s: float = 0.0
    samples: int = 0

    def metrics(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {"samples_per_s": self.samples / elapsed, "data_wait_fraction": self.data_wait_s / elapsed}


class TrainWorker(CheckpointSaving):
    """One Ray Train worker of a training stage (see the module docstring for the order of its parts)."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.setup_model(loop_config, rank=context.get_world_rank(), world=context.get_world_size(),
                         device=ray.train.torch.get_device(), source=self.checkpoint_source(loop_config))
        cfg = self.cfg
        null = null_from_tensors(train_data.load_null(cfg.data.path, cfg.s3_endpoint))
        self.null = type(null)(*(None if v is None else v.to(self.device) for v in
                                 (null.text_tokens, null.image_embed, null.first_frame, null.t5_tokens, null.t5_mask)))
        self.open_data_streams()
        order_dir = cfg.data.log_order_dir or f"{loop_config['run_dir']}/data_order"  # local (TrainConfig checks)
        self.data_order_log = DataOrderLog(order_dir if cfg.data.log_order else None, self.rank)
        self.encoders = (load_config(EncoderConfig, data=loop_config["encoders"]) if loop_config.get("encoders")
                         else EncoderConfig())
        self.tracker: Any = None
        self.heldout: TrainBatch | None = None
        self.heldout_images: TrainBatch | None = None
        self.start_tracking()
        self.window = ThroughputWindow()

    # ------------------------------------------------------------------ build, restore, distribute

    def setup_model(self, loop_config: dict[str, Any], *, rank: int, world: int, device: torch.device,
                    source: str | None) -> None:
        """Model, optimizer and EMA of this worker, restored from ``source`` (a checkpoint; None = fresh), in
        the order that leaves every tensor on its parameter's device (no Ray here: tests call it with a
        fake device):

        1. build the model on the CPU (same seed on every worker; ``init_from`` weights);
        2. :meth:`restore`: trainer state and RNG; the checkpoint's weights into the CPU model (DDP);
        3. :meth:`distribute`: place the model on ``device`` and wrap it (DDP) or shard it (FSDP2);
        4. the optimizer over the placed parameters (fused AdamW on CUDA), the EMA from the placed weights;
        5. the checkpoint's optimizer and EMA state loaded onto the parameters' devices (FSDP: the DCP shards
           into the sharded model and optimizer), then checked once (:func:`state_device_problems`).
        """
        self.loop_config = loop_config
        self.cfg = cfg = load_config(TrainConfig, data=loop_config["cfg"])
        self.rank, self.world, self.device = rank, world, torch.device(device)
        torch.set_num_threads(cfg.scaling.threads())
        torch.manual_seed(cfg.seed)
        enable_tf32(self.device)
        self.fsdp = self.world > 1 and cfg.scaling.parallel == "fsdp"
        self.model: torch.nn.Module = build_model(cfg, loop_config.get("init_from"))
        self.no_sync: Any = None  # skips the gradient reduction of all but the last micro-batch (distribute)
        self.plain: FactorizedDreamerUNet | None = None  # FSDP, rank 0: unsharded copy for validation / samples
        self.gathered_step = -1  # the step whose full weights self.plain holds
        self.checkpoint_group: Any = None  # FSDP async saves: their own gloo group (collectives off the main thread)
        self.pending: PendingCheckpoint | None = None
        self.schedule = NoiseSchedule(cfg.schedule)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" and cfg.mixed_precision == "bf16" else None)
        self.null: Any = None  # CFG null conditions on the device (__init__: from the data)
        self.state = checkpointing.TrainerState(world_size=self.world, seed=cfg.seed)
        folder = self.restore(source)
        self.distribute()
        self.optimizer = self._new_optimizer()
        self.ema = (EMA(parallel.unwrap(self.model), cfg.optim.ema_decay, cfg.optim.ema_start)
                    if cfg.optim.ema_decay > 0 else None)
        if folder is not None:
            if self.fsdp:
                checkpointing.load_sharded(folder, self.model, self.optimizer)
            else:
                checkpointing.restore_training_state(folder, self.optimizer, self.ema)
        problems = state_device_problems(parallel.unwrap(self.model), self.optimizer, self.ema)
        if problems:  # a check that runs once, at start-up: a step would fail (or run on the wrong device)
            raise RuntimeError(f"{len(problems)} optimizer / EMA tensors off their parameter's device: {problems[:3]}")

    def _new_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return make_optimizer(self.model, o.lr, o.weight_decay, o.betas, o.eps)

    @staticmethod
    def checkpoint_source(loop_config: dict[str, Any]) -> str | None:
        """The checkpoint Ray hands over (``ray.train.get_checkpoint()``: a restart after a worker failure),
        else the one the driver names (``--resume``), else None."""
        import ray.train

        restored = ray.train.get_checkpoint()
        return loop_config.get("resume_from") if restored is None else checkpointing.checkpoint_uri(restored)

    def restore(self, source: str | None) -> Path | None:
        """Trainer state and RNG of checkpoint ``source``, and (DDP / one worker) its weights into the model,
        still on the CPU; returns the local checkpoint folder (None when starting fresh). The optimizer
        and EMA state are loaded by :meth:`setup_model` once the model is placed (FSDP: the shards too)."""
        if source is None:
            return None
        # Local, or s3:// fetched into this node's cache (each file written under a temp name, then renamed).
        # Not Ray's ``Checkpoint.as_directory()``: it downloads into a shared temp folder under a lock that a
        # second worker of the node takes again once the first has finished, rewriting the files in place
        # while the first reads them (a restart after a worker kill read a torn model.safetensors).
        folder = checkpointing.local_checkpoint(source, self.cfg.s3_endpoint, resume=True)
        self.state = checkpointing.read_trainer_state(folder)
        if self.state.world_size != self.world:
            raise model_checkpoint.CheckpointError(
                f"checkpoint was written by {self.state.world_size} workers, this run has {self.world}: the data "
                "position would not be exact; use the same num_workers")
        checkpointing.check_resumable(folder, "fsdp" if self.fsdp else "ddp")
        checkpointing.check_complete(folder, sharded=self.fsdp, ema=self.cfg.optim.ema_decay > 0)
        if not self.fsdp:
            model_checkpoint.load_weights_into(self.model, folder)
        checkpointing.restore_rng(folder)
        return folder

    def distribute(self) -> None:
        """Place the model on the device and wrap it for DDP / shard it with FSDP2 (more than one worker).
        Runs before the optimizer and EMA exist: they are built over the placed parameters."""
        self.model.to(self.device)
        reduce_dtype = self.cfg.scaling.grad_reduce_dtype
        if self.fsdp:
            if self.rank == 0:  # validation and samples run unsharded on rank 0 (weights gathered into it)
                self.plain = copy.deepcopy(self.model).eval()
            parallel.apply_fsdp(self.model, reduce_dtype)
            self.no_sync = functools.partial(parallel.fsdp_no_sync, self.model)
            if self.cfg.checkpoint.async_save:
                self.checkpoint_group = torch.distributed.new_group(
                    backend="gloo", timeout=datetime.timedelta(seconds=self.cfg.scaling.collective_timeout_s))
        elif self.world > 1:
            import ray.train.torch

            # gradient_as_bucket_view: the .grad tensors are views into DDP's all-reduce buckets (no second
            # copy of every gradient: ~5.7 GB less per GPU for sd15 in fp32, and no bucket -> grad copy)
            self.model = ray.train.torch.prepare_model(
                self.model, parallel_strategy="ddp", parallel_strategy_kwargs={"gradient_as_bucket_view": True})
            parallel.apply_ddp_grad_reduce(self.model, reduce_dtype)
            self.no_sync = self.model.no_sync
        self.model.train()

    # ------------------------------------------------------------------ data streams

    def open_data_streams(self) -> None:
        """The ``train`` stream (clips, or images when ``image_ratio = 1``) and, for joint batches, the
        cycling ``images`` stream continued from its saved position (:func:`training.data.open_stream`:
        this worker's read plan from the block counts the driver made)."""
        from training.order import Blocks

        blocks = {name: Blocks.from_dict(b) for name, b in self.loop_config["blocks"].items()}
        pin_memory = self.device.type == "cuda"
        self.primary = train_data.open_stream(self.cfg, "train", blocks["train"], rank=self.rank, world=self.world,
                                              pin_memory=pin_memory)
        self.images = None
        if "images" in blocks:
            self.images = train_data.open_stream(self.cfg, "images", blocks["images"], rank=self.rank,
                                                 world=self.world, position=self.state.extra.get("images"),
                                                 pin_memory=pin_memory)

    def next_micro_batches(self) -> list[MicroBatch] | None:
        """The micro-batches of the next optimizer step, or None when this epoch of the clips is used up
        (the time spent waiting for them counts as data wait)."""
        waiting_since = time.perf_counter()
        micro_batches: list[MicroBatch] | None = []
        for _ in range(self.cfg.accumulation):
            clips = self.primary.next()
            if clips is None:
                micro_batches = None
                break
            if self.images is not None:
                micro_batches.append(to_device(JointBatch(clips, self.images.next_cycling()), self.device))
            else:
                micro_batches.append(to_device(clips, self.device))  # CUDA: pinned (reader thread), non-blocking
        self.window.data_wait_s += time.perf_counter() - waiting_since
        return micro_batches

    # ------------------------------------------------------------------ tracking, validation, samples

    def start_tracking(self) -> None:
        """Rank 0: the MLflow run (continued after a restart), where every rank runs, the held-out batches."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        nodes = [node] * self.world
        if self.world > 1:  # collective: placement over the cluster's nodes is visible in MLflow
            torch.distributed.all_gather_object(nodes, node)
        if self.rank != 0:
            return
        from training.tracking import Tracker

        self.tracker = Tracker(self.cfg, self.state.mlflow_run_id)
        self.state.mlflow_run_id = self.tracker.run_id
        self.tracker.set_tag("ray.worker_nodes", json.dumps(nodes))
        self.tracker.set_tag("ray.num_nodes", len(set(nodes)))
        heldout = train_data.heldout_batch(self.cfg)
        self.heldout = heldout.to(self.device) if heldout is not None else None
        if self.cfg.image_micro_batch:
            images = train_data.heldout_batch(self.cfg, train_data.IMAGE)
            self.heldout_images = images.to(self.device) if images is not None else None

    def full_model(self) -> FactorizedDreamerUNet | None:
        """The full model on rank 0 (None on the other ranks). FSDP: every rank takes part in gathering the
        full state dict (collective, once per step) into rank 0's unsharded copy."""
        if not self.fsdp:
            return parallel.unwrap(self.model) if self.rank == 0 else None
        if self.gathered_step != self.state.step:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.rank == 0:  # cpu_offload: only rank 0 receives the tensors
                self.plain.load_state_dict(full)
            self.gathered_step = self.state.step
        return self.plain

    def evaluate(self, step: int, validate: bool, samples: bool) -> dict[str, float]:
        """Validation loss and/or sample videos on rank 0 (called by every rank: FSDP gathers collectively)."""
        if not (validate or samples):
            return {}
        metrics: dict[str, float] = {}
        timesteps = self.cfg.objective.validation_timesteps
        model = self.full_model()
        if self.rank != 0:
            return {}
        if validate:
            for batch in (self.heldout, self.heldout_images):
                if batch is not None:
                    # micro-batched (the run's micro-batch) under the training autocast: the held-out clips
                    # (max_heldout, 32) in one fp32 forward would need ~30x a training step's activations
                    losses = validation_loss(model, self.schedule, batch, timesteps, self.cfg.seed,
                                             micro_batch=self.cfg.micro_batch, autocast=self.autocast)
                    self.tracker.log_metrics(losses, step=step)
                    metrics.update(losses)
        if samples:
            from training.samples import log_samples

            log_samples(self.tracker, model, self.cfg, self.encoders, self.heldout, step)
        return metrics

    # ------------------------------------------------------------------ train, save, report

    def train_step(self, micro_batches: list[MicroBatch]) -> StepResult:
        cfg, objective = self.cfg, self.cfg.objective
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.state.step, cfg.optim.lr, cfg.optim.warmup_steps)
        return optimizer_step(
            self.model, self.optimizer, self.schedule, micro_batches, null=self.null,
            drop_probs=(objective.drop_text, objective.drop_image, objective.drop_both), gamma=objective.gamma,
            grad_clip=cfg.optim.grad_clip, seed=cfg.seed, rank=self.rank, step=self.state.step,
            no_sync=self.no_sync, autocast=self.autocast,
            image_weight=objective.image_loss_weight, timestep_sampling=objective.timestep_sampling)

    def log_step(self, result: StepResult) -> None:
        images = {"l_df_video": result.l_df_video, "l_df_image": result.l_df_image} if self.cfg.image_micro_batch else {}
        self.tracker.log_metrics({
            "loss": result.loss, "l_df": result.l_df, "l_flow": result.l_flow, "grad_norm": result.grad_norm,
            **images, "lr": self.optimizer.param_groups[0]["lr"], **self.window.metrics(), "epoch": self.state.epoch,
            **self.primary.stats(), **(self.images.stats() if self.images is not None else {}),
        }, step=self.state.step)

    def run(self) -> None:
        """Train from the restored position to ``cfg.steps`` epoch by epoch, then :meth:`finish`."""
        state = self.state
        if state.step == 0:
            self.evaluate(0, validate=True, samples=False)
        self.window = ThroughputWindow()
        while state.step < self.cfg.steps:
            self.primary.start(state.epoch, state.consumed)
            while state.step < self.cfg.steps and (micro_batches := self.next_micro_batches()) is not None:
                self.step(micro_batches)
            if state.step < self.cfg.steps:  # this epoch of the clips is used up (a partial step is dropped)
                self.next_epoch()
        self.finish()

    def optimize(self, micro_batches: list[MicroBatch]) -> StepResult:
        """The optimizer step itself and what a checkpoint records of it: weights, AdamW state, EMA, step
        and micro-batches consumed (no Ray; the resume tests and ``tests/gpu_check.py`` call it)."""
        result = self.train_step(micro_batches)
        self.state.step += 1
        self.state.consumed += len(micro_batches)
        if self.ema is not None:
            self.ema.update(self.model, self.state.step)
        return result

    def step(self, micro_batches: list[MicroBatch]) -> None:
        """One optimizer step, then its logging, periodic validation / samples and checkpoint."""
        cfg, state, tracking = self.cfg, self.state, self.cfg.tracking
        index = state.step
        result = self.optimize(micro_batches)
        self.flush_checkpoint()  # the asynchronous save of the previous step's checkpoint had this step's time
        self.data_order_log.write(index, state.epoch, [i for mb in micro_batches for i in mb.clip_ids])
        if self.images is not None:
            state.extra["images"] = self.images.position()
        self.window.samples += sum(_num_samples(mb) for mb in micro_batches) * self.world
        if self.rank == 0 and (state.step % tracking.log_every == 0 or state.step == cfg.steps):
            self.log_step(result)
            self.window = ThroughputWindow()
        if state.step < cfg.steps:  # the last step is validated, sampled and saved by finish()
            self.evaluate(state.step, validate=tracking.validate_every > 0 and state.step % tracking.validate_every == 0,
                          samples=tracking.sample_every > 0 and state.step % tracking.sample_every == 0)
            if state.step % cfg.checkpoint.every == 0:
                self.save_and_report({"step": state.step, "loss": result.loss})

    def next_epoch(self) -> None:
        if self.state.consumed == 0:
            raise DataError(f"worker {self.rank} got no batch in epoch {self.state.epoch}: the data shard has fewer "
                             f"rows than {self.primary.batch_size} per micro-batch x accumulation "
                             f"{self.cfg.accumulation}")
        self.state.epoch += 1
        self.state.consumed = 0

    def finish(self) -> None:
        """Final validation and samples, the final checkpoint (also logged to MLflow), the run closed."""
        for stream in (self.primary, self.images):
            if stream is not None:
                stream.close()
        metrics: dict[str, Any] = {"step": self.state.step}
        metrics.update(self.evaluate(self.state.step, validate=True, samples=self.cfg.tracking.sample_every >= 0))
        self.save_and_report(metrics, final=True)
        if self.rank == 0:
            self.tracker.finish()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: one :class:`TrainWorker` per worker process."""
    TrainWorker(config).run()
