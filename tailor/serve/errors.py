"""Errors as the API answers them, and the body-size limit that refuses large bodies before they reach a route.

Every error, of the native routes and of the OpenAI-compatible ones alike, has OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, so an OpenAI client raises it as it would one of OpenAI's: 401 no,
bad or revoked key, 404 unknown user, model or job, 409 a user whose state is missing or unusable, or history that
contradicts what is stored, 413 too long or too many, 422 malformed, 503 queue full. `code` is tailor's reason
(`unknown_user`, `not_personalized`, ...), `param` the request field at fault where there is one.
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

TYPES = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error", 503: "overloaded_error"}
"""OpenAI's error `type` by status; other 4xx are `invalid_request_error`, 5xx `server_error`."""


def error_type(status: int) -> str:
    return TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.param = status, code, message, headers, param

    def to_json(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": error_type(self.status), "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.to_json(), self.status, headers=self.headers)


class BodyLimit:
    """Refuse request bodies over `limit` bytes with a 413, whether they announce their length or stream it.

    A body that announces a larger length is refused unread. One sent without a length (chunked) is read here, up to
    the limit, and handed on whole; over the limit, the rest is read and dropped (up to `drain` bytes, so that a
    client still sending hears the 413 instead of a broken connection) and the 413 sent.
    """

    def __init__(self, app: ASGIApp, limit: int, drain: int = 64 << 20):
        self.app, self.limit, self.drain = app, limit, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        too_long = ApiError(413, "too_long", f"request body over {self.limit} bytes")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                await too_long.response()(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            if size > self.drain:
                break
            if size <= self.limit:
                chunks.append(chunk)
        if size > self.limit:
            await too_long.response()(scope, receive, send)
            return
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def install_error_handlers(app: FastAPI, routes: Sequence[APIRoute]) -> None:
    """Every error, FastAPI's and Starlette's own included, in the API's one shape; `routes` are the app's routes,
    which a 405 lists the allowed methods of."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        code = "invalid_user_id" if any(tuple(p["loc"][:2]) == ("path", "user_id") for p in problems) else "malformed"
        detail = "; ".join(f"{'.'.join(str(x) for x in p['loc'])}: {p['msg']}" for p in problems[:5])
        param = ".".join(str(x) for x in problems[0]["loc"][1:]) if problems else None
        return ApiError(422, code, f"malformed request: {detail}", param=param or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400:  # FastAPI's answer to a body it cannot even decode
            return ApiError(422, "malformed", f"malformed request: {error.detail} (send UTF-8 JSON)").response()
        if error.status_code == 405:  # Starlette's Allow names only the first route of the path, not all of them
            allowed = sorted({m for route in routes if route.path_regex.match(request.url.path)
                              for m in route.methods})
            return ApiError(405, "method_not_allowed", f"{request.method} not allowed here; use "
                            f"{', '.join(allowed)}", {"Allow": ", ".join(allowed)}).response()
        code = {404: "not_found"}.get(error.status_code, "http_error")
        return ApiError(error.status_code, code, str(error.detail), getattr(error, "headers", None)).response()

    @app.exception_handler(Exception)
    async def internal(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=error)
        return ApiError(500, "internal", "internal server error; the server log has the details").response()
