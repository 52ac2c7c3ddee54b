"""LLaMA Pro expansion: more blocks, same function until the new blocks train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.cli import main
from jobs.llama_pro import expanded_state_dict


def expand_by_two(model: Path, out: Path) -> int:
    """`rayft expand-model MODEL --num-expand 2 --output OUT`; its exit code."""
    return main(["expand-model", str(model), "--num-expand", "2", "--output", str(out)])


def test_expanded_model_computes_the_same_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    layers = base.config.num_hidden_layers
    assert expand_by_two(tiny_model_dir, tmp_path / "pro") == 0
    pro = AutoModelForCausalLM.from_pretrained(tmp_path / "pro").eval()
    assert pro.config.num_hidden_layers == layers + 2
    ids = torch.tensor([[3, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(base(input_ids=ids).logits, pro(input_ids=ids).logits, atol=1e-5)
    inserted = pro.model.layers[layers // 2]  # the copy after the first half
    assert inserted.self_attn.o_proj.weight.abs().sum() == 0
    assert inserted.mlp.down_proj.weight.abs().sum() == 0


def test_num_expand_must_divide_the_blocks() -> None:
    with pytest.raises(ValueError, match="divide the model's 3 blocks"):
        expanded_state_dict({}, num_layers=3, num_expand=2)


def test_use_llama_pro_trains_only_the_inserted_blocks(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from configs import RayftConfig
    from jobs.model import build_trainable_model

    expand_by_two(tiny_model_dir, tmp_path / "pro")
    config = RayftConfig(
        model_name_or_path=str(tmp_path / "pro"),
        finetuning_type="freeze",
        use_llama_pro=True,
        freeze_trainable_layers=2,
        disable_gradient_checkpointing=True,
    )
    model = build_trainable_model(config, on_gpu=False)
    layers = model.config.num_hidden_layers
    trained = {
        int(name.split(".layers.")[1].split(".")[0])
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    stride = layers // 2
    assert trained == {stride - 1, layers - 1}  # the copy after each half
