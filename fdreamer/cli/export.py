"""``fdreamer export-image-model``: a checkpoint's spatial UNet as an SD-layout image model (unet/ + scheduler/)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from fdreamer.checkpoint import CheckpointError, export_image_model, resolve_checkpoint

    try:
        ckpt, _ = resolve_checkpoint(args.checkpoint)
        out = export_image_model(ckpt, args.out, use_ema=not args.no_ema)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"fdreamer export-image-model: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": str(ckpt), "unet": str(out / "unet"), "scheduler": str(out / "scheduler")}))
    return 0


def register_cli(sub: Any) -> None:
    """Add ``export-image-model --checkpoint CKPT --out DIR [--no-ema]``."""
    p = sub.add_parser("export-image-model", help="write a checkpoint's spatial UNet as SD-layout unet/ + scheduler/",
                       description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or training run folder (its latest)")
    p.add_argument("--out", required=True, help="folder to write unet/ and scheduler/ into (e.g. a tiny models folder)")
    p.add_argument("--no-ema", action="store_true", help="the live weights instead of the EMA")
    p.set_defaults(func=_run)
