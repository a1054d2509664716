"""HTTP route of POST /v1/completions: translation between HTTP and CompletionServing only."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moestack.api.chat.routes import ERRORS
from moestack.api.completions.protocol import Completion, CompletionRequest
from moestack.api.disconnect import cancel_on_disconnect

router = APIRouter()


@router.post("/v1/completions", response_model=Completion, responses=ERRORS)
async def create_completion(body: CompletionRequest, request: Request):
    work = request.app.state.completions.create(body)
    result = await (work if body.stream else cancel_on_disconnect(request, work))
    if isinstance(result, Response):  # the client left before the response was ready
        return result
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream")
    return JSONResponse(result.model_dump(exclude_none=True))
