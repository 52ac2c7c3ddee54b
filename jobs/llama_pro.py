"""LLaMA Pro block expansion (Wu et al. 2024, arXiv:2401.02415): `rayft expand-model`.

After every `num_layers / num_expand` decoder blocks, a copy of the previous block is inserted
whose output projections (`o_proj`, `down_proj`) are zero, so the expanded model computes
exactly what the original did until the new blocks are trained (LLaMA-Factory's
`scripts/llama_pro.py` rule). Train it with `finetuning_type: freeze`, `use_llama_pro: true`
and `freeze_trainable_layers: <num_expand>`, which trains only the inserted blocks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

# Parameter names of a decoder block: "<prefix>.layers.<index>.<rest>".
_BLOCK = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.(?P<rest>.+)$")
# Projections whose zeroing makes an inserted block an identity (its residual adds nothing).
ZEROED = ("o_proj", "down_proj")


def expanded_state_dict(
    state: dict[str, torch.Tensor], *, num_layers: int, num_expand: int
) -> dict[str, torch.Tensor]:
    """The state dict of the expanded model (new blocks interleaved, zero output projections).

    Raises:
        ValueError: `num_expand` does not divide the number of blocks.
    """
    if num_expand < 1 or num_layers % num_expand != 0:
        raise ValueError(
            f"num_expand={num_expand} must divide the model's {num_layers} blocks evenly"
        )
    split = num_layers // num_expand
    new_index: dict[int, int] = {}
    inserted: dict[int, int] = {}
    count = 0
    for index in range(num_layers):
        new_index[index] = count
        count += 1
        if (index + 1) % split == 0:
            inserted[index] = count
            count += 1
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = _BLOCK.match(name)
        if match is None:
            out[name] = tensor
            continue
        index, prefix, rest = int(match["index"]), match["prefix"], match["rest"]
        out[f"{prefix}.{new_index[index]}.{rest}"] = tensor
        if index in inserted:
            copy = torch.zeros_like(tensor) if any(p in rest for p in ZEROED) else tensor.clone()
            out[f"{prefix}.{inserted[index]}.{rest}"] = copy
    return out


def expand_model(
    model_path: str, output_dir: str | Path, *, num_expand: int, trust_remote_code: bool = False
) -> Path:
    """Write the expanded model and its tokenizer to `output_dir`.

    Returns:
        The output directory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(
        model_path, trust_remote_code=trust_remote_code
    )
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    num_layers = config.num_hidden_layers
    state = expanded_state_dict(model.state_dict(), num_layers=num_layers, num_expand=num_expand)
    config.num_hidden_layers = num_layers + num_expand
    if getattr(config, "layer_types", None):  # per-layer attention kinds (Gemma 3, Qwen3-Next)
        split = num_layers // num_expand
        kinds: list[str] = []
        for index, kind in enumerate(config.layer_types):
            kinds += [kind, kind] if (index + 1) % split == 0 else [kind]
        config.layer_types = kinds
    expanded = AutoModelForCausalLM.from_config(
        config, dtype=model.dtype, trust_remote_code=trust_remote_code
    )
    expanded.load_state_dict(state, strict=True)
    out = Path(output_dir)
    expanded.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code).save_pretrained(
        out
    )
    return out
