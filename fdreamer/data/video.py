"""Video I/O: probe, sample frame indices, decode (decord or PyAV), resize/crop, and H.264 encode.

Frames are always ``uint8`` RGB arrays shaped ``[T, H, W, 3]``. Sources are a path or the bytes of
an in-memory container (e.g. an mp4 downloaded from object storage).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal, Union

import av
import cv2
import numpy as np

logger = logging.getLogger(__name__)

VideoSource = Union[str, os.PathLike, bytes]
Backend = Literal["auto", "decord", "pyav"]

_BACKENDS = ("auto", "decord", "pyav")


class VideoDecodeError(ValueError):
    """A video could not be read: unreadable/corrupt input, no frames, or too short a clip."""


@dataclass
class VideoInfo:
    """Stream properties of the first video stream of a container."""

    num_frames: int
    fps: float
    width: int
    height: int
    duration: float
    codec: str
    pix_fmt: str


@dataclass
class VideoClip:
    """Decoded frames (uint8 ``[T, H, W, 3]`` RGB) plus where they came from."""

    frames: np.ndarray
    fps: float
    indices: list[int]
    source: VideoInfo


# ----------------------------------------------------------------------------------------- helpers


def _describe(src: VideoSource) -> str:
    """Human-readable name of a source for error messages."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<in-memory video, {len(src)} bytes>"
    return os.fspath(src)


def _check_source(src: VideoSource) -> None:
    """Reject sources of the wrong type, empty bytes and missing files before any decoder runs."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise VideoDecodeError(f"{_describe(src)}: empty input")
        return
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"video source must be a path or bytes, got {type(src).__name__}")
    path = Path(src)
    if not path.is_file():
        raise VideoDecodeError(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: file is empty")


def _open_container(src: VideoSource) -> av.container.InputContainer:
    """Open ``src`` with PyAV for reading."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(bytes(src)), mode="r")
    return av.open(os.fspath(src), mode="r")


def _check_frames(frames: np.ndarray, what: str) -> None:
    """Validate a uint8 ``[T, H, W, 3]`` frame array."""
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"{what}: frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{what}: frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{what}: frames must be shaped [T, H, W, 3], got {list(frames.shape)}")
    if min(frames.shape[:3]) < 1:
        raise ValueError(f"{what}: frames must be non-empty, got shape {list(frames.shape)}")


# ------------------------------------------------------------------------------------------- probe


def probe_video(src: VideoSource) -> VideoInfo:
    """Read stream metadata of ``src`` (path or bytes) with PyAV, without decoding pixels."""
    _check_source(src)
    name = _describe(src)
    try:
        with _open_container(src) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{name}: no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            num_frames = int(stream.frames or 0)
            if num_frames <= 0:  # container has no frame count: count packets (cheap, no decode)
                num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = num_frames / fps if fps > 0 else 0.0
            info = VideoInfo(
                num_frames=num_frames,
                fps=fps,
                width=int(ctx.width),
                height=int(ctx.height),
                duration=duration,
                codec=str(ctx.name),
                pix_fmt=str(ctx.pix_fmt),
            )
    except av.FFmpegError as exc:
        raise VideoDecodeError(f"{name}: cannot read video ({exc})") from exc
    if info.num_frames <= 0:
        raise VideoDecodeError(f"{name}: video has zero frames")
    if info.fps <= 0:
        raise VideoDecodeError(f"{name}: video has no usable frame rate")
    return info


# ---------------------------------------------------------------------------------------- sampling


def sample_frame_indices(
    num_source_frames: int,
    source_fps: float,
    num_frames: int,
    *,
    fps: float | None = None,
    stride: int | None = None,
    start_frame: int = 0,
) -> list[int]:
    """Pick ``num_frames`` indices from ``start_frame``, at a target ``fps`` or every ``stride``.

    With ``fps`` the i-th index is ``start_frame + round(i * source_fps / fps)`` (a target fps above
    the source fps repeats frames); with ``stride`` it is ``start_frame + i * stride``. Give at most
    one of the two; neither means ``stride=1``. Raises VideoDecodeError when the clip is too short.
    """
    if fps is not None and stride is not None:
        raise ValueError("give exactly one of fps or stride, not both")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_source_frames < 0:
        raise ValueError(f"num_source_frames must be >= 0, got {num_source_frames}")
    if not source_fps > 0:
        raise ValueError(f"source_fps must be > 0, got {source_fps}")
    if start_frame < 0:
        raise ValueError(f"start_frame must be >= 0, got {start_frame}")
    if fps is not None:
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        step = source_fps / fps
        # Round half up (not to even) so positions are symmetric and predictable.
        indices = [start_frame + int(np.floor(i * step + 0.5)) for i in range(num_frames)]
    else:
        stride = 1 if stride is None else stride
        if not isinstance(stride, (int, np.integer)) or stride < 1:
            raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
        indices = [start_frame + i * int(stride) for i in range(num_frames)]
    if indices[-1] >= num_source_frames:
        how = f"fps={fps}" if fps is not None else f"stride={stride}"
        raise VideoDecodeError(
            f"clip too short: {num_frames} frames at {how} from frame {start_frame} need "
            f"{indices[-1] + 1} source frames, but the video has {num_source_frames}"
        )
    return indices


