"""Input checks shared by the metric modules (precise ``ValueError``/``TypeError`` messages)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def check_video(video: object, what: str = "video", min_frames: int = 1) -> np.ndarray:
    """``video`` checked to be a uint8 numpy array ``[T, H, W, 3]`` with at least ``min_frames`` frames."""
    if not isinstance(video, np.ndarray):
        raise TypeError(f"{what} must be a uint8 numpy array [T, H, W, 3], got {type(video).__name__}")
    if video.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 [T, H, W, 3], got dtype {video.dtype}")
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{what} must have shape [T, H, W, 3], got {list(video.shape)}")
    if video.shape[1] < 1 or video.shape[2] < 1:
        raise ValueError(f"{what} has empty frames: shape {list(video.shape)}")
    if video.shape[0] < min_frames:
        raise ValueError(f"{what} needs at least {min_frames} frame(s), got {video.shape[0]}")
    return video


def check_videos(videos: Sequence[np.ndarray] | np.ndarray, what: str = "videos", min_frames: int = 1) -> list[np.ndarray]:
    """A non-empty batch of videos: a list of ``[T, H, W, 3]`` arrays or one ``[N, T, H, W, 3]`` array."""
    if isinstance(videos, np.ndarray):
        if videos.ndim != 5:
            raise ValueError(f"{what} as one array must have shape [N, T, H, W, 3], got {list(videos.shape)}")
        items = list(videos)
    elif isinstance(videos, (list, tuple)):
        items = list(videos)
    else:
        raise TypeError(f"{what} must be a list of videos or an [N, T, H, W, 3] array, got {type(videos).__name__}")
    if not items:
        raise ValueError(f"{what} is empty")
    return [check_video(v, f"{what}[{i}]", min_frames) for i, v in enumerate(items)]
