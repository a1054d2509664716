"""The model list the gateway answers itself (filtered to the calling tenant's models)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moestack"
    max_model_len: int | None = None
    parent: str | None = None
    """For a LoRA adapter, the base model it runs on (as vLLM lists adapters)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
