"""Optical flow at latent resolution (OpenCV DIS on grayscale) and a scalar motion score."""

from __future__ import annotations

import cv2
import numpy as np


def optical_flow(frames: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """Flow between consecutive frames: uint8 ``[T, H, W, 3]`` -> float16 ``[2, T-1, h, w]``.

    Channel 0 is dx (positive = rightwards), channel 1 is dy (positive = downwards), both in
    *latent* pixels per frame: the full-resolution flow is area-resized to ``latent_hw`` and the
    vectors are scaled by ``w / W`` and ``h / H``.
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {getattr(frames, 'shape', type(frames))}")
    t, big_h, big_w, _ = frames.shape
    if t < 2:
        raise ValueError(f"optical flow needs at least 2 frames, got {t}")
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"latent_hw must be positive, got {latent_hw}")
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    out = np.empty((2, t - 1, h, w), dtype=np.float16)
    scale = np.array([w / big_w, h / big_h], dtype=np.float32)
    for i in range(t - 1):
        flow = dis.calc(gray[i], gray[i + 1], None)  # [H, W, 2] (dx, dy) in source pixels
        small = cv2.resize(flow, (w, h), interpolation=cv2.INTER_AREA) * scale  # [h, w, 2]
        out[:, i] = np.moveaxis(small, -1, 0)  # [h, w, 2] -> [2, h, w]
    return out


def motion_score(flow: np.ndarray) -> float:
    """Mean flow magnitude (latent pixels per frame) of a ``[2, T-1, h, w]`` flow."""
    if flow.ndim != 4 or flow.shape[0] != 2:
        raise ValueError(f"flow must be [2, T-1, h, w], got {list(flow.shape)}")
    f = flow.astype(np.float32)
    return float(np.sqrt(f[0] ** 2 + f[1] ** 2).mean())
