"""The API's errors: :class:`ApiError` and the one JSON shape every error is answered with,
``{"error": str, "error_type": str}``, plus the FastAPI handlers that give every failure that shape.

No Ray here: :mod:`serving.request_parsing` raises these and is tested without a cluster.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")
MAX_NAME_CHARS = 64  # a client's field name quoted in a message is cut to this


class ApiError(Exception):
    """An error answered as ``{"error", "error_type"}`` with ``status`` (and ``headers``)."""

    def __init__(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message, self.headers = status, error_type, message, headers or {}


def error_response(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def field_name(name: object) -> str:
    """A client-sent field name as it appears in messages (cut: names are the client's, of any length)."""
    text = str(name)
    return text if len(text) <= MAX_NAME_CHARS else text[:MAX_NAME_CHARS] + "…"


def describe_errors(errors: list[dict[str, Any]]) -> str:
    """pydantic / FastAPI validation errors as ``"field: message; ..."`` (never the offending values)."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(field_name(x) for x in e.get("loc", ()) if x != "body") or "body"
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Every error answered by ``app`` gets the ``{"error", "error_type"}`` shape; a catch-all answers
    500 ``internal_error`` (the traceback goes to the replica log, never to the client)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error_type, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "validation_error", describe_errors(exc.errors()))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")


__all__ = ["ApiError", "describe_errors", "error_response", "field_name", "install_error_handlers"]
