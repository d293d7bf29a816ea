"""Deterministic "moving shapes" sample dataset, written as WebVid/Pexels-style CSVs plus mp4 clips.

Each clip shows one subject shape carrying a commanded motion (and maybe a small still distractor)
over a smooth, low-frequency textured background, so the motion is recoverable from pixels and a
tiny factor-4 VAE reconstructs the frames well.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fdreamer.data.video import write_video

logger = logging.getLogger(__name__)

MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "grow", "shrink", "rotate", "still")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
ROTATABLE_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s != "circle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30), "green": (30, 200, 50), "blue": (40, 70, 235),
    "yellow": (240, 220, 30), "magenta": (220, 40, 220), "cyan": (20, 200, 225),
}
# Soft, low-saturation background tints (name -> RGB), far from every entry of COLORS.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "green": (115, 140, 115), "blue": (115, 125, 150),
    "beige": (150, 138, 115), "pink": (150, 120, 130), "teal": (110, 138, 138),
}
MOTION_PHRASES: dict[str, str] = {
    "left": "slides to the left", "right": "slides to the right", "up": "moves up",
    "down": "moves down", "grow": "grows", "shrink": "shrinks", "rotate": "spins",
    "still": "stays still",
}
# Three speed levels, as the total change over the clip so any clip length stays in frame:
# translation in units of the crop side, grow/shrink as the total scale factor, rotation in degrees.
_TRANSLATE_TOTAL = (0.25, 0.36, 0.48)
_SCALE_TOTAL = (1.8, 2.25, 2.75)
_ROTATE_TOTAL = (100.0, 150.0, 200.0)
_REF_SIDE = 96.0  # sizes below are in pixels of a 96-pixel short side, scaled for other sizes
# Start circumradius range of the subject per motion (grow starts small, shrink starts big).
_SUBJECT_SIZE = {"left": (11.0, 14.0), "right": (11.0, 14.0), "up": (11.0, 14.0),
                 "down": (11.0, 14.0), "grow": (8.0, 10.0), "shrink": (22.0, 26.0),
                 "rotate": (13.0, 17.0), "still": (11.0, 16.0)}
_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
WEBVID_COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name")
PEXELS_COLUMNS = ("id", "url", "title", "duration", "width", "height")
HELDOUT_PERIOD = 10  # one clip in ten (per motion) is held out
FORMAT_VERSION = 1  # bump when rendering changes so cached datasets are rebuilt


@dataclass
class ShapeSpec:
    """One shape: start centre ``(x, y)`` and circumradius ``size`` in pixels, and its motion.

    ``speed`` is pixels/frame (left/right/up/down), scale factor/frame (grow/shrink), degrees/frame
    counter-clockwise as displayed (rotate), or 0 (still). ``angle`` is the start orientation.
    """

    kind: str
    color: str
    rgb: tuple[int, int, int]
    x: float
    y: float
    size: float
    motion: str
    speed: float
    angle: float = 0.0


@dataclass
class ClipSpec:
    """Everything needed to render one clip; ``shapes[0]`` is the subject."""

    clip_id: str
    shapes: list[ShapeSpec]
    background_seed: int
    background: str
    caption: str
    motion_caption: str
    motion: str
    source: str
    width: int
    height: int
    num_frames: int
    fps: float
    split: str


# ------------------------------------------------------------------------------------------ specs


def shape_state(shape: ShapeSpec, t: int) -> tuple[float, float, float, float]:
    """Centre x, centre y, circumradius and angle (degrees) of ``shape`` at frame ``t``."""
    x, y, size, angle = shape.x, shape.y, shape.size, shape.angle
    if shape.motion in _DIRECTIONS:
        ux, uy = _DIRECTIONS[shape.motion]
        x, y = x + ux * shape.speed * t, y + uy * shape.speed * t
    elif shape.motion in ("grow", "shrink"):
        size *= shape.speed**t
    elif shape.motion == "rotate":
        angle += shape.speed * t
    return x, y, size, angle


def _subject(rng: np.random.Generator, motion: str, w: int, h: int, num_frames: int) -> ShapeSpec:
    """Draw the subject so it stays inside the centred square crop for the whole clip."""
    side = min(w, h)
    s = side / _REF_SIDE
    x0, y0 = (w - side) / 2.0, (h - side) / 2.0  # top-left of the centred square crop
    margin = 2.0 * s
    level = int(rng.integers(3))
    kind = str(rng.choice(ROTATABLE_SHAPES if motion == "rotate" else SHAPES))
    color = str(rng.choice(list(COLORS)))
    if motion not in _SUBJECT_SIZE:
        raise ValueError(f"unknown motion {motion!r}; expected one of {MOTIONS}")
    steps = num_frames - 1
    size = rng.uniform(*_SUBJECT_SIZE[motion]) * s
    extent = size  # largest circumradius over the clip
    dx = dy = speed = 0.0  # dx, dy: total displacement over the clip
    if motion in _DIRECTIONS:
        speed = _TRANSLATE_TOTAL[level] * side / steps
        dx, dy = (u * speed * steps for u in _DIRECTIONS[motion])
    elif motion == "grow":
        speed = _SCALE_TOTAL[level] ** (1.0 / steps)
        extent = size * _SCALE_TOTAL[level]
    elif motion == "shrink":
        speed = (1.0 / _SCALE_TOTAL[level]) ** (1.0 / steps)
    elif motion == "rotate":
        speed = _ROTATE_TOTAL[level] / steps

    def start(lo_edge: float, delta: float) -> float:
        lo = lo_edge + extent + margin + max(0.0, -delta)
        hi = lo_edge + side - extent - margin - max(0.0, delta)
        if lo > hi:
            raise ValueError(f"frame {w}x{h} is too small for a {motion} clip")
        return float(rng.uniform(lo, hi))

    x, y = start(x0, dx), start(y0, dy)
    angle = float(rng.uniform(0.0, 360.0)) if motion == "rotate" else 0.0
    return ShapeSpec(kind, color, COLORS[color], x, y, float(size), motion, float(speed), angle)


def _distractor(
    rng: np.random.Generator, subject: ShapeSpec, w: int, h: int, num_frames: int
) -> ShapeSpec | None:
    """A small still shape of another colour away from the subject's path, or None if none fits."""
    s = min(w, h) / _REF_SIDE
    size = float(rng.uniform(6.0, 8.0) * s)
    kind = str(rng.choice(SHAPES))
    color = str(rng.choice([c for c in COLORS if c != subject.color]))
    x_a, y_a, r_a, _ = shape_state(subject, 0)
    x_b, y_b, r_b, _ = shape_state(subject, num_frames - 1)
    reach = max(r_a, r_b) + size + 4.0 * s
    seg = np.array([x_b - x_a, y_b - y_a])
    for _ in range(30):
        p = np.array([rng.uniform(size + 2, w - size - 2), rng.uniform(size + 2, h - size - 2)])
        # Distance from p to the segment swept by the subject's centre.
        u = float(np.clip(np.dot(p - (x_a, y_a), seg) / max(np.dot(seg, seg), 1e-9), 0.0, 1.0))
        if np.linalg.norm(p - (x_a + u * seg[0], y_a + u * seg[1])) > reach:
            x, y = float(p[0]), float(p[1])
            return ShapeSpec(kind, color, COLORS[color], x, y, size, "still", 0.0)
    return None


