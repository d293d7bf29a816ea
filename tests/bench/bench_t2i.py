"""Does a checkpoint's text-to-image step draw the prompt's colour? One JSON line (a learning diagnostic).

    python tests/bench/bench_t2i.py --checkpoint CKPT_OR_RUN [--data data/sample] [--num 32] [--steps 20]
        [--guidance 7.5] [--prompt caption|motion_caption] [--t2i-path SD_FOLDER] [--save DIR]

For the first ``--num`` held-out clips of a ``fdreamer sample-data`` folder, the T2I step of
:class:`fdreamer.inference.pipeline.VideoPipeline` (the checkpoint's own spatial UNet, or ``--t2i-path``, a
Stable-Diffusion-layout folder such as the tiny models with a trained T2I) draws one image per caption at
the checkpoint's size; :func:`fdreamer.eval.metrics.subject_colour` names the colour of its subject.
``colour_accuracy`` = the fraction named as the prompt says (chance 1/6; the real first frames: ~0.99).
``--save DIR`` writes the images as PNGs (``<clip_id>_<colour>.png``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or training run folder (its latest)")
    p.add_argument("--data", default=str(REPO / "data" / "sample"), help="fdreamer sample-data folder")
    p.add_argument("--num", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--prompt", choices=("caption", "motion_caption"), default="caption")
    p.add_argument("--t2i-path", default=None)
    p.add_argument("--save", default=None)
    args = p.parse_args(argv)

    import cv2
    import numpy as np

    from fdreamer.checkpoint import read_meta, resolve_checkpoint
    from fdreamer.eval.evaluate import read_manifest
    from fdreamer.eval.metrics import subject_colour
    from fdreamer.inference.pipeline import VideoPipeline

    ckpt, _ = resolve_checkpoint(args.checkpoint)
    size = int(read_meta(ckpt).get("size") or 64)
    rows = sorted((r for r in read_manifest(args.data) if r.get("split") == "heldout"), key=lambda r: r["clip_id"])
    rows = rows[: args.num]
    if not rows:
        raise SystemExit(f"{args.data}: no held-out clips")
    pipe = VideoPipeline.from_checkpoint(ckpt, t2i_path=args.t2i_path)
    t0 = time.perf_counter()
    named, per_colour = [], {}
    for i, r in enumerate(rows):
        image = pipe.text_to_image(r[args.prompt], height=size, width=size, num_inference_steps=args.steps,
                                   guidance_scale=args.guidance, seed=i)
        colour = subject_colour(image)
        named.append(colour)
        hit = per_colour.setdefault(r["subject_color"], [0, 0])
        hit[0] += colour == r["subject_color"]
        hit[1] += 1
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(Path(args.save) / f"{r['clip_id']}_{colour}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    correct = [n == r["subject_color"] for n, r in zip(named, rows, strict=True)]
    print(json.dumps({"bench": "t2i_colour", "checkpoint": str(ckpt), "t2i_path": args.t2i_path, "num": len(rows),
                      "prompt": args.prompt, "steps": args.steps, "guidance": args.guidance,
                      "colour_accuracy": round(float(np.mean(correct)), 4), "chance": round(1 / 6, 4),
                      "unnamed": sum(n is None for n in named),
                      "per_colour": {k: f"{a}/{b}" for k, (a, b) in sorted(per_colour.items())},
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
