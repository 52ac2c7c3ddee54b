"""A worker killed mid-run costs only the steps since the last checkpoint, and nothing else.

Rank 1 calls `os._exit(1)` right after optimizer step 3 (once); with `ray.max_failures: 1`
Ray Train restarts the worker group from checkpoint-2, the loop skips the micro-batches it had
already trained, and the run finishes. The resumed `trainer_log.jsonl` (from step 3 on) and
the final loss must equal an uninterrupted run's within 1e-4, for DDP and for FSDP2 (sharded
optimizer state restored from per-rank shards).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobs.launch import run_training
from jobs.loop import FaultInjection
from jobs.preflight import load_run_config

ROOT = Path(__file__).resolve().parents[2]
STEPS, KILL_AFTER = 5, 3


def _train(work: Path, model_dir: Path, name: str, strategy: str, total_cpus: float,
           fault: FaultInjection | None) -> Path:
    raw = {
        "model_name_or_path": str(model_dir), "template": "qwen",
        "dataset": "alpaca_en_demo", "dataset_dir": str(ROOT / "data"), "max_samples": 40,
        "cutoff_len": 48, "output_dir": str(work / name),
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "learning_rate": 5.0e-3, "lr_scheduler_type": "cosine", "max_steps": STEPS,
        "logging_steps": 1, "save_steps": 2, "lora_rank": 4,
        "disable_gradient_checkpointing": True,
        "tokenized_cache_dir": str(work / "cache"),
        "ray": {"num_workers": 2, "strategy": strategy, "max_failures": 1},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_training(load_run_config(path), total_cpus=total_cpus, fault=fault)
    return work / name


def _by_step(output_dir: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run logs the re-trained step again)."""
    records = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
    return {record["current_steps"]: record for record in records}


# CI runs DDP; FSDP2 (sharded optimizer state restored from per-rank shards) is `make test-slow`.
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_killed_worker_resumes_to_the_same_curve(
    strategy: str, ray_cluster: float, tiny_model_dir: Path, tmp_path: Path
) -> None:
    plain = _train(tmp_path, tiny_model_dir, "plain", strategy, ray_cluster, None)
    marker = tmp_path / "killed.txt"
    faulted = _train(
        tmp_path, tiny_model_dir, "faulted", strategy, ray_cluster,
        FaultInjection(step=KILL_AFTER, marker=str(marker)),
    )
    assert marker.exists(), "the injected failure never happened"
    raw = (faulted / "trainer_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["current_steps"] for line in raw] == [1, 2, 3, 3, 4, 5]
    expected, resumed = _by_step(plain), _by_step(faulted)
    for step in range(KILL_AFTER, STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-4), step
        assert resumed[step]["lr"] == pytest.approx(expected[step]["lr"], rel=1e-6), step
    plain_result = json.loads((plain / "all_results.json").read_text())
    faulted_result = json.loads((faulted / "all_results.json").read_text())
    assert faulted_result["final_loss"] == pytest.approx(plain_result["final_loss"], abs=1e-4)
