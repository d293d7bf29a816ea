"""``fdreamer generate``: one text-to-video or image-to-video generation from a checkpoint folder.

    fdreamer generate --checkpoint runs/x/checkpoint --prompt "a red circle moves left" [--image f0.png]
                      [--steps 25] [--seed 1] [--progress] --out out.mp4

Prints one JSON line (path, seed, frames, size, fps, timings) on stdout; progress goes to stderr with
``--progress``. The output format follows the extension of ``--out`` (.mp4, .gif, .webp). Options are
the fields of :class:`GenerateConfig` (``fdreamer generate --help``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Literal

from fdreamer.config import opt
from fdreamer.inference.request import DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE, DEFAULT_STEPS


@dataclass
class GenerateConfig:
    checkpoint: str = opt(help="checkpoint folder, run folder (its latest checkpoint), either local or s3://, or "
                               "runs:/<mlflow run id>")
    prompt: str = opt(help="text prompt (the motion caption for image-to-video)")
    out: str = opt(help="output video: .mp4 (H.264), .gif or .webp")
    image: str | None = opt(None, "conditioning first frame (image-to-video); none = text-to-video")
    s3_endpoint: str | None = opt(None, "S3 endpoint URL of an s3:// checkpoint (MinIO/moto); null = AWS")
    negative_prompt: str = opt("", "negative prompt (the null text of guidance)")
    num_frames: int | None = opt(None, "frames (default: the checkpoint's)")
    height: int | None = opt(None, "height in pixels (default: the checkpoint's)")
    width: int | None = opt(None, "width in pixels (default: the checkpoint's)")
    fps: float | None = opt(None, "frames per second of the output (default: the checkpoint's)")
    steps: int = opt(DEFAULT_STEPS, "denoising steps per phase")
    guidance_scale: float = opt(DEFAULT_GUIDANCE_SCALE, "text guidance scale")
    image_guidance_scale: float = opt(DEFAULT_IMAGE_GUIDANCE_SCALE, "image guidance scale")
    guidance_rescale: float = opt(0.0, "guidance rescale in [0, 1]")
    seed: int | None = opt(None, "random seed (default: random, printed)")
    sampler: Literal["ddim", "euler"] = opt("ddim", "diffusers sampler")
    t2i_path: str | None = opt(None, "local diffusers Stable Diffusion folder for the T2I step")
    device: str = opt("cpu", "torch device, e.g. cpu, cuda")
    dtype: Literal["float32", "float16", "bfloat16"] | None = opt(None, "model/encoder dtype (default: as saved)")
    use_ema: bool = opt(True, "use the EMA weights when the checkpoint has them")
    progress: bool = opt(False, "print each denoising step to stderr")


def _read_image(path: str) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def generate(cfg: GenerateConfig) -> int:
    from fdreamer.checkpoint import resolve_checkpoint
    from fdreamer.encoders import DTYPES
    from fdreamer.inference.pipeline import GenerationCancelled, VideoPipeline, VideoRequest, save_video
    from fdreamer.inference.request import video_format

    try:
        video_format(cfg.out)  # fail before loading anything
        image = _read_image(cfg.image) if cfg.image else None
        request = VideoRequest(
            prompt=cfg.prompt, image=image, negative_prompt=cfg.negative_prompt, num_frames=cfg.num_frames,
            height=cfg.height, width=cfg.width, fps=cfg.fps, num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale, image_guidance_scale=cfg.image_guidance_scale,
            guidance_rescale=cfg.guidance_rescale, sampler=cfg.sampler, seed=cfg.seed,
        )
        checkpoint, _ = resolve_checkpoint(cfg.checkpoint, s3_endpoint=cfg.s3_endpoint)
        pipe = VideoPipeline.from_checkpoint(checkpoint, device=cfg.device, dtype=DTYPES[cfg.dtype] if cfg.dtype else None,
                                             t2i_path=cfg.t2i_path, use_ema=cfg.use_ema)

        def progress(step: int, total: int, phase: str) -> None:
            print(f"{phase} {step}/{total}", file=sys.stderr, flush=True)

        result = pipe(request, callback=progress if cfg.progress else None)
        path = save_video(result, cfg.out)
    except (ValueError, FileNotFoundError, OSError, GenerationCancelled) as err:
        print(f"fdreamer generate: error: {err}", file=sys.stderr)
        return 2
    h, w = result.size
    print(json.dumps({"path": str(path), "seed": result.seed, "num_frames": result.num_frames, "height": h,
                      "width": w, "fps": result.fps, "timings": {k: round(v, 4) for k, v in result.timings.items()}}))
    return 0


def register_cli(sub: Any) -> None:
    from fdreamer.cli.config_command import add_config_command

    add_config_command(sub, "generate", GenerateConfig, generate,
                       help="text-to-video or image-to-video from a checkpoint; prints a JSON line")


__all__ = ["GenerateConfig", "generate", "register_cli"]
