"""A real sweep: three trials, each a TorchTrainer run, ASHA stopping the weak ones early.

The sweep is started as `python -m jobs.tune` in a child process on the session's cluster and
killed (SIGKILL, no chance to clean up) once the first trial has finished; the test then resumes
it with `--resume` semantics and checks that the finished trial was not trained again.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from configs import load_config
from jobs.tune import check_tune, run_sweep

ROOT = Path(__file__).resolve().parents[2]
KILL_DEADLINE_S = 600


def _sweep_yaml(path: Path, tiny_model_dir: Path, out: Path, address: str) -> Path:
    settings = {
        "model_name_or_path": str(tiny_model_dir),
        "template": "qwen",
        "dataset": "alpaca_en_demo",
        "dataset_dir": str(ROOT / "data"),
        "max_samples": 32,
        "cutoff_len": 64,
        "output_dir": str(out),
        "tokenized_cache_dir": str(out / "cache"),
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "logging_steps": 1,
        "save_steps": 3,
        "ray": {"num_workers": 1, "address": address},
        # One strong and two hopeless learning rates, tried in this order: ASHA keeps the first
        # and cuts the others at the first rung.
        "tune": {
            "search_space": {"learning_rate": {"grid": [2.0e-2, 1.0e-9, 1.0e-9]}},
            "scheduler": "asha",
            "grace_period": 2,
            "reduction_factor": 2,
        },
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def _finished_trials(out: Path) -> dict[str, float]:
    """Trial folders whose run wrote its final results, with that file's modification time."""
    return {
        results.parent.name: results.stat().st_mtime
        for results in (out / "trials").glob("*/all_results.json")
    }


def _sweep_state_says_terminated(out: Path) -> bool:
    """Tune has saved a sweep state in which some trial is finished (what a restore reads)."""
    return any(
        "TERMINATED" in state.read_text()
        for state in (out / "tune" / "sweep").glob("experiment_state-*.json")
    )


def _start_and_kill(config_path: Path, out: Path, log: Path) -> dict[str, float]:
    """Run the sweep in a child process and SIGKILL it once a finished trial is on record."""
    with log.open("w") as handle:
        child = subprocess.Popen(
            [sys.executable, "-m", "jobs.tune", str(config_path)],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + KILL_DEADLINE_S
    try:
        while not (_finished_trials(out) and _sweep_state_says_terminated(out)):
            if child.poll() is not None:
                pytest.fail(
                    f"the sweep ended (rc {child.returncode}) before it could be killed:\n"
                    + log.read_text()[-4000:]
                )
            if time.monotonic() > deadline:
                pytest.fail("no trial finished in time:\n" + log.read_text()[-4000:])
            time.sleep(0.5)
        finished = _finished_trials(out)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    return finished


@pytest.fixture(scope="module")
def sweep(ray_cluster: float, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    import ray

    out = tmp_path_factory.mktemp("sweep")
    config_path = _sweep_yaml(
        out.parent / f"{out.name}.yaml",
        tiny_model_dir,
        out,
        ray.get_runtime_context().gcs_address,
    )
    finished = _start_and_kill(config_path, out, out.parent / f"{out.name}.log")
    config = load_config(str(config_path), ["ray.address=null"], checks=(check_tune,))
    best = run_sweep(config, total_cpus=ray_cluster, resume=True)
    return config, out, best, finished


def test_asha_stops_weak_trials_and_the_best_adapter_loads(sweep) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, out, best, _ = sweep
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


def test_a_killed_sweep_resumes_without_redoing_finished_trials(sweep) -> None:
    _, out, _, finished_before_kill = sweep
    assert finished_before_kill, "the sweep was killed before any trial finished"
    after = _finished_trials(out)
    for trial, mtime in finished_before_kill.items():
        assert after[trial] == mtime, f"trial {trial} was trained again after the resume"
    assert len(list((out / "trials").iterdir())) == 3
