"""Render every failure as an OpenAI-shaped JSON error with the right status."""

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
               param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def moestack_error_response(exc: MoestackError) -> JSONResponse:
    return JSONResponse(exc.to_openai(), status_code=exc.status_code, headers=exc.headers())


def sse_error_event(exc: MoestackError) -> str:
    return f"data: {json.dumps(exc.to_openai())}\n\n"


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
    async def _moestack(_: Request, exc: MoestackError):
        return moestack_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_json(400, message, "invalid_request_error", code="invalid_request",
                          param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_json(exc.status_code, str(exc.detail),
                          _HTTP_TYPES.get(exc.status_code, "invalid_request_error"),
                          headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        # Last resort: a bug must still answer in the OpenAI shape; the traceback goes to the log.
        log.exception("unhandled error", exc_info=exc)
        return error_json(500, "Internal server error.", "server_error", code="internal_error")
