"""``POST /v1/videos`` before a job exists: the body read within its size limit, parsed (JSON or
multipart), checked field by field, the image decoded, and the parameters resolved against the limits.

Every refusal is an :class:`~serving.errors.ApiError` (a 4xx naming the field). Nothing here imports
Ray, so all of it runs and is tested without a cluster; :mod:`serving.api` calls it from the routes.

Parsing is bounded before anything recursive sees the data: JSON goes through ``pydantic_core.from_json``
(Rust, nesting refused past :data:`MAX_JSON_DEPTH` levels, no ``NaN``/``Infinity``) rather than
:func:`json.loads` (whose recursion ends in a RecursionError a few hundred levels deep), and multipart
through the flat parser of :mod:`serving.multipart`. The image's size in bytes and its dimensions (read
from the header) are checked before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from typing import Annotated, Any, Literal

import numpy as np
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from fdreamer.inference.request import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_STEPS,
    VideoRequest,
)
from serving.errors import ApiError, describe_errors, field_name
from serving.multipart import parse_form_data
from serving.settings import Limits

MAX_JSON_DEPTH = 200  # pydantic_core's (jiter's) fixed recursion limit; a valid body is 1 level deep
MEDIA_TYPES = ("application/json", "multipart/form-data")


class VideoCreate(BaseModel):
    """``POST /v1/videos``: the diffusers / Hugging Face parameter names. ``image`` (base64 PNG/JPEG/WebP)
    makes it image-to-video; without it the server runs text-to-image first (text-to-video)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Annotated[str, Field(description="text prompt (the motion caption for image-to-video)")]
    negative_prompt: str = ""
    motion_prompt: Annotated[str | None, Field(description="text for the temporal layers' T5 (the motion "
                                                           "phrase); default: prompt")] = None
    image: Annotated[str | None, Field(description="base64 image (optionally a data: URL)")] = None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE_SCALE
    guidance_rescale: float = 0.0
    sampler: Literal["ddim", "euler"] = "ddim"
    seed: int | None = None


#: multipart text fields converted to these types (the others stay strings)
FORM_TYPES = {"num_frames": int, "height": int, "width": int, "num_inference_steps": int, "seed": int,
              "fps": float, "guidance_scale": float, "image_guidance_scale": float, "guidance_rescale": float}
SAMPLING_DEFAULTS = {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE_SCALE,
                     "image_guidance_scale": DEFAULT_IMAGE_GUIDANCE_SCALE, "guidance_rescale": 0.0,
                     "sampler": "ddim"}


# ---------------------------------------------------------------------------------- the body


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to be longer than ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_large = int(length) > limit
        except ValueError:
            raise ApiError(400, "bad_request", "invalid Content-Length") from None
        if too_large:
            raise ApiError(413, "body_too_large", f"request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(content_type: str) -> str:
    """``application/json`` or ``multipart/form-data``, else 415."""
    media = content_type.split(";")[0].strip().lower()
    if media not in MEDIA_TYPES:
        raise ApiError(415, "unsupported_media_type",
                       "send application/json or multipart/form-data (with an `image` file)")
    return media


def parse_json(body: bytes) -> dict[str, Any]:
    """The JSON object of ``body`` (UTF-8). 400 ``invalid_json`` for what is not JSON, including nesting
    deeper than :data:`MAX_JSON_DEPTH` (naming the top-level field it is in) and ``NaN``/``Infinity``."""
    body = body.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
    try:
        data = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as err:
        message = str(err)
        if "recursion limit" in message:
            raise ApiError(400, "invalid_json", f"{_deep_field(body, message)}: JSON nested deeper than "
                                                f"{MAX_JSON_DEPTH} levels") from None
        raise ApiError(400, "invalid_json", f"body is not valid JSON ({message})") from None
    if not isinstance(data, dict):
        raise ApiError(422, "validation_error", "body: has to be a JSON object")
    return data


def _deep_field(body: bytes, message: str) -> str:
    """The top-level field that holds the too-deep value, from the parser's ``line L column C``: the
    body up to there parses (as a partial document) within the limit, its last key is the field."""
    m = re.search(r"line (\d+) column (\d+)", message)
    if m is None:
        return "body"
    start = 0
    for _ in range(int(m[1]) - 1):
        start = body.find(b"\n", start) + 1
    try:
        head = pydantic_core.from_json(body[: start + int(m[2]) - 1], allow_partial=True)
    except ValueError:
        return "body"
    return field_name(list(head)[-1]) if isinstance(head, dict) and head else "body"


def form_fields(parts) -> tuple[dict[str, Any], bytes | None]:
    """Multipart parts -> (fields converted to :data:`FORM_TYPES`, the ``image`` file's bytes or None).
    Each field at most once; ``image`` has to be a non-empty file part, the others text."""
    fields: dict[str, Any] = {}
    image: bytes | None = None
    seen: set[str] = set()
    for part in parts:
        name = field_name(part.name)
        if part.name in seen:
            raise ApiError(422, "validation_error", f"{name}: given more than once")
        seen.add(part.name)
        if part.name == "image":
            if part.filename is None:
                raise ApiError(422, "invalid_image", "image: upload it as a file part (with a filename)")
            if not part.data:
                raise ApiError(422, "invalid_image", "image: the uploaded file is empty")
            image = part.data
            continue
        if part.filename is not None:
            raise ApiError(422, "validation_error", f"{name}: a file part; only `image` is a file")
        try:
            text = part.data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, "validation_error", f"{name}: not UTF-8 text") from None
        kind = FORM_TYPES.get(part.name)
        if kind is None:
            fields[part.name] = text
        elif text.strip() != "":  # an empty optional form field: the default
            fields[part.name] = _convert(name, text, kind)
    return fields, image


