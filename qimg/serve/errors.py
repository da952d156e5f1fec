"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, for every route.

FastAPI's 422 validation answer is replaced by HTTP 400 in this shape, and so are Starlette's HTTP errors
(404, 405, multipart parse errors) and qimg's own `InputError` (400) and `CheckpointError` (500).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qimg.errors import Cancelled, CheckpointError, InputError

log = logging.getLogger("qimg.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
         416: "invalid_request_error",
         429: "rate_limit_error"}


class SafeJSONResponse(JSONResponse):
    """JSON whose text is always UTF-8: a string UTF-8 cannot encode (a lone surrogate) is sent as its `\\u`
    escape instead of failing the response with a 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None,
                          separators=(",", ":")).encode("utf-8", "backslashreplace")


class ApiError(Exception):
    """An error answer: HTTP status, message, and OpenAI's `type` / `param` / `code` fields."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


class ClientGone(Exception):
    """The client went away before its request body arrived: nobody reads an answer (logged quietly)."""


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def error_response(err: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    merged = {**err.headers, **(headers or {})}
    if err.status >= 500 or err.status in (408, 409):
        merged.setdefault("x-should-retry", "false")  # a failed job fails again: tell OpenAI clients not to retry
    return SafeJSONResponse(err.body(), status_code=err.status, headers=merged)


def from_exception(exc: BaseException) -> ApiError:
    """The answer for an exception raised while a job ran."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):
        return ApiError(400, str(exc))
    if isinstance(exc, Cancelled):
        return ApiError(409, f"the job was cancelled ({exc})", type="cancelled", code="job_cancelled")
    if isinstance(exc, CheckpointError):
        return ApiError(500, f"model error: {exc}", type="server_error", code="model_error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error")


def _loc(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def validation_error(errors) -> ApiError:
    """HTTP 400 for pydantic / FastAPI validation errors: the first one, named by its parameter."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc(first.get("loc", ()))
    msg = str(first.get("msg", "invalid request"))
    kind = first.get("type")
    if kind == "missing" and param is None:
        message = 'the request body is empty: send a JSON object such as {"prompt": "a red circle"}'
    elif kind == "missing":
        message = f"missing required parameter: {param!r}"
    elif kind == "extra_forbidden":
        raw = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header", "form")]
        message = f"unknown parameter: {'.'.join(raw)!r}" + (" (an empty name)" if raw == [""] else "")
    elif param is None:
        message = f"the request body is not a valid JSON object: {msg}"
    else:
        message = f"invalid value for {param!r}: {msg}"
    return bad_request(message, param=param)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(ApiError(exc.status_code, message), headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        log.debug("client went away during %s %s", request.method, request.url.path)
        return error_response(ApiError(400, "the client disconnected before the request body arrived"))

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError):
        return error_response(ApiError(400, str(exc)))

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(from_exception(exc))
