"""``fdreamer generate``: one text-to-video or image-to-video generation from a checkpoint folder.

Prints one JSON line (path, seed, frames, size, fps, timings) on stdout; progress goes to stderr with
``--progress``. The output format follows the extension of ``--out`` (.mp4, .gif, .webp).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint folder (fdreamer_checkpoint.json)")
    p.add_argument("--prompt", required=True, help="text prompt (the motion caption for image-to-video)")
    p.add_argument("--image", metavar="PNG", help="conditioning first frame (image-to-video); none = text-to-video")
    p.add_argument("--negative-prompt", default="", help="negative prompt (the null text of guidance)")
    p.add_argument("--num-frames", type=int, help="frames (default: the checkpoint's)")
    p.add_argument("--height", type=int, help="height in pixels (default: the checkpoint's)")
    p.add_argument("--width", type=int, help="width in pixels (default: the checkpoint's)")
    p.add_argument("--fps", type=float, help="frames per second of the output (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per phase (default 25)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="text guidance scale (default 7.5)")
    p.add_argument("--image-guidance-scale", type=float, default=1.5, help="image guidance scale (default 1.5)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale in [0, 1] (default 0)")
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument("--sampler", choices=("ddim", "euler"), default="ddim", help="diffusers sampler (default ddim)")
    p.add_argument("--t2i-path", metavar="DIR", help="local diffusers Stable Diffusion folder for the T2I step")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda (default cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="model/encoder dtype (default: as saved)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights are saved")
    p.add_argument("--progress", action="store_true", help="print each denoising step to stderr")
    p.add_argument("--out", required=True, metavar="FILE", help="output video: .mp4 (H.264), .gif or .webp")


def _read_image(path: str) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _run(args: argparse.Namespace) -> int:
    from fdreamer.inference.pipeline import (
        GenerationCancelled,
        VideoPipeline,
        VideoRequest,
        save_video,
    )
    from fdreamer.inference.request import video_format

    try:
        video_format(args.out)  # fail before loading anything
        image = _read_image(args.image) if args.image else None
        request = VideoRequest(
            prompt=args.prompt, image=image, negative_prompt=args.negative_prompt, num_frames=args.num_frames,
            height=args.height, width=args.width, fps=args.fps, num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale,
            guidance_rescale=args.guidance_rescale, sampler=args.sampler, seed=args.seed,
        )
        dtype = None
        if args.dtype:
            from fdreamer.encoders import DTYPES

            dtype = DTYPES[args.dtype]
        pipe = VideoPipeline.from_checkpoint(args.checkpoint, device=args.device, dtype=dtype,
                                             t2i_path=args.t2i_path, use_ema=not args.no_ema)

        def progress(step: int, total: int, phase: str) -> None:
            print(f"{phase} {step}/{total}", file=sys.stderr, flush=True)

        result = pipe(request, callback=progress if args.progress else None)
        path = save_video(result, args.out)
    except (ValueError, FileNotFoundError, OSError, GenerationCancelled) as err:
        print(f"fdreamer generate: error: {err}", file=sys.stderr)
        return 2
    h, w = result.size
    print(json.dumps({"path": str(path), "seed": result.seed, "num_frames": result.num_frames, "height": h,
                      "width": w, "fps": result.fps, "timings": {k: round(v, 4) for k, v in result.timings.items()}}))
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser("generate", help="text-to-video or image-to-video from a checkpoint; prints a JSON line",
                       description=__doc__.splitlines()[0])
    _add_arguments(p)
    p.set_defaults(func=_run)


__all__ = ["register_cli"]
