"""Errors as the API answers them, `{"error": {"code", "message"}}` with a status that says whose problem it is, and
the body-size limit that refuses large bodies before they are read.

401 no or bad key, 404 unknown user or job, 409 a user whose state is missing, stale or unusable, 413 too long or too
many, 422 malformed, 503 queue full.
"""

from __future__ import annotations

import logging
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


class BodyLimit:
    """Refuse request bodies over `limit` bytes with a 413, whether they announce their length or stream it."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        message = f"request body over {self.limit} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await error_response(413, "too_long", message)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, "too_long", message)
            return event

        await self.app(scope, counted, send)



def install_error_handlers(app: FastAPI, routes: Sequence[APIRoute]) -> None:
    """Every error, FastAPI's and Starlette's own included, in the API's one shape; `routes` are the app's routes,
    which a 405 lists the allowed methods of."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        code = "invalid_user_id" if any(tuple(p["loc"][:2]) == ("path", "user_id") for p in problems) else "malformed"
        detail = "; ".join(f"{'.'.join(str(x) for x in p['loc'])}: {p['msg']}" for p in problems[:5])
        return error_response(422, code, f"malformed request: {detail}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400:  # FastAPI's answer to a body it cannot even decode
            return error_response(422, "malformed", f"malformed request: {error.detail} (send UTF-8 JSON)")
        if error.status_code == 405:  # Starlette's Allow names only the first route of the path, not all of them
            allowed = sorted({m for route in routes if route.path_regex.match(request.url.path)
                              for m in route.methods})
            return error_response(405, "method_not_allowed",
                                  f"{request.method} not allowed here; use {', '.join(allowed)}",
                                  {"Allow": ", ".join(allowed)})
        code = {404: "not_found"}.get(error.status_code, "http_error")
        return error_response(error.status_code, code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=error)
        return error_response(500, "internal", "internal server error; the server log has the details")
