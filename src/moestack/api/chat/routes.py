"""HTTP route of POST /v1/chat/completions: translation between HTTP and ChatServing only."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moestack.api.chat.protocol import ChatCompletion, ChatCompletionRequest
from moestack.api.disconnect import cancel_on_disconnect
from moestack.api.protocol import ErrorResponse

router = APIRouter()
ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 429, 503)}


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    work = request.app.state.chat.create(body)
    result = await (work if body.stream else cancel_on_disconnect(request, work))
    if isinstance(result, Response):  # the client left before the response was ready
        return result
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream")
    return JSONResponse(result.model_dump(exclude_none=True))
