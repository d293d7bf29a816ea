"""``fdreamer export-image-model`` / ``export-video-model``: hand a trained stage on.

- ``export-image-model``: a checkpoint's spatial UNet as an SD-layout image model (unet/ + scheduler/);
- ``export-video-model``: a checkpoint as an inference checkpoint (EMA folded into model.safetensors, no
  trainer state), optionally with the encoders' folders it will be used with (``--models_dir``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _run_image(args: argparse.Namespace) -> int:
    from fdreamer.checkpoint import CheckpointError, export_image_model, resolve_checkpoint

    try:
        ckpt, _ = resolve_checkpoint(args.checkpoint)
        out = export_image_model(ckpt, args.out, use_ema=not args.no_ema)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"fdreamer export-image-model: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": str(ckpt), "unet": str(out / "unet"), "scheduler": str(out / "scheduler")}))
    return 0


def _run_video(args: argparse.Namespace) -> int:
    from fdreamer.checkpoint import CheckpointError, export_video_model, resolve_checkpoint
    from fdreamer.encoders import EncoderConfig

    try:
        ckpt, _ = resolve_checkpoint(args.checkpoint)
        encoders = EncoderConfig.tiny(args.models_dir) if args.models_dir else None
        out = export_video_model(ckpt, args.out, encoders=encoders, use_ema=not args.no_ema)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"fdreamer export-video-model: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": str(ckpt), "out": str(out)}))
    return 0


def register_cli(sub: Any) -> None:
    """Add ``export-image-model --checkpoint CKPT --out DIR [--no-ema]`` and ``export-video-model``."""
    p = sub.add_parser("export-image-model", help="write a checkpoint's spatial UNet as SD-layout unet/ + scheduler/",
                       description="a checkpoint's spatial UNet as an SD-layout image model (unet/ + scheduler/)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or training run folder (its latest)")
    p.add_argument("--out", required=True, help="folder to write unet/ and scheduler/ into (e.g. a tiny models folder)")
    p.add_argument("--no-ema", action="store_true", help="the live weights instead of the EMA")
    p.set_defaults(func=_run_image)

    v = sub.add_parser("export-video-model", help="write a checkpoint as an inference checkpoint (EMA folded in)",
                       description="a checkpoint as an inference checkpoint: EMA folded into model.safetensors, "
                       "no trainer state")
    v.add_argument("--checkpoint", required=True, help="checkpoint folder or training run folder (its latest)")
    v.add_argument("--out", required=True, help="folder to write the checkpoint into")
    v.add_argument("--models_dir", default=None,
                   help="tiny models folder whose encoders the export records (default: the checkpoint's own)")
    v.add_argument("--no-ema", action="store_true", help="the live weights instead of the EMA")
    v.set_defaults(func=_run_video)
