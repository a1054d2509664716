"""GET /v1/models and GET /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from moestack.api.context import request_context
from moestack.api.models.protocol import ModelCard, ModelList
from moestack.config.schema import ModelConfig
from moestack.errors import ModelNotFoundError
from moestack.hooks import RequestContext

router = APIRouter()


def _allowed(ctx: RequestContext, name: str) -> bool:
    """With tenancy, whether the calling tenant's model list admits ``name``."""
    return ctx.principal is None or ctx.principal.allows(name)


def _card(request: Request, model: ModelConfig) -> ModelCard:
    return ModelCard(id=model.name, created=request.app.state.created,
                     max_model_len=model.max_model_len)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request,
                      ctx: RequestContext = Depends(request_context)) -> ModelList:
    return ModelList(data=[_card(request, m) for m in request.app.state.config.models
                           if _allowed(ctx, m.name)])


@router.get("/v1/models/{model:path}", response_model=ModelCard)
async def get_model(model: str, request: Request,
                    ctx: RequestContext = Depends(request_context)) -> ModelCard:
    config = request.app.state.config.model(model)
    if config is None or not _allowed(ctx, model):
        # As OpenAI does: a model the tenant may not use is indistinguishable from a missing one.
        raise ModelNotFoundError.of(model)
    return _card(request, config)
