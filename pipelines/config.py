"""Typed configuration of the preprocessing job (``PreprocessConfig``), loaded with fdreamer.config."""

# ruff: noqa: RUF009  (opt()/nested() build dataclass fields, as everywhere in fdreamer.config users)

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from fdreamer.config import nested, opt
from fdreamer.data.dedup import PHASH_FRAMES
from fdreamer.data.fetch import FetchConfig
from fdreamer.data.shots import ShotConfig
from fdreamer.data.schema import T5_CAPTION_FIELDS
from fdreamer.data.splits import DEFAULT_FRACTION
from fdreamer.encoders import EncoderConfig


@dataclass
class ProfileConfig:
    """How clips are sampled from each video."""

    num_frames: int = opt(8, "frames per clip (T)")
    fps: float | None = opt(None, "target fps of the sampled frames (give fps or stride, not both)")
    stride: int | None = opt(2, "take every stride-th source frame (used when fps is null)")
    size: int = opt(64, "square output side in pixels (resize shorter side + centre crop)")
    clips_per_video: int = opt(1, "at most this many non-overlapping clips per video")
    min_side: int = opt(48, "sources whose shorter side is below this are quarantined as too_small")
    shot_threshold: float | None = opt(27.0, "PySceneDetect content-detector threshold for shot cuts, detected at "
                                             "hash size in pass 1; clips are placed inside shots, never across a "
                                             "cut (null: no detection, clips at fixed positions)")
    min_shot_frames: int = opt(15, "shortest shot the detector reports, in source frames (PySceneDetect's "
                                   "min_scene_len): a flash does not become two cuts")
    decode_timeout_s: float = opt(60.0, "per-video decode time limit in both passes, else quarantined as "
                                        "decode_timeout (0 disables)")

    def __post_init__(self) -> None:
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be >= 2 (flow needs pairs), got {self.num_frames}")
        if self.fps is not None and self.stride is not None:
            raise ValueError("give profile.fps or profile.stride, not both (set the other to null)")
        if self.fps is None and self.stride is None:
            raise ValueError("give profile.fps or profile.stride")
        if self.size < 8 or self.clips_per_video < 1:
            raise ValueError(f"size must be >= 8 and clips_per_video >= 1, got {self.size}, {self.clips_per_video}")
        if self.shot_threshold is not None:
            ShotConfig(threshold=self.shot_threshold, min_shot_frames=self.min_shot_frames)  # its checks
        if self.decode_timeout_s < 0:
            raise ValueError(f"decode_timeout_s must be >= 0 (0 disables), got {self.decode_timeout_s}")

    @property
    def tag(self) -> str:
        """Sampling tag that enters clip ids (``fps8.0`` or ``s2``) plus the size."""
        rate = f"fps{self.fps}" if self.fps is not None else f"s{self.stride}"
        return f"{rate}-{self.size}"

    def stage_dict(self) -> dict:
        """Every field plus ``tag``: the ``profile`` argument of the functions in :mod:`pipelines.stages`."""
        return asdict(self) | {"tag": self.tag}


@dataclass
class StageConfig:
    """Resources of one Ray Data stage."""

    concurrency: int | tuple[int, int] | None = opt(
        1, "tasks at once (function stages; null: as many as the cluster's CPUs allow, growing with the "
           "autoscaled CPU group), or actors (encoder stage: n, or [min, max] for a pool that grows with the GPUs "
           "the autoscaler adds and is not started before pass 2)")
    num_cpus: float = opt(1.0, "CPUs per task/actor")
    num_gpus: float = opt(0.0, "GPUs per task/actor")
    batch_size: int = opt(4, "rows per batch")


@dataclass
class HashStageConfig(StageConfig):
    """Resources of pass 1 (decode + exact and perceptual hashes, CPU tasks)."""

    batch_size: int = opt(32, "videos per pass-1 task: a Ray Data task has ~0.4 s of fixed cost on a small machine, "
                              "more than 8 videos' hashing at the tiny profile")


@dataclass
class WriteStageConfig:
    """Resources of the shard writers (rows per shard follow from ``shard_target_bytes``)."""

    concurrency: int = opt(1, "shard-writing tasks at once (one writes ~57 sd15 clips/s: use >= 16 for 40 GPUs)")
    num_cpus: float = opt(0.25, "CPUs per writing task")


@dataclass
class StagesConfig:
    hash: HashStageConfig = nested(HashStageConfig, "pass 1: decode + sample + resize + hashes (CPU)")
    decode: StageConfig = nested(StageConfig, "pass 2: decode + sample + resize + optical flow (CPU)")
    encode: StageConfig = nested(StageConfig, "frozen encoder actor pool (VAE, SD CLIP text, T5, CLIP); CPU actors "
                                              "with concurrency null: one actor per CPU the cluster has when pass 2 "
                                              "starts")
    write: WriteStageConfig = nested(WriteStageConfig, "Parquet shard writers")

    def __post_init__(self) -> None:
        if self.encode.concurrency is None and self.encode.num_gpus:
            raise ValueError("stages.encode.concurrency: null sizes the pool from the cluster's CPUs, which GPU actors "
                             "do not use; give a number of actors or [min, max] (an autoscaling cluster may have no "
                             "GPU yet when the job starts)")
        if isinstance(self.decode.concurrency, tuple):
            raise ValueError("stages.decode.concurrency is a number of tasks or null (the cluster's CPUs), "
                             f"not a range: {list(self.decode.concurrency)}")


