"""Weight-free motion metrics: mean optical-flow magnitude and flow-warping error.

Flow is OpenCV DIS (``DISOPTICAL_FLOW_PRESET_MEDIUM``, the preset of ``fdreamer/data/flow.py``) on
grayscale frames at full resolution, from frame t to frame t+1: ``flow[t][y, x] = (dx, dy)`` means
the content at ``(x, y)`` in frame t is at ``(x + dx, y + dy)`` in frame t+1 (x rightwards, y
downwards, pixels per frame).
"""

from __future__ import annotations

import cv2
import numpy as np

from fdreamer.eval.metrics._validate import check_video


def dis_flow(video: np.ndarray) -> np.ndarray:
    """Forward DIS flow between consecutive frames: uint8 ``[T, H, W, 3]`` -> float32 ``[T-1, H, W, 2]`` (dx, dy)."""
    check_video(video, min_frames=2)
    if min(video.shape[1:3]) < 8:
        raise ValueError(f"optical flow needs frames of at least 8x8 pixels, got {video.shape[2]}x{video.shape[1]}")
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in video]
    out = np.empty((len(video) - 1, *video.shape[1:3], 2), dtype=np.float32)
    for t in range(len(video) - 1):
        out[t] = dis.calc(gray[t], gray[t + 1], None)
    return out


def mean_flow_magnitude(video: np.ndarray, flow: np.ndarray | None = None) -> float:
    """Mean optical-flow magnitude in pixels per frame: ``mean_{t,x,y} ||flow_t(x, y)||`` over
    the T-1 consecutive pairs (0 for a static video). Pass ``flow`` from :func:`dis_flow` to reuse it.
    """
    check_video(video, min_frames=2)
    f = dis_flow(video) if flow is None else _check_flow(flow, video)
    return float(np.sqrt(f[..., 0] ** 2 + f[..., 1] ** 2).mean())


def _check_flow(flow: np.ndarray, video: np.ndarray) -> np.ndarray:
    want = (video.shape[0] - 1, video.shape[1], video.shape[2], 2)
    if not isinstance(flow, np.ndarray) or flow.shape != want:
        raise ValueError(f"flow must be a [T-1, H, W, 2] array {list(want)}, got {list(getattr(flow, 'shape', []))}")
    return flow.astype(np.float32, copy=False)


def warp_back(next_frame: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Warp frame t+1 back onto frame t with the forward flow t->t+1 (bilinear ``cv2.remap``).

    Returns (warped float32 ``[H, W, C]``, in-frame mask bool ``[H, W]``: where ``(x+dx, y+dy)``
    falls inside frame t+1).
    """
    h, w = flow.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    map_x, map_y = xs + flow[..., 0], ys + flow[..., 1]
    warped = cv2.remap(next_frame.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE)
    inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    return warped.reshape(h, w, -1), inside


def warping_error(video: np.ndarray, *, mask_out_of_frame: bool = True, flow: np.ndarray | None = None) -> float:
    """Flow-warping error: for each consecutive pair, warp frame t+1 back to frame t with the DIS
    flow t->t+1 and take the mean absolute difference to frame t in [0, 1] intensity (all RGB
    channels); the result is the mean over the T-1 pairs. With ``mask_out_of_frame`` pixels whose
    flow points outside the frame are left out of that pair's mean. 0 for a static video; about
    1/3 for independent uniform noise frames (E|U-V| of two uniforms).
    """
    check_video(video, min_frames=2)
    f = dis_flow(video) if flow is None else _check_flow(flow, video)
    errors = []
    for t in range(len(video) - 1):
        warped, inside = warp_back(video[t + 1], f[t])
        diff = np.abs(warped - video[t].astype(np.float32)).mean(axis=-1) / 255.0  # [H, W]
        if mask_out_of_frame:
            if not inside.any():
                continue  # the whole frame flowed out: no evidence either way
            diff = diff[inside]
        errors.append(float(diff.mean()))
    if not errors:
        raise ValueError("every pixel of every pair flowed out of the frame; the warping error is undefined")
    return float(np.mean(errors))


def motion_metrics(video: np.ndarray, *, mask_out_of_frame: bool = True) -> dict[str, float]:
    """``{"flow_magnitude": ..., "warping_error": ...}`` with the flow computed once."""
    f = dis_flow(video)
    return {"flow_magnitude": mean_flow_magnitude(video, f),
            "warping_error": warping_error(video, mask_out_of_frame=mask_out_of_frame, flow=f)}
