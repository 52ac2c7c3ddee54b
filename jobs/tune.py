"""Hyperparameter sweeps with Ray Tune: every trial is a full rayft training run.

Ray Train V2 pattern: Tune runs a function that builds and fits a `TorchTrainer`; the trainer's
`TuneReportCallback` forwards what the workers report (`loss`, `step`, checkpoint paths) so
ASHA can stop weak trials early. Tokenization happens once for all trials (the cache in
`data_pipelines.cache` is keyed by content, and the sweep does not change the data).

Run: `python -m jobs.tune CONFIG.yaml [key=value ...] [--resume]` (what `rayft tune` runs).
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from configs import ConfigProblem, RayftConfig, write_resolved
from jobs.resources import plan_resources

# Keys a sweep may not vary: where things go and the sweep itself.
_NOT_TUNABLE = frozenset({"ray", "serve", "tune", "output_dir", "export_dir", "dataset_dir"})
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# The trial function only drives its TorchTrainer; Tune needs it to ask for some resource.
TRIAL_DRIVER_CPUS = 0.05


def reported_metrics(config: RayftConfig) -> tuple[str, ...]:
    """What the training loop reports to Ray Train (and so to Tune) at every report: the loss,
    the stage's metrics, and their eval_ versions when the run evaluates."""
    from jobs.registry import get_stage

    try:
        names = ("loss", *get_stage(config.stage).metrics)
    except ValueError:
        names = ("loss",)
    evaluated = tuple(f"eval_{name}" for name in names) if config.eval_strategy != "no" else ()
    return names + evaluated


