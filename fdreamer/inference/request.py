"""What a video generation is asked for and what it returns (:class:`VideoRequest`, :class:`VideoResult`),
and :func:`save_video`. Re-exported by :mod:`fdreamer.inference.pipeline`; no torch needed here.

:meth:`VideoRequest.check` (run by ``__post_init__``) validates what does not depend on the model, with
diffusers ``check_inputs``-style messages naming the field; :meth:`fdreamer.inference.pipeline.VideoPipeline.check_request`
adds the checkpoint's limits (frames, size multiples, steps, whether images are accepted).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SAMPLERS = ("ddim", "euler")
MAX_SEED = 2**63 - 1
MAX_IMAGE_SIDE = 8192  # pixels; the image is resized to the output size anyway
MAX_GUIDANCE = 100.0
MAX_FPS = 240.0
VIDEO_FORMATS = ("mp4", "gif", "webp")


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))



# The sampling defaults, defined once (the server, `fdreamer generate`, evaluation and the pipeline read these).
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE_SCALE = 7.5  # text CFG
DEFAULT_IMAGE_GUIDANCE_SCALE = 1.5


@dataclass
class VideoRequest:
    """One generation. ``image`` None = text-to-video; None sizes/frames/fps take the pipeline's defaults;
    ``seed`` None draws a random seed (reported in :class:`VideoResult`)."""

    prompt: str
    image: np.ndarray | None = None  # uint8 [H, W, 3] conditioning first frame (I2V)
    negative_prompt: str = ""
    # the text the temporal layers' T5 reads; None = ``prompt``. A model trained with T5 on the motion
    # caption alone (preprocessing ``t5_caption: motion_caption``, recorded as ``t5_caption`` in its
    # checkpoint) reads the motion phrase here while CLIP / the T2I step read the full ``prompt``
    motion_prompt: str | None = None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE  # text CFG
    image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE_SCALE
    guidance_rescale: float = 0.0
    sampler: str = "ddim"
    seed: int | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError (naming the field) for anything no model could accept."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"`prompt` has to be a non-empty string but is {self.prompt!r}.")
        if self.motion_prompt is not None and (not isinstance(self.motion_prompt, str) or not self.motion_prompt.strip()):
            raise ValueError(f"`motion_prompt` has to be a non-empty string or None but is {self.motion_prompt!r}.")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(  # noqa: TRY004  (every invalid field is a ValueError: the server's 4xx)
                f"`negative_prompt` has to be a string but is {type(self.negative_prompt).__name__}.")
        if self.image is not None:
            img = self.image
            if not isinstance(img, np.ndarray):
                raise ValueError(f"`image` has to be a numpy uint8 array [H, W, 3] but is {type(img).__name__}.")
            if img.dtype != np.uint8:
                raise ValueError(f"`image` has to be uint8 [H, W, 3] but has dtype {img.dtype}.")
            if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
                raise ValueError(f"`image` has to have shape [H, W, 3] (RGB) but has shape {tuple(img.shape)}.")
            if max(img.shape[:2]) > MAX_IMAGE_SIDE:
                raise ValueError(f"`image` sides have to be at most {MAX_IMAGE_SIDE} but are {tuple(img.shape[:2])}.")
        for name in ("num_frames", "height", "width"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"`{name}` has to be a positive integer or None but is {v!r}.")
        if self.fps is not None and (not _is_real(self.fps) or not 0 < self.fps <= MAX_FPS):
            raise ValueError(f"`fps` has to be a number in (0, {MAX_FPS:g}] or None but is {self.fps!r}.")
        if not _is_int(self.num_inference_steps) or self.num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` has to be a positive integer but is {self.num_inference_steps!r}.")
        for name in ("guidance_scale", "image_guidance_scale"):
            v = getattr(self, name)
            if not _is_real(v) or not 0 <= v <= MAX_GUIDANCE:
                raise ValueError(f"`{name}` has to be a number in [0, {MAX_GUIDANCE:g}] but is {v!r}.")
        if not _is_real(self.guidance_rescale) or not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"`guidance_rescale` has to be a number in [0, 1] but is {self.guidance_rescale!r}.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"`sampler` has to be one of {list(SAMPLERS)} but is {self.sampler!r}.")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"`seed` has to be an integer in [0, 2**63 - 1] or None but is {self.seed!r}.")


@dataclass
class VideoResult:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    first_frame: np.ndarray  # uint8 [H, W, 3]: the given image resized/cropped, or the T2I output
    seed: int
    fps: float
    timings: dict[str, float] = field(default_factory=dict)  # seconds: t2i, i2v, decode, total

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])


def video_format(path: str | Path, format: str | None = None) -> str:
    """``format`` checked, or the one named by ``path``'s extension (mp4 when it has none)."""
    fmt = (format or Path(path).suffix.lstrip(".") or "mp4").lower()
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"`format` has to be one of {list(VIDEO_FORMATS)} but is {fmt!r} (from {str(path)!r}).")
    return fmt


def save_video(result: VideoResult, path: str | Path, format: str | None = None) -> Path:
    """Write ``result`` to ``path``: mp4 (H.264, :func:`fdreamer.data.video.write_video`), or animated GIF /
    WebP via PIL (looping). ``format`` None takes the file extension."""
    fmt = video_format(path, format)
    path = Path(path)
    if fmt == "mp4":
        from fdreamer.data.video import write_video

        return write_video(path, result.frames, result.fps)
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in result.frames]
    duration = max(1, round(1000.0 / result.fps))  # ms per frame
    extra = {"lossless": False, "quality": 90, "method": 4} if fmt == "webp" else {"optimize": False, "disposal": 1}
    images[0].save(path, format=fmt.upper(), save_all=True, append_images=images[1:], duration=duration, loop=0,
                   **extra)
    return path


__all__ = ["MAX_SEED", "SAMPLERS", "VIDEO_FORMATS", "VideoRequest", "VideoResult", "save_video", "video_format"]
