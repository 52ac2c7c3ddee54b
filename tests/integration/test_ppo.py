"""`ppo` and `grpo` run for real: 2 gloo Ray Train workers, the tiny Qwen2 model, LoRA, with
the reward served by a Ray actor (a reward model saved by the test for ppo; a reward function
given by import path for grpo).

Each run does 2 rollout steps: losses are finite, the stage's metrics are in
`trainer_log.jsonl`, the policy adapter trained (LoRA B starts at zero) and reloads with peft;
ppo's value model reloads as a sequence classifier. `ppo_full` and `grpo_full` (make
test-slow) train the whole policy (and ppo's value model) and reload them with transformers.
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
    "ppo": {"stage": "ppo", "reward_model_type": "full", "ppo_epochs": 2, "ppo_score_norm": True},
    "ppo_full": {
        "stage": "ppo",
        "finetuning_type": "full",
        "reward_model_type": "full",
        "ppo_epochs": 1,
        "learning_rate": 1.0e-4,
    },
    "grpo": {
        "stage": "grpo",
        "reward_funcs": ["tests.fixtures.ppo_rewards:completion_length"],
        "num_generations": 2,
        "grpo_beta": 0.04,
        "per_device_train_batch_size": 1,
    },
    "grpo_full": {
        "stage": "grpo",
        "finetuning_type": "full",
        "learning_rate": 1.0e-4,
        "reward_funcs": ["tests.fixtures.ppo_rewards:completion_length"],
        "num_generations": 2,
        "per_device_train_batch_size": 1,
    },
}
PPO_METRICS = {"loss", "ppo/policy_loss", "ppo/value_loss", "ppo/kl", "ppo/reward", "ppo/clipfrac"}
EXPECTED_METRICS = {
    "ppo": PPO_METRICS,
    "ppo_full": PPO_METRICS,
    "grpo": {"loss", "grpo/reward", "grpo/kl", "grpo/clipfrac", "grpo/completion_length"},
    "grpo_full": {"loss", "grpo/reward", "grpo/clipfrac", "grpo/completion_length"},
}


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full reward model: the tiny base as a one-label sequence classifier."""
    from transformers import AutoModelForSequenceClassification

    target = tmp_path_factory.mktemp("reward_model")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1
    ).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def trained(
    ray_cluster: float,
    tiny_model_dir: Path,
    reward_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
):
    work = tmp_path_factory.mktemp("rollout_stages")

    @cache
    def train(name: str, max_steps: int = 2) -> Path:
        raw = {
            "model_name_or_path": str(tiny_model_dir),
            "template": "qwen",
            "dataset": "alpaca_en_demo",
            "dataset_dir": str(ROOT / "data"),
            "max_samples": 8,
            "cutoff_len": 48,
            "max_new_tokens": 8,
            "temperature": 1.0,
            "top_p": 1.0,
            "output_dir": str(work / name),
            "per_device_train_batch_size": 2,
            "learning_rate": 1.0e-2,
            "lr_scheduler_type": "constant",
            "max_steps": max_steps,
            "logging_steps": 1,
            "save_steps": 2,
            "lora_rank": 4,
            "disable_gradient_checkpointing": True,
            "tokenized_cache_dir": str(work / "cache"),
            "ray": {"num_workers": 2},
            **({"reward_model": str(reward_model_dir)} if name.startswith("ppo") else {}),
            **RUNS[name],
        }
        if raw.get("finetuning_type") == "full":
            del raw["lora_rank"]
        path = work / f"{name}-{max_steps}.yaml"
        path.write_text(yaml.safe_dump(raw))
        config = load_run_config(path)
        run_training(config, total_cpus=ray_cluster)
        return Path(config.output_dir)

    return train


def _log(output_dir: Path) -> list[dict]:
    return [
        json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()
    ]


# Full-model ppo and grpo share the rollout loop, reward actor and reload path with the LoRA
# runs: `make test-slow` runs them.
@pytest.mark.parametrize(
    "name", [n if n in ("ppo", "grpo") else pytest.param(n, marks=pytest.mark.slow) for n in RUNS]
)
def test_rollout_stage_trains_and_reloads(name: str, trained, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    output = trained(name)
    log = _log(output)
    assert [record["current_steps"] for record in log] == [1, 2]
    assert EXPECTED_METRICS[name] <= set(log[-1])
    assert all(math.isfinite(record[key]) for record in log for key in EXPECTED_METRICS[name])
    if RUNS[name].get("finetuning_type") == "full":
        _assert_full_models_trained(output, tiny_model_dir, value=RUNS[name]["stage"] == "ppo")
        return
    adapter = load_file(output / "adapter_model.safetensors")
    lora_b = [value for key, value in adapter.items() if "lora_B" in key]
    assert lora_b and any(bool(value.abs().sum() > 0) for value in lora_b)  # trained from zero
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), output)
    with torch.no_grad():
        assert torch.isfinite(policy(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    if name == "ppo":
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
        value = PeftModel.from_pretrained(base, output / "value_model").eval()
        with torch.no_grad():
            assert value(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 1)


def _assert_full_models_trained(output: Path, base_dir: Path, *, value: bool) -> None:
    """Full-model ppo / grpo: the policy is a whole causal LM whose weights moved from the
    base, and ppo's value model a whole one-label sequence classifier; both reload with
    transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base, trained = (
        load_file(base_dir / "model.safetensors"),
        load_file(output / "model.safetensors"),
    )
    assert base.keys() == trained.keys()
    assert any(not torch.equal(base[key], trained[key]) for key in base)
    policy = AutoModelForCausalLM.from_pretrained(output)
    with torch.no_grad():
        assert torch.isfinite(policy(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    if value:
        critic = AutoModelForSequenceClassification.from_pretrained(output / "value_model")
        with torch.no_grad():
            assert critic(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 1)
    else:
        assert not (output / "value_model").exists()


def test_ppo_checkpoint_holds_policy_value_and_kl_state(trained) -> None:
    """The step-2 checkpoint has what a resume loads: both models, optimizers, KL state."""
    output = trained("ppo")
    checkpoints = sorted((output / "ray").glob("*/checkpoint-2"))
    assert checkpoints, "no checkpoint-2 under the run's storage"
    checkpoint = checkpoints[0]
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
        assert (checkpoint / name).is_file() and (checkpoint / "value" / name).is_file()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["kl_coef"] > 0 and state["score_moments"]["count"] >= 1


@pytest.mark.slow
def test_ppo_resumes_from_its_checkpoint(trained) -> None:
    """A longer run into the same output_dir continues from checkpoint-2 (models, optimizers,
    KL coefficient) and logs only the new step."""
    first = _log(trained("ppo"))
    output = trained("ppo", 3)
    log = _log(output)
    assert [record["current_steps"] for record in log] == [1, 2, 3]
    assert log[:2] == first
    assert math.isfinite(log[-1]["loss"])
