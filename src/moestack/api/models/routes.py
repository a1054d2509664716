"""GET /v1/models and GET /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter, Request

from moestack.api.protocol import ModelCard, ModelList
from moestack.errors import ModelNotFoundError

router = APIRouter()


def _card(request: Request, name: str) -> ModelCard:
    model = request.app.state.config.model(name)
    if model is None:
        raise ModelNotFoundError(f"The model `{name}` does not exist.", param="model")
    return ModelCard(id=model.name, created=request.app.state.created,
                     max_model_len=model.max_model_len)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(request, m.name) for m in request.app.state.config.models])


@router.get("/v1/models/{model:path}", response_model=ModelCard)
async def get_model(model: str, request: Request) -> ModelCard:
    return _card(request, model)
