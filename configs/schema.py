"""The one rayft configuration schema.

LLaMA-Factory's flat YAML keys are accepted as they are (same names, same defaults), plus rayft's
own sections (`ray:`). Every model is strict (`extra="forbid"`) and frozen: code reads settings
from here and never with an inline default of its own.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class RaySection(_Strict):
    """Where and how wide a run goes. Only this section differs between a laptop and a cluster."""

    address: str | None = Field(
        None, description="Ray address to join; unset starts a private 127.0.0.1 cluster."
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one process per rank).")
    resources_per_worker: dict[str, float] | None = Field(
        None,
        description="Resources each worker asks for, e.g. {CPU: 4, GPU: 1}; unset sizes CPU "
        "requests from the cluster so that data tasks can run beside the workers.",
    )
    storage_path: str | None = Field(
        None,
        description="Where Ray Train keeps checkpoints (local dir, NFS or s3://); unset uses "
        "`<output_dir>/ray`.",
    )
    use_gpu: bool = Field(False, description="Give each worker a GPU (NCCL instead of gloo).")
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts from the last checkpoint; -1 is unlimited."
    )
    strategy: Literal["ddp", "deepspeed", "fsdp"] | None = Field(
        None,
        description="Distributed strategy: ddp (Ray Train's DistributedDataParallel), deepspeed "
        "(ZeRO, needs deepspeed_config) or fsdp (FSDP2 fully_shard per block). Unset: deepspeed "
        "when deepspeed_config is given, else ddp.",
    )
    deepspeed_config: str | None = Field(
        None,
        description="DeepSpeed JSON (LLaMA-Factory's top-level `deepspeed:`), e.g. "
        "configs/deepspeed/ds_z3_config.json; \"auto\" values are filled from this config.",
    )
    fsdp_mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="FSDP2 compute dtype of sharded parameters (gradients reduce in fp32)."
    )
    fsdp_cpu_offload: bool = Field(
        False, description="FSDP2 keeps parameters, gradients and optimizer state on the CPU."
    )

    @model_validator(mode="after")
    def _strategy_options_match(self) -> RaySection:
        strategy = self.effective_strategy
        if self.deepspeed_config is not None and strategy != "deepspeed":
            raise ValueError(
                f"deepspeed_config is set but strategy is {strategy!r}; drop one of them"
            )
        if strategy == "deepspeed" and self.deepspeed_config is None:
            raise ValueError(
                "strategy deepspeed needs deepspeed_config (or LLaMA-Factory's `deepspeed:`), "
                "e.g. configs/deepspeed/ds_z2_config.json"
            )
        if strategy != "fsdp" and (self.fsdp_mixed_precision != "no" or self.fsdp_cpu_offload):
            raise ValueError(f"fsdp_* options need strategy fsdp (strategy is {strategy!r})")
        return self

    @property
    def effective_strategy(self) -> str:
        """`strategy`, or deepspeed when only `deepspeed_config` is given, else ddp."""
        if self.strategy is not None:
            return self.strategy
        return "deepspeed" if self.deepspeed_config is not None else "ddp"


class ServeSection(_Strict):
    """How `rayft serve` exposes the model."""

    host: str = Field("127.0.0.1", description="Interface the HTTP proxy binds to.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI API.")
    model_name: str | None = Field(None, description="Name in /v1/models; default: the dir name.")
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="vllm on CUDA when installed, else transformers."
    )
    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count.")
    autoscaling: dict[str, float] | None = Field(
        None, description="{min_replicas, max_replicas, target_ongoing_requests}; not with "
        "num_replicas."
    )
    max_ongoing_requests: int | None = Field(None, ge=1, description="Per replica; default 32.")
    max_batch_size: int | None = Field(None, ge=1, description="Requests decoded together (8).")
    batch_wait_timeout_s: float | None = Field(
        None, ge=0.0, description="How long a batch waits to fill (0.02 s)."
    )
    api_keys_file: str | None = Field(None, description="File of API keys, one per line.")
    api_keys_env: str | None = Field(
        None, description="Name of an environment variable holding comma-separated API keys."
    )
    max_request_bytes: int | None = Field(None, ge=1, description="Larger bodies get 413 (1 MB).")
    max_tokens_limit: int | None = Field(None, ge=1, description="Cap on a request's max_tokens.")


Distribution = Literal["loguniform", "uniform", "choice", "grid", "randint"]


class TuneSection(_Strict):
    """A hyperparameter sweep with Ray Tune over any training key (`rayft tune`)."""

    search_space: dict[str, dict[Distribution, list[Any]]] = Field(
        description="Training key → one distribution, e.g. `learning_rate: {loguniform: "
        "[1.0e-5, 1.0e-3]}`, `lora_rank: {choice: [8, 16]}`, `{grid: [...]}`, "
        "`{uniform: [a, b]}`, `{randint: [a, b]}`."
    )
    num_samples: int = Field(1, ge=1, description="Samples drawn (grid values repeat per sample).")
    metric: str = Field("loss", description="Reported metric the sweep optimises.")
    mode: Literal["min", "max"] = Field("min", description="Minimise or maximise `metric`.")
    scheduler: Literal["asha", "pbt", "none"] = Field("asha", description="Trial scheduler.")
    search_alg: Literal["random", "optuna"] = Field("random", description="How points are drawn.")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials running at once.")
    grace_period: int = Field(2, ge=1, description="ASHA: steps every trial gets before a cut.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA: share cut at each rung.")

    @field_validator("search_space")
    @classmethod
    def _one_distribution_each(cls, value: dict) -> dict:
        for key, spec in value.items():
            if len(spec) != 1:
                raise ValueError(f"`{key}` needs exactly one distribution, got {sorted(spec)}")
            (kind, args), = spec.items()
            if not args:
                raise ValueError(f"`{key}`: the `{kind}` list is empty")
            if kind in ("loguniform", "uniform", "randint") and len(args) != 2:
                raise ValueError(f"`{key}`: `{kind}` takes [low, high], got {args}")
        return value


class RayftConfig(_Strict):
    """A training (and serving) run. Field names and defaults follow LLaMA-Factory."""

    # model
    model_name_or_path: str = Field(description="Hub id or local directory of the base model.")
    adapter_name_or_path: str | None = Field(None, description="PEFT adapter(s) to load.")
    template: str | None = Field(
        None, description="Chat template name; unset uses the tokenizer's own chat_template."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")
    default_system: str | None = Field(None, description="Overrides the template's system.")
    tool_format: str | None = Field(
        None, description="Tool-call format overriding the template's (default, qwen, glm4, …)."
    )
    enable_thinking: bool = Field(
        True, description="Reasoning templates: train/answer with thinking (LLaMA-Factory's)."
    )

    # method
    stage: Literal["sft"] = Field("sft", description="Training stage.")
    do_train: bool = Field(True, description="Run training (LLaMA-Factory compatibility).")
    finetuning_type: Literal["lora"] = Field("lora", description="How weights are trained.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha; default 2 * lora_rank.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target: str = Field(
        "all", description="Comma list of module names, or `all` for every linear layer."
    )

    # data
    dataset: str | None = Field(None, description="Comma list of names from dataset_info.json.")
    dataset_dir: str = Field("data", description="Folder holding dataset_info.json.")
    cutoff_len: int = Field(2048, ge=2, description="Max tokens per example after truncation.")
    max_samples: int | None = Field(None, ge=1, description="Keep at most this many rows each.")
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens.")
    mask_history: bool = Field(False, description="Train on the last turn only.")
    overwrite_cache: bool = Field(False, description="Re-tokenize even if a cache exists.")
    tokenized_path: str | None = Field(
        None,
        description="Tokenized dataset folder (parquet): loaded when it exists, else written "
        "there after tokenizing (`rayft preprocess` writes one).",
    )
    tokenized_cache_dir: str = Field(
        "~/.cache/rayft",
        description="Where tokenized datasets are cached by content, so no run tokenizes twice.",
    )
    preprocessing_num_workers: int | None = Field(
        None, ge=1, description="Parallel tokenization tasks; unset lets Ray Data decide."
    )
    max_bad_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="Fail when more than this share of rows is malformed."
    )

    # output and logging
    output_dir: str | None = Field(None, description="Where adapters, logs and results go.")
    logging_steps: int = Field(5, ge=1, description="Log every N optimizer steps.")
    save_steps: int = Field(500, ge=1, description="Checkpoint every N optimizer steps.")
    plot_loss: bool = Field(False, description="Write training_loss.png.")
    overwrite_output_dir: bool = Field(False, description="Start over instead of resuming.")
    save_total_limit: int | None = Field(None, ge=1, description="Checkpoints kept.")
    report_to: Literal["none", "tensorboard", "mlflow"] = Field(
        "none", description="Experiment tracker written from rank 0."
    )

    # optimisation
    per_device_train_batch_size: int = Field(1, ge=1, description="Micro-batch per worker.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per step.")
    learning_rate: float = Field(5e-5, gt=0.0, description="Peak AdamW learning rate.")
    num_train_epochs: float = Field(3.0, gt=0.0, description="Passes over the data.")
    max_steps: int = Field(-1, description="Stop after N optimizer steps; -1 uses epochs.")
    lr_scheduler_type: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
        "polynomial", "inverse_sqrt",
    ] = Field("linear", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Warmup share of all steps.")
    warmup_steps: int = Field(0, ge=0, description="Warmup steps; overrides warmup_ratio.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping; 0 disables it.")
    seed: int = Field(42, description="Seed for model init, LoRA init and data order.")
    bf16: bool = Field(False, description="bfloat16 autocast on GPUs (ignored on CPU).")
    fp16: bool = Field(False, description="float16 autocast on GPUs (ignored on CPU).")

    # export
    export_dir: str | None = Field(None, description="Where the merged model is written.")
    export_size: int = Field(5, ge=1, description="Max safetensors shard size in GB.")

    # generation (chat / serve)
    max_new_tokens: int = Field(512, ge=1, description="Max tokens generated per answer.")
    temperature: float = Field(0.95, ge=0.0, description="0 means greedy decoding.")
    top_p: float = Field(0.7, gt=0.0, le=1.0, description="Nucleus sampling mass.")

    ray: RaySection = Field(default_factory=RaySection, description="Ray resources.")
    serve: ServeSection = Field(default_factory=ServeSection, description="Serving.")
    tune: TuneSection | None = Field(None, description="Sweep settings for `rayft tune`.")

    @field_validator("dataset")
    @classmethod
    def _non_empty_names(cls, value: str | None) -> str | None:
        if value is not None and not [name for name in value.split(",") if name.strip()]:
            raise ValueError("names no dataset; give a comma list of dataset_info.json names")
        return value

    @model_validator(mode="after")
    def _one_precision(self) -> RayftConfig:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true; choose one")
        return self

    @property
    def dataset_names(self) -> list[str]:
        """The `dataset` comma list, stripped."""
        return [name.strip() for name in (self.dataset or "").split(",") if name.strip()]

    @property
    def lora_targets(self) -> list[str] | str:
        """`all-linear` for peft, or the listed module names."""
        names = [name.strip() for name in self.lora_target.split(",") if name.strip()]
        return "all-linear" if names == ["all"] else names

    @property
    def effective_lora_alpha(self) -> int:
        """LLaMA-Factory's default: twice the rank."""
        return self.lora_alpha if self.lora_alpha is not None else self.lora_rank * 2
