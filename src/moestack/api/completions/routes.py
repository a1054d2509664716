"""HTTP route of POST /v1/completions: translation between HTTP and CompletionServing only."""

from __future__ import annotations

from fastapi import APIRouter, Request

from moestack.api.chat.routes import ERRORS
from moestack.api.completions.protocol import Completion, CompletionRequest
from moestack.api.disconnect import respond

router = APIRouter()


@router.post("/v1/completions", response_model=Completion, responses=ERRORS)
async def create_completion(body: CompletionRequest, request: Request):
    return await respond(request, request.app.state.completions.create(body), body.stream)
