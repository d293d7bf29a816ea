"""Pass 1's cost per video at a web-video size: decode at the profile size vs straight to the hash size, and
the footage hash. Prints ONE JSON line.

    python tests/bench/bench_pass1.py [--width 640 --height 360 --seconds 10 --fps 24 --repeat 5]

A synthetic H.264 video (moving gradient and shapes, ``--width`` x ``--height``, CRF 23) is hashed the way
pass 1 does it for the ``stage1.yaml`` profile (32 frames at 8 fps, 256 px): ``profile_size`` decodes the
clip's frames at the source size, resizes them to 256 and hashes them (before); ``hash_size`` is
:func:`pipelines.stages.hash_clip` (the decoder scales to 64 px; now); ``footage`` is
:func:`pipelines.stages.footage_of` (16 frames at 2 fps). Seconds per video, best of ``--repeat``, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]


def _video(path: Path, width: int, height: int, seconds: float, fps: float) -> Path:
    import numpy as np

    from fdreamer.data.video import write_video

    n = int(seconds * fps)
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        frames[t, ..., 0] = (x + 3 * t) % 256
        frames[t, ..., 1] = (y + 2 * t) % 256
        frames[t, ..., 2] = ((x // 40 + y // 40 + t // 12) % 2) * 200
    return write_video(path, frames, fps, crf=23)


def best_of(fn, repeat: int) -> float:
    """The shortest of ``repeat`` timed calls of ``fn`` (seconds)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def video_args(description: str) -> argparse.Namespace:
    """The pass-1 benches' command line: the test video's size, length, rate, and the repeats."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--repeat", type=int, default=5)
    return p.parse_args()


def main() -> int:
    args = video_args(__doc__.splitlines()[0])

    import cv2

    cv2.setNumThreads(1)
    from fdreamer.data import dedup
    from fdreamer.data.video import probe_video, read_video
    from pipelines import stages
    from fdreamer.config import load_config
    from pipelines.config import PreprocessConfig

    profile = load_config(PreprocessConfig, REPO / "pipelines/configs/stage1.yaml", []).profile.stage_dict()
    with tempfile.TemporaryDirectory() as tmp:
        src = str(_video(Path(tmp) / "v.mp4", args.width, args.height, args.seconds, args.fps))
        info = probe_video(src)

        def profile_size() -> None:
            clip = read_video(src, profile["num_frames"], fps=profile["fps"], size=profile["size"], info=info)
            dedup.clip_hashes(clip.frames)

        def hash_size() -> None:
            dedup.clip_hashes(stages.hash_clip(src, profile, 0, info).frames)

        def footage() -> None:
            stages.footage_of(src, info)

        out = {k: round(best_of(f, args.repeat), 4) for k, f in
               (("profile_size_s", profile_size), ("hash_size_s", hash_size), ("footage_s", footage))}
    out = {"bench": "pass1", "video": f"{args.width}x{args.height} {args.seconds}s {args.fps}fps H.264",
           "profile": "stage1 (32 frames at 8 fps, 256 px)", **out,
           "hash_size_over_profile_size": round(out["hash_size_s"] / out["profile_size_s"], 3),
           "footage_over_hash_size": round(out["footage_s"] / out["hash_size_s"], 3)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
