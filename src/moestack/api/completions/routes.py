"""HTTP route of POST /v1/completions: translation between HTTP and CompletionServing only."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from moestack.api.chat.routes import ERRORS
from moestack.api.completions.protocol import Completion, CompletionRequest

router = APIRouter()


@router.post("/v1/completions", response_model=Completion, responses=ERRORS)
async def create_completion(body: CompletionRequest, request: Request):
    result = await request.app.state.completions.create(body)
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream")
    return JSONResponse(result.model_dump(exclude_none=True))
