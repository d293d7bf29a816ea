"""The HTTP ingress: the FastAPI routes served by the ``Api`` deployment (``@serve.ingress``).

``POST /v1/videos`` validates before a job exists (:mod:`serving.request_parsing`: body size, content
type, JSON / multipart, field names and types, the image, the limits), writes the job record to the
store (:mod:`serving.jobs`) and hands the job to ``VideoModel``. Every error is ``{"error", "error_type"}``
with a 4xx status (:mod:`serving.errors`); nothing raised by a request reaches the client as a traceback
or takes the replica down (a catch-all handler answers 500 with the same shape).
"""

import asyncio
import hmac
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError

from serving.errors import ApiError, error_response, install_error_handlers
from serving.jobs import TERMINAL, JobStore, new_job_id, valid_job_id
from serving.request_parsing import (
    SAMPLING_DEFAULTS,
    VideoCreate,
    decode_image,
    effective_limits,
    media_type,
    parse_body,
    read_body,
    resolve_params,
)
from serving.settings import Settings

logger = logging.getLogger("ray.serve")
STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}

app = FastAPI(
    title="Factorized-Dreamer video API",
    version="1.0",
    description="Text-to-video and image-to-video jobs. Send `Authorization: Bearer <key>` when the "
                "server has a key (FDREAMER_API_KEY). See serving/README.md.",
)
install_error_handlers(app)


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
        return effective_limits(info["limits"], self.settings.limits)

    async def _parse(self, request: Request) -> tuple[VideoCreate, bytes | None]:
        ctype = request.headers.get("content-type", "")
        media_type(ctype)  # 415 before the body is read
        body = await read_body(request, self.settings.limits.max_body_bytes)
        return await asyncio.to_thread(parse_body, ctype, body)

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
            return error_response(503, "not_ready", f"not ready: {type(err).__name__}", self._retry())
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
        return {"limits": self._limits(info), "defaults": {**SAMPLING_DEFAULTS, **info["defaults"]}}

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
        image = None
        if image_bytes is not None:
            image = await asyncio.to_thread(decode_image, image_bytes, self.settings.limits)
        try:
            info = await self._model_info()
        except Exception as err:  # noqa: BLE001 - the model deployment is not up (yet)
            raise ApiError(503, "not_ready", f"the model is not ready ({type(err).__name__})", self._retry()) from None
        params = resolve_params(req, image is not None, self._limits(info), info["defaults"])
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
