"""Training runs shared by several integration modules.

One uninterrupted run per strategy serves twice: `test_strategies` compares the strategies'
loss curves with each other, and `test_fault_tolerance` compares a run with a killed worker
against the uninterrupted run of the same strategy. Each Ray Train run costs about half a
minute of worker start-up on two cores, so training each reference once keeps CI in budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from jobs.launch import run_training
from jobs.loop import FaultInjection
from jobs.preflight import load_run_config

ROOT = Path(__file__).resolve().parents[2]
STEPS = 5
SAVE_STEPS = 2

STRATEGY_KEYS: dict[str, dict] = {
    "ddp": {},
    "zero2": {"deepspeed": "configs/deepspeed/ds_z2_config.json"},
    "zero3": {"deepspeed": "configs/deepspeed/ds_z3_config.json"},
    "fsdp": {"ray": {"num_workers": 2, "strategy": "fsdp", "max_failures": 1}},
}


def write_strategy_config(work: Path, model_dir: Path, name: str, strategy: str) -> Path:
    """Two gloo workers, the tiny model, LoRA, one epoch of 5 steps, checkpoints at 2 and 4."""
    raw = {
        "model_name_or_path": str(model_dir),
        "template": "qwen",
        "dataset": "alpaca_en_demo",
        "dataset_dir": str(ROOT / "data"),
        "max_samples": 40,
        "cutoff_len": 48,
        "output_dir": str(work / name),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 5.0e-3,
        "lr_scheduler_type": "cosine",
        "max_steps": STEPS,
        "logging_steps": 1,
        "save_steps": SAVE_STEPS,
        "lora_rank": 8,
        "disable_gradient_checkpointing": True,
        "tokenized_cache_dir": str(work / "cache"),
        "ray": {"num_workers": 2, "max_failures": 1},
        **STRATEGY_KEYS[strategy],
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def step_seconds(output_dir: Path) -> float:
    """Mean wall time of a step after the first (the first includes start-up)."""
    log = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
    return (log[-1]["elapsed_time"] - log[0]["elapsed_time"]) / max(len(log) - 1, 1)


class StrategyRuns:
    """Trains a strategy's reference run once per session; faulted runs are trained anew."""

    def __init__(self, work: Path, model_dir: Path, cpus: float) -> None:
        self.work, self.model_dir, self.cpus = work, model_dir, cpus
        self._done: dict[str, Path] = {}

    def __call__(self, strategy: str) -> Path:
        if strategy not in self._done:
            self._done[strategy] = self.train(strategy, strategy)
            print(f"{strategy}: {step_seconds(self._done[strategy]):.2f} s/step")
        return self._done[strategy]

    def train(self, name: str, strategy: str, fault: FaultInjection | None = None) -> Path:
        path = write_strategy_config(self.work, self.model_dir, name, strategy)
        outcome = run_training(load_run_config(path), total_cpus=self.cpus, fault=fault)
        return Path(outcome.output_dir)
