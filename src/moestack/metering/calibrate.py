"""Measure an engine's cost per token kind: replica-seconds per uncached prompt token (prefill)
and per generated token (decode), with the engine saturated by a batch of concurrent requests.

These are the figures ``cost.engine_token_cost`` takes; the cost model values a request's work
with them. Run ``benchmarks/engine_token_cost.py`` on the target accelerator to get them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from moestack.engine.protocol import Engine, EngineRequest


@dataclass(frozen=True)
class TokenCostMeasurement:
    prefill_s_per_token: float
    decode_s_per_token: float
    prefill_tokens: int
    decode_tokens: int
    prefill_wall_s: float
    decode_wall_s: float


async def _run_batch(engine: Engine, prompt_ids: list[int], max_tokens: int,
                     concurrency: int) -> tuple[float, int, int]:
    """Wall seconds, uncached prompt tokens and completion tokens of one concurrent batch."""
    async def one(i: int) -> tuple[int, int]:
        # A distinct first token per request keeps prefix caches from serving the prompt.
        ids = [i + 1, *prompt_ids[1:]]
        body = {"model": engine.info.model, "prompt": ids, "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True}
        req = EngineRequest(f"calibrate-{uuid.uuid4().hex}", "/v1/completions",
                            json.dumps(body).encode())
        last = None
        async for chunk in engine.serve(req):
            last = chunk
        if last is None or last.status not in (None, 200):
            raise RuntimeError(f"calibration request failed: {last.data[:300]!r}")
        u = last.usage
        return u.prompt_tokens - u.cached_prompt_tokens, u.completion_tokens

    started = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return time.perf_counter() - started, sum(p for p, _ in done), sum(c for _, c in done)


async def measure_token_cost(engine: Engine, *, prompt_tokens: int = 256, decode_tokens: int = 64,
                             concurrency: int = 16, warmup: bool = True) -> TokenCostMeasurement:
    """Prefill: ``concurrency`` requests of ``prompt_tokens`` with one output token each;
    decode: the same number of 8-token prompts generating ``decode_tokens`` each. The decode
    figure has the (measured) prefill of its short prompts taken out."""
    long_prompt = [(7 * i) % 200 + 10 for i in range(prompt_tokens)]
    short_prompt = long_prompt[:8]
    if warmup:
        await _run_batch(engine, short_prompt, 2, 2)
    p_wall, p_tokens, p_out = await _run_batch(engine, long_prompt, 1, concurrency)
    prefill = p_wall / max(1, p_tokens + p_out)
    d_wall, d_prompt, d_tokens = await _run_batch(engine, short_prompt, decode_tokens,
                                                  concurrency)
    decode = max(d_wall - d_prompt * prefill, 0.0) / max(1, d_tokens)
    return TokenCostMeasurement(prefill, decode, p_tokens, d_tokens, p_wall, d_wall)
