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


# Ray runtime_env keys `ray.runtime_env` may carry (Ray's own names).
RUNTIME_ENV_KEYS = frozenset(
    "env_vars pip uv conda py_modules py_executable excludes config image_uri nsight".split()
)


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
        'configs/deepspeed/ds_z3_config.json; "auto" values are filled from this config.',
    )
    fsdp_mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="FSDP2 compute dtype of sharded parameters (gradients reduce in fp32)."
    )
    fsdp_cpu_offload: bool = Field(
        False, description="FSDP2 keeps parameters, gradients and optimizer state on the CPU."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How the workers' placement group spreads over nodes (Ray's "
        "ScalingConfig.placement_strategy): PACK fills few nodes, SPREAD uses many, STRICT_* "
        "fail instead of bending.",
    )
    placement_timeout_s: float = Field(
        0.0,
        ge=0.0,
        description="Seconds to wait for an autoscaling cluster to grow to the resources the "
        "workers need before failing with the missing resources; 0 checks once.",
    )
    rank0_node: str | None = Field(
        None,
        description="Where rank 0 runs (it hosts the process-group rendezvous and writes logs "
        "and exports): `head`, a node IP, or a node id (`ray list nodes`); unset lets Ray's "
        "placement choose.",
    )
    runtime_env: dict[str, Any] | None = Field(
        None,
        description="Ray runtime_env (env_vars, pip, uv, conda, py_modules, excludes, …) for the "
        "run's driver, workers and data tasks: `rayft train`/`tune` start Ray with it, `rayft "
        "submit` puts it on the job; working_dir is set by rayft submit itself.",
    )

    @field_validator("runtime_env")
    @classmethod
    def _runtime_env_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if "working_dir" in value:
            raise ValueError(
                "working_dir is set by `rayft submit` (the project, without outputs and "
                "caches); remove it from ray.runtime_env"
            )
        unknown = sorted(set(value) - RUNTIME_ENV_KEYS)
        if unknown:
            raise ValueError(
                f"unknown runtime_env key(s) {unknown}; known: {sorted(RUNTIME_ENV_KEYS)}"
            )
        env_vars = value.get("env_vars") or {}
        if not isinstance(env_vars, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()
        ):
            raise ValueError(f"runtime_env.env_vars must map names to strings, got {env_vars!r}")
        return value

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
        None,
        description="{min_replicas, max_replicas, target_ongoing_requests}; not with num_replicas.",
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
    max_queued_requests: int | None = Field(
        None, ge=1, description="Queue in front of busy replicas; beyond it, HTTP 429."
    )
    adapters: dict[str, str] | None = Field(
        None, description="More LoRA adapters, name → local dir, each served as its own model."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Served context window (prompt + answer); LF's vllm_maxlen."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="Serving dtype; auto: float32 on CPU, the checkpoint's on GPU."
    )
    resources_per_replica: dict[str, float] | None = Field(
        None, description="Ray resources per replica besides CPUs, e.g. {GPU: 1}."
    )


Distribution = Literal["loguniform", "uniform", "choice", "grid", "randint"]


class TuneSection(_Strict):
    """A hyperparameter sweep with Ray Tune over any training key (`rayft tune`)."""

    search_space: dict[str, dict[Distribution, list[Any]]] = Field(
        description="Training key → one distribution, e.g. `learning_rate: {loguniform: "
        "[1.0e-5, 1.0e-3]}`, `lora_rank: {choice: [8, 16]}`, `{grid: [...]}`, "
        "`{uniform: [a, b]}`, `{randint: [a, b]}`."
    )
    num_samples: int = Field(1, ge=1, description="Samples drawn (grid values repeat per sample).")
    metric: str | None = Field(
        None,
        description="Reported metric the sweep optimises; default eval_loss when the run "
        "evaluates (val_size / eval_dataset), else loss.",
    )
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
            ((kind, args),) = spec.items()
            if not args:
                raise ValueError(f"`{key}`: the `{kind}` list is empty")
            if kind in ("loguniform", "uniform", "randint") and len(args) != 2:
                raise ValueError(f"`{key}`: `{kind}` takes [low, high], got {args}")
        return value


