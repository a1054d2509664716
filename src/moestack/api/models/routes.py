"""GET /v1/models and GET /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter, Request

from moestack.api.protocol import ModelCard, ModelList
from moestack.errors import ModelNotFoundError

router = APIRouter()


def _visible(request: Request, name: str) -> bool:
    """Served, and (with tenancy) in the calling tenant's model list."""
    principal = getattr(request.state, "principal", None)
    return request.app.state.config.model(name) is not None and (
        principal is None or principal.allows(name))


def _card(request: Request, name: str) -> ModelCard:
    if not _visible(request, name):
        # As OpenAI does: a model the tenant may not use is indistinguishable from a missing one.
        raise ModelNotFoundError(f"The model `{name}` does not exist or you do not have access "
                                 "to it.", param="model")
    model = request.app.state.config.model(name)
    return ModelCard(id=model.name, created=request.app.state.created,
                     max_model_len=model.max_model_len)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(request, m.name) for m in request.app.state.config.models
                           if _visible(request, m.name)])


@router.get("/v1/models/{model:path}", response_model=ModelCard)
async def get_model(model: str, request: Request) -> ModelCard:
    return _card(request, model)
