"""Full and freeze fine-tuning on real Ray Train workers: train, save, reload, resume.

Two gloo workers on the private test cluster, the tiny Qwen2, three optimizer steps. The output
directory must hold a whole model that `AutoModelForCausalLM.from_pretrained` loads (as
LLaMA-Factory saves full/freeze runs); freeze must leave every weight outside the trained blocks
bit-identical to the base; a resume from the step-2 checkpoint must reproduce step 3's loss
(weights and optimizer restored). ZeRO-3 and FSDP2 must gather the whole model for that save.
QLoRA (4-bit base, fp32 compute on CPU) trains an adapter under DDP.
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml

from jobs.launch import run_training
from jobs.preflight import load_run_config

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
METHODS = {
    "full": {"finetuning_type": "full"},
    "freeze": {"finetuning_type": "freeze", "freeze_trainable_layers": 1},
    "full_zero3": {"finetuning_type": "full", "deepspeed": "configs/deepspeed/ds_z3_config.json"},
    "full_fsdp": {"finetuning_type": "full", "ray": {"num_workers": 2, "strategy": "fsdp"}},
    "qlora": {"quantization_bit": 4},
}


def _write_config(work: Path, model_dir: Path, name: str, **extra: object) -> Path:
    raw = {
        "model_name_or_path": str(model_dir),
        "template": "qwen",
        "dataset": "alpaca_en_demo",
        "dataset_dir": str(ROOT / "data"),
        "max_samples": 32,
        "cutoff_len": 64,
        "output_dir": str(work / name),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "lr_scheduler_type": "constant",
        "max_steps": STEPS,
        "logging_steps": 1,
        "save_steps": 2,
        "ray": {"num_workers": 2},
        **extra,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "trainer_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def run(ray_cluster: float, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("finetuning")

    @cache
    def train(name: str) -> Path:
        config = load_run_config(_write_config(work, tiny_model_dir, name, **METHODS[name]))
        return Path(run_training(config, total_cpus=ray_cluster).output_dir)

    train.work = work  # type: ignore[attr-defined]
    train.cpus = ray_cluster  # type: ignore[attr-defined]
    return train


@pytest.mark.slow  # full weights are also trained, saved and reloaded by test_stages' dpo_full
def test_full_trains_every_weight_and_reloads(run, tiny_model_dir: Path) -> None:
    out = run("full")
    assert len(_losses(out)) == STEPS
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    base, trained = _weights(tiny_model_dir), _weights(out)
    assert trained.keys() == base.keys()
    unchanged = [n for n in base if torch.equal(base[n], trained[n])]
    # embedding rows of tokens never seen keep their values, but every tensor moves
    assert not unchanged, unchanged


def test_freeze_trains_only_the_last_block(run, tiny_model_dir: Path) -> None:
    out = run("freeze")
    base, trained = _weights(tiny_model_dir), _weights(out)
    for name in base:
        if ".layers.1." in name:
            assert not torch.equal(base[name], trained[name]), f"{name} did not train"
        else:
            assert torch.equal(base[name], trained[name]), f"frozen {name} changed"


@pytest.mark.slow
def test_checkpoint_holds_the_whole_model_and_optimizer(run) -> None:
    out = run("full")
    checkpoint = out / "ray" / f"rayft-{out.name}" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "optimizer.pt").is_file()


@pytest.mark.slow
def test_full_resume_reproduces_the_loss(run, tiny_model_dir: Path) -> None:
    """Restart from the step-2 checkpoint alone: step 3 reproduces the uninterrupted loss."""
    full_dir = run("full")
    full = _losses(full_dir)
    resumed_dir = run.work / "full_resume"
    ray_dir = resumed_dir / "ray" / f"rayft-{resumed_dir.name}"
    ray_dir.mkdir(parents=True)
    shutil.copytree(
        full_dir / "ray" / f"rayft-{full_dir.name}" / "checkpoint-2", ray_dir / "checkpoint-2"
    )
    log = (full_dir / "trainer_log.jsonl").read_text().splitlines()[:2]
    (resumed_dir / "trainer_log.jsonl").write_text("\n".join(log) + "\n")
    path = _write_config(run.work, tiny_model_dir, "full_resume", **METHODS["full"])
    run_training(load_run_config(path), total_cpus=run.cpus)
    resumed = _losses(resumed_dir)
    assert len(resumed) == STEPS
    assert resumed[2] == pytest.approx(full[2], rel=1e-4)
    final, reference = _weights(resumed_dir), _weights(full_dir)
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full_zero3", "full_fsdp"])
def test_sharded_strategies_gather_the_whole_model(run, name: str) -> None:
    reference = _weights(run("full"))
    out = run(name)
    trained = _weights(out)
    assert trained.keys() == reference.keys()
    for key in reference:  # same trajectory as DDP, up to reduction order
        torch.testing.assert_close(trained[key], reference[key], rtol=1e-3, atol=1e-4)


def test_qlora_trains_an_adapter_under_ddp(run, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = run("qlora")
    losses = _losses(out)
    assert len(losses) == STEPS and all(loss == loss for loss in losses)  # no NaN
    assert (out / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained away from zero init