# Keys that mean something for one finetuning_type only; giving them for another is an error.
LORA_ONLY_KEYS = frozenset(
    """lora_rank lora_alpha lora_dropout lora_target additional_target use_rslora use_dora
    pissa_init pissa_iter create_new_adapter loraplus_lr_ratio loraplus_lr_embedding""".split()
)
FREEZE_ONLY_KEYS = frozenset(
    "freeze_trainable_layers freeze_trainable_modules freeze_extra_modules use_llama_pro".split()
)

# Keys of the online RL stages and the stages they apply to (`ppo_*`: every key so prefixed).
ROLLOUT_KEYS: dict[str, tuple[str, ...]] = {
    "reward_model": ("ppo", "grpo"),
    "reward_model_type": ("ppo", "grpo"),
    "reward_funcs": ("ppo", "grpo"),
    "num_generations": ("grpo",),
    "ppo_*": ("ppo",),
    "grpo_*": ("grpo",),
}


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
    stage: Literal["pt", "sft", "rm", "dpo", "kto", "orpo", "simpo", "ppo", "grpo"] = Field(
        "sft",
        description="Training stage. `orpo`/`simpo` are spellings of `dpo` with that pref_loss; "
        "`grpo` (beyond LLaMA-Factory) is group-relative policy optimisation.",
    )
    do_train: bool = Field(True, description="Run training (LLaMA-Factory compatibility).")
    finetuning_type: Literal["lora", "freeze", "full"] = Field(
        "lora",
        description="How weights are trained: lora (PEFT adapter), freeze (the last/first "
        "`freeze_trainable_layers` blocks) or full (every weight).",
    )
    lora_rank: int = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha; default 2 * lora_rank.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target: str = Field(
        "all", description="Comma list of module names, or `all` for every linear layer."
    )
    additional_target: str | None = Field(
        None,
        description="LoRA: comma list of extra modules trained in full and saved with the "
        "adapter (peft modules_to_save), e.g. embed_tokens,lm_head.",
    )
    use_rslora: bool = Field(False, description="LoRA: rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="LoRA: weight-decomposed LoRA (DoRA).")
    pissa_init: bool = Field(False, description="LoRA: initialise the adapter with PiSSA.")
    pissa_iter: int = Field(
        16, ge=-1, description="PiSSA fast-SVD iterations; -1 uses the full SVD."
    )
    pissa_convert: bool = Field(
        False, description="Convert a PiSSA adapter to plain LoRA on save (not supported yet)."
    )
    create_new_adapter: bool = Field(
        False, description="With adapter_name_or_path: merge it into the base and train a new one."
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0.0, description="LoRA+: lora_B learns at learning_rate times this ratio."
    )
    loraplus_lr_embedding: float = Field(
        1e-6, gt=0.0, description="LoRA+: learning rate of LoRA embedding layers."
    )
    freeze_trainable_layers: int = Field(
        2, description="freeze: train the last N blocks (N > 0) or the first -N (N < 0)."
    )
    freeze_trainable_modules: str = Field(
        "all", description="freeze: comma list of module names inside those blocks, or `all`."
    )
    freeze_extra_modules: str | None = Field(
        None,
        description="freeze: comma list of modules outside the blocks to train, e.g. "
        "embed_tokens,norm.",
    )
    use_llama_pro: bool = Field(
        False,
        description="freeze: train only the blocks `rayft expand-model` inserted "
        "(freeze_trainable_layers = the number inserted).",
    )
    quantization_bit: Literal[4, 8] | None = Field(
        None, description="QLoRA: load the base model in 4 or 8 bits (bitsandbytes); lora only."
    )
    quantization_method: Literal["bnb"] = Field(
        "bnb", description="On-the-fly quantization backend (bitsandbytes)."
    )
    quantization_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type of bitsandbytes."
    )
    double_quantization: bool = Field(
        True, description="Also quantize the 4-bit quantization constants."
    )
    neftune_noise_alpha: float | None = Field(
        None, gt=0.0, description="NEFTune: uniform noise of this scale on input embeddings."
    )
    disable_gradient_checkpointing: bool = Field(
        False, description="Turn off gradient checkpointing (on by default, non-reentrant)."
    )
    rope_scaling: Literal["linear", "dynamic", "yarn", "llama3"] | None = Field(
        None,
        description="RoPE scaling when cutoff_len exceeds the model's context; the factor "
        "is ceil(cutoff_len / max_position_embeddings).",
    )
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2"] = Field(
        "auto",
        description="Attention kernel: auto (model default), disabled (eager), sdpa, fa2 "
        "(FlashAttention-2, needs a GPU and the flash_attn package).",
    )

    # preference stages (rm, dpo, kto) — LLaMA-Factory's names and defaults
    pref_beta: float = Field(0.1, gt=0.0, description="beta of DPO/KTO/ORPO/SimPO.")
    pref_ftx: float = Field(0.0, ge=0.0, description="Weight of an added SFT loss (dpo, kto).")
    pref_loss: Literal["sigmoid", "hinge", "ipo", "orpo", "simpo"] = Field(
        "sigmoid", description="dpo objective: sigmoid (DPO), hinge, ipo, orpo or simpo."
    )
    dpo_label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="cDPO label smoothing (pref_loss sigmoid)."
    )
    simpo_gamma: float = Field(0.5, description="SimPO target reward margin.")
    kto_chosen_weight: float = Field(1.0, gt=0.0, description="KTO weight of desirable rows.")
    kto_rejected_weight: float = Field(1.0, gt=0.0, description="KTO weight of undesirable rows.")
    ref_model: str | None = Field(
        None, description="Reference model; unset: the base model (LoRA: adapter disabled)."
    )
    ref_model_adapters: str | None = Field(None, description="Adapter loaded on ref_model.")

    # online RL stages (ppo: LLaMA-Factory's names and defaults; grpo: TRL's GRPOConfig)
    reward_model: str | None = Field(
        None,
        description="ppo/grpo: reward model dir, an AutoModelForSequenceClassification "
        "(e.g. the output of `stage: rm`); scored at the last real token.",
    )
    reward_model_type: Literal["lora", "full", "api"] = Field(
        "lora",
        description="ppo/grpo: `lora` (reward_model is an adapter over "
        "model_name_or_path) or `full` (a whole model); `api` is not supported.",
    )
    reward_funcs: list[str] | None = Field(
        None,
        description="ppo/grpo: reward functions as `module:function` import paths, called "
        "as f(prompts=[str], completions=[str], completion_ids=[[int]]) -> [float]; summed.",
    )
    ppo_epochs: int = Field(4, ge=1, description="ppo: passes over each rollout batch.")
    ppo_buffer_size: int = Field(
        1,
        ge=1,
        description="ppo: batches of per_device_train_batch_size x "
        "gradient_accumulation_steps prompts rolled out per PPO step.",
    )
    ppo_target: float = Field(6.0, gt=0.0, description="ppo: target KL of the adaptive KL control.")
    ppo_score_norm: bool = Field(False, description="ppo: normalise scores by running moments.")
    ppo_whiten_rewards: bool = Field(False, description="ppo: whiten the per-token rewards.")
    num_generations: int = Field(8, ge=2, description="grpo: completions sampled per prompt.")
    grpo_beta: float = Field(
        0.0, ge=0.0, description="grpo: KL coefficient to the reference (0: no reference)."
    )
    grpo_loss_type: Literal["dapo", "grpo", "bnpo", "dr_grpo"] = Field(
        "dapo", description="grpo: how per-token losses are averaged (TRL's loss_type)."
    )
    grpo_epsilon: float = Field(0.2, gt=0.0, description="grpo: lower clip range of the ratio.")
    grpo_epsilon_high: float | None = Field(
        None, gt=0.0, description="grpo: upper clip range (DAPO: 0.28); unset: grpo_epsilon."
    )
    grpo_scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="grpo: divide advantages by the group's, batch's or no std."
    )
    grpo_num_iterations: int = Field(
        1, ge=1, description="grpo: optimizer steps per rollout batch (TRL num_iterations)."
    )

    # data
    dataset: str | None = Field(None, description="Comma list of names from dataset_info.json.")
    dataset_dir: str = Field("data", description="Folder holding dataset_info.json.")
    cutoff_len: int = Field(2048, ge=2, description="Max tokens per example after truncation.")
    max_samples: int | None = Field(None, ge=1, description="Keep at most this many rows each.")
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens.")
    mask_history: bool = Field(False, description="Train on the last turn only.")
    packing: bool | None = Field(
        None,
        description="pt: concatenate texts into cutoff_len blocks; sft: pack whole examples "
        "into cutoff_len rows (position ids restart per example); unset: on for `pt` only "
        "(LLaMA-Factory's default).",
    )
    neat_packing: bool = Field(
        False,
        description="sft: pack as `packing` does, but no token attends across examples "
        "(implies packing).",
    )
    mix_strategy: Literal["concat", "interleave_under", "interleave_over", "interleave_once"] = (
        Field(
            "concat",
            description="How several datasets are mixed: one after the other, or alternated "
            "until the first (under) / every (over: restarting the others) / every, without "
            "repeats (once) dataset is used up.",
        )
    )
    interleave_probs: str | None = Field(
        None,
        description="Comma list of sampling probabilities, one per dataset, for the "
        "interleave strategies (drawn with `seed`); unset: strict alternation.",
    )
    overwrite_cache: bool = Field(False, description="Re-tokenize even if a cache exists.")
    val_size: float = Field(
        0.0,
        ge=0.0,
        description="Hold out this share (< 1) or number (>= 1) of the training rows for "
        "evaluation; the split is deterministic per row content and `seed`.",
    )
    eval_dataset: str | None = Field(
        None, description="Comma list of dataset_info.json names evaluated instead of val_size."
    )
    eval_strategy: Literal["no", "steps", "epoch"] = Field(
        "no", description="When to compute eval_loss: every eval_steps, or every epoch."
    )
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate every N optimizer steps; default logging_steps."
    )
    per_device_eval_batch_size: int = Field(8, ge=1, description="Evaluation micro-batch.")
    tokenized_path: str | None = Field(
        None,
        description="Tokenized dataset folder (parquet): loaded when it exists, else written "
        "there after tokenizing (`rayft preprocess` writes one).",
    )
    streaming: bool = Field(
        False,
        description="Tokenize while training instead of caching the tokenized dataset first "
        "(needs max_steps; rows are counted as they stream and reported at the end).",
    )
    buffer_size: int = Field(
        16384,
        ge=1,
        description="Streaming only: rows in each trainer's shuffle buffer (LLaMA-Factory's "
        "streaming shuffle buffer).",
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
        "linear",
        "cosine",
        "constant",
        "constant_with_warmup",
        "cosine_with_restarts",
        "polynomial",
        "inverse_sqrt",
    ] = Field("linear", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Warmup share of all steps.")
    warmup_steps: int = Field(0, ge=0, description="Warmup steps; overrides warmup_ratio.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam beta2.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="Adam epsilon.")
    use_galore: bool = Field(False, description="GaLore optimizer (pip install galore-torch).")
    galore_target: str = Field(
        "all", description="GaLore: comma list of linear module names, or `all`."
    )
    galore_rank: int = Field(16, ge=1, description="GaLore: rank of the gradient projection.")
    galore_update_interval: int = Field(
        200, ge=1, description="GaLore: steps between projection updates."
    )
    galore_scale: float = Field(2.0, gt=0.0, description="GaLore: scaling coefficient.")
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = Field(
        "std", description="GaLore: projection type."
    )
    galore_layerwise: bool = Field(
        False, description="GaLore: per-layer updates inside backward (not supported by rayft)."
    )
    use_apollo: bool = Field(False, description="APOLLO optimizer (pip install apollo-torch).")
    apollo_target: str = Field(
        "all", description="APOLLO: comma list of linear module names, or `all`."
    )
    apollo_rank: int = Field(16, ge=1, description="APOLLO: rank of the gradient projection.")
    apollo_update_interval: int = Field(
        200, ge=1, description="APOLLO: steps between projection updates."
    )
    apollo_scale: float = Field(32.0, gt=0.0, description="APOLLO: scaling coefficient.")
    apollo_proj: Literal["svd", "random"] = Field("random", description="APOLLO: projection.")
    apollo_proj_type: Literal["std", "right", "left"] = Field(
        "std", description="APOLLO: projection type."
    )
    apollo_scale_type: Literal["channel", "tensor"] = Field(
        "channel", description="APOLLO: scaling per channel or per tensor."
    )
    apollo_layerwise: bool = Field(
        False, description="APOLLO: per-layer updates inside backward (not supported by rayft)."
    )
    apollo_scale_front: bool = Field(
        False, description="APOLLO: norm-growth limiter before gradient scaling."
    )
    use_badam: bool = Field(
        False, description="BAdam block-coordinate optimizer (pip install badam)."
    )
    badam_mode: Literal["layer", "ratio"] = Field(
        "layer", description="BAdam: layer- or ratio-wise."
    )
    badam_start_block: int | None = Field(
        None, ge=0, description="BAdam: first block (layer mode)."
    )
    badam_switch_mode: Literal["ascending", "descending", "random", "fixed"] = Field(
        "ascending", description="BAdam: order in which blocks train (layer mode)."
    )
    badam_switch_interval: int = Field(
        50, description="BAdam: steps per block (layer mode); -1 never switches."
    )
    badam_update_ratio: float = Field(
        0.05, gt=0.0, le=1.0, description="BAdam: share of each weight updated (ratio mode)."
    )
    badam_mask_mode: Literal["adjacent", "scatter"] = Field(
        "adjacent", description="BAdam: which entries ratio mode updates."
    )
    badam_verbose: int = Field(0, ge=0, le=2, description="BAdam: 0 quiet, 1 blocks, 2 params.")
    use_adam_mini: bool = Field(False, description="Adam-mini optimizer (pip install adam-mini).")
    use_muon: bool = Field(
        False, description="Muon (torch.optim.Muon) on 2-D hidden weights, AdamW on the rest."
    )
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
    infer_backend: Literal["huggingface", "vllm"] | None = Field(
        None, description="LF's serving engine: huggingface = serve.engine transformers."
    )
    vllm_maxlen: int | None = Field(
        None, ge=1, description="LF: vLLM context (serve.max_model_len)."
    )
    vllm_gpu_util: float | None = Field(
        None, gt=0.0, le=1.0, description="LF: share of GPU memory vLLM may use (vLLM only)."
    )
    vllm_enforce_eager: bool = Field(False, description="LF: vLLM without CUDA graphs (vLLM only).")
    top_k: int = Field(50, ge=0, description="Sample among the k likeliest tokens; 0: all.")

    ray: RaySection = Field(default_factory=RaySection, description="Ray resources.")
    serve: ServeSection = Field(default_factory=ServeSection, description="Serving.")
    tune: TuneSection | None = Field(None, description="Sweep settings for `rayft tune`.")

    @field_validator("dataset")
    @classmethod
    def _non_empty_names(cls, value: str | None) -> str | None:
        if value is not None and not [name for name in value.split(",") if name.strip()]:
            raise ValueError("names no dataset; give a comma list of dataset_info.json names")
        return value

    @model_validator(mode="before")
    @classmethod
    def _stage_spellings(cls, data: Any) -> Any:
        """`stage: orpo|simpo` means LLaMA-Factory's `stage: dpo` with that `pref_loss`."""
        if isinstance(data, dict) and data.get("stage") in ("orpo", "simpo"):
            given = data.get("pref_loss", data["stage"])
            if given != data["stage"]:
                raise ValueError(
                    f"stage {data['stage']} with pref_loss {given}: drop pref_loss or use stage dpo"
                )
            data = {**data, "stage": "dpo", "pref_loss": data["stage"]}
        return data

    def _streaming_options(self) -> None:
        """`streaming` has no row count before training: LLaMA-Factory's rules plus what a
        stream cannot give (a held-out share, an epoch's end, a cache, a mixing plan)."""
        if not self.streaming:
            return
        problems = {
            "max_steps": self.max_steps <= 0,
            "val_size": self.val_size > 0,
            "eval_strategy": self.eval_strategy == "epoch",
            "tokenized_path": self.tokenized_path is not None,
            "mix_strategy": self.mix_strategy != "concat" and len(self.dataset_names) > 1,
        }
        fixes = {
            "max_steps": "set max_steps (a stream has no length to count epochs by)",
            "val_size": "use eval_dataset (tokenized and cached as usual) instead of val_size",
            "eval_strategy": "use eval_strategy: steps (a stream has no epoch end to wait for)",
            "tokenized_path": "remove tokenized_path (a stream is never written out) or streaming",
            "mix_strategy": "use mix_strategy: concat (interleaving is planned over counted rows)",
        }
        wrong = [key for key, bad in problems.items() if bad]
        if wrong:
            raise ValueError(
                "streaming: true cannot be combined with "
                + "; ".join(f"{key} ({fixes[key]})" for key in wrong)
            )

    @model_validator(mode="after")
    def _stage_options(self) -> RayftConfig:
        """Options LLaMA-Factory allows for some stages only."""
        if self.stage != "sft" and (self.train_on_prompt or self.mask_history):
            raise ValueError(
                f"train_on_prompt and mask_history apply to stage sft only (stage is {self.stage})"
            )
        evaluating = self.val_size > 0 or self.eval_dataset is not None
        if self.val_size > 0 and self.eval_dataset is not None:
            raise ValueError("val_size and eval_dataset are both set; use one of them")
        if evaluating and self.eval_strategy == "no":
            raise ValueError(
                "val_size / eval_dataset is set but eval_strategy is no; set eval_strategy: "
                "steps (every eval_steps) or epoch"
            )
        if self.eval_strategy != "no" and not evaluating:
            raise ValueError(
                f"eval_strategy {self.eval_strategy} needs evaluation data: set val_size "
                "(e.g. 0.1) or eval_dataset"
            )
        self._streaming_options()
        if self.dpo_label_smoothing and self.pref_loss != "sigmoid":
            raise ValueError(
                f"dpo_label_smoothing applies to pref_loss sigmoid only (pref_loss is "
                f"{self.pref_loss}); set it to 0"
            )
        if self.packing and self.stage not in ("pt", "sft"):
            raise ValueError(
                f"packing applies to stages pt and sft (stage is {self.stage}); set packing: false"
            )
        if self.neat_packing and self.stage != "sft":
            raise ValueError(
                f"neat_packing applies to stage sft only (stage is {self.stage}); remove it"
            )
        if self.neat_packing and self.packing is False:
            raise ValueError("neat_packing packs the data: remove packing: false")
        self._check_mixing()
        return self

    def _check_mixing(self) -> None:
        """interleave_probs: one probability per dataset, for an interleave strategy only."""
        if self.interleave_probs is None:
            return
        if self.mix_strategy == "concat":
            raise ValueError(
                "interleave_probs is set but mix_strategy is concat; set mix_strategy: "
                "interleave_under (or interleave_over / interleave_once), or remove it"
            )
        probs = self.mixing_probabilities
        for names, key in (
            (self.dataset_names, "dataset"),
            (self.eval_dataset_names, "eval_dataset"),
        ):
            if names and len(names) != len(probs):
                raise ValueError(
                    f"interleave_probs has {len(probs)} values but {key} names {len(names)} "
                    f"datasets; give one probability per dataset"
                )
        if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"interleave_probs {probs} must be non-negative and sum to 1")

    @property
    def mixing_probabilities(self) -> list[float] | None:
        """`interleave_probs` as floats (`None`: strict alternation)."""
        if self.interleave_probs is None:
            return None
        try:
            return [float(part) for part in self.interleave_probs.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"interleave_probs {self.interleave_probs!r} is not a comma list of numbers "
                '(e.g. "0.7,0.3")'
            ) from None

    @model_validator(mode="after")
    def _rollout_options(self) -> RayftConfig:
        """ppo/grpo need a reward (model or functions); their keys mean nothing elsewhere."""
        fields = type(self).model_fields
        given = {key for key in self.model_fields_set if getattr(self, key) != fields[key].default}
        problems = []
        for key in sorted(given):
            stages = ROLLOUT_KEYS.get(key) or ROLLOUT_KEYS.get(key.split("_")[0] + "_*")
            if stages is not None and self.stage not in stages:
                problems.append(
                    f"{key} applies to stage {' and '.join(stages)} only (stage is "
                    f"{self.stage}); remove it"
                )
        if self.stage in ("ppo", "grpo"):
            if self.reward_model is None and not self.reward_funcs:
                problems.append(
                    f"stage {self.stage} needs a reward: set `reward_model` (a reward model dir, "
                    "e.g. the output of stage rm) or `reward_funcs` (import paths "
                    "`module:function`)"
                )
            if self.reward_model is not None and self.reward_funcs:
                problems.append("reward_model and reward_funcs are both set; use one of them")
            if self.reward_model_type == "api":
                problems.append(
                    "reward_model_type api (an HTTP reward server) is not supported; "
                    "use lora or full, or call the server from a reward_funcs entry"
                )
            problems += [
                f"reward_funcs entry {path!r} is not an import path `module:function`"
                for path in self.reward_funcs or []
                if path.count(":") != 1 or not all(path.split(":"))
            ]
            if self.ray.effective_strategy != "ddp":
                problems.append(
                    f"stage {self.stage} supports ray.strategy ddp only "
                    f"(strategy is {self.ray.effective_strategy})"
                )
            if self.val_size > 0 or self.eval_dataset is not None:
                problems.append(
                    f"stage {self.stage} has no evaluation; remove val_size / eval_dataset"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _one_precision(self) -> RayftConfig:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true; choose one")
        return self

    @model_validator(mode="after")
    def _finetuning_options_match(self) -> RayftConfig:
        """LLaMA-Factory's combination rules, plus keys of another method that would be ignored."""
        problems: list[str] = []
        # Keys set to something other than their default: a config that went through
        # model_dump → model_validate (Ray workers, Tune trials) has every key "set".
        fields = type(self).model_fields
        given = {key for key in self.model_fields_set if getattr(self, key) != fields[key].default}
        if self.finetuning_type != "lora":
            for key in LORA_ONLY_KEYS & given:
                problems.append(
                    f"{key} is only valid with finetuning_type lora "
                    f"(finetuning_type is {self.finetuning_type})"
                )
        if self.finetuning_type != "freeze":
            for key in FREEZE_ONLY_KEYS & given:
                problems.append(
                    f"{key} is only valid with finetuning_type freeze "
                    f"(finetuning_type is {self.finetuning_type})"
                )
        if self.quantization_bit is not None and self.finetuning_type != "lora":
            problems.append(
                f"quantization_bit {self.quantization_bit} needs finetuning_type lora (QLoRA); a "
                f"quantized base cannot be trained with {self.finetuning_type}"
            )
        if self.quantization_bit is not None and self.ray.effective_strategy == "fsdp":
            problems.append("quantization_bit is not supported with ray.strategy fsdp; use ddp")
        if self.pissa_init and self.quantization_bit is not None:
            problems.append("pissa_init cannot initialise an adapter on a quantized model")
        if self.pissa_init and (
            self.stage == "kto" or (self.stage == "dpo" and self.pref_loss not in ("orpo", "simpo"))
        ):
            problems.append(
                f"pissa_init cannot be used with stage {self.stage}: its reference model is the "
                "base with the adapter disabled, which PiSSA changes"
            )
        if self.pissa_convert:
            problems.append("pissa_convert is not supported yet; remove it")
        if self.galore_layerwise or self.apollo_layerwise:
            problems.append(
                "galore_layerwise / apollo_layerwise step inside backward, before the strategy "
                "averages gradients over ranks; rayft does not support them, remove them"
            )
        optimizers = [
            key
            for key in ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon")
            if getattr(self, key)
        ] + (["loraplus_lr_ratio"] if self.loraplus_lr_ratio is not None else [])
        if len(optimizers) > 1:
            problems.append(f"choose one optimizer option, got {', '.join(optimizers)}")
        if self.finetuning_type == "lora" and (
            self.use_galore or self.use_apollo or self.use_badam
        ):
            problems.append(
                "use_galore / use_apollo / use_badam need finetuning_type freeze or full"
            )
        if (
            self.use_badam
            and self.ray.num_workers > 1
            and self.ray.effective_strategy != "deepspeed"
        ):
            problems.append(
                "use_badam switches the trainable block during training, which DDP/FSDP with "
                "several ray.num_workers cannot follow; use 1 worker or deepspeed"
            )
        matrix_wise = [
            key for key in ("use_galore", "use_apollo", "use_muon") if getattr(self, key)
        ]
        if matrix_wise and self.ray.effective_strategy != "ddp":
            problems.append(
                f"{matrix_wise[0]} works on whole weight matrices, which ray.strategy "
                f"{self.ray.effective_strategy} flattens or shards; use ddp"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def tune_metric(self) -> str:
        """`tune.metric`, or its default: eval_loss when the run evaluates, else loss."""
        if self.tune is not None and self.tune.metric:
            return self.tune.metric
        return "eval_loss" if self.eval_strategy != "no" else "loss"

    @property
    def eval_dataset_names(self) -> list[str]:
        """The `eval_dataset` comma list, stripped."""
        return [name.strip() for name in (self.eval_dataset or "").split(",") if name.strip()]

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
