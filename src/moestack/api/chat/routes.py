"""HTTP route of POST /v1/chat/completions: translation between HTTP and ChatServing only."""

from __future__ import annotations

from fastapi import APIRouter, Request

from moestack.api.chat.protocol import ChatCompletion, ChatCompletionRequest
from moestack.api.disconnect import respond
from moestack.api.protocol import ErrorResponse

router = APIRouter()
ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 429, 503)}


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    return await respond(request, request.app.state.chat.create(body), body.stream)
