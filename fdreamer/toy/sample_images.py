"""A high-quality image set for VideoCrafter2-style training, made from the sample clips' clean first frames.

VideoCrafter2 fine-tunes the spatial layers on high-quality images after training on low-quality
videos. The sample data's counterpart: the clips are H.264 (lossy, like WebVid), while here frame 0
of every clip spec is rendered again and written losslessly as PNG — the same scene without the
compression, at the clip's own size. ``images.jsonl`` is a generic manifest the preprocessing job
reads as images (``.png`` paths; ``kind: image`` is written too):

    {"path": ".../images/clip_00000.png", "caption": <the clip's caption>, "clip_id": "clip_00000",
     "source": "image", "kind": "image", "split": "train" | "heldout", "motion": ..., "width": ..., "height": ...}

``fdreamer sample-data DIR --images`` writes ``DIR/images/*.png`` and ``DIR/images.jsonl`` next to
the clips (same seed and sizes, so image i is the clean first frame of clip i).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2

from fdreamer.toy.sample_data import _atomic_write_text
from fdreamer.toy.scenes import FORMAT_VERSION, make_specs, render_clip


def write_sample_images(
    out_dir: str | os.PathLike, num_clips: int = 320, seed: int = 0, *, width: int = 128, height: int = 96,
    num_frames: int = 24, fps: float = 12, force: bool = False,
) -> dict[str, Any]:
    """Write ``images/<clip_id>.png`` and ``images.jsonl`` (then ``images/_DONE.json``); idempotent.

    The arguments are those of :func:`fdreamer.toy.sample_data.write_sample_data` (the start position of a
    moving subject depends on the clip length, so they must match for image i to be clip i's frame 0).
    """
    out = Path(out_dir).resolve()
    params = dict(num_clips=num_clips, seed=seed, width=width, height=height, num_frames=num_frames,
                  fps=float(fps), out_dir=str(out), format_version=FORMAT_VERSION)
    folder = out / "images"
    done_path = folder / "_DONE.json"
    if done_path.is_file() and not force:
        done = json.loads(done_path.read_text(encoding="utf-8"))
        if done.get("params") == params and (out / "images.jsonl").is_file():
            return {**done, "skipped": True}
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    done_path.unlink(missing_ok=True)
    rows = []
    for spec in make_specs(num_clips, seed, width, height, num_frames, fps):
        frame = render_clip(replace(spec, num_frames=1))[0]  # clean frame 0, uint8 [H, W, 3] RGB
        path = folder / f"{spec.clip_id}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
        rows.append({"path": str(path), "caption": spec.caption, "clip_id": spec.clip_id, "source": "image",
                     "kind": "image", "split": spec.split, "motion": spec.motion, "width": spec.width,
                     "height": spec.height})
    _atomic_write_text(out / "images.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    counts = {"images": len(rows), **{k: sum(r["split"] == k for r in rows) for k in ("train", "heldout")}}
    summary = {"params": params, "counts": counts, "seconds": round(time.perf_counter() - started, 3)}
    _atomic_write_text(done_path, json.dumps(summary, indent=2) + "\n")
    return {**summary, "skipped": False}


__all__ = ["write_sample_images"]
