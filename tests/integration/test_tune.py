"""A real sweep: three trials, each a TorchTrainer run, ASHA stopping the weak ones early."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from configs import load_config
from jobs.tune import check_tune, run_sweep

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sweep(ray_cluster: float, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sweep")
    config = load_config(
        None,
        [
            f"model_name_or_path={tiny_model_dir}",
            "template=qwen",
            "dataset=alpaca_en_demo",
            f"dataset_dir={ROOT / 'data'}",
            "max_samples=32",
            "cutoff_len=64",
            f"output_dir={out}",
            f"tokenized_cache_dir={out / 'cache'}",
            "per_device_train_batch_size=4",
            "max_steps=6",
            "logging_steps=1",
            "save_steps=3",
            "ray.num_workers=1",
            # One strong and two hopeless learning rates, tried in this order: ASHA keeps the
            # first and cuts the others at the first rung.
            "tune={search_space: {learning_rate: {grid: [2.0e-2, 1.0e-9, 1.0e-9]}}, "
            "scheduler: asha, grace_period: 2, reduction_factor: 2}",
        ],
        checks=(check_tune,),
    )
    best = run_sweep(config, total_cpus=ray_cluster, resume=False)
    return config, out, best


def test_asha_stops_weak_trials_and_the_best_adapter_loads(sweep) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, out, best = sweep
    with (out / "tune_results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    statuses = sorted(row["status"] for row in rows)
    assert statuses.count("stopped early") >= 1, rows
    assert "completed" in statuses, rows
    assert (out / "tune_curves.png").is_file()
    assert float((best / "best_params.json").read_text().split(":")[1].strip(" }\n")) == 2.0e-2
    base = AutoModelForCausalLM.from_pretrained(config.model_name_or_path)
    PeftModel.from_pretrained(base, str(best))


def test_resume_does_not_redo_finished_trials(sweep, ray_cluster: float) -> None:
    config, out, _ = sweep
    trials_before = sorted(p.name for p in (out / "trials").iterdir())
    run_sweep(config, total_cpus=ray_cluster, resume=True)
    assert sorted(p.name for p in (out / "trials").iterdir()) == trials_before
    with (out / "tune_results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3
