"""The scenes of the "moving shapes" sample dataset: vocabulary, deterministic clip specs, and rendering.

Each clip shows one subject shape carrying a commanded motion (and maybe a small still distractor)
over a smooth, low-frequency textured background, so the motion is recoverable from pixels and a
tiny factor-4 VAE reconstructs the frames well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

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
SPLITS: tuple[str, ...] = ("train", "heldout")
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
