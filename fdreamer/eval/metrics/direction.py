"""Motion-direction classification of the subject in (generated) synthetic "moving shapes" videos.

Given a video and the commanded subject's colour (a name of :data:`fdreamer.toy.sample_data.COLORS`,
as in the manifest's ``subject_color``, or an RGB triple), the subject is segmented in every frame,
its centroid / area / orientation / shape tracked, and the motion classified as one of
:data:`fdreamer.toy.sample_data.MOTIONS` (left, right, up, down, grow, shrink, rotate, still).

Segmentation (per frame, float RGB ``p``, subject colour ``c``):

1. ``d = ||p - c||``; a first mask ``d < 0.5 * median(d)`` (the subject covers well under half the
   frame; the sample backgrounds are low-saturation tints far from every subject colour).
2. Local background ``b``: a normalised Gaussian blur (sigma = ``BG_SIGMA`` x short side) of the
   frame with the dilated first mask left out (the backgrounds are smooth, low-frequency).
3. Coverage ``a = 1 - d / ||c - b||`` (exact for an antialiased mix of ``c`` and ``b``), mapped
   through the ramp ``clip((a - ALPHA_LO) / (ALPHA_HI - ALPHA_LO), 0, 1)`` to suppress texture noise
   while keeping edge pixels' area unbiased (the ramp is symmetric about 0.5).
4. Only the largest connected component of ``a > 0.5`` (dilated by 2 px) is kept, so a distractor
   or stray blob of a similar colour does not pull the centroid.

Fallback: if the colour gives under ``MIN_AREA_PX`` pixels of subject in frame 0 (a generated
video whose colour drifted, or ``subject_color=None``), the frame-0 background is estimated by a
large median filter, the largest region differing from it by more than ``FALLBACK_DIFF`` is taken
as the subject, its mean colour becomes ``c``, and segmentation proceeds as above.

Classification (T frames, W x H; fits use only frames where the subject was found):

- translation: least-squares line through the centroid track, total displacement
  ``(dx / W, dy / H)``; score ``max(|dx/W|, |dy/H|) / TRANSLATE_MIN`` (TRANSLATE_MIN = 0.08; the
  sample data move 0.19-0.48 of the frame side);
- scale: least-squares line through log(area), total ``log(A_end / A_start)``; score
  ``|.| / SCALE_MIN`` (SCALE_MIN = log 1.5; the sample data change area by 3.2x-7.6x);
- the larger score wins if > 1 (direction = sign along the dominant axis; grow/shrink = sign);
- otherwise rotation: the mean over frames of the shape change
  ``sum|a_t - a_0| / (A_t + A_0)`` after shifting ``a_t`` onto frame 0's centroid; above
  ``ROTATE_MIN`` (0.075; rendered rotate clips give >= 0.10, still clips 0, or <= 0.052 with
  sigma-8 pixel noise at 32x32) it is "rotate", else "still". (Second-moment orientation is reported in
  ``details`` but not used: the second moments of a regular polygon are isotropic, so they do not
  see a square or star turn.)

If the subject is found in fewer than half the frames (or fewer than 2), the label is
``"unknown"``, which never matches a motion and so counts as wrong in :func:`direction_accuracy`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from fdreamer.eval.metrics._validate import check_video
from fdreamer.toy.scenes import COLORS, MOTIONS

UNKNOWN = "unknown"
BG_SIGMA = 0.12  # local-background blur, fraction of the short side
ALPHA_LO, ALPHA_HI = 0.2, 0.8  # coverage ramp
MIN_AREA_PX = 2.0  # subject area (in pixels of coverage) below which a frame counts as "not found"
FALLBACK_DIFF = 60.0  # RGB distance from the frame-0 background estimate that marks the fallback subject
TRANSLATE_MIN = 0.08  # total centroid displacement, fraction of the frame width/height
SCALE_MIN = math.log(1.5)  # total |log area ratio|
ROTATE_MIN = 0.075  # mean normalised shape change vs frame 0
COLOUR_MAX_DISTANCE = 90.0  # RGB distance from a named colour within which subject_colour names it


def _subject_rgb(subject_color: str | Sequence[float] | None) -> np.ndarray | None:
    if subject_color is None:
        return None
    if isinstance(subject_color, str):
        if subject_color not in COLORS:
            raise ValueError(f"unknown subject_color {subject_color!r}; expected one of {list(COLORS)} or an RGB triple")
        return np.asarray(COLORS[subject_color], dtype=np.float32)
    rgb = np.asarray(subject_color, dtype=np.float32)
    if rgb.shape != (3,) or not np.isfinite(rgb).all() or (rgb < 0).any() or (rgb > 255).any():
        raise ValueError(f"subject_color must be a colour name or an RGB triple in [0, 255], got {subject_color!r}")
    return rgb


def _odd(n: float) -> int:
    k = max(3, round(n))
    return k if k % 2 else k + 1


def subject_alpha(frame: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Soft coverage ``[H, W]`` in [0, 1] of the subject of colour ``rgb`` in one uint8 frame (module docstring, steps 1-4)."""
    img = frame.astype(np.float32)
    h, w = img.shape[:2]
    d = np.linalg.norm(img - rgb, axis=-1)  # [H, W]
    first = (d < 0.5 * float(np.median(d))).astype(np.uint8)
    keep = 1.0 - cv2.dilate(first, np.ones((3, 3), np.uint8), iterations=2).astype(np.float32)  # background weight
    sigma = BG_SIGMA * min(h, w)
    num = cv2.GaussianBlur(img * keep[..., None], (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    den = cv2.GaussianBlur(keep, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    if keep.any():
        fallback_bg = np.median(img[keep > 0], axis=0)
    else:
        fallback_bg = np.median(img.reshape(-1, 3), axis=0)
    bg = np.where(den[..., None] > 1e-3, num / np.maximum(den, 1e-3)[..., None], fallback_bg)
    contrast = np.maximum(np.linalg.norm(bg - rgb, axis=-1), 1.0)
    alpha = np.clip((1.0 - d / contrast - ALPHA_LO) / (ALPHA_HI - ALPHA_LO), 0.0, 1.0)
    core = (alpha > 0.5).astype(np.uint8)
    n, labels, _, _ = cv2.connectedComponentsWithStats(core, connectivity=8)
    if n <= 1:
        return np.zeros_like(alpha)
    sums = np.bincount(labels.ravel(), weights=alpha.ravel(), minlength=n)[1:]
    biggest = (labels == 1 + int(np.argmax(sums))).astype(np.uint8)
    return alpha * cv2.dilate(biggest, np.ones((3, 3), np.uint8), iterations=2)


def estimate_subject_rgb(frame: np.ndarray) -> np.ndarray | None:
    """Fallback colour: mean colour of the largest region of ``frame`` that differs from its
    median-filtered background estimate by more than ``FALLBACK_DIFF`` (None if there is none)."""
    h, w = frame.shape[:2]
    bg = cv2.medianBlur(np.ascontiguousarray(frame), _odd(0.75 * min(h, w)))
    diff = np.linalg.norm(frame.astype(np.float32) - bg.astype(np.float32), axis=-1)
    mask = (diff > FALLBACK_DIFF).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    region = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if region.sum() < MIN_AREA_PX:
        return None
    core = cv2.erode(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    pick = core if core.sum() >= MIN_AREA_PX else region
    return frame[pick].astype(np.float32).mean(axis=0)


def subject_colour(frame: np.ndarray, max_distance: float = COLOUR_MAX_DISTANCE) -> str | None:
    """The name in ``COLORS`` nearest to the mean colour of uint8 ``frame``'s largest foreground region
    (:func:`estimate_subject_rgb`: the subject, the largest shape of a sample scene), or None when there
    is no such region or no named colour within ``max_distance`` (RGB). The text-to-image check: does the
    first frame show the colour the prompt names?"""
    rgb = estimate_subject_rgb(np.ascontiguousarray(frame))
    if rgb is None:
        return None
    names = list(COLORS)
    dist = np.linalg.norm(np.asarray([COLORS[n] for n in names], dtype=np.float32) - rgb, axis=-1)
    best = int(np.argmin(dist))
    return names[best] if dist[best] <= max_distance else None


def _moments(alpha: np.ndarray) -> tuple[float, float, float, float]:
    """Area, centroid x, centroid y and second-moment orientation (degrees) of a coverage map."""
    area = float(alpha.sum())
    if area < MIN_AREA_PX:
        return area, math.nan, math.nan, math.nan
    m = cv2.moments(alpha.astype(np.float32))
    cx, cy = m["m10"] / m["m00"], m["m01"] / m["m00"]
    orient = 0.5 * math.degrees(math.atan2(2 * m["mu11"], m["mu20"] - m["mu02"]))
    return area, cx, cy, orient


def _line_total(values: np.ndarray, ts: np.ndarray, t_total: int) -> float:
    """Change over ``t_total`` frames of the least-squares line through ``(ts, values)``."""
    slope = np.polyfit(ts.astype(np.float64), values.astype(np.float64), 1)[0]
    return float(slope * t_total)


def track_subject(video: np.ndarray, subject_color: str | Sequence[float] | None) -> dict[str, Any]:
    """Per-frame coverage maps and moments of the subject: keys ``alpha`` ``[T, H, W]``, ``area``,
    ``cx``, ``cy``, ``orientation_deg`` (``[T]``, NaN where not found), ``rgb`` and ``fallback``."""
    check_video(video)
    rgb = _subject_rgb(subject_color)
    fallback = False
    first = subject_alpha(video[0], rgb) if rgb is not None else None
    if first is None or first.sum() < MIN_AREA_PX:
        est = estimate_subject_rgb(video[0])
        if est is not None:
            rgb, fallback = est, True
            first = subject_alpha(video[0], rgb)
    if rgb is None or first is None:
        t, h, w = video.shape[:3]
        nan = np.full(t, math.nan)
        return {"alpha": np.zeros((t, h, w), np.float32), "area": np.zeros(t), "cx": nan, "cy": nan.copy(),
                "orientation_deg": nan.copy(), "rgb": None, "fallback": True}
    alphas = np.stack([first] + [subject_alpha(f, rgb) for f in video[1:]]).astype(np.float32)
    stats = np.array([_moments(a) for a in alphas])  # [T, 4]
    return {"alpha": alphas, "area": stats[:, 0], "cx": stats[:, 1], "cy": stats[:, 2],
            "orientation_deg": stats[:, 3], "rgb": [float(v) for v in rgb], "fallback": fallback}


def _shape_change(alphas: np.ndarray, cx: np.ndarray, cy: np.ndarray, valid: np.ndarray) -> float:
    """Mean over valid frames t > first of ``sum|a_t - a_0| / (A_t + A_0)`` with a_t moved onto a_0's centroid."""
    idx = np.flatnonzero(valid)
    ref = alphas[idx[0]]
    h, w = ref.shape
    vals = []
    for t in idx[1:]:
        shift = np.float32([[1, 0, cx[idx[0]] - cx[t]], [0, 1, cy[idx[0]] - cy[t]]])
        moved = cv2.warpAffine(alphas[t], shift, (w, h), flags=cv2.INTER_LINEAR, borderValue=0.0)
        vals.append(float(np.abs(moved - ref).sum() / max(moved.sum() + ref.sum(), 1e-6)))
    return float(np.mean(vals)) if vals else 0.0


def classify_motion(video: np.ndarray, subject_color: str | Sequence[float] | None) -> tuple[str, dict[str, Any]]:
    """Classify the subject's motion in uint8 ``[T, H, W, 3]`` as one of ``MOTIONS`` (or ``"unknown"``
    if the subject is not found in at least half the frames); see the module docstring for the
    method and thresholds. ``details`` holds the track (centroid, area, orientation per frame), the
    measured totals (``dx_frac``, ``dy_frac``, ``log_area_ratio``, ``shape_change``), the scores and
    whether the colour fallback was used.
    """
    check_video(video, min_frames=2)
    tr = track_subject(video, subject_color)
    t_count, h, w = video.shape[:3]
    valid = (tr["area"] >= MIN_AREA_PX) & np.isfinite(tr["cx"])
    details: dict[str, Any] = {
        "cx": tr["cx"].tolist(), "cy": tr["cy"].tolist(), "area": tr["area"].tolist(),
        "orientation_deg": tr["orientation_deg"].tolist(), "subject_rgb": tr["rgb"],
        "fallback": tr["fallback"], "found_frames": int(valid.sum()),
    }
    if valid.sum() < max(2, math.ceil(t_count / 2)):
        return UNKNOWN, details
    ts = np.flatnonzero(valid)
    steps = t_count - 1
    dx = _line_total(tr["cx"][valid], ts, steps) / w
    dy = _line_total(tr["cy"][valid], ts, steps) / h
    log_area = _line_total(np.log(tr["area"][valid]), ts, steps)
    trans_score = max(abs(dx), abs(dy)) / TRANSLATE_MIN
    scale_score = abs(log_area) / SCALE_MIN
    details.update(dx_frac=dx, dy_frac=dy, log_area_ratio=log_area, translate_score=trans_score,
                   scale_score=scale_score)
    if max(trans_score, scale_score) > 1.0:
        details["shape_change"] = None
        if trans_score >= scale_score:
            if abs(dx) >= abs(dy):
                return ("right" if dx > 0 else "left"), details
            return ("down" if dy > 0 else "up"), details
        return ("grow" if log_area > 0 else "shrink"), details
    change = _shape_change(tr["alpha"], tr["cx"], tr["cy"], valid)
    details["shape_change"] = change
    details["rotate_score"] = change / ROTATE_MIN
    return ("rotate" if change > ROTATE_MIN else "still"), details


def direction_accuracy(
    videos: Sequence[np.ndarray], colors: Sequence[str | Sequence[float] | None], labels: Sequence[str]
) -> float:
    """Motion-direction accuracy: the fraction of videos whose :func:`classify_motion` label equals
    the commanded motion in ``labels`` (each one of ``MOTIONS``); "unknown" counts as wrong."""
    if isinstance(labels, str) or isinstance(colors, str):
        raise TypeError("colors and labels must be sequences (one per video), not a single str")
    n = len(videos)
    if n == 0:
        raise ValueError("videos is empty")
    if len(colors) != n or len(labels) != n:
        raise ValueError(f"got {n} videos, {len(colors)} colors and {len(labels)} labels; they must match")
    bad = [lab for lab in labels if lab not in MOTIONS]
    if bad:
        raise ValueError(f"unknown motion label {bad[0]!r}; expected one of {MOTIONS}")
    hits = sum(classify_motion(v, c)[0] == lab for v, c, lab in zip(videos, colors, labels, strict=True))
    return hits / n