def make_specs(
    num_clips: int, seed: int = 0, width: int = 128, height: int = 96, num_frames: int = 24,
    fps: float = 12,
) -> list[ClipSpec]:
    """Deterministic clip specs; clip i depends only on (seed, i), so prefixes are stable.

    Motions go round-robin over MOTIONS; ~25% of clips are "pexels" at 1.25x the size; ~10% (one
    round in ten, per motion) are "heldout".
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if width < 48 or height < 48:
        raise ValueError(f"width and height must be >= 48, got {width}x{height}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    specs = []
    for i in range(num_clips):
        rng = np.random.default_rng([seed, i])
        m_idx, rnd = i % len(MOTIONS), i // len(MOTIONS)
        motion = MOTIONS[m_idx]
        source = "pexels" if (rnd + m_idx // 2) % 4 == 1 else "webvid"
        w, h = (width, height)
        if source == "pexels":  # the larger size: 1.25x, kept even
            w, h = 2 * round(width * 0.625), 2 * round(height * 0.625)
        split = "heldout" if (rnd + m_idx + seed) % HELDOUT_PERIOD == 0 else "train"
        subject = _subject(rng, motion, w, h, num_frames)
        shapes = [subject]
        if rng.random() < 0.5:
            other = _distractor(rng, subject, w, h, num_frames)
            if other is not None:
                shapes.append(other)
        background = str(rng.choice(list(BACKGROUNDS)))
        motion_caption = f"a {subject.color} {subject.kind} {MOTION_PHRASES[motion]}"
        company = f" next to a small {shapes[1].color} {shapes[1].kind}" if len(shapes) > 1 else ""
        caption = f"{motion_caption}{company} over a soft {background} textured background"
        specs.append(ClipSpec(
            clip_id=f"clip_{i:05d}", shapes=shapes, background_seed=int(rng.integers(2**31 - 1)),
            background=background, caption=caption, motion_caption=motion_caption, motion=motion,
            source=source, width=w, height=h, num_frames=num_frames, fps=float(fps), split=split,
        ))
    return specs


# -------------------------------------------------------------------------------------- rendering


def render_background(seed: int, tint: str, width: int, height: int) -> np.ndarray:
    """Smooth textured background, float32 ``[H, W, 3]``: gradient + sinusoids + blurred noise."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)  # each [H, W]
    u, v = u / width, v / height
    theta = rng.uniform(0.0, 2.0 * np.pi)
    lum = 36.0 * (np.cos(theta) * (u - 0.5) + np.sin(theta) * (v - 0.5))  # [H, W]
    for _ in range(3):
        fx, fy = rng.uniform(-2.0, 2.0, size=2)  # cycles per image: low frequency only
        lum += rng.uniform(4.0, 8.0) * np.sin(2 * np.pi * (fx * u + fy * v) + rng.uniform(0, 6.3))
    coarse = rng.normal(0.0, 7.0, size=(4, 5)).astype(np.float32)  # [4, 5] low-res noise
    lum += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)  # -> [H, W]
    fx, fy = rng.uniform(-1.5, 1.5, size=2)
    wave = np.sin(2 * np.pi * (fx * u + fy * v) + rng.uniform(0, 6.3))  # [H, W]
    chroma = wave[..., None] * rng.uniform(-6.0, 6.0, size=3).astype(np.float32)  # [H, W, 3]
    base = np.asarray(BACKGROUNDS[tint], dtype=np.float32)  # [3]
    return np.clip(base + lum[..., None] + chroma, 0.0, 255.0).astype(np.float32)  # [H, W, 3]


