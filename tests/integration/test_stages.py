"""Every training stage runs for real: 2 gloo Ray Train workers, the tiny Qwen2 model, LoRA.

For each stage a few optimizer steps must give a finite loss and the stage's metrics in
`trainer_log.jsonl`, change the trained weights (LoRA B starts at zero), and leave an output
that transformers + peft load back (the reward model as a sequence classifier).
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml

from jobs.launch import run_training
from jobs.preflight import load_run_config

ROOT = Path(__file__).resolve().parents[2]

RUNS: dict[str, dict] = {
    "pt": {"stage": "pt", "dataset": "c4_demo", "cutoff_len": 32},
    "rm": {"stage": "rm", "dataset": "dpo_en_demo"},
    "dpo": {
        "stage": "dpo",
        "dataset": "dpo_en_demo",
        "pref_ftx": 0.5,
        "max_samples": 12,
        "val_size": 0.4,
        "eval_strategy": "steps",
        "eval_steps": 1,
    },
    "orpo": {"stage": "orpo", "dataset": "dpo_en_demo"},
    # SimPO's path is ORPO's (reference-free, per-token means); its loss is checked against
    # TRL in tests/unit/test_preference_losses.py.
    "simpo": {"stage": "simpo", "dataset": "dpo_en_demo"},
    # QLoRA on a preference stage: 4-bit base (fp32 compute on CPU); the reference is the same
    # quantized base with the adapter off.
    "dpo_qlora": {"stage": "dpo", "dataset": "dpo_en_demo", "quantization_bit": 4},
    "kto": {"stage": "kto", "dataset": "kto_en_demo"},
    # sft on two datasets interleaved, examples neat-packed into 256-token rows.
    "sft_neat": {
        "stage": "sft",
        "dataset": "alpaca_en_demo,identity",
        "cutoff_len": 256,
        "mix_strategy": "interleave_under",
        "neat_packing": True,
    },
}
# Full fine-tuning of every stage (sft full is in test_finetuning_methods.py, ppo/grpo full in
# test_ppo.py): the weights are saved whole, and dpo/kto load a separate frozen reference model.
FULL_RUNS: dict[str, dict] = {
    f"{name}_full": {**RUNS[name], "finetuning_type": "full", "learning_rate": 1.0e-3}
    for name in ("pt", "rm", "dpo", "kto", "orpo", "simpo")
}
for values in FULL_RUNS.values():
    values.pop("pref_ftx", None)
    values.update({"max_samples": 8, "val_size": 0.0, "eval_strategy": "no"})
EXPECTED_METRICS = {
    "pt": set(),
    "rm": {"rewards/accuracies", "rewards/margins"},
    "dpo": {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    },
    "orpo": {"rewards/accuracies", "logps/chosen"},
    "simpo": {"rewards/accuracies", "rewards/margins", "logps/chosen"},
    "dpo_qlora": {"rewards/accuracies", "rewards/margins"},
    "kto": {"rewards/chosen", "rewards/rejected", "kl"},
    "sft_neat": set(),
}


def _config(work: Path, model_dir: Path, name: str) -> Path:
    raw = {
        "model_name_or_path": str(model_dir),
        "template": "qwen",
        "dataset_dir": str(ROOT / "data"),
        "max_samples": 8,
        "cutoff_len": 96,
        "output_dir": str(work / name),
        "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-2,
        "lr_scheduler_type": "constant",
        "max_steps": 2,
        "logging_steps": 1,
        "save_steps": 2,
        "disable_gradient_checkpointing": True,
        "tokenized_cache_dir": str(work / "cache"),
        "ray": {"num_workers": 2},
        **({"lora_rank": 4} if name in RUNS else {}),
        **(RUNS.get(name) or FULL_RUNS[name]),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def trained(ray_cluster: float, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("stages")

    @cache
    def train(name: str) -> Path:
        config = load_run_config(_config(work, tiny_model_dir, name))
        run_training(config, total_cpus=ray_cluster)
        return Path(config.output_dir)

    return train


def _log(output_dir: Path) -> list[dict]:
    return [
        json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()
    ]


# Same code paths as runs kept in CI (QLoRA: test_finetuning_methods trains it under sft).
SLOW = {"simpo", "dpo_qlora", *(name for name in FULL_RUNS if name != "dpo_full")}


def _cases(names: list[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


@pytest.mark.parametrize("name", _cases(list(RUNS)))
def test_stage_trains_and_reloads(name: str, trained, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    output = trained(name)
    log = _log(output)
    assert [record["current_steps"] for record in log] == [1, 2]
    assert all(math.isfinite(record["loss"]) for record in log)
    assert EXPECTED_METRICS[name] <= set(log[-1])
    adapter = load_file(output / "adapter_model.safetensors")
    lora_b = [value for key, value in adapter.items() if "lora_B" in key]
    assert lora_b and any(bool(value.abs().sum() > 0) for value in lora_b)  # trained from zero
    if name == "rm":
        assert any(".score." in key for key in adapter)  # the value head is saved with it
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, output).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(out).all()
    if name == "rm":
        assert out.shape == (1, 1)


@pytest.mark.parametrize("name", _cases(list(FULL_RUNS)))
def test_full_finetuning_stage_trains_every_weight_and_reloads(
    name: str, trained, tiny_model_dir: Path
) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    output = trained(name)
    log = _log(output)
    assert all(math.isfinite(record["loss"]) for record in log)
    assert EXPECTED_METRICS[name.removesuffix("_full")] <= set(log[-1])
    assert not (output / "adapter_config.json").exists()
    trained_weights = load_file(output / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    changed = [
        key
        for key in base
        if key in trained_weights and not torch.equal(base[key], trained_weights[key])
    ]
    assert len(changed) >= len(base) // 2  # not a stray parameter: the blocks trained
    loader = AutoModelForSequenceClassification if name == "rm_full" else AutoModelForCausalLM
    model = loader.from_pretrained(output).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_evaluation_reports_eval_metrics_every_eval_step(trained) -> None:
    """dpo with val_size: held-out pairs give eval_loss and eval reward metrics per step."""
    log = _log(trained("dpo"))
    assert all(math.isfinite(record["eval_loss"]) for record in log)
    assert {"eval_rewards/accuracies", "eval_rewards/margins"} <= set(log[-1])
    report = json.loads((trained("dpo") / "data_report.json").read_text())
    assert report["kept"] == 12


def test_pretraining_packs_rows_into_blocks(trained) -> None:
    """pt packs by default: all kept rows are counted, and training reads the blocks."""
    report = json.loads((trained("pt") / "data_report.json").read_text())
    assert report["total"] == report["kept"] == 8
    assert report["examples"] > report["kept"]  # 8 web texts make many 32-token blocks


def test_neat_packing_trains_on_packed_rows_of_the_mixed_datasets(trained) -> None:
    """8 rows of each dataset, alternated, packed: fewer rows than examples reach training."""
    report = json.loads((trained("sft_neat") / "data_report.json").read_text())
    assert report["total"] == report["kept"] == 16
    assert report["examples"] < report["kept"]


def test_reward_model_learns_the_training_pairs(trained) -> None:
    """rm's pairwise accuracy is reported per step (a mean over pairs, within [0, 1])."""
    log = _log(trained("rm"))
    assert all(0.0 <= record["rewards/accuracies"] <= 1.0 for record in log)
