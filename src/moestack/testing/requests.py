"""Engine requests and answers for tests that call engines or backends directly."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from moestack.api.endpoints import endpoint_at, read_body
from moestack.engine.protocol import EngineChunk, EngineRequest


def engine_request(body: dict[str, Any], path: str = "/v1/completions",
                   request_id: str | None = None, tenant: str | None = None,
                   max_model_len: int = 256) -> EngineRequest:
    """``body`` as the gateway would send it (``model`` defaults to ``fake-moe``)."""
    raw = json.dumps({"model": "fake-moe", **body}).encode()
    endpoint = endpoint_at(path)
    facts, _ = read_body(endpoint, raw)
    return EngineRequest(request_id or uuid.uuid4().hex, path, raw, tenant=tenant,
                         prompt_text=facts.prompt_text,
                         estimated_tokens=facts.token_bound(max_model_len,
                                                            endpoint.generates).total)


def completion(prompt: str, max_tokens: int, **kwargs: Any) -> EngineRequest:
    """A ``/v1/completions`` request of ``prompt``."""
    return engine_request({"prompt": prompt, "max_tokens": max_tokens}, **kwargs)


def answer_text(chunks: Sequence[EngineChunk]) -> str:
    """The text of choice 0 of a whole (non-streamed) completion or chat answer."""
    choice = json.loads(b"".join(c.data for c in chunks))["choices"][0]
    return choice.get("text") if "text" in choice else choice["message"]["content"]
