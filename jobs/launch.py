"""Config → Ray Data pipeline → `TorchTrainer` → fit. The driver side of a training run.

Example:
    >>> from jobs.runtime import local_ray
    >>> with local_ray() as cpus:
    ...     outcome = run_training(config, total_cpus=cpus)
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from configs import RayftConfig, write_resolved
from jobs.loop import LoopPlan, plan_steps, train_loop_per_worker
from jobs.registry import get_stage
from jobs.resources import plan_resources
from jobs.strategies import load_deepspeed_config


@dataclasses.dataclass(frozen=True)
class TrainingOutcome:
    """What a finished run left behind."""

    output_dir: Path
    total_steps: int
    final_loss: float | None
    checkpoint_path: str | None


def run_training(
    config: RayftConfig, *, total_cpus: float, callbacks: Sequence[Any] = ()
) -> TrainingOutcome:
    """Tokenize with Ray Data, train with Ray Train, write LLaMA-Factory-style outputs.

    Args:
        config: a validated config (see `jobs.preflight.load_run_config`); `output_dir` is
            made absolute so that workers, whose cwd is not the driver's, write to the same place.
        total_cpus: CPUs of the Ray cluster, to size fractional requests.
        callbacks: Ray Train callbacks (a sweep passes Tune's `TuneReportCallback`).

    Returns:
        Paths, steps and the last loss.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = with_absolute_paths(config)
    # Read before any cluster time is spent, so a bad path fails here, not in every worker.
    deepspeed_config = (
        load_deepspeed_config(config.ray.deepspeed_config)
        if config.ray.effective_strategy == "deepspeed" and config.ray.deepspeed_config
        else None
    )
    output_dir = Path(config.output_dir)
    if config.overwrite_output_dir and output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(config, output_dir)
    storage = config.ray.storage_path or str(output_dir / "ray")
    previous = latest_checkpoint(Path(storage) / _run_name(output_dir))
    if previous is None:
        (output_dir / "trainer_log.jsonl").unlink(missing_ok=True)
    else:
        print(f"[rayft] resuming from {previous} (set overwrite_output_dir to start over)")

    workers = config.ray.num_workers
    resources = plan_resources(total_cpus, num_workers=workers)
    stage = get_stage(config.stage)
    data = stage.prepare_data(config, resources.cpus_per_data_task)
    print(f"[rayft] data: {data.report.summary()}", flush=True)
    data.report.write(output_dir)

    _, micro, steps_per_epoch, total_steps = plan_steps(
        config, rows=data.report.kept, world_size=workers
    )
    print(
        f"[rayft] {data.report.kept} rows, {workers} worker(s) ({config.ray.effective_strategy}), "
        f"{steps_per_epoch} step(s)/epoch, {total_steps} step(s) in total",
        flush=True,
    )
    plan = LoopPlan(
        config=config.model_dump(mode="json"),
        micro_per_epoch=micro,
        total_steps=total_steps,
        torch_threads=resources.torch_threads,
        resume_from=str(previous) if previous else None,
        deepspeed_config=deepspeed_config,
    )
    per_worker = config.ray.resources_per_worker or {"CPU": resources.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(plan),
        torch_config=TorchConfig(backend="nccl" if config.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=config.ray.use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            callbacks=list(callbacks),
            name=_run_name(output_dir),
            storage_path=storage,
            failure_config=FailureConfig(max_failures=config.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.save_total_limit),
        ),
        datasets={"train": data.dataset},
    )
    result = trainer.fit()
    if config.plot_loss:
        plot_loss(output_dir)
    results = json.loads((output_dir / "all_results.json").read_text())
    return TrainingOutcome(
        output_dir=output_dir,
        total_steps=total_steps,
        final_loss=results.get("final_loss"),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
    )


def with_absolute_paths(config: RayftConfig) -> RayftConfig:
    """Local paths made absolute: Ray workers and tasks do not run in the driver's cwd."""
    updates: dict[str, str] = {}
    for key in ("model_name_or_path", "adapter_name_or_path", "dataset_dir", "export_dir"):
        value = getattr(config, key)
        if value and Path(value).expanduser().exists():
            updates[key] = str(Path(value).expanduser().resolve())
    if config.output_dir:
        updates["output_dir"] = str(Path(config.output_dir).expanduser().resolve())
    return config.model_copy(update=updates)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest step of an earlier run in `run_dir`, if any.

    As in LLaMA-Factory, a run into an `output_dir` that holds checkpoints continues from the
    last one unless `overwrite_output_dir` is set.
    """
    steps = {
        int(match.group(1)): path
        for path in run_dir.glob("checkpoint-*")
        if (match := re.fullmatch(r"checkpoint-(\d+)", path.name))
        and (path / "trainer_state.json").is_file()
    }
    return steps[max(steps)] if steps else None


def _run_name(output_dir: Path) -> str:
    return "rayft-" + re.sub(r"[^A-Za-z0-9_.-]", "_", output_dir.name)


def plot_loss(output_dir: Path) -> Path | None:
    """`training_loss.png` from `trainer_log.jsonl` (as LLaMA-Factory's `plot_loss`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = output_dir / "trainer_log.jsonl"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([r["current_steps"] for r in records], [r["loss"] for r in records], label="loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(f"training loss of {output_dir.name}")
    axis.legend()
    target = output_dir / "training_loss.png"
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target
