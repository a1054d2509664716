"""Render every failure as an OpenAI-shaped JSON error with the right status.

On the Anthropic routes (``/v1/messages``) the same errors take the Anthropic shape
(``{"type": "error", "error": {"type", "message"}}``), so both official SDKs raise their own
typed exceptions.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moestack.errors import MoestackError

log = logging.getLogger(__name__)

_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error"}


def error_json(status: int, message: str, error_type: str, code: str | None = None,
               param: str | None = None, headers: dict[str, str] | None = None,
               anthropic: bool = False) -> JSONResponse:
    body = anthropic_shape(status, message) if anthropic else {
        "error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error"}

ANTHROPIC_PREFIX = "/v1/messages"


def anthropic_shape(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"),
                                       "message": message}}


def moestack_error_response(exc: MoestackError, anthropic: bool = False) -> JSONResponse:
    body = anthropic_shape(exc.status_code, exc.message) if anthropic else exc.to_openai()
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers())


def sse_error_event(exc: MoestackError, anthropic: bool = False) -> bytes:
    """A stream's last event when it fails after it started."""
    if anthropic:
        return b"event: error\ndata: %s\n\n" % json.dumps(
            anthropic_shape(exc.status_code, exc.message)).encode()
    return b"data: %s\n\n" % json.dumps(exc.to_openai()).encode()


def _anthropic(request: Request) -> bool:
    return request.url.path.startswith(ANTHROPIC_PREFIX)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if tuple(first.get("loc", ())) == ("body",):
        return "The request body must be a JSON object.", None
    param = ".".join(loc) or None
    where = f"`{param}`: " if param else ""
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"Invalid request: {where}{first.get('msg', 'invalid value')}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MoestackError)
    async def _moestack(request: Request, exc: MoestackError):
        return moestack_error_response(exc, _anthropic(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_json(400, message, "invalid_request_error", code="invalid_request",
                          param=param, anthropic=_anthropic(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_json(exc.status_code, str(exc.detail),
                          _HTTP_TYPES.get(exc.status_code, "invalid_request_error"),
                          headers=getattr(exc, "headers", None), anthropic=_anthropic(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Last resort: a bug must still answer in the API's shape; the traceback goes to the log.
        log.exception("unhandled error", exc_info=exc)
        return error_json(500, "Internal server error.", "server_error", code="internal_error",
                          anthropic=_anthropic(request))
