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
from jobs.checkpoints import latest_complete
from jobs.loop import FaultInjection, LoopPlan, plan_steps, train_loop_per_worker
from jobs.placement import check_cluster_fits, rank0_label_selectors
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
    config: RayftConfig,
    *,
    total_cpus: float,
    callbacks: Sequence[Any] = (),
    fault: FaultInjection | None = None,
) -> TrainingOutcome:
    """Tokenize with Ray Data, train with Ray Train, write LLaMA-Factory-style outputs.

    Args:
        config: a validated config (see `jobs.preflight.load_run_config`); `output_dir` is
            made absolute so that workers, whose cwd is not the driver's, write to the same place.
        total_cpus: CPUs of the Ray cluster, to size fractional requests.
        callbacks: Ray Train callbacks (a sweep passes Tune's `TuneReportCallback`).
        fault: kill one worker once at a chosen step (fault-tolerance tests; never from YAML).

    Returns:
        Paths, steps and the last loss.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
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
    run_dir = _local_run_dir(storage, output_dir)
    if config.overwrite_output_dir and run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints kept outside output_dir too
    previous = latest_checkpoint(Path(run_dir)) if run_dir else None
    if previous is None:
        (output_dir / "trainer_log.jsonl").unlink(missing_ok=True)
    else:
        print(f"[rayft] resuming from {previous} (set overwrite_output_dir to start over)")

    workers = config.ray.num_workers
    resources = plan_resources(total_cpus, num_workers=workers)
    # Before any data work: a run the cluster cannot hold fails here, not as a silent hang.
    check_cluster_fits(config, cpus_per_worker=resources.cpus_per_worker)
    label_selector = rank0_label_selectors(config, cpus_per_worker=resources.cpus_per_worker)
    stage = get_stage(config.stage)
    data = stage.prepare_data(config, resources.cpus_per_data_task)
    if data.stream is None:
        print(f"[rayft] data: {data.report.summary()}", flush=True)
        data.report.write(output_dir)
    datasets, rows = evaluation_datasets(config, stage, data, resources.cpus_per_data_task)

    _, micro, steps_per_epoch, total_steps = plan_steps(
        config, rows=rows["train"], world_size=workers
    )
    if "eval" in rows and rows["eval"] < workers:
        raise ValueError(
            f"{rows['eval']} evaluation rows cannot feed {workers} workers (each rank evaluates "
            "its own share); raise val_size or add eval data"
        )
    examples = "streamed" if data.stream else f"{data.report.training_examples} examples"
    per_epoch = f"{steps_per_epoch} step(s)/epoch, " if steps_per_epoch else ""
    print(
        f"[rayft] {examples}, {workers} worker(s) ({config.ray.effective_strategy}), "
        f"{per_epoch}{total_steps} step(s) in total",
        flush=True,
    )
    plan = LoopPlan(
        config=config.model_dump(mode="json"),
        micro_per_epoch=micro,
        total_steps=total_steps,
        torch_threads=resources.torch_threads,
        resume_from=str(previous) if previous else None,
        deepspeed_config=deepspeed_config,
        eval_rows=rows.get("eval", 0),
        fault=dataclasses.asdict(fault) if fault else None,
        run_dir=run_dir,
    )
    per_worker = config.ray.resources_per_worker or {"CPU": resources.cpus_per_worker}
    trainer = TorchTrainer(
        stage.train_loop or train_loop_per_worker,
        train_loop_config=dataclasses.asdict(plan),
        torch_config=TorchConfig(backend="nccl" if config.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=config.ray.use_gpu,
            resources_per_worker=per_worker,
            placement_strategy=config.ray.placement_strategy,
            label_selector=label_selector,
        ),
        run_config=RunConfig(
            callbacks=list(callbacks),
            name=_run_name(output_dir),
            storage_path=storage,
            failure_config=FailureConfig(max_failures=config.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.save_total_limit),
        ),
        datasets=datasets,
        dataset_config=_ordered_ingest(DataConfig),
    )
    result = trainer.fit()
    if data.stream is not None:
        finish_stream(data.stream, config, output_dir)
    if config.plot_loss:
        plot_loss(output_dir)
    results = json.loads((output_dir / "all_results.json").read_text())
    return TrainingOutcome(
        output_dir=output_dir,
        total_steps=total_steps,
        final_loss=results.get("final_loss"),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
    )


def finish_stream(stream: Any, config: RayftConfig, output_dir: Path) -> None:
    """A streamed run's row counts, known only now: printed, written, and held against
    `max_bad_fraction` (the stream itself fails early once enough rows have passed)."""
    report = stream.report()
    print(f"[rayft] streamed data: {report.summary()}", flush=True)
    report.write(output_dir)
    report.check(
        config.max_bad_fraction,
        note=f" (streamed: the run's outputs in {output_dir} were trained on the rest)",
    )


def _ordered_ingest(data_config: Any) -> Any:
    """Shards whose block order is the same in every attempt: a resumed worker skips exactly
    the micro-batches it trained before the checkpoint, so the resumed loss curve equals the
    uninterrupted one."""
    options = data_config.default_ingest_options()
    options.preserve_order = True
    return data_config(execution_options=options, enable_shard_locality=False)


def evaluation_datasets(
    config: RayftConfig, stage: Any, data: Any, cpus_per_task: float
) -> tuple[dict[str, Any], dict[str, int | None]]:
    """The Ray datasets of a run ("train", and "eval" when evaluating) and their row counts.

    `eval_dataset` is tokenized like the training data (and cached the same way); `val_size`
    holds rows out of the training data by content hash (`data_pipelines.splits`).
    """
    from data_pipelines.families import get_family
    from data_pipelines.splits import held_out_share, split_validation

    rows: dict[str, int | None] = {"train": None if data.stream else data.report.training_examples}
    if config.eval_dataset:
        # Evaluation data are tokenized and cached even when training streams: evaluation
        # needs their row count to give every rank its share.
        held_out = stage.prepare_data(
            config.model_copy(update={"dataset": config.eval_dataset, "streaming": False}),
            cpus_per_task,
        )
        print(f"[rayft] eval data: {held_out.report.summary()}", flush=True)
        rows["eval"] = held_out.report.training_examples
        return {"train": data.dataset, "eval": held_out.dataset}, rows
    if config.val_size <= 0:
        return {"train": data.dataset}, rows
    share = held_out_share(config.val_size, rows["train"])
    id_column = get_family(stage.family).id_columns[0]
    train, held_out = split_validation(
        data.dataset,
        id_column=id_column,
        share=share,
        seed=config.seed,
        cpus_per_task=cpus_per_task,
    )
    # Two streaming counting passes (the split is a pure function of each row); nothing is
    # held in memory, and training streams the same lazy plans again.
    rows = {"train": train.count(), "eval": held_out.count()}
    if rows["eval"] == 0 or rows["train"] == 0:
        raise ValueError(
            f"val_size={config.val_size} split {sum(rows.values())} rows into {rows['train']} "
            f"for training and {rows['eval']} for evaluation; change val_size"
        )
    print(f"[rayft] val_size={config.val_size}: {rows['train']} train / {rows['eval']} eval rows")
    return {"train": train, "eval": held_out}, rows


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
    """The complete checkpoint with the highest step of an earlier run in `run_dir`, if any.

    As in LLaMA-Factory, a run into an `output_dir` that holds checkpoints continues from the
    last one unless `overwrite_output_dir` is set; a half-written one is never used.
    """
    return latest_complete(run_dir)


def _local_run_dir(storage: str, output_dir: Path) -> str | None:
    """The run's checkpoint folder when storage is a local (or mounted) path, else None."""
    if "://" in storage:
        return None
    return str(Path(storage) / _run_name(output_dir))


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
