"""Image records of the preprocessing job (VideoCrafter2-style joint image-video training).

A manifest record is an *image* when its generic manifest has a ``kind`` column saying ``image``, or,
without one, when its path ends with an image extension (:data:`IMAGE_EXTENSIONS`, case-insensitive,
any ``?query`` ignored) — see :func:`record_kind`. Images become 1-frame rows of the same Parquet
schema (``num_frames`` = 1; video profiles require >= 2, so ``num_frames == 1`` identifies them).

:func:`read_image` decodes one image (Pillow, EXIF orientation applied, RGB) and resizes + centre-crops
it like a video frame, returning ``[1, S, S, 3]`` uint8 "frames". Failures raise
:class:`ImageDecodeError` carrying a quarantine reason of :mod:`fdreamer.data.quarantine`:
``missing``, ``zero_byte``, ``not_a_video`` (the bytes are no image format Pillow knows either),
``corrupt`` (a known format that fails to decode, e.g. a truncated PNG); ``too_small`` comes from
:func:`fdreamer.data.quarantine.check_size`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from fdreamer.data.video import VideoDecodeError, VideoInfo, resize_center_crop

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KINDS: tuple[str, ...] = ("video", "image")


class ImageDecodeError(VideoDecodeError):
    """An image record could not be read; ``reason`` is its quarantine reason."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_image_uri(uri: str) -> bool:
    """Whether ``uri``'s path ends with one of :data:`IMAGE_EXTENSIONS`."""
    return urlparse(str(uri)).path.lower().endswith(IMAGE_EXTENSIONS) or str(uri).lower().endswith(IMAGE_EXTENSIONS)


def record_kind(uri: str, declared: object = None) -> str:
    """``video`` or ``image``: the manifest's ``kind`` value when given (else ValueError), else by extension."""
    if declared is not None and str(declared).strip() != "":
        kind = str(declared).strip().lower()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {declared!r}")
        return kind
    return "image" if is_image_uri(uri) else "video"


def _open(src: str | os.PathLike | bytes) -> tuple[object, str]:
    """``(RGB PIL image, format name)``, decoded now; ImageDecodeError with its reason otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = f"<in-memory image, {len(src)} bytes>" if isinstance(src, (bytes, bytearray)) else os.fspath(src)
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    else:
        path = Path(src)
        if not path.is_file():
            raise ImageDecodeError(f"{name}: no such image file", "missing")
        data = path.read_bytes()
    if not data:
        raise ImageDecodeError(f"{name}: file is empty", "zero_byte")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{name}: not an image (no known image format)", "not_a_video") from exc
    except Exception as exc:  # noqa: BLE001 - a recognised but unreadable header
        raise ImageDecodeError(f"{name}: unreadable image header: {type(exc).__name__}: {exc}", "corrupt") from exc
    try:
        img.load()  # decode now: truncated / damaged data fails here
        return ImageOps.exif_transpose(img).convert("RGB"), str(img.format or "").lower()
    except Exception as exc:  # noqa: BLE001 - any decoder failure of a known format is corruption
        raise ImageDecodeError(f"{name}: {img.format} image fails to decode: {type(exc).__name__}: {exc}",
                               "corrupt") from exc


def read_image(
    src: str | os.PathLike | bytes, size: int | tuple[int, int] | None = None,
) -> tuple[np.ndarray, VideoInfo]:
    """``(frames, info)``: uint8 ``[1, S, S, 3]`` (resized + centre-cropped to ``size`` when given);
    ``info`` describes the source as a 1-frame video (fps 0: an image has none)."""
    img, fmt = _open(src)
    info = VideoInfo(num_frames=1, fps=0.0, width=img.width, height=img.height, duration=0.0, codec=fmt,
                     pix_fmt="rgb24")
    frames = np.asarray(img, dtype=np.uint8)[None]  # [H, W, 3] -> [1, H, W, 3]
    if size is not None:
        frames = resize_center_crop(frames, size)
    return np.ascontiguousarray(frames), info


__all__ = ["IMAGE_EXTENSIONS", "KINDS", "ImageDecodeError", "is_image_uri", "read_image", "record_kind"]