@dataclass
class PreprocessConfig:
    """The Ray Data preprocessing job: manifests -> Parquet shards of latents, embeddings and flow."""

    inputs: list[str] = opt([], "manifest URIs (WebVid CSV, Pexels CSV, generic .jsonl/.parquet; path or s3://)")
    output: str = opt("", "output folder: a local path or s3://bucket/prefix; shards go to <output>/shards")
    s3_endpoint: str | None = opt(None, "S3 endpoint URL (e.g. a MinIO/moto server); null = AWS default")
    models_dir: str | None = opt(None, "folder with vae/, text_encoder/, tokenizer/, t5/, clip/ (fills unset encoder paths)")
    encoders: EncoderConfig = nested(EncoderConfig, "frozen encoders")
    t5_caption: Literal["caption", "motion_caption"] = opt(
        "caption", "manifest text the t5 column encodes: caption, or motion_caption (rows without one fall "
                   "back to caption, counted in summary.json); CLIP always encodes caption")
    profile: ProfileConfig = nested(ProfileConfig, "clip sampling")
    fetch: FetchConfig = nested(FetchConfig, "http(s) inputs (WebVid contentUrl, Pexels links, remote tar shards): "
                                             "timeouts, retries, size cap, per-host limit (fdreamer/data/fetch.py)")
    fetch_ahead: int = opt(4, "videos each decode task fetches ahead of its decoder (threads), so transfers of "
                              "remote inputs overlap decoding (0: fetch each video when its decode starts)")
    stages: StagesConfig = nested(StagesConfig, "per-stage resources")
    heldout_fraction: float = opt(DEFAULT_FRACTION, "records whose manifest gives no split (WebVid, Pexels, video2dataset) get "
                                        "split 'heldout' for about this fraction of the videos, by a hash of the "
                                        "video id (fdreamer/data/splits.py), else 'train'")
    dedup_threshold: float = opt(10.0, "near-duplicate threshold: mean Hamming bits per 64-bit frame pHash")
    dedup_bands: int = opt(16, f"LSH bands of the {8 * PHASH_FRAMES}-byte perceptual hash (must divide it)")
    shard_target_bytes: int = opt(256 * 2**20, "target (uncompressed) bytes of one Parquet shard")
    plan_partition_rows: int = opt(100_000, "manifest records per partition of the global plan's shuffles through "
                                   "<output>/_plan (cache lookup, ids, exact and near duplicates), and per map task")
    ray_address: str | None = opt(None, "Ray address; null = 'auto' when a cluster runs, else a local one")
    mlflow_tracking_uri: str | None = opt(None, "log the summary to MLflow when set (optional)")
    mlflow_experiment: str = opt("preprocess", "MLflow experiment name for the summary run")

    def __post_init__(self) -> None:
        if self.t5_caption not in T5_CAPTION_FIELDS:
            raise ValueError(f"t5_caption must be one of {list(T5_CAPTION_FIELDS)}, got {self.t5_caption!r}")
        if self.fetch_ahead < 0:
            raise ValueError(f"fetch_ahead must be >= 0, got {self.fetch_ahead}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.dedup_threshold < 0 or self.shard_target_bytes < 1 or self.plan_partition_rows < 1:
            raise ValueError("dedup_threshold must be >= 0, shard_target_bytes and plan_partition_rows >= 1")
        hash_bytes = 8 * PHASH_FRAMES
        if self.dedup_bands < 1 or hash_bytes % self.dedup_bands:
            allowed = [b for b in range(1, hash_bytes + 1) if hash_bytes % b == 0]
            raise ValueError(f"dedup_bands must divide the {hash_bytes}-byte perceptual hash into equal bands: "
                             f"one of {allowed}, got {self.dedup_bands}")

    def fetch_dict(self) -> dict:
        """The ``fetch`` argument of the decode stages (:func:`pipelines.stages.fetch_settings`)."""
        return asdict(self.fetch) | {"ahead": self.fetch_ahead}

    def resolved_encoders(self) -> EncoderConfig:
        """``encoders`` with unset paths filled from ``models_dir``."""
        if self.models_dir is None:
            return self.encoders
        root = Path(self.models_dir)
        fill = {n: str(root / n) for n in ("vae", "text_encoder", "tokenizer", "t5", "clip")
                if getattr(self.encoders, n) is None}
        return replace(self.encoders, **fill)

    def check_ready(self) -> None:
        """Fail early on what the defaults cannot supply."""
        if not self.inputs:
            raise ValueError("no inputs: set --inputs='[manifest.csv, ...]'")
        if not self.output:
            raise ValueError("no output folder: set --output=DIR")
        enc = self.resolved_encoders()
        for name in ("vae", "text_encoder", "tokenizer", "t5", "clip"):
            if getattr(enc, name) is None:
                raise ValueError(f"encoder path '{name}' is unset: give models_dir or encoders.{name}")


__all__ = ["PreprocessConfig", "ProfileConfig", "StageConfig", "StagesConfig", "WriteStageConfig"]
