"""Fine-tuning methods and optimizers on the tiny models, without Ray.

Freeze tuning is checked against goldens made by LLaMA-Factory 0.9.5 itself
(`tests/goldens/lf095_freeze.json`, see `generate_lf_freeze.py`); LoRA options against the peft
config they produce; QLoRA really quantizes on CPU (bitsandbytes' CPU backend) and trains in
fp32; every optimizer takes real steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from configs import ConfigError, RayftConfig, load_config
from jobs.model import FinetuningError, build_trainable_model, count_parameters
from jobs.optimizers import OPTIMIZERS, OptimizerError, make_optimizer_factory, optimizer_name
from tests.fixtures.tiny import build_tiny_model

GOLDENS = Path(__file__).resolve().parents[1] / "goldens" / "lf095_freeze.json"


@pytest.fixture(scope="module")
def model_dirs(
    tiny_model_dir: Path, tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    llama = build_tiny_model(
        tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer_dir, arch="llama"
    )
    return {"qwen2": tiny_model_dir, "llama": llama}


def _config(model_dir: Path, **keys: Any) -> RayftConfig:
    return RayftConfig.model_validate(
        {"model_name_or_path": str(model_dir), "template": "qwen", **keys}
    )


def _trainable(model: Any) -> list[str]:
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


def _train_steps(model: Any, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 1000, (2, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------- freeze


@pytest.mark.parametrize(
    "case",
    json.loads(GOLDENS.read_text())["cases"],
    ids=lambda case: f"{case['arch']}-{'-'.join(f'{k}={v}' for k, v in case['keys'].items())}",
)
def test_freeze_trains_what_llamafactory_trains(model_dirs: dict[str, Path], case: dict) -> None:
    config = _config(model_dirs[case["arch"]], finetuning_type="freeze", **case["keys"])
    assert _trainable(build_trainable_model(config, on_gpu=False)) == case["trainable"]


def test_freeze_unknown_module_names_the_choices(tiny_model_dir: Path) -> None:
    config = _config(tiny_model_dir, finetuning_type="freeze", freeze_trainable_modules="mlpp")
    with pytest.raises(FinetuningError, match=r"freeze_trainable_modules: 'mlpp'.*mlp"):
        build_trainable_model(config, on_gpu=False)
    config = _config(tiny_model_dir, finetuning_type="freeze", freeze_extra_modules="embed")
    with pytest.raises(FinetuningError, match=r"freeze_extra_modules: 'embed'.*embed_tokens"):
        build_trainable_model(config, on_gpu=False)


def test_full_trains_every_weight(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    model = build_trainable_model(_config(tiny_model_dir, finetuning_type="full"), on_gpu=False)
    assert all(p.requires_grad for p in model.parameters())
    trainable, total = count_parameters(model)
    assert trainable == total
    assert (
        f"[rayft] trainable params: {total:,d} || all params: {total:,d}" in capsys.readouterr().out
    )
    assert model.training


# --------------------------------------------------------------------------------------- lora


def test_lora_options_reach_the_peft_config(tiny_model_dir: Path) -> None:
    config = _config(
        tiny_model_dir,
        use_rslora=True,
        use_dora=True,
        pissa_init=True,
        additional_target="embed_tokens",
        lora_target="q_proj,v_proj",
    )
    model = build_trainable_model(config, on_gpu=False)
    peft_config = model.peft_config["default"]
    assert peft_config.use_rslora and peft_config.use_dora
    assert peft_config.init_lora_weights == "pissa_niter_16"
    assert set(peft_config.modules_to_save) >= {"embed_tokens"}
    assert set(peft_config.target_modules) == {"q_proj", "v_proj"}
    names = _trainable(model)
    assert any("embed_tokens.modules_to_save" in n for n in names)
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA
    assert not any("k_proj" in n for n in names)


def test_pissa_full_svd(tiny_model_dir: Path) -> None:
    model = build_trainable_model(
        _config(tiny_model_dir, pissa_init=True, pissa_iter=-1), on_gpu=False
    )
    assert model.peft_config["default"].init_lora_weights == "pissa"


def test_continue_or_merge_an_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = build_trainable_model(_config(tiny_model_dir), on_gpu=False)
    with torch.no_grad():
        for name, param in first.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    first.save_pretrained(tmp_path / "adapter")
    resumed = build_trainable_model(
        _config(tiny_model_dir, adapter_name_or_path=str(tmp_path / "adapter")), on_gpu=False
    )
    lora_b = [p for n, p in resumed.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.requires_grad and torch.all(p == 0.01) for p in lora_b)
    fresh = build_trainable_model(
        _config(
            tiny_model_dir, adapter_name_or_path=str(tmp_path / "adapter"), create_new_adapter=True
        ),
        on_gpu=False,
    )
    assert all(torch.all(p == 0) for n, p in fresh.named_parameters() if "lora_B" in n)
    base = build_trainable_model(_config(tiny_model_dir, finetuning_type="full"), on_gpu=False)
    merged_q = fresh.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(merged_q, base.model.layers[0].self_attn.q_proj.weight)


# ------------------------------------------------------------------------------------- reward


@pytest.mark.parametrize("finetuning_type", ["full", "freeze", "lora"])
def test_reward_head_trains_score_and_reloads(
    tiny_model_dir: Path, tmp_path: Path, finetuning_type: str
) -> None:
    from transformers import AutoModelForSequenceClassification

    config = _config(tiny_model_dir, finetuning_type=finetuning_type)
    model = build_trainable_model(config, on_gpu=False, head="reward")
    assert any(
        n.endswith("score.weight") or "score.modules_to_save" in n for n in _trainable(model)
    )
    ids = torch.tensor([[7, 8, 9, 5, 5]])  # 5 = <pad>: the score is read at the last real token
    model.eval()
    expected = model(input_ids=ids).logits
    assert expected.shape == (1, 1)
    if finetuning_type == "lora":
        model = model.merge_and_unload()
    model.save_pretrained(tmp_path / "rm")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert reloaded.config.pad_token_id == 5
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


# -------------------------------------------------------------------------------------- QLoRA


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_quantizes_on_cpu_and_trains_in_fp32(tiny_model_dir: Path, bits: int) -> None:
    import bitsandbytes as bnb

    model = build_trainable_model(_config(tiny_model_dir, quantization_bit=bits), on_gpu=False)
    layer = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    quantized = [m for m in model.modules() if isinstance(m, layer)]
    assert quantized, "no bitsandbytes layer in the model"
    if bits == 4:
        assert quantized[0].compute_dtype == torch.float32
        assert quantized[0].weight.quant_state.quant_type == "nf4"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in _trainable(model))
    assert all(p.dtype == torch.float32 for p in trainable)
    ids = torch.randint(0, 1000, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


def test_qlora_without_bitsandbytes_says_what_to_install(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(FinetuningError, match="pip install bitsandbytes"):
        build_trainable_model(_config(tiny_model_dir, quantization_bit=4), on_gpu=False)


# ------------------------------------------------------------------------------ model options


def test_gradient_checkpointing_is_on_unless_disabled(tiny_model_dir: Path) -> None:
    on = build_trainable_model(_config(tiny_model_dir, finetuning_type="full"), on_gpu=False)
    assert on.is_activation_checkpointing and on.config.use_cache is False
    off = build_trainable_model(
        _config(tiny_model_dir, finetuning_type="full", disable_gradient_checkpointing=True),
        on_gpu=False,
    )
    assert not off.is_activation_checkpointing


def test_neftune_noises_embeddings_in_training_only(tiny_model_dir: Path) -> None:
    model = build_trainable_model(
        _config(tiny_model_dir, finetuning_type="full", neftune_noise_alpha=5.0), on_gpu=False
    )
    embed = model.get_input_embeddings()
    ids = torch.tensor([[1, 2, 3, 4]])
    clean = torch.nn.functional.embedding(ids, embed.weight)
    noisy = embed(ids)
    bound = 5.0 / (4 * embed.weight.shape[1]) ** 0.5
    assert not torch.equal(noisy, clean)
    assert (noisy - clean).abs().max() <= bound + 1e-6
    model.eval()
    assert torch.equal(embed(ids), clean)


def test_rope_scaling_uses_llamafactorys_factor(tiny_model_dir: Path) -> None:
    model = build_trainable_model(
        _config(tiny_model_dir, finetuning_type="full", rope_scaling="yarn", cutoff_len=3000),
        on_gpu=False,
    )
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 3.0  # ceil(3000 / 1024)
    assert rope["original_max_position_embeddings"] == 1024
    assert model.config.max_position_embeddings == 3072
    short = build_trainable_model(
        _config(tiny_model_dir, finetuning_type="full", rope_scaling="linear", cutoff_len=512),
        on_gpu=False,
    )
    assert short.config.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize(("flash_attn", "expected"), [("sdpa", "sdpa"), ("disabled", "eager")])
def test_flash_attn_picks_the_kernel(tiny_model_dir: Path, flash_attn: str, expected: str) -> None:
    config = _config(tiny_model_dir, finetuning_type="full", flash_attn=flash_attn)
    assert build_trainable_model(config, on_gpu=False).config._attn_implementation == expected


def test_fa2_on_cpu_is_a_clear_error(tiny_model_dir: Path) -> None:
    with pytest.raises(FinetuningError, match="flash_attn: fa2` needs a GPU"):
        build_trainable_model(_config(tiny_model_dir, flash_attn="fa2"), on_gpu=False)


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"finetuning_type": "full", "quantization_bit": 4},
            "quantization_bit 4 needs finetuning_type lora",
        ),
        (
            {"finetuning_type": "freeze", "use_dora": True},
            "use_dora is only valid with finetuning_type lora",
        ),
        (
            {"freeze_trainable_layers": 1},
            "freeze_trainable_layers is only valid with finetuning_type freeze",
        ),
        ({"use_galore": True}, "need finetuning_type freeze or full"),
        (
            {"finetuning_type": "full", "use_galore": True, "use_adam_mini": True},
            "choose one optimizer",
        ),
        ({"pissa_convert": True}, "pissa_convert is not supported"),
        ({"finetuning_type": "full", "use_galore": True, "galore_layerwise": True}, "layerwise"),
        ({"quantization_bit": 4, "pissa_init": True}, "pissa_init cannot initialise"),
        ({"stage": "dpo", "pissa_init": True}, "pissa_init cannot be used with stage dpo"),
        ({"quantization_bit": 3}, "quantization_bit"),
        (
            {
                "finetuning_type": "full",
                "use_muon": True,
                "deepspeed": "configs/deepspeed/ds_z2_config.json",
            },
            "use_muon works on whole weight matrices",
        ),
    ],
)
def test_bad_combinations_are_config_errors(keys: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, base={"model_name_or_path": "m", **keys})


def test_implemented_llamafactory_keys_are_accepted() -> None:
    config = load_config(
        None,
        base={
            "model_name_or_path": "m",
            "finetuning_type": "freeze",
            "freeze_trainable_layers": -2,
            "freeze_trainable_modules": "mlp",
            "freeze_extra_modules": "norm",
            "flash_attn": "sdpa",
            "rope_scaling": "linear",
            "neftune_noise_alpha": 5,
            "disable_gradient_checkpointing": True,
            "use_galore": True,
            "galore_rank": 8,
        },
    )
    assert optimizer_name(config) == "galore"


# ---------------------------------------------------------------------------------- optimizers

OPTIMIZER_CASES = {
    "adamw": {"finetuning_type": "full", "weight_decay": 0.1},
    "loraplus": {"loraplus_lr_ratio": 16.0},
    "galore": {
        "finetuning_type": "full",
        "use_galore": True,
        "galore_rank": 4,
        "galore_update_interval": 1,
    },
    "apollo": {"finetuning_type": "full", "use_apollo": True, "apollo_rank": 4},
    "badam": {"finetuning_type": "full", "use_badam": True, "badam_switch_interval": 1},
    "adam_mini": {"finetuning_type": "full", "use_adam_mini": True},
    "muon": {"finetuning_type": "full", "use_muon": True},
}


def test_every_registered_optimizer_is_tested() -> None:
    assert set(OPTIMIZER_CASES) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(OPTIMIZER_CASES))
def test_optimizer_steps_change_the_weights(tiny_model_dir: Path, name: str) -> None:
    config = _config(tiny_model_dir, learning_rate=1e-2, **OPTIMIZER_CASES[name])
    assert optimizer_name(config) == name
    model = build_trainable_model(config, on_gpu=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer_factory(config, model)(
        [p for p in model.parameters() if p.requires_grad]
    )
    _train_steps(model, optimizer)
    changed = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert len(changed) >= len(before) // 2, (name, len(changed), len(before))
    optimizer.load_state_dict(optimizer.state_dict())  # resume path round-trips


def test_loraplus_gives_lora_b_the_ratio(tiny_model_dir: Path) -> None:
    config = _config(tiny_model_dir, learning_rate=1e-3, loraplus_lr_ratio=16.0)
    model = build_trainable_model(config, on_gpu=False)
    optimizer = make_optimizer_factory(config, model)(
        [p for p in model.parameters() if p.requires_grad]
    )
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert lr_of[id(param)] == pytest.approx(1.6e-2 if "lora_B" in name else 1e-3)


def test_default_adamw_skips_decay_on_norms_and_biases(tiny_model_dir: Path) -> None:
    config = _config(tiny_model_dir, finetuning_type="full", weight_decay=0.1)
    model = build_trainable_model(config, on_gpu=False)
    optimizer = make_optimizer_factory(config, model)(
        [p for p in model.parameters() if p.requires_grad]
    )
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        no_decay = "norm" in name or name.endswith("bias")
        assert decay_of[id(param)] == (0.0 if no_decay else 0.1), name


@pytest.mark.parametrize(
    ("name", "package"),
    [
        ("galore", "galore-torch"),
        ("apollo", "apollo-torch"),
        ("badam", "badam"),
        ("adam_mini", "adam-mini"),
    ],
)
def test_missing_optimizer_package_names_it(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, name: str, package: str
) -> None:
    import importlib.util

    module = package.replace("-", "_")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a)
    )
    config = _config(tiny_model_dir, **OPTIMIZER_CASES[name])
    with pytest.raises(OptimizerError, match=f"pip install {package}"):
        make_optimizer_factory(config, object())