def _ring(n: int, start_deg: float, radii: tuple[float, ...] = (1.0,)) -> np.ndarray:
    """``n`` vertices ``[n, 2]`` from ``start_deg``, radius cycling through ``radii``."""
    a = np.deg2rad(start_deg + 360.0 / n * np.arange(n))  # [n]
    return np.stack([np.cos(a), np.sin(a)], axis=1) * np.resize(radii, n)[:, None]


def _cross(arm: float = 1.0, half: float = 0.33) -> np.ndarray:
    """Plus-sign vertices ``[12, 2]``: one quarter turned by 90 degrees four times."""
    quarter = np.array([(half, -arm), (half, -half), (arm, -half)])  # [3, 2]
    turns = [quarter]
    for _ in range(3):
        turns.append(turns[-1] @ np.array([[0.0, 1.0], [-1.0, 0.0]]))  # (x, y) -> (-y, x)
    return np.concatenate(turns) / math.hypot(arm, half)  # [12, 2], circumradius 1


# Unit-circumradius polygons (x, y), pointing up (image y grows downwards).
_UNIT_POLYGONS: dict[str, np.ndarray] = {
    "square": _ring(4, 45.0), "triangle": _ring(3, -90.0), "star": _ring(10, -90.0, (1.0, 0.45)),
    "cross": _cross(),
}


