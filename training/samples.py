"""Sample videos during training (rank 0): fixed held-out first frames + captions -> mp4 in MLflow.

The same :class:`fdreamer.inference.pipeline.VideoPipeline` as the server (image-to-video with the training
schedule), fixed seeds, so videos logged at different steps (or by different runs) are comparable.
The conditioning image is the held-out clip's first frame as the VAE sees it (its stored latent,
decoded): no video is read in the training loop.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from fdreamer.data.batching import decode_tensor_column
from training import data as train_data
from training.config import TrainConfig

_ENCODERS: dict[str, Any] = {}
logger = logging.getLogger(__name__)


def _encoders(cfg: Any) -> Any:
    """Frozen encoders, loaded once per worker process."""
    from fdreamer.encoders import FrozenEncoders

    key = repr(cfg)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = FrozenEncoders.load(cfg)
    return _ENCODERS[key]


def sample_prompts(cfg: TrainConfig, n: int) -> list[dict[str, Any]]:
    """The first ``n`` held-out clips (sorted by id): caption, motion caption and first-frame latent."""
    if cfg.data.heldout_split is None or n <= 0:
        return []
    cols = ["clip_id", "caption", "first_latent", "first_latent_shape", "first_latent_dtype"]
    table = train_data.heldout_table(cfg, cols, limit=n)
    d = table.to_pydict()
    lat = decode_tensor_column(d, "first_latent")
    return [{"clip_id": d["clip_id"][i], "caption": d["caption"][i], "first_latent": lat[i]} for i in range(len(lat))]


def log_samples(tracker: Any, model: torch.nn.Module, cfg: TrainConfig, encoders_cfg: Any, heldout: Any, step: int) -> list[Path]:
    """:func:`render_samples`, but a failure only warns (and tags the run): a sample video must never stop training."""
    try:
        return render_samples(tracker, model, cfg, encoders_cfg, heldout, step)
    except Exception as exc:  # noqa: BLE001
        logger.warning("sample videos at step %d failed: %s: %s", step, type(exc).__name__, exc)
        tracker.set_tag("fdreamer.sample_error", f"step {step}: {type(exc).__name__}: {exc}"[:500])
        return []


@torch.no_grad()
def render_samples(tracker: Any, model: torch.nn.Module, cfg: TrainConfig, encoders_cfg: Any, heldout: Any, step: int) -> list[Path]:
    """Render ``tracking.num_samples`` image-to-video samples and log them under ``samples/``."""
    from fdreamer.inference.pipeline import VideoPipeline, VideoRequest, save_video

    prompts = sample_prompts(cfg, cfg.tracking.num_samples)
    if not prompts or encoders_cfg.vae is None:
        return []
    enc = _encoders(encoders_cfg)
    was_training = model.training
    model.eval()
    pipe = VideoPipeline(model, cfg.schedule, enc, defaults={"num_frames": cfg.schedule.num_frames,
                                                             "size": cfg.schedule.height})
    out: list[Path] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i, p in enumerate(prompts):
                latent = torch.from_numpy(p["first_latent"].astype("float32"))[None, :, None]  # [1, C, 1, h, w]
                image = enc.decode_latents(latent.to(enc.cfg.device))[0, 0].numpy()  # [H, W, 3] uint8
                if not cfg.model.factorized:  # Table 4 (b): no image conditioning, direct text-to-video
                    image = None
                result = pipe(VideoRequest(prompt=p["caption"], image=image, num_inference_steps=cfg.tracking.sample_steps,
                                           seed=cfg.seed + i))
                path = save_video(result, Path(tmp) / f"step{step:08d}_{i}_{p['clip_id'][:40]}.mp4")
                tracker.log_artifact(path, "samples")
                out.append(path)
    finally:
        model.train(was_training)
    return out
