"""GET /v1/models and GET /v1/models/{model}: the base models the caller may use, and the LoRA
adapters its tenant may use (with ``parent``, their base model)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from moestack.api.catalog import resolve_model
from moestack.api.context import request_context
from moestack.api.models.protocol import ModelCard, ModelList
from moestack.config.schema import ModelConfig
from moestack.hooks import RequestContext

router = APIRouter()


def _allowed(ctx: RequestContext, name: str) -> bool:
    """With tenancy, whether the calling tenant's model list admits ``name``."""
    return ctx.principal is None or ctx.principal.allows(name)


def _card(request: Request, model: ModelConfig) -> ModelCard:
    return ModelCard(id=model.name, created=request.app.state.created,
                     max_model_len=model.max_model_len)


def _adapter_card(request: Request, base: ModelConfig, name: str) -> ModelCard:
    return ModelCard(id=name, created=request.app.state.created,
                     max_model_len=base.max_model_len, parent=base.name)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request,
                      ctx: RequestContext = Depends(request_context)) -> ModelList:
    config = request.app.state.config
    cards = [_card(request, m) for m in config.models if _allowed(ctx, m.name)]
    if (adapters := getattr(request.app.state, "adapters", None)) is not None:
        cards += [_adapter_card(request, config.model(a.base_model), a.name)
                  for a in await adapters.visible(ctx.tenant)
                  if config.model(a.base_model) is not None and _allowed(ctx, a.base_model)]
    return ModelList(data=cards)


@router.get("/v1/models/{model:path}", response_model=ModelCard)
async def get_model(model: str, request: Request,
                    ctx: RequestContext = Depends(request_context)) -> ModelCard:
    # As OpenAI does: a model the tenant may not use is indistinguishable from a missing one.
    base, adapter = await resolve_model(request.app.state.config,
                                        getattr(request.app.state, "adapters", None),
                                        ctx.principal, model)
    return _card(request, base) if adapter is None else _adapter_card(request, base, model)