def _polygon(kind: str, x: float, y: float, r: float, angle: float) -> np.ndarray:
    """Vertices ``[N, 2]`` (x, y) of a shape with circumradius ``r``, rotated CCW by ``angle``."""
    if kind not in _UNIT_POLYGONS:
        raise ValueError(f"unknown polygon shape {kind!r}; expected one of {list(_UNIT_POLYGONS)}")
    pts = _UNIT_POLYGONS[kind]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    # Image y points down, so a CCW turn on screen is x' = x c + y s, y' = -x s + y c.
    rot = np.array([[c, -s], [s, c]])
    return pts @ rot * r + (x, y)  # [N, 2]


def _shape_alpha(
    kind: str, x: float, y: float, r: float, angle: float, h: int, w: int
) -> np.ndarray:
    """Antialiased coverage in [0, 1], float32 ``[H, W]``."""
    mask = np.zeros((h, w), dtype=np.uint8)
    sub = 16  # 4 fractional bits for sub-pixel vertex positions
    if kind == "circle":
        centre = (int(round(x * sub)), int(round(y * sub)))
        cv2.circle(mask, centre, int(round(r * sub)), 255, -1, cv2.LINE_AA, shift=4)
    else:
        pts = np.round(_polygon(kind, x, y, r, angle) * sub).astype(np.int32)  # [N, 2]
        cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA, shift=4)
    return mask.astype(np.float32) / 255.0


def render_clip(spec: ClipSpec) -> np.ndarray:
    """Render ``spec`` to uint8 ``[T, H, W, 3]`` RGB; the subject is drawn last (on top)."""
    h, w = spec.height, spec.width
    bg = render_background(spec.background_seed, spec.background, w, h)  # [H, W, 3]
    frames = np.empty((spec.num_frames, h, w, 3), dtype=np.uint8)
    for t in range(spec.num_frames):
        img = bg.copy()
        for shape in reversed(spec.shapes):
            x, y, r, angle = shape_state(shape, t)
            alpha = _shape_alpha(shape.kind, x, y, r, angle, h, w)[..., None]  # [H, W, 1]
            img = img * (1.0 - alpha) + np.asarray(shape.rgb, dtype=np.float32) * alpha
        frames[t] = np.round(img).astype(np.uint8)
    return frames


# ---------------------------------------------------------------------------------------- writing


