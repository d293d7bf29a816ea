"""Typed configuration of the Ray Train job (``TrainConfig``), loaded with :mod:`fdreamer.config`.

Named runs are YAML files in ``training/configs/`` derived with ``extends:`` (``tiny_stage2.yaml``
extends ``tiny_stage1.yaml`` ...); any field can be overridden on the command line
(``--optim.lr=1e-4``). ``python training/run.py --help`` lists every field with its help text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fdreamer.config import ConfigError, nested, opt
from fdreamer.models import ModelConfig
from fdreamer.schedule import ScheduleConfig
from fdreamer.train.objective import TimestepSampling


@dataclass
class DataConfig:
    """Which preprocessed Parquet rows the job trains on (filters select rows; nothing is deleted)."""

    path: str = opt("", "output folder of pipelines/preprocess.py (holds shards/ and null_conditions.safetensors)")
    split: str | None = opt(None, "train on rows whose `split` column equals this (null: every row not in "
                                  "heldout_split, which is what WebVid/Pexels data holds: their held-out rows are "
                                  "assigned by the preprocessing job's heldout_fraction)")
    heldout_split: str | None = opt("heldout", "rows of this split form the validation set (null: none)")
    min_motion_score: float | None = opt(None, "drop clips whose motion_score is below this (static clips)")
    max_motion_score: float | None = opt(None, "drop clips whose motion_score is above this (shaky / cuts)")
    num_frames: int | None = opt(None, "keep clips with this many frames (null: the model's stage profile is not checked)")
    shuffle_buffer: int = opt(64, "rows per shuffle window of each worker (at least one micro-batch): each window's "
                                  "rows are permuted, seeded by seed, epoch, rank and window (training/order.py)")
    prefetch_batches: int = opt(2, "batches each worker's reader thread keeps ready")
    max_heldout: int = opt(32, "at most this many held-out clips for the validation loss")
    cache_blocks: int = opt(0, "row groups (after filters) each worker keeps in memory across epochs (small data "
                               "sets: all of them; 0: read every epoch)")
    log_order: bool = opt(False, "record every step's clip ids per rank in <log_order_dir>/rank<r>.jsonl")
    log_order_dir: str | None = opt(None, "folder of the data-order logs (default <run dir>/data_order); a local or "
                                          "shared folder, needed when storage_path is s3://")
    image_path: str | None = opt(
        None,
        "joint image-video training (VideoCrafter2): output folder of pipelines/preprocess.py on an IMAGE "
        "manifest; its 1-frame rows (num_frames = 1) of `split` are the images (null: no images)",
    )
    image_ratio: float = opt(
        0.0,
        "fraction of every micro-batch that are images: micro_batch x image_ratio images + the rest video "
        "clips (0: videos only, as before; 1: images only, e.g. VideoCrafter2 stage B); must give a whole number",
    )


@dataclass
class OptimConfig:
    """AdamW with a constant learning rate (paper §4.1: 5e-5)."""

    lr: float = opt(5e-5, "learning rate (constant after warmup)")
    warmup_steps: int = opt(0, "linear warmup steps")
    weight_decay: float = opt(1e-2, "AdamW weight decay")
    betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 disables)")
    ema_decay: float = opt(0.9999, "EMA decay of the trainable weights (0 disables)")
    ema_start: int = opt(0, "start updating the EMA after this many steps (it copies the weights until then)")


@dataclass
class ObjectiveConfig:
    """Eq. 7 (+ γ·L_flow) and classifier-free-guidance dropout."""

    gamma: float = opt(1.0, "weight γ of the flow loss (stage 3, PredictNet)")
    drop_text: float = opt(0.05, "probability of dropping only the text condition")
    drop_image: float = opt(0.05, "probability of dropping only the image condition")
    drop_both: float = opt(0.05, "probability of dropping text and image")
    timestep_sampling: TimestepSampling = opt(
        "uniform",
        "how training timesteps are drawn: uniform over 0..N-1 (paper), or logit_normal = floor(N sigmoid(u)), "
        "u ~ N(0, 1) (SD3; more steps at middle noise levels); fdreamer/train/objective.py sample_timesteps",
    )
    validation_timesteps: list[int] = opt([99, 299, 499, 699, 899], "fixed timestep indices of the validation loss")
    image_loss_weight: float = opt(
        1.0,
        "weight w of one image relative to one video clip in a joint micro-batch: "
        "L = (n_v L_video + w n_i L_image) / (n_v + w n_i) (fdreamer/train/step.py)",
    )


@dataclass
class ScalingSection:
    """Ray Train resources and parallelism."""

    num_workers: int = opt(2, "training workers (one process each)")
    use_gpu: bool = opt(False, "one GPU per worker; NCCL backend")
    cpus_per_worker: float = opt(1.0, "CPUs reserved per worker")
    placement_strategy: str = opt("SPREAD", "PACK or SPREAD workers over nodes")
    parallel: Literal["ddp", "fsdp"] = opt(
        "ddp", "DDP (default) or FSDP: FSDP2 fully_shard per resnet / transformer / temporal / PACA layer, sharded "
        "checkpoints (torch.distributed.checkpoint); CPU (gloo) or GPU (NCCL); no EMA")
    torch_threads: int | None = opt(None, "torch intra-op threads per worker (null: cpus_per_worker, at least 1: the "
                                          "CPUs Ray reserves for the worker)")
    collective_timeout_s: int = opt(
        1800, "timeout of the workers' process group (Ray Train TorchConfig.timeout_s; also the FSDP checkpoint "
        "group): a collective that waits longer fails the step and Ray Train restarts the group from the latest "
        "checkpoint. Rank 0 alone validates, renders samples and (DDP) writes checkpoints while the other ranks "
        "wait in the next collective, so keep it above the longest of those (sd15: minutes), and below the time "
        "a hung rank may cost the whole job")
    grad_reduce_dtype: Literal["fp32", "bf16", "fp16"] = opt(
        "fp32", "dtype the gradients are all-reduced in (DDP comm hook / FSDP reduce_dtype): bf16 or fp16 halve the "
        "bytes per step; with ddp bf16 needs NCCL (use_gpu) and fp16 also runs on gloo (CPU); with fsdp both run on "
        "gloo")

    def threads(self) -> int:
        """The intra-op thread count of a worker: ``torch_threads``, else the CPUs reserved for it (>= 1)."""
        return max(1, self.torch_threads if self.torch_threads is not None else int(self.cpus_per_worker))

    def __post_init__(self) -> None:
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 (or null), got {self.torch_threads}")
        if self.collective_timeout_s < 1:
            raise ValueError(f"collective_timeout_s must be >= 1, got {self.collective_timeout_s}")
        if self.grad_reduce_dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"grad_reduce_dtype must be fp32, bf16 or fp16, got {self.grad_reduce_dtype!r}")
        if self.grad_reduce_dtype == "bf16" and not self.use_gpu and self.parallel != "fsdp":
            raise ValueError("grad_reduce_dtype=bf16 needs GPU workers (use_gpu=true) with parallel=ddp: torch's bf16 "
                             "all-reduce hook requires NCCL; on CPU (gloo) use fp16 or fp32, or parallel=fsdp (FSDP2 "
                             "reduce-scatters bf16 on gloo)")


@dataclass
class CheckpointSection:
    every: int = opt(1000, "report a checkpoint every this many optimizer steps (and at the end)")
    keep: int = opt(3, "keep the last k checkpoints (Ray CheckpointConfig.num_to_keep)")
    max_failures: int = opt(2, "restart the worker group this many times (FailureConfig.max_failures)")
    async_save: bool = opt(
        True, "parallel=fsdp: write the sharded checkpoint in a background thread (dcp.async_save on its own gloo "
        "group) while training goes on; it is reported to Ray Train after the next step (or at the end). false: "
        "dcp.save, reported at once. DDP checkpoints are always written synchronously by rank 0")


@dataclass
class TrackingConfig:
    """MLflow (rank 0 only)."""

    tracking_uri: str | None = opt(None, "MLflow tracking URI (server URL or store); null = sqlite:///<storage>/mlflow.db")
    experiment: str = opt("factorized-dreamer", "experiment name (one per ablation study)")
    run_name: str | None = opt(None, "run name (default: <name>)")
    tags: dict[str, str] = opt({}, "extra run tags, e.g. {table4_row: e}")
    log_every: int = opt(10, "log step metrics every this many optimizer steps")
    validate_every: int = opt(500, "validation loss every this many steps (and at step 0 and the end)")
    sample_every: int = opt(0, "log a sample mp4 every this many steps (0: only at the end; -1: never)")
    sample_steps: int = opt(25, "denoising steps of the sample videos")
    num_samples: int = opt(2, "held-out clips (first frame + caption) rendered as sample videos")


@dataclass
class TrainConfig:
    """One training stage of Factorized-Dreamer on Ray Train."""

    name: str = opt("stage1", "run name: the checkpoint folder <storage_path>/<name> and the MLflow run name")
    stage: str = opt("stage1", "stage label (stage1 | stage2 | stage3), logged and stored in checkpoints")
    preset: Literal["tiny", "sd15"] = opt("tiny", "network size preset (spatial UNet architecture)")
    unet_overrides: dict[str, Any] = opt(
        {}, "UNet2DConditionModel kwargs replacing the preset's (random init only, pretrained_unet null), e.g. "
        "{block_out_channels: [32, 64, 64, 64]}: the sd15 block structure at a small width (tiny_fsdp.yaml)")
    pretrained_unet: str | None = opt(None, "local SD folder (or its unet/) for the spatial weights; null = random init")
    init_from: str | None = opt(None, "previous stage: a checkpoint folder, a run folder (latest checkpoint) or runs:/<mlflow run id>")
    models_dir: str | None = opt(None, "frozen encoders (vae/ ...) recorded in checkpoints for inference; default: from the data's summary")
    model: ModelConfig = nested(ModelConfig, "the video UNet (t5_dim / image_embed_dim must match the data)")
    schedule: ScheduleConfig = nested(ScheduleConfig, "noise schedule (§3.3)")
    data: DataConfig = nested(DataConfig, "training data")
    optim: OptimConfig = nested(OptimConfig, "optimizer")
    objective: ObjectiveConfig = nested(ObjectiveConfig, "loss and CFG dropout")
    scaling: ScalingSection = nested(ScalingSection, "workers")
    checkpoint: CheckpointSection = nested(CheckpointSection, "checkpoints")
    tracking: TrackingConfig = nested(TrackingConfig, "MLflow")
    steps: int = opt(400_000, "optimizer steps of this stage (paper: 400k / 300k / 100k)")
    global_batch: int = opt(40, "videos per optimizer step over all workers (paper: 40)")
    micro_batch: int = opt(1, "videos per worker per forward/backward; accumulation = global / (workers x micro)")
    seed: int = opt(0, "seed of initialisation, data order, noise and timesteps")
    mixed_precision: Literal["no", "bf16"] = opt("bf16", "bf16 autocast on CUDA (ignored on CPU)")
    storage_path: str = opt("runs/train", "Ray Train storage: checkpoints go to <storage_path>/<name>; a local or shared "
                            "filesystem path, or s3://bucket/prefix")
    s3_endpoint: str | None = opt(None, "S3 endpoint URL for s3:// data, storage_path and init_from (e.g. a MinIO/moto "
                                  "server); null = AWS default")
    resume: bool = opt(False, "continue from the latest checkpoint of <storage_path>/<name>")
    ray_address: str | None = opt(None, "Ray address; null = RAY_ADDRESS, a running local cluster, else a new local one")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.global_batch < 1 or self.micro_batch < 1:
            raise ValueError(f"global_batch and micro_batch must be >= 1, got {self.global_batch}, {self.micro_batch}")
        per_step = self.scaling.num_workers * self.micro_batch
        if self.global_batch % per_step:
            raise ValueError(
                f"global_batch {self.global_batch} is not divisible by num_workers x micro_batch = "
                f"{self.scaling.num_workers} x {self.micro_batch} = {per_step}; change one of them"
            )
        if self.scaling.parallel == "fsdp" and self.optim.ema_decay > 0:
            raise ValueError("optim.ema_decay must be 0 with scaling.parallel=fsdp: the EMA (fdreamer.train.step.EMA) "
                             "keeps a full fp32 copy of every trainable parameter on each worker, which sharding is "
                             "meant to avoid, and an EMA of the sharded parameters (and its sharded checkpoint) is "
                             "not implemented; keep an EMA with ddp")
        if self.unet_overrides and self.pretrained_unet:
            raise ValueError("unet_overrides change the preset's random-init UNet; with pretrained_unet the "
                             "architecture is the checkpoint's: set one of them")
        d = self.objective
        if min(d.drop_text, d.drop_image, d.drop_both) < 0 or d.drop_text + d.drop_image + d.drop_both > 1:
            raise ValueError("CFG dropout probabilities must be >= 0 and sum to <= 1")
        if self.model.predictnet and self.objective.gamma < 0:
            raise ValueError("objective.gamma must be >= 0")
        self._check_images()

    def _check_images(self) -> None:
        ratio, n = self.data.image_ratio, self.micro_batch * self.data.image_ratio
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"data.image_ratio must be in [0, 1], got {ratio}")
        if abs(n - round(n)) > 1e-9:
            raise ValueError(f"micro_batch x data.image_ratio = {self.micro_batch} x {ratio} = {n:g} images per "
                             "micro-batch is not a whole number; change micro_batch or data.image_ratio")
        if self.objective.image_loss_weight <= 0:
            raise ValueError(f"objective.image_loss_weight must be > 0, got {self.objective.image_loss_weight}")
        if ratio == 1.0:  # images reach only the spatial layers: everything else must be frozen
            unfrozen = [g for g in self.model.present_groups() if g != "spatial" and g not in self.model.freeze]
            if unfrozen:
                raise ValueError(
                    f"data.image_ratio=1 trains on images only, which reach the spatial layers only; freeze the "
                    f"other groups: add {unfrozen} to model.freeze "
                    f"(e.g. model.freeze={list(self.model.freeze) + unfrozen})")

    def unet_kwargs(self) -> dict[str, Any]:
        """The ``UNet2DConditionModel`` kwargs of ``preset`` with ``unet_overrides`` applied."""
        import inspect

        from diffusers import UNet2DConditionModel

        from fdreamer.models.config import preset_unet_config

        kwargs = preset_unet_config(self.preset)
        unknown = sorted(set(self.unet_overrides) - set(inspect.signature(UNet2DConditionModel).parameters))
        if unknown:
            raise ConfigError(f"unet_overrides: {unknown} are no UNet2DConditionModel arguments")
        return {**kwargs, **{k: tuple(v) if isinstance(v, list) else v for k, v in self.unet_overrides.items()}}

    @property
    def image_micro_batch(self) -> int:
        """Images per worker per micro-batch (``micro_batch x data.image_ratio``)."""
        return round(self.micro_batch * self.data.image_ratio)

    @property
    def video_micro_batch(self) -> int:
        """Video clips per worker per micro-batch (the rest of ``micro_batch``)."""
        return self.micro_batch - self.image_micro_batch

    @property
    def accumulation(self) -> int:
        """Micro-batches per worker per optimizer step."""
        return self.global_batch // (self.scaling.num_workers * self.micro_batch)

    def check_ready(self) -> None:
        """Fail before Ray starts on what defaults cannot supply (:class:`~fdreamer.config.ConfigError`)."""
        if not self.data.path:
            raise ConfigError("no training data: set --data.path=<output of pipelines/preprocess.py> (the video clips; "
                              "also read for the null conditions, validation and the inference defaults)")
        for key, value in (("storage_path", self.storage_path), ("init_from", self.init_from),
                           ("data.path", self.data.path), ("data.image_path", self.data.image_path)):
            allowed = ("runs:/", "s3://") if key == "init_from" else ("s3://",)
            if value and "://" in value and not value.startswith(allowed):
                raise ConfigError(f"{key}={value!r}: a local or shared filesystem path or s3://bucket/prefix"
                                  + (" (or runs:/<mlflow run id>)" if key == "init_from" else ""))
        for key, value in (("pretrained_unet", self.pretrained_unet), ("models_dir", self.models_dir)):
            if value and "://" in value:
                raise ConfigError(f"{key}={value!r}: the pretrained models are read from a local folder on every node")
        if self.data.log_order and self.storage_path.startswith("s3://") and not self.data.log_order_dir:
            raise ConfigError("data.log_order appends to a local file per worker: with an s3:// storage_path give "
                              "data.log_order_dir (a local or shared folder)")
        if self.data.image_ratio > 0 and not self.data.image_path:
            raise ConfigError(f"data.image_ratio={self.data.image_ratio} needs images: set --data.image_path=<output of "
                              "pipelines/preprocess.py on an image manifest>")


__all__ = ["CheckpointSection", "DataConfig", "ObjectiveConfig", "OptimConfig", "ScalingSection",
           "TrackingConfig", "TrainConfig"]
