"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Route code raises APIError (or lets the engine's own errors through); the handlers installed
by `install_error_handlers` turn every failure into that shape. Nothing from a traceback ever
reaches a response: an unexpected exception is logged and answered with a bare 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tr_engine.errors import (
    EngineDead,
    InvalidParameter,
    QueueFull,
    RequestFailed,
    RequestTooLong,
)

log = logging.getLogger("tr_engine.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": _utf8(message), "type": kind,
                      "param": None if param is None else _utf8(param), "code": code}}


def _utf8(text: str) -> str:
    """`text` with anything UTF-8 cannot carry (a lone surrogate a message echoes) replaced,
    so that the error itself can always be sent."""
    return text.encode("utf-8", "replace").decode("utf-8")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code),
                        status_code=err.status, headers=err.headers)


def as_api_error(exc: Exception, retry_after_s: int = 1) -> APIError | None:
    """The APIError for an exception the engine or SamplingParams raise, else None."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestTooLong):
        return APIError(400, str(exc), getattr(exc, "param", None), "context_length_exceeded")
    if isinstance(exc, InvalidParameter):
        return APIError(400, str(exc), exc.param, "invalid_value")
    if isinstance(exc, QueueFull):
        return APIError(503, str(exc) or "The request queue is full; retry later.", None,
                        "queue_full", {"Retry-After": str(retry_after_s)})
    if isinstance(exc, EngineDead):
        return APIError(503, "The engine is not running.", None, "engine_dead")
    if isinstance(exc, RequestFailed):
        return APIError(500, f"The engine could not serve this request: {exc}", None,
                        "request_failed")
    return None


def _describe(errors: list[dict]) -> tuple[str, str | None]:
    """A one-line message and the offending parameter from pydantic's error list."""
    if not errors:
        return "Invalid request body.", None
    if errors[0].get("type") == "json_invalid":
        detail = (errors[0].get("ctx") or {}).get("error", "")
        return f"The request body is not valid JSON: {detail}".rstrip(": "), None
    # A value that matches no member of a union gets one error per member; the deepest one
    # ("prompt.0: must be >= 0" rather than "prompt: must be a string") says the most.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    # Drop "body" and the union-member tags pydantic adds ("str", "list[int]", ...).
    path = [str(p) for p in first.get("loc", ())
            if p != "body" and not any(c in str(p) for c in "[]")
            and p not in ("str", "int", "float", "bool", "list", "dict")]
    msg = first.get("msg", "invalid value")
    if not path:
        if first.get("type") == "missing":
            return "The request body is missing.", None
        return f"Invalid request body: {msg}", None
    param = ".".join(path)
    return f"Invalid value for '{param}': {msg}", param


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe(list(exc.errors()))
        return error_response(APIError(400, message, param, "invalid_value"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if status == 404:
            message = f"Not found: {request.url.path}"
        elif status == 400 and message == "There was an error parsing the body":
            message = "The request body could not be read as JSON in UTF-8."
        return error_response(APIError(status, message, headers=exc.headers))

    async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(as_api_error(exc, retry_after_s))

    for cls in (RequestTooLong, InvalidParameter, QueueFull, EngineDead, RequestFailed):
        app.add_exception_handler(cls, _engine_error)

    # Starlette answers with this handler and then re-raises, so uvicorn logs it too.
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return error_response(APIError(500, "Internal server error.", code="internal_error"))
