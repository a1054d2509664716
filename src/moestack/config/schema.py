"""The one configuration tree of moestack.

The CLI, the Ray Serve app and the Helm chart all read this schema; every field says what it is
for. Paths given relative to a YAML file are resolved against that file's folder by the loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moestack.engine.tiny import TinyArch


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelSource(_Strict):
    """A random-weight tiny MoE checkpoint built locally on first use and cached."""

    arch: TinyArch = Field(description="Architecture to imitate: deepseek-v3 or mixtral.")
    seed: int = Field(0, ge=0, description="Seed for weights; the same seed gives the same files.")


class ParallelismConfig(_Strict):
    """How one replica of a model is sharded over accelerators (passed to vLLM)."""

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


class FakeEngineSettings(_Strict):
    """Timing of the in-package fake engine (``engine: fake``), for tests and gateway benchmarks."""

    ttft_s: float = Field(0.0, ge=0, description="Delay before the first token, in seconds.")
    token_interval_s: float = Field(0.0, ge=0, description="Delay between output tokens, seconds.")


class ModelConfig(_Strict):
    """One served model: where its weights are, how it is sharded, and its engine."""

    name: str = Field(description="Model id clients put in the `model` field.",
                      pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    path: Path | None = Field(None, description="Local Hugging Face checkpoint folder.")
    tiny: TinyModelSource | None = Field(None, description="Build a tiny random-weight checkpoint "
                                         "instead of reading `path`.")
    architecture: str | None = Field(None, description="Expected `architectures[0]` of the "
                                     "checkpoint (e.g. DeepseekV3ForCausalLM); checked at start.")
    engine: Literal["vllm", "fake"] = Field("vllm", description="Engine implementation.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight and activation dtype (`auto` reads the checkpoint).")
    max_model_len: int = Field(2048, ge=16, description="Context length in tokens (prompt + "
                               "completion).")
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig,
                                           description="Sharding of one replica.")
    accelerator: Literal["cpu", "gpu"] = Field("cpu", description="What one parallel worker "
                                               "holds: a CPU slot or a GPU.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per parallel worker in "
                                   "the replica's Ray placement group.")
    num_replicas: int = Field(1, ge=1, description="Engine replicas of this model.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica takes at once "
                                      "before Ray Serve queues more.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of the "
                                "replica process (e.g. VLLM_CPU_KVCACHE_SPACE).")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Escape hatch: extra "
                                        "vLLM AsyncEngineArgs, applied last.")
    fake: FakeEngineSettings = Field(default_factory=FakeEngineSettings,
                                     description="Fake engine timing (engine: fake only).")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.engine == "vllm" and (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of `path` (a checkpoint folder) or `tiny`")
        return self


class GatewayConfig(_Strict):
    """The OpenAI-compatible HTTP front door (Ray Serve proxy + Gateway deployment)."""

    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port the HTTP proxy binds.")
    num_replicas: int = Field(1, ge=1, description="Gateway replicas.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted; "
                                "larger bodies get 413.")
    first_token_timeout_s: float = Field(300.0, gt=0, description="Longest wait for an engine's "
                                         "first output before the request fails with 503.")


class StorageConfig(_Strict):
    """Where tenants, keys and the usage ledger live."""

    url: str = Field("sqlite:///moestack.db", description="SQLAlchemy URL: SQLite file "
                     "(embedded default) or postgresql+psycopg2://... in production.")


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


class MoestackConfig(_Strict):
    """Root of the configuration."""

    models: list[ModelConfig] = Field(min_length=1, description="Models to serve.")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="HTTP gateway.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Database.")
    pricing_file: Path | None = Field(None, description="Pricing catalog YAML.")
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig,
                                         description="Metrics.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster.")
    cache_dir: Path | None = Field(None, description="Where built tiny models are cached "
                                   "(default: $MOESTACK_CACHE_DIR or ~/.cache/moestack).")

    @model_validator(mode="after")
    def _unique_model_names(self) -> MoestackConfig:
        names = [m.name for m in self.models]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)