def _render_and_write(job: tuple[ClipSpec, str, int]) -> str:
    """Worker: render one clip and write its mp4; returns the clip id."""
    spec, path, crf = job
    cv2.setNumThreads(1)
    write_video(path, render_clip(spec), spec.fps, crf=crf)
    return spec.clip_id


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """Atomically write a CSV with ``header`` then ``rows``."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    _atomic_write_text(path, buf.getvalue())


def _iso_duration(seconds: float) -> str:
    """WebVid-style ISO-8601 duration, e.g. 2 s -> "PT00H00M02S"."""
    total = int(round(seconds))
    return f"PT{total // 3600:02d}H{total % 3600 // 60:02d}M{total % 60:02d}S"


def manifest_row(spec: ClipSpec, path: Path) -> dict[str, Any]:
    """The ground-truth manifest entry of one clip."""
    subject = spec.shapes[0]
    return {
        "path": str(path), "caption": spec.caption, "motion_caption": spec.motion_caption,
        "clip_id": spec.clip_id, "source": spec.source, "motion": spec.motion,
        "subject_shape": subject.kind, "subject_color": subject.color, "split": spec.split,
        "width": spec.width, "height": spec.height, "num_frames": spec.num_frames,
        "fps": spec.fps,
    }


def write_sample_data(
    out_dir: str | os.PathLike, num_clips: int = 320, seed: int = 0, *, workers: int = 2,
    width: int = 128, height: int = 96, num_frames: int = 24, fps: float = 12, crf: int = 18,
    force: bool = False,
) -> dict[str, Any]:
    """Write clips/<clip_id>.mp4, webvid.csv, pexels.csv, manifest.jsonl and finally _DONE.json.

    Paths in the CSVs and manifest are absolute. If _DONE.json already records the same parameters
    (and ``force`` is false) nothing is rewritten and its summary is returned with ``skipped=True``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir).resolve()
    params = dict(num_clips=num_clips, seed=seed, width=width, height=height,
                  num_frames=num_frames, fps=float(fps), crf=crf, out_dir=str(out),
                  format_version=FORMAT_VERSION)
    done_path = out / "_DONE.json"
    if done_path.is_file() and not force:
        done = json.loads(done_path.read_text(encoding="utf-8"))
        if done.get("params") == params and (out / "manifest.jsonl").is_file():
            return {**done, "skipped": True}
        logger.info("parameters changed since %s; rebuilding", done_path)

    started = time.perf_counter()
    specs = make_specs(num_clips, seed, width, height, num_frames, fps)
    clips_dir = out / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    done_path.unlink(missing_ok=True)  # an interrupted rebuild must not look finished
    paths = {s.clip_id: clips_dir / f"{s.clip_id}.mp4" for s in specs}
    for stale in clips_dir.glob("clip_*.mp4"):
        if stale.stem not in paths:
            stale.unlink()

    jobs = [(s, str(paths[s.clip_id]), crf) for s in specs]
    if workers == 1:
        for job in jobs:
            _render_and_write(job)
    else:
        # spawn, not fork: the parent may hold decoder/cv2 threads that fork would not copy safely.
        # An executor (not Pool) so workers that cannot start raise instead of hanging.
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, len(jobs) // (4 * workers))
        try:
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                list(pool.map(_render_and_write, jobs, chunksize=chunk))
        except BrokenProcessPool as exc:
            raise RuntimeError(
                "sample-data worker processes died; when calling from a script, guard it with "
                "`if __name__ == '__main__':`, or pass workers=1"
            ) from exc

    # videoid/id is the clip index; page_dir mimics WebVid's "000000_000049" buckets.
    webvid = [[i, str(paths[s.clip_id]), _iso_duration(s.num_frames / s.fps),
               f"{i // 50 * 50:06d}_{i // 50 * 50 + 49:06d}", s.caption]
              for i, s in enumerate(specs) if s.source == "webvid"]
    pexels = [[i, str(paths[s.clip_id]), s.caption, max(1, round(s.num_frames / s.fps)), s.width,
               s.height] for i, s in enumerate(specs) if s.source == "pexels"]
    _write_csv(out / "webvid.csv", list(WEBVID_COLUMNS), webvid)
    _write_csv(out / "pexels.csv", list(PEXELS_COLUMNS), pexels)
    _atomic_write_text(out / "manifest.jsonl", "".join(
        json.dumps(manifest_row(s, paths[s.clip_id])) + "\n" for s in specs))

    counts: dict[str, int] = {"clips": len(specs), "webvid": len(webvid), "pexels": len(pexels)}
    counts |= {key: sum(s.split == key for s in specs) for key in ("train", "heldout")}
    counts |= {f"motion_{m}": sum(s.motion == m for s in specs) for m in MOTIONS}
    summary = {"params": params, "counts": counts,
               "seconds": round(time.perf_counter() - started, 3)}
    _atomic_write_text(done_path, json.dumps(summary, indent=2) + "\n")
    return {**summary, "skipped": False}


# -------------------------------------------------------------------------------------------- CLI


def _cli_sample_data(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    summary = write_sample_data(args.dir, args.num_clips, args.seed, workers=args.workers,
                                force=args.force)
    verb = "already present" if summary["skipped"] else "wrote"
    count, where = summary["counts"]["clips"], summary["params"]["out_dir"]
    print(f"sample-data: {verb} {count} clips in {where} ({time.perf_counter() - started:.1f} s)")
    if args.images:  # the clips' clean first frames as a PNG image manifest (VideoCrafter2 recipe)
        from fdreamer.toy.sample_images import write_sample_images

        images = write_sample_images(args.dir, args.num_clips, args.seed, force=args.force)
        verb = "already present" if images["skipped"] else "wrote"
        print(f"sample-data: {verb} {images['counts']['images']} images, manifest {where}/images.jsonl")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``fdreamer sample-data DIR [--num-clips N] [--seed S] [--workers W] [--force] [--images]``."""
    p = sub.add_parser("sample-data", help="write the deterministic moving-shapes sample dataset")
    p.add_argument("dir", help="output directory")
    p.add_argument("--num-clips", type=int, default=320, help="number of clips (default 320)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--force", action="store_true", help="rebuild even if already complete")
    p.add_argument("--images", action="store_true",
                   help="also write the clips' clean first frames as PNGs + images.jsonl (an image manifest)")
    p.set_defaults(func=_cli_sample_data)