def check_tune(config: RayftConfig) -> list[ConfigProblem]:
    """Config check for `rayft tune`: a search space over real training keys, a metric that
    the loop reports, an installed search algorithm."""
    if config.tune is None:
        return [ConfigProblem("tune", "is required for a sweep; add a `tune:` section")]
    problems: list[ConfigProblem] = []
    tunable = sorted(set(RayftConfig.model_fields) - _NOT_TUNABLE)
    for key in config.tune.search_space:
        if key not in tunable:
            close = difflib.get_close_matches(key, tunable, n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append(
                ConfigProblem(f"tune.search_space.{key}", f"is not a training key{hint}")
            )
    reported = reported_metrics(config)
    if config.tune_metric not in reported:
        problems.append(
            ConfigProblem(
                "tune.metric",
                f"`{config.tune_metric}` is never reported; this run reports "
                f"{', '.join(reported)} (eval_* metrics need val_size or eval_dataset with "
                "eval_strategy)",
            )
        )
    if config.tune.search_alg == "optuna" and importlib.util.find_spec("optuna") is None:
        problems.append(
            ConfigProblem("tune.search_alg", "optuna is not installed: pip install optuna")
        )
    return problems


def param_space(config: RayftConfig) -> dict[str, Any]:
    """The `tune:` search space as Ray Tune domains."""
    from ray import tune

    domains: dict[str, Callable[[list[Any]], Any]] = {
        "loguniform": lambda args: tune.loguniform(*args),
        "uniform": lambda args: tune.uniform(*args),
        "randint": lambda args: tune.randint(args[0], args[1] + 1),  # inclusive, as users expect
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    assert config.tune is not None
    return {
        key: domains[kind](args)
        for key, spec in config.tune.search_space.items()
        for kind, args in spec.items()
    }


def _trial(params: dict[str, Any], *, base: dict[str, Any], cpus_per_trial: float) -> None:
    """One trial: the base config with this trial's values, trained to completion or until
    the scheduler stops it."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.launch import run_training

    trial_dir = Path(base["output_dir"]) / "trials" / tune.get_context().get_trial_id()
    values = {**base, **params, "output_dir": str(trial_dir), "tune": None}
    config = RayftConfig.model_validate(values)
    run_training(config, total_cpus=cpus_per_trial, callbacks=[TuneReportCallback()])


def run_sweep(config: RayftConfig, *, total_cpus: float, resume: bool) -> Path:
    """Run (or resume) the sweep, write the results table and plot, export the best trial.

    Returns:
        `output_dir/best`, holding the best trial's adapter and resolved config.

    Raises:
        ValueError: when a trial with its workers and data tasks cannot fit the cluster.
    """
    from ray import tune

    from jobs.launch import with_absolute_paths

    assert config.tune is not None
    config = with_absolute_paths(config)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = config.tune
    cpus_per_trial = total_cpus / settings.max_concurrent_trials - TRIAL_DRIVER_CPUS
    need = _cpus_needed(config, cpus_per_trial)
    if need > cpus_per_trial:
        raise ValueError(
            f"a trial needs {need:g} CPUs (ray.num_workers={config.ray.num_workers} workers plus "
            f"a data task) but max_concurrent_trials={settings.max_concurrent_trials} leaves "
            f"{cpus_per_trial:g} of the cluster's {total_cpus:g}; lower one of them"
        )
    base = config.model_dump(mode="json")
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, cpus_per_trial=cpus_per_trial),
        {"CPU": TRIAL_DRIVER_CPUS},
    )
    storage = output_dir / "tune"
    name = "sweep"
    if resume and tune.Tuner.can_restore(str(storage / name)):
        print(f"[rayft] resuming the sweep in {storage / name}", flush=True)
        tuner = tune.Tuner.restore(
            str(storage / name), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(config),
            tune_config=tune.TuneConfig(
                metric=config.tune_metric,
                mode=settings.mode,
                num_samples=settings.num_samples,
                max_concurrent_trials=settings.max_concurrent_trials,
                scheduler=_scheduler(config),
                search_alg=_search_alg(config),
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(storage)),
        )
    grid = tuner.fit()
    rows = _results_table(grid, config)
    _write_table(rows, output_dir / "tune_results.csv")
    _plot_curves(grid, config, output_dir / "tune_curves.png")
    best = grid.get_best_result(metric=config.tune_metric, mode=settings.mode, scope="all")
    return _export_best(best, config, output_dir / "best")


def _cpus_needed(config: RayftConfig, cpus_per_trial: float) -> float:
    if config.ray.resources_per_worker:
        per_worker = config.ray.resources_per_worker.get("CPU", 0.0)
        return per_worker * config.ray.num_workers
    plan = plan_resources(cpus_per_trial, num_workers=config.ray.num_workers)
    return plan.cpus_per_worker * config.ray.num_workers + plan.cpus_per_data_task


def _scheduler(config: RayftConfig) -> Any:
    from ray.tune.schedulers import FIFOScheduler, PopulationBasedTraining

    from jobs.tune_asha import ResumableASHA

    assert config.tune is not None
    settings = config.tune
    schedulers: dict[str, Callable[[], Any]] = {
        "asha": lambda: ResumableASHA(
            time_attr="step",
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        ),
        "pbt": lambda: PopulationBasedTraining(
            time_attr="step",
            perturbation_interval=settings.grace_period,
            hyperparam_mutations=param_space(config),
        ),
        "none": FIFOScheduler,
    }
    return schedulers[settings.scheduler]()


def _search_alg(config: RayftConfig) -> Any:
    assert config.tune is not None
    if config.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch()
    return None  # Tune's default: random and grid search over `param_space`


def _results_table(grid: Any, config: RayftConfig) -> list[dict[str, Any]]:
    assert config.tune is not None
    metric = config.tune_metric
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        last_step = int(frame["step"].max()) if frame is not None and "step" in frame else 0
        finished = result.error is None and _completed(result, Path(config.output_dir))
        rows.append(
            {
                "trial": Path(result.path).name,
                **{key: result.config.get(key) for key in config.tune.search_space},
                f"last_{metric}": (result.metrics or {}).get(metric),
                f"best_{metric}": float(frame[metric].min())
                if frame is not None and metric in frame
                else None,
                "steps": last_step,
                "status": "error"
                if result.error
                else ("completed" if finished else "stopped early"),
            }
        )
    header = list(rows[0]) if rows else []
    print("\n[rayft] sweep results")
    print("  " + "  ".join(f"{h:>14}" for h in header))
    for row in rows:
        print("  " + "  ".join(f"{_fmt(row[h]):>14}" for h in header))
    return rows


def _completed(result: Any, output_dir: Path) -> bool:
    """A trial that ran to the end has its final results file (rank 0's last write)."""
    trial_id = (result.metrics or {}).get("trial_id")
    return bool(trial_id) and (output_dir / "trials" / trial_id / "all_results.json").is_file()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_table(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"[rayft] results table: {path}")


def _plot_curves(grid: Any, config: RayftConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert config.tune is not None
    metric = config.tune_metric
    figure, axis = plt.subplots(figsize=(7, 4))
    for result in grid:
        frame = result.metrics_dataframe
        if frame is not None and metric in frame and "step" in frame:
            axis.plot(frame["step"], frame[metric], label=Path(result.path).name[-24:])
    axis.set_xlabel("step")
    axis.set_ylabel(metric)
    axis.set_title("sweep: one curve per trial")
    axis.legend(fontsize=6)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"[rayft] trial curves: {path}")


def _export_best(best: Any, config: RayftConfig, target: Path) -> Path:
    """Copy the best trial's latest checkpointed adapter (and its config) to `target`."""
    frame = best.metrics_dataframe
    paths = list(frame["checkpoint_path"].dropna()) if "checkpoint_path" in frame else []
    if not paths:
        raise RuntimeError(f"the best trial {best.path} reported no checkpoint")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy2(Path(paths[-1]) / name, target / name)
    tuned = {key: best.config[key] for key in config.tune.search_space}  # type: ignore[union-attr]
    best_config = config.model_copy(update={**tuned, "tune": None})
    write_resolved(best_config, target)
    (target / "best_params.json").write_text(json.dumps(tuned, indent=2))
    print(f"[rayft] best trial {Path(best.path).name} {tuned} → {target}")
    if config.export_dir:
        from jobs.export import export_merged

        export_merged(best_config.model_copy(update={"adapter_name_or_path": str(target)}))
    return target


def main(argv: list[str] | None = None) -> Path:
    """`python -m jobs.tune CONFIG [key=value ...] [--resume]`."""
    from configs import load_config
    from jobs.preflight import TRAIN_CHECKS
    from jobs.runtime import local_ray

    args = sys.argv[1:] if argv is None else argv
    resume = "--resume" in args
    args = [a for a in args if a != "--resume"]
    if not args:
        raise SystemExit("usage: python -m jobs.tune CONFIG.yaml [key=value ...] [--resume]")
    config = load_config(args[0], args[1:], checks=(*TRAIN_CHECKS, check_tune))
    with local_ray(config.ray.address, runtime_env=config.ray.runtime_env) as total_cpus:
        return run_sweep(config, total_cpus=total_cpus, resume=resume)


if __name__ == "__main__":
    main()
