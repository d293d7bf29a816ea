"""The HTTP ingress: a FastAPI app served by the ``Api`` deployment (``@serve.ingress``).

Validation happens here, before a job exists: body size, content type, JSON / multipart parsing,
field names and types (pydantic, strict, unknown fields rejected), the image (base64 or an uploaded
file; size in bytes, dimensions read from the header before decoding, decodability), then the limits
(the smaller of the config's ``limits`` and the checkpoint's :attr:`VideoPipeline.limits`). Every
error is ``{"error": str, "error_type": str}`` with a 4xx status; nothing raised by a request reaches
the client as a traceback or takes the replica down (a catch-all handler answers 500 with the same shape).
"""


import asyncio
import base64
import binascii
import email.parser
import email.policy
import hmac
import io
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.jobs import TERMINAL, JobStore, new_job_id, valid_job_id
from serving.settings import Settings

logger = logging.getLogger("ray.serve")
STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
OPEN_PATHS = ("/healthz", "/readyz", "/", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")


class ApiError(Exception):
    """An error answered as ``{"error", "error_type"}`` with ``status`` (and ``headers``)."""

    def __init__(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message, self.headers = status, error_type, message, headers or {}


class VideoCreate(BaseModel):
    """``POST /v1/videos``: the diffusers / Hugging Face parameter names. ``image`` (base64 PNG/JPEG/WebP)
    makes it image-to-video; without it the server runs text-to-image first (text-to-video)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Annotated[str, Field(description="text prompt (the motion caption for image-to-video)")]
    negative_prompt: str = ""
    image: Annotated[str | None, Field(description="base64 image (optionally a data: URL)")] = None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    guidance_rescale: float = 0.0
    sampler: Literal["ddim", "euler"] = "ddim"
    seed: int | None = None


FORM_TYPES = {"num_frames": int, "height": int, "width": int, "num_inference_steps": int, "seed": int,
              "fps": float, "guidance_scale": float, "image_guidance_scale": float, "guidance_rescale": float}


def _err(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


app = FastAPI(
    title="Factorized-Dreamer video API",
    version="1.0",
    description="Text-to-video and image-to-video jobs. Send `Authorization: Bearer <key>` when the "
                "server has a key (FDREAMER_API_KEY). See serving/README.md.",
)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _err(exc.status, exc.error_type, exc.message, exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _err(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _err(422, "validation_error", _describe_errors(exc.errors()))


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return _err(500, "internal_error", "internal server error")


def _describe_errors(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------- parsing


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise ApiError(413, "body_too_large", f"request body is larger than {limit} bytes")
        except ValueError:
            raise ApiError(400, "bad_request", "invalid Content-Length") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, Any], bytes | None]:
    """Form fields (strings converted to the field's type) and the ``image`` file's bytes (stdlib parser)."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
    if not msg.is_multipart():
        raise ApiError(400, "bad_request", "malformed multipart body")
    fields: dict[str, Any] = {}
    image = None
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise ApiError(400, "bad_request", "multipart part without a name")
        data = part.get_payload(decode=True) or b""
        if name == "image":
            image = data if data else None
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, "validation_error", f"{name}: not UTF-8 text") from None
        if name in FORM_TYPES and text != "":
            try:
                fields[name] = FORM_TYPES[name](text)
            except ValueError:
                raise ApiError(422, "validation_error",
                               f"{name}: expected {FORM_TYPES[name].__name__}, got {text!r}") from None
        elif name in FORM_TYPES:
            continue  # an empty optional form field: the default
        else:
            fields[name] = text
    return fields, image


def _decode_base64(s: str) -> bytes:
    if s.startswith("data:"):
        _, _, s = s.partition(",")
    try:
        return base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_image", "image: not valid base64") from None


def decode_image(data: bytes, lim: Settings) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]``; checks bytes and header dimensions before decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > lim.limits.max_image_bytes:
        raise ApiError(413, "image_too_large", f"image is larger than {lim.limits.max_image_bytes} bytes")
    if not data:
        raise ApiError(422, "invalid_image", "image: empty")
    side = lim.limits.max_image_side
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


def _overloaded(rec: dict[str, Any]) -> bool:
    return (rec.get("error") or {}).get("error_type") == "overloaded"


# ---------------------------------------------------------------------------------- the deployment


@serve.deployment(
    name="Api",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=128,
    max_queued_requests=256,
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress(app)
class Api:
    def __init__(self, video, settings: dict[str, Any]) -> None:
        self.video = video
        self.settings = Settings.from_dict(settings)
        self.store = JobStore(self.settings.store, self.settings.s3_endpoint)
        self.api_key = os.environ.get(self.settings.api_key_env) or None
        if self.api_key is None:
            logger.warning("%s is not set: the API accepts requests WITHOUT authentication",
                           self.settings.api_key_env)
        self._info: dict[str, Any] | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self.jobs_total = metrics.Counter("fdreamer_api_jobs_total", tag_keys=("status",),
                                          description="Jobs seen by the ingress: queued on submit, rejected, "
                                                      "and their final status.")
        self.queue_depth = metrics.Gauge("fdreamer_queue_depth",
                                         description="Jobs queued or running, submitted through this ingress replica.")
        self.queue_depth.set(0)

    # -------------------------------------------------------------- helpers

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer <key>)",
                           {"WWW-Authenticate": "Bearer"})

    async def _model_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.video.info.remote()
        return self._info

    def _limits(self, info: dict[str, Any]) -> dict[str, Any]:
        m, c = info["limits"], self.settings.limits
        return {"max_num_frames": min(m["max_num_frames"], c.max_num_frames),
                "max_height": min(m["max_height"], c.max_height), "max_width": min(m["max_width"], c.max_width),
                "max_num_inference_steps": min(m["max_num_inference_steps"], c.max_num_inference_steps),
                "max_guidance_scale": c.max_guidance_scale, "max_prompt_chars": c.max_prompt_chars,
                "size_multiple_i2v": m["size_multiple_i2v"], "size_multiple_t2v": m["size_multiple_t2v"],
                "supports_image": m["supports_image"], "samplers": m["samplers"],
                "max_body_bytes": c.max_body_bytes, "max_image_bytes": c.max_image_bytes,
                "max_image_side": c.max_image_side}

    def _check(self, req: VideoCreate, has_image: bool, info: dict[str, Any]) -> dict[str, Any]:
        """Resolved parameters, or ApiError(422) naming the field."""
        from fdreamer.inference.request import VideoRequest

        lim, d = self._limits(info), info["defaults"]
        if len(req.prompt) > lim["max_prompt_chars"] or len(req.negative_prompt) > lim["max_prompt_chars"]:
            raise ApiError(422, "limit_exceeded", f"prompt: at most {lim['max_prompt_chars']} characters")
        if has_image and not lim["supports_image"]:
            raise ApiError(422, "invalid_value", "image: this checkpoint is text-to-video only")
        p = {"prompt": req.prompt, "negative_prompt": req.negative_prompt,
             "num_frames": req.num_frames if req.num_frames is not None else d["num_frames"],
             "height": req.height if req.height is not None else d["height"],
             "width": req.width if req.width is not None else d["width"],
             "fps": float(req.fps) if req.fps is not None else float(d["fps"]),
             "num_inference_steps": req.num_inference_steps, "guidance_scale": float(req.guidance_scale),
             "image_guidance_scale": float(req.image_guidance_scale),
             "guidance_rescale": float(req.guidance_rescale), "sampler": req.sampler}
        try:  # the model-independent checks, with diffusers-style messages
            VideoRequest(**{k: v for k, v in p.items()}, seed=req.seed)
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

    async def _parse(self, request: Request) -> tuple[VideoCreate, bytes | None]:
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";")[0].strip().lower()
        if media not in ("application/json", "multipart/form-data"):
            raise ApiError(415, "unsupported_media_type",
                           "send application/json or multipart/form-data (with an `image` file)")
        body = await _read_body(request, self.settings.limits.max_body_bytes)
        image: bytes | None = None
        if media == "application/json":
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise ApiError(400, "invalid_json", "body is not valid JSON") from None
            if not isinstance(data, dict):
                raise ApiError(422, "validation_error", "body: has to be a JSON object")
            strict = True
        else:
            data, image = _parse_multipart(ctype, body)
            if "image" in data:  # a text field named image
                raise ApiError(422, "validation_error", "image: upload it as a file part")
            strict = False
        try:
            req = VideoCreate.model_validate(data, strict=strict)
        except ValidationError as err:
            raise ApiError(422, "validation_error", _describe_errors(err.errors())) from None
        if req.image is not None:
            image = _decode_base64(req.image)
        return req, image

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}

    async def _run(self, job: dict[str, Any], response) -> dict[str, Any]:
        """Await the model's answer; whatever happens, the job gets a final record."""
        try:
            return await response
        except BackPressureError:  # the model's queue is full (its max_queued_requests)
            return self.store.update(job["id"], status="failed", finished_at=time.time(),
                                     error={"error": "server overloaded, retry later", "error_type": "overloaded"}
                                     ) or job
        except Exception as err:  # noqa: BLE001 - e.g. the model replica died mid-job
            logger.warning("job %s: model call failed: %s", job["id"], type(err).__name__)
            rec = self.store.get(job["id"]) or job
            if rec.get("status") not in TERMINAL:
                rec = self.store.update(job["id"], status="failed", finished_at=time.time(),
                                        error={"error": "the model deployment failed; submit the job again",
                                               "error_type": "internal_error"}) or rec
            return rec
        finally:
            self._tasks.pop(job["id"], None)
            self.queue_depth.set(len(self._tasks))
            final = self.store.get(job["id"]) or {}
            if final.get("status") in TERMINAL:
                self.jobs_total.inc(tags={"status": final["status"]})

    @staticmethod
    def _public(rec: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in rec.items() if not k.startswith("_")}
        out["content_url"] = f"/v1/videos/{rec['id']}/content" if rec.get("status") == "succeeded" else None
        return out

    # -------------------------------------------------------------- open routes

    @app.get("/healthz", tags=["ops"])
    async def healthz(self) -> dict[str, str]:
        """Liveness: the ingress answers (no auth)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz(self) -> JSONResponse:
        """Readiness: the model deployment answers and the store is reachable (no auth)."""
        try:
            info = await asyncio.wait_for(self._model_info(), timeout=10)
            await asyncio.to_thread(self.store.ping)
        except Exception as err:  # noqa: BLE001
            return _err(503, "not_ready", f"not ready: {type(err).__name__}", self._retry())
        return JSONResponse({"status": "ready", "checkpoint": info.get("checkpoint")})

    @app.get("/", include_in_schema=False)
    async def index(self) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> FileResponse:
        if name not in STATIC_FILES or not (STATIC / name).is_file():
            raise ApiError(404, "not_found", "no such file")
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])

    # -------------------------------------------------------------- the API

    @app.get("/v1/limits", tags=["videos"])
    async def limits(self, request: Request) -> dict[str, Any]:
        """The effective request limits and the checkpoint's defaults."""
        self._auth(request)
        info = await self._model_info()
        return {"limits": self._limits(info), "defaults": info["defaults"]}

    @app.post("/v1/videos", tags=["videos"], status_code=202, openapi_extra={"requestBody": {
        "required": True, "content": {
            "application/json": {"schema": VideoCreate.model_json_schema()},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "image": {"type": "string", "format": "binary"},
                **{k: {"type": "string"} for k in VideoCreate.model_fields if k != "image"}}}}}}})
    async def create(self, request: Request, wait: bool = False) -> JSONResponse:
        """Submit a job: 202 ``{id, status}``; with ``?wait=true`` 200 and the final record."""
        self._auth(request)
        if len(self._tasks) >= self.settings.max_jobs_in_flight:
            self.jobs_total.inc(tags={"status": "rejected"})
            raise ApiError(429, "too_many_jobs", f"{len(self._tasks)} jobs queued or running; retry later",
                           self._retry())
        req, image_bytes = await self._parse(request)
        image = await asyncio.to_thread(decode_image, image_bytes, self.settings) if image_bytes is not None else None
        try:
            info = await self._model_info()
        except Exception as err:  # noqa: BLE001 - the model deployment is not up (yet)
            raise ApiError(503, "not_ready", f"the model is not ready ({type(err).__name__})", self._retry()) from None
        params = self._check(req, image is not None, info)
        job_id = new_job_id()
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        now = time.time()
        job = {"id": job_id, "status": "queued", "mode": "i2v" if image is not None else "t2v", "params": params,
               "seed": seed, "created_at": now, "started_at": None, "finished_at": None,
               "progress": {"step": 0, "total": params["num_inference_steps"], "phase": "queued"},
               "timings": {}, "error": None}
        if image is not None:
            job["image_size"] = [int(image.shape[0]), int(image.shape[1])]
        await asyncio.to_thread(self.store.put, job)
        task = asyncio.ensure_future(self._run(job, self.video.generate.remote(job, image)))
        self._tasks[job_id] = task
        self.queue_depth.set(len(self._tasks))
        self.jobs_total.inc(tags={"status": "queued"})
        # Serve raises BackPressureError at once when the model's queue is full (max_queued_requests)
        done, _ = await asyncio.wait({task}, timeout=self.settings.backpressure_probe_s)
        if done and _overloaded(task.result()):
            raise ApiError(503, "overloaded", "the model deployment's queue is full; retry later", self._retry())
        if wait:
            rec = await asyncio.shield(task)
            if _overloaded(rec):
                raise ApiError(503, "overloaded", "the model deployment's queue is full; retry later", self._retry())
            return JSONResponse(self._public(rec), status_code=200)
        return JSONResponse({"id": job_id, "status": "queued", "seed": seed, "url": f"/v1/videos/{job_id}"},
                            status_code=202, headers={"Location": f"/v1/videos/{job_id}"})

    @app.get("/v1/videos", tags=["videos"])
    async def recent(self, request: Request, limit: int = 20) -> dict[str, Any]:
        """The most recent jobs, newest first (at most ``limit``, up to 100)."""
        self._auth(request)
        if not 1 <= limit <= 100:
            raise ApiError(422, "validation_error", "limit: has to be in [1, 100]")
        records = await asyncio.to_thread(self.store.recent, limit)
        return {"data": [self._public(r) for r in records]}

    def _get(self, job_id: str) -> dict[str, Any]:
        rec = self.store.get(job_id) if valid_job_id(job_id) else None
        if rec is None:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return rec

    @app.get("/v1/videos/{job_id}", tags=["videos"])
    async def status(self, request: Request, job_id: str) -> dict[str, Any]:
        """Status, progress ``{step, total, phase}``, seed, timings, error."""
        self._auth(request)
        return self._public(await asyncio.to_thread(self._get, job_id))

    @app.get("/v1/videos/{job_id}/content", tags=["videos"], response_class=Response,
             responses={200: {"content": {"video/mp4": {}}}})
    async def content(self, request: Request, job_id: str) -> Response:
        """The video (``video/mp4``) of a succeeded job; 409 while it is not done."""
        self._auth(request)
        rec = await asyncio.to_thread(self._get, job_id)
        if rec.get("status") != "succeeded":
            raise ApiError(409, "not_ready", f"job {job_id} is {rec.get('status')}")
        data = await asyncio.to_thread(self.store.get_video, job_id)
        if data is None:
            raise ApiError(404, "not_found", f"the video of job {job_id} is missing from the store")
        return Response(content=data, media_type="video/mp4",
                        headers={"Content-Disposition": f'inline; filename="{job_id}.mp4"'})

    @app.delete("/v1/videos/{job_id}", tags=["videos"], status_code=202)
    async def cancel(self, request: Request, job_id: str) -> JSONResponse:
        """Cancel: the running step callback returns False; a queued job never starts."""
        self._auth(request)
        rec = await asyncio.to_thread(self._get, job_id)
        if rec.get("status") in TERMINAL:
            return JSONResponse(self._public(rec), status_code=200)
        await asyncio.to_thread(self.store.request_cancel, job_id)
        if rec.get("status") == "queued":
            rec = await asyncio.to_thread(self.store.update, job_id, status="cancelled", finished_at=time.time()) or rec
        return JSONResponse({**self._public(rec), "cancel_requested": True}, status_code=202)
