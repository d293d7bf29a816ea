"""What shot-cut detection adds to pass 1 per video: :func:`fdreamer.data.shots.video_cuts` vs pass 1's current
work. Prints ONE JSON line.

    python tests/bench/bench_shots.py [--width 640 --height 360 --seconds 10 --fps 24 --repeat 5]

A synthetic H.264 video (``--width`` x ``--height``, CRF 23) of three shots, each a moving-shapes clip
(:mod:`fdreamer.toy.scenes`, each a different background tint and subject, rendered at the video's size) with a
drifting camera-like gradient on top, so every frame moves. ``cuts`` decodes every frame at
:data:`fdreamer.data.dedup.HASH_SIDE` and runs the ContentDetector (:func:`~fdreamer.data.shots.video_cuts`);
``hash_clip`` is one clip as pass 1 hashes it for the ``stage1.yaml`` profile
(:func:`pipelines.stages.hash_clip` + :func:`fdreamer.data.dedup.clip_hashes`, 32 frames at 8 fps),
``footage`` is :func:`pipelines.stages.footage_of`; ``pass1_one_clip_s`` is their sum and
``pass1_video_s`` adds the profile's other clips (``clips_per_video`` x ``hash_clip`` + ``footage``).
``job_pass1_with_shots_s`` / ``job_pass1_without_shots_s``: the job's own pass 1 of the video
(:func:`pipelines.stages.hash_videos`) with detection on (one decode of every frame at hash size, the clip and
footage hashes taken from those frames) and off (``shot_threshold: null``, today's separate decodes), and
their ratio. Seconds per video, best of ``--repeat``, one thread.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(Path(__file__).parent)]

from bench_pass1 import best_of, video_args  # noqa: E402  (the same timing and video options)


def _video(path: Path, width: int, height: int, seconds: float, fps: float) -> tuple[Path, list[int]]:
    """The three-shot video and the frames where shots 2 and 3 start."""
    import numpy as np

    from fdreamer.data.video import write_video
    from fdreamer.toy.scenes import make_specs, render_clip

    n = int(seconds * fps)
    bounds = [0, n * 3 // 10, n * 7 // 10, n]  # shots of 30 %, 40 %, 30 %
    # Tints far apart: ContentDetector scores a cut between two of these soft tints of close hue (blue ->
    # teal ~21; blue -> blue, new texture and subject, ~15) under its threshold of 27, so it would miss it.
    pool = [s for s in make_specs(24, seed=3, width=width, height=height, num_frames=n, fps=fps)
            if (s.width, s.height) == (width, height)]
    specs = [next(s for s in pool if s.background == tint) for tint in ("grey", "blue", "beige")]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)  # each [H, W]
    frames = np.empty((n, height, width, 3), np.uint8)  # [T, H, W, 3]
    for spec, a, b in zip(specs, bounds[:-1], bounds[1:]):
        clip = render_clip(spec)[a:b].astype(np.float32)  # [b - a, H, W, 3]: the shot's part of its clip
        for t in range(b - a):
            drift = 10.0 * np.sin(2 * np.pi * ((x + 2 * (a + t)) / width + y / (2 * height)))  # [H, W]
            frames[a + t] = np.clip(clip[t] + drift[..., None], 0, 255).astype(np.uint8)
    return write_video(path, frames, fps, crf=23), bounds[1:-1]


def main() -> int:
    args = video_args(__doc__.splitlines()[0])

    import cv2

    cv2.setNumThreads(1)
    from fdreamer.config import load_config
    from fdreamer.data import dedup, shots
    from fdreamer.data.video import probe_video
    from pipelines import stages
    from pipelines.config import PreprocessConfig

    profile = load_config(PreprocessConfig, REPO / "pipelines/configs/stage1.yaml", []).profile.stage_dict()
    with tempfile.TemporaryDirectory() as tmp:
        src, truth = _video(Path(tmp) / "v.mp4", args.width, args.height, args.seconds, args.fps)
        src = str(src)
        info = probe_video(src)
        found = shots.video_cuts(src, info)

        def cuts() -> None:
            shots.video_cuts(src, info)

        def hash_clip() -> None:
            dedup.clip_hashes(stages.hash_clip(src, profile, 0, info).frames)

        def footage() -> None:
            stages.footage_of(src, info)

        import pyarrow as pa

        record = pa.Table.from_pylist([{"uri": src, "caption": "x", "motion_caption": "", "source": "bench",
                                        "video_id": "v", "width": 0, "height": 0, "split": "", "motion": "",
                                        "kind": "video", "record_key": "k"}])
        no_shots = profile | {"shot_threshold": None}

        def pass1_with_shots() -> None:  # the job's pass 1 of one video: one decode at hash size, cuts, hashes
            stages.hash_videos(record, profile)

        def pass1_without() -> None:  # the same with shot detection off (fixed positions, decodes per clip)
            stages.hash_videos(record, no_shots)

        t = {k: best_of(f, args.repeat)
             for k, f in (("cuts_s", cuts), ("hash_clip_s", hash_clip), ("footage_s", footage),
                          ("job_pass1_with_shots_s", pass1_with_shots), ("job_pass1_without_shots_s", pass1_without))}
    one = t["hash_clip_s"] + t["footage_s"]
    video = profile["clips_per_video"] * t["hash_clip_s"] + t["footage_s"]
    out = {"bench": "shots", "video": f"{args.width}x{args.height} {args.seconds}s {args.fps}fps H.264, 3 shots",
           "profile": f"stage1 (32 frames at 8 fps, {profile['clips_per_video']} clips/video)",
           "frames": info.num_frames, "cuts_true": truth, "cuts_found": found,
           **{k: round(v, 4) for k, v in t.items()},
           "pass1_one_clip_s": round(one, 4), "pass1_video_s": round(video, 4),
           "cuts_over_pass1_one_clip": round(t["cuts_s"] / one, 3),
           "cuts_over_pass1_video": round(t["cuts_s"] / video, 3),
           "job_pass1_with_over_without": round(t["job_pass1_with_shots_s"] / t["job_pass1_without_shots_s"], 3)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