# ------------------------------------------------------------------------------------ resize / crop


def resize_center_crop(frames: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize so the shorter side covers ``size`` then centre-crop; ``size`` is an int or (h, w).

    Downscaling uses cv2 area interpolation, upscaling bilinear. Returns uint8 ``[T, h, w, 3]``.
    """
    _check_frames(frames, "resize_center_crop")
    if isinstance(size, (int, np.integer)):
        out_h, out_w = int(size), int(size)
    elif isinstance(size, tuple) and len(size) == 2:
        out_h, out_w = int(size[0]), int(size[1])
    else:
        raise ValueError(f"size must be an int or an (h, w) tuple, got {size!r}")
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {(out_h, out_w)}")
    _, in_h, in_w, _ = frames.shape  # [T, H, W, 3]
    scale = max(out_h / in_h, out_w / in_w)
    new_h = max(out_h, int(round(in_h * scale)))
    new_w = max(out_w, int(round(in_w * scale)))
    if (new_h, new_w) != (in_h, in_w):
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        # cv2 takes one [H, W, 3] image and (width, height): resize frame by frame.
        resized = np.stack([cv2.resize(f, (new_w, new_h), interpolation=interp) for f in frames])
    else:
        resized = frames
    top = (new_h - out_h) // 2
    left = (new_w - out_w) // 2
    # [T, new_h, new_w, 3] -> [T, out_h, out_w, 3]
    return np.ascontiguousarray(resized[:, top : top + out_h, left : left + out_w])


# ----------------------------------------------------------------------------------------- decoding


def _scaled_size(info: VideoInfo, side: int | None) -> tuple[int, int]:
    """(width, height) with the shorter side ``side`` (even, aspect kept), or (-1, -1): the source's."""
    if not side or min(info.width, info.height) <= side:
        return -1, -1
    scale = side / min(info.width, info.height)
    return max(side, 2 * round(info.width * scale / 2)), max(side, 2 * round(info.height * scale / 2))


def _decode_decord(src: VideoSource, indices: list[int], name: str, wh: tuple[int, int] = (-1, -1)) -> np.ndarray:
    """Decode ``indices`` with decord (scaled to ``wh`` in the decoder when given); raises VideoDecodeError
    (or ImportError if not installed)."""
    import decord

    in_memory = isinstance(src, (bytes, bytearray, memoryview))
    data = io.BytesIO(bytes(src)) if in_memory else os.fspath(src)
    try:
        reader = decord.VideoReader(data, ctx=decord.cpu(0), width=wh[0], height=wh[1])
        available = len(reader)
        if indices[-1] >= available:
            raise VideoDecodeError(
                f"{name}: clip too short, needs frame {indices[-1]} but decord sees "
                f"{available} frames"
            )
        frames = reader.get_batch(indices).asnumpy()  # [T, H, W, 3] uint8 RGB
    except decord.DECORDError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VideoDecodeError(f"{name}: decord cannot decode ({reason})") from exc
    return frames


def _decode_pyav(src: VideoSource, indices: list[int], name: str, wh: tuple[int, int] = (-1, -1)) -> np.ndarray:
    """Decode ``indices`` with PyAV by decoding in order up to the last needed frame (scaled to ``wh`` when given)."""
    scale = {"width": wh[0], "height": wh[1]} if wh[0] > 0 else {}
    wanted = set(indices)
    last = max(indices)
    picked: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        with _open_container(src) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if decoded in wanted:
                    picked[decoded] = frame.to_ndarray(format="rgb24", **scale)  # [H, W, 3]
                decoded += 1
                if decoded > last:
                    break
    except av.FFmpegError as exc:
        raise VideoDecodeError(f"{name}: PyAV cannot decode ({exc})") from exc
    if decoded <= last:
        raise VideoDecodeError(
            f"{name}: clip too short, needs frame {last} but only {decoded} frames decode"
        )
    return np.stack([picked[i] for i in indices])  # T x [H, W, 3] -> [T, H, W, 3]


def read_video(
    src: VideoSource,
    num_frames: int,
    *,
    fps: float | None = None,
    stride: int | None = None,
    start_frame: int = 0,
    size: int | tuple[int, int] | None = None,
    backend: Backend = "auto",
    decode_side: int | None = None,
    info: VideoInfo | None = None,
) -> VideoClip:
    """Decode ``num_frames`` frames of ``src`` (path or mp4 bytes), sampled by sample_frame_indices.

    ``size`` (int or (h, w)) resizes and centre-crops the result. ``decode_side``: the decoder scales each
    frame so its shorter side is this many pixels (no full-size RGB frame is made; for hashing at a small
    size), before ``size``'s crop. ``info``: the source's :func:`probe_video`, when the caller has it.
    ``backend="auto"`` uses decord and falls back to PyAV when decord is missing or fails; both give the
    same frames.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    name = _describe(src)
    info = info or probe_video(src)
    wh = _scaled_size(info, decode_side)
    try:
        indices = sample_frame_indices(
            info.num_frames, info.fps, num_frames, fps=fps, stride=stride, start_frame=start_frame
        )
    except VideoDecodeError as exc:
        raise VideoDecodeError(f"{name}: {exc}") from exc

    if backend == "pyav":
        frames = _decode_pyav(src, indices, name, wh)
    elif backend == "decord":
        frames = _decode_decord(src, indices, name, wh)
    else:
        frames = _decode_auto(src, indices, name, wh)

    if size is not None:
        frames = resize_center_crop(frames, size)
    return VideoClip(frames=frames, fps=clip_fps(info, fps, stride), indices=indices, source=info)


def clip_fps(info: VideoInfo, fps: float | None = None, stride: int | None = None) -> float:
    """The frame rate of a clip sampled at ``fps``, or every ``stride``-th frame of ``info``'s video."""
    return float(fps if fps is not None else info.fps / (stride or 1))


def footage_indices(info: VideoInfo, rate: float, limit: int) -> list[int]:
    """Frame indices at ``rate`` frames per second from the start, at most ``limit`` (within the video)."""
    if info.fps <= 0 or rate <= 0:
        return []
    step = info.fps / rate
    return [i for i in (int(round(k * step)) for k in range(limit)) if i < info.num_frames]


def decode_frames(src: VideoSource, indices: list[int], *, decode_side: int | None = None,
                  info: VideoInfo | None = None) -> np.ndarray:
    """Frames ``indices`` (ascending) of ``src`` as uint8 ``[T, H, W, 3]`` (decord, else PyAV), scaled in the
    decoder to a shorter side of ``decode_side`` when given."""
    return _decode_auto(src, indices, _describe(src), _scaled_size(info or probe_video(src), decode_side))


def _decode_auto(src: VideoSource, indices: list[int], name: str, wh: tuple[int, int]) -> np.ndarray:
    """decord, falling back to PyAV when decord is missing or fails (both give the same frames)."""
    try:
        return _decode_decord(src, indices, name, wh)
    except (ImportError, VideoDecodeError) as exc:
        logger.debug("decord failed on %s (%s); falling back to PyAV", name, exc)
        return _decode_pyav(src, indices, name, wh)


# ----------------------------------------------------------------------------------------- encoding


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad odd height/width by one row/column (bottom/right), replicating the edge."""
    _, h, w, _ = frames.shape  # [T, H, W, 3]
    pad_h, pad_w = h % 2, w % 2
    if not (pad_h or pad_w):
        return frames
    # [T, H, W, 3] -> [T, H + pad_h, W + pad_w, 3]
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _encode_to_file(path: Path, frames: np.ndarray, fps: float, crf: int) -> None:
    """Write an H.264 yuv420p faststart MP4 to ``path`` (the mp4 format is forced)."""
    _check_frames(frames, "write_video")
    if not (isinstance(fps, (int, float, np.integer, np.floating)) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not (isinstance(crf, (int, np.integer)) and 0 <= crf <= 51):
        raise ValueError(f"crf must be an integer in [0, 51], got {crf!r}")
    frames = _pad_to_even(frames)
    _, height, width, _ = frames.shape  # [T, H, W, 3]
    rate = Fraction(float(fps)).limit_denominator(1001)
    # threads=1 (both for libavcodec and x264) makes the bitstream independent of the machine. mbtree=0:
    # x264's macroblock-tree rate control reads uninitialized memory on small frames (<= 64 px here), so
    # the same frames gave different I-frames (decoded differences up to 17/255) from call to call.
    options = {"crf": str(int(crf)), "preset": "medium", "threads": "1", "x264-params": "threads=1:mbtree=0"}
    mux_options = {"movflags": "+faststart"}  # moov atom first: browsers can start playing early
    with av.open(os.fspath(path), mode="w", format="mp4", options=mux_options) as out:
        stream = out.add_stream("libx264", rate=rate, options=options)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for rgb in frames:  # each [H, W, 3]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))  # flush delayed frames


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, *, crf: int = 18) -> Path:
    """Encode uint8 ``[T, H, W, 3]`` RGB frames to an H.264 yuv420p MP4 (faststart) at ``path``.

    Odd heights/widths are padded to even by replicating the last row/column (yuv420p needs even
    sizes), so the stored size may be one pixel larger. Encoding is deterministic (single-threaded
    x264). The file is written to a temporary name and renamed, so readers never see a partial mp4.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: that creates the file 0600; let the muxer create it with the usual umask mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _encode_to_file(tmp, frames, fps, crf)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def encode_video(frames: np.ndarray, fps: float, crf: int = 18) -> bytes:
    """Encode frames like write_video and return the MP4 bytes.

    The faststart pass rewrites the file, so this goes through a temporary file.
    """
    with tempfile.TemporaryDirectory(prefix="fdreamer-encode-") as tmp_dir:
        path = Path(tmp_dir) / "video.mp4"
        _encode_to_file(path, frames, fps, crf)
        return path.read_bytes()