def _convert(name: str, text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise ApiError(422, "validation_error", f"{name}: expected {kind.__name__}, got {field_name(text)!r}") from None
    if kind is float and not math.isfinite(value):
        raise ApiError(422, "validation_error", f"{name}: has to be a finite number, got {field_name(text)!r}")
    return value


def parse_body(content_type: str, body: bytes) -> tuple[VideoCreate, bytes | None]:
    """The validated request and the image's encoded bytes (base64-decoded or the uploaded file)."""
    if media_type(content_type) == "application/json":
        data, image, strict = parse_json(body), None, True
    else:
        data, image = form_fields(parse_form_data(content_type, body))
        strict = False  # the form's strings were converted above
    try:
        req = VideoCreate.model_validate(data, strict=strict)
    except ValidationError as err:
        raise ApiError(422, "validation_error", describe_errors(err.errors())) from None
    if req.image is not None:
        image = decode_base64(req.image)
    return req, image


# ---------------------------------------------------------------------------------- the image


def decode_base64(s: str) -> bytes:
    if s.startswith("data:"):
        _, _, s = s.partition(",")
    try:
        return base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_image", "image: not valid base64") from None


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]``; checks bytes and header dimensions before decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise ApiError(413, "image_too_large", f"image is larger than {limits.max_image_bytes} bytes")
    if not data:
        raise ApiError(422, "invalid_image", "image: empty")
    side = limits.max_image_side
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size  # from the header, nothing decoded yet
            if max(w, h) > side or w < 1 or h < 1:
                raise ApiError(422, "image_too_large", f"image is {w}x{h}; sides have to be at most {side} pixels")
            im.draft("RGB", (w, h))
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ApiError(422, "invalid_image", f"image: cannot decode ({type(err).__name__})") from None
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------------------------- limits and parameters


def effective_limits(model: dict[str, Any], config: Limits) -> dict[str, Any]:
    """The smaller of the checkpoint's limits (``VideoPipeline.limits``) and the config's."""
    return {"max_num_frames": min(model["max_num_frames"], config.max_num_frames),
            "max_height": min(model["max_height"], config.max_height),
            "max_width": min(model["max_width"], config.max_width),
            "max_num_inference_steps": min(model["max_num_inference_steps"], config.max_num_inference_steps),
            "max_guidance_scale": config.max_guidance_scale, "max_prompt_chars": config.max_prompt_chars,
            "size_multiple_i2v": model["size_multiple_i2v"], "size_multiple_t2v": model["size_multiple_t2v"],
            "supports_image": model["supports_image"], "samplers": model["samplers"],
            "max_body_bytes": config.max_body_bytes, "max_image_bytes": config.max_image_bytes,
            "max_image_side": config.max_image_side}


def resolve_params(req: VideoCreate, has_image: bool, lim: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The job's parameters (the checkpoint's ``defaults`` where the request leaves them out), or
    ApiError(422) naming the field. ``lim``: :func:`effective_limits`."""
    if max(len(req.prompt), len(req.negative_prompt), len(req.motion_prompt or "")) > lim["max_prompt_chars"]:
        raise ApiError(422, "limit_exceeded", f"prompt: at most {lim['max_prompt_chars']} characters")
    if has_image and not lim["supports_image"]:
        raise ApiError(422, "invalid_value", "image: this checkpoint is text-to-video only")
    d = defaults
    p = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "motion_prompt": req.motion_prompt,
         "num_frames": req.num_frames if req.num_frames is not None else d["num_frames"],
         "height": req.height if req.height is not None else d["height"],
         "width": req.width if req.width is not None else d["width"],
         "fps": float(req.fps) if req.fps is not None else float(d["fps"]),
         "num_inference_steps": req.num_inference_steps, "guidance_scale": float(req.guidance_scale),
         "image_guidance_scale": float(req.image_guidance_scale),
         "guidance_rescale": float(req.guidance_rescale), "sampler": req.sampler}
    try:  # the model-independent checks, with diffusers-style messages
        VideoRequest(**p, seed=req.seed)
    except ValueError as err:
        raise ApiError(422, "invalid_value", str(err)) from None
    checks = [("num_frames", p["num_frames"], lim["max_num_frames"]),
              ("height", p["height"], lim["max_height"]), ("width", p["width"], lim["max_width"]),
              ("num_inference_steps", p["num_inference_steps"], lim["max_num_inference_steps"]),
              ("guidance_scale", p["guidance_scale"], lim["max_guidance_scale"]),
              ("image_guidance_scale", p["image_guidance_scale"], lim["max_guidance_scale"])]
    for name, value, top in checks:
        if value > top:
            raise ApiError(422, "limit_exceeded", f"{name}: has to be at most {top} but is {value}")
    multiple = lim["size_multiple_i2v"] if has_image else lim["size_multiple_t2v"]
    for name in ("height", "width"):
        if p[name] % multiple:
            raise ApiError(422, "invalid_value", f"{name}: has to be divisible by {multiple} but is {p[name]}")
    return p


__all__ = ["FORM_TYPES", "MAX_JSON_DEPTH", "SAMPLING_DEFAULTS", "VideoCreate", "decode_base64", "decode_image",
           "effective_limits", "form_fields", "media_type", "parse_body", "parse_json", "read_body",
           "resolve_params"]
