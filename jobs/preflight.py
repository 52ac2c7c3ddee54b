"""Every check a run needs before any cluster time is spent, reported together.

`load_run_config` is what `rayft validate`, `rayft train` and `python -m jobs.train` call: the
schema errors and the cross-layer checks (datasets on disk, template, stage, tracker) come back
in one `ConfigError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from configs import ConfigProblem, RayftConfig, load_config
from data_pipelines.dataset_info import DatasetError, resolve_dataset
from data_pipelines.families import check_row_kinds, get_family
from data_pipelines.templates import get_template
from jobs.registry import check_stage, get_stage
from jobs.trackers import check_tracker


def check_datasets(config: RayftConfig) -> list[ConfigProblem]:
    """Each name in `dataset` is declared, its files exist, and its rows fit the stage (e.g.
    `dpo` needs ranking pairs)."""
    if not config.dataset_names:
        return [ConfigProblem("dataset", "is required for training; e.g. `dataset: identity`")]
    problems = []
    try:
        family = get_family(get_stage(config.stage).family)
    except ValueError:
        family = None  # an unknown stage is check_stage's to report
    for name in [*config.dataset_names, *config.eval_dataset_names]:
        try:
            spec = resolve_dataset(name, config.dataset_dir)
            if family is not None:
                check_row_kinds([spec], family, config.stage)
        except DatasetError as err:
            problems.append(ConfigProblem("dataset", str(err)))
    return problems


def check_template(config: RayftConfig) -> list[ConfigProblem]:
    """A named template exists (unset uses the tokenizer's own chat_template, as in
    LLaMA-Factory)."""
    if config.template is None:
        return []
    try:
        get_template(config.template)
    except ValueError as err:
        return [ConfigProblem("template", str(err))]
    return []


def check_model_path(config: RayftConfig) -> list[ConfigProblem]:
    """A path-like `model_name_or_path` exists (hub ids are checked when loaded)."""
    value = config.model_name_or_path
    looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1
    if looks_local and not Path(value).expanduser().is_dir():
        return [
            ConfigProblem(
                "model_name_or_path",
                f"no model directory at {Path(value).expanduser().resolve()}"
                + ("; run `rayft prepare-model` first" if "gemma-3-270m" in value else ""),
            )
        ]
    return []


def check_output_dir(config: RayftConfig) -> list[ConfigProblem]:
    """Training writes somewhere the user chose."""
    if not config.output_dir:
        return [
            ConfigProblem("output_dir", "is required for training; e.g. `output_dir: saves/run`")
        ]
    return []


def check_deepspeed(config: RayftConfig) -> list[ConfigProblem]:
    """The DeepSpeed JSON exists, parses, and its ZeRO options fit its stage."""
    from jobs.strategies import StrategyError, load_deepspeed_config

    if config.ray.effective_strategy != "deepspeed" or not config.ray.deepspeed_config:
        return []
    try:
        load_deepspeed_config(config.ray.deepspeed_config)
    except StrategyError as err:
        return [ConfigProblem("ray.deepspeed_config", str(err))]
    return []


TRAIN_CHECKS = (
    check_model_path,
    check_template,
    check_datasets,
    check_output_dir,
    check_stage,
    check_tracker,
    check_deepspeed,
)
INFER_CHECKS = (check_model_path, check_template)


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RayftConfig:
    """Load a training config and run every pre-flight check; `ConfigError` lists all problems."""
    return load_config(path, overrides, checks=TRAIN_CHECKS)


def load_infer_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RayftConfig:
    """Load a config for chat/serve/export: the model and template must be usable."""
    return load_config(path, overrides, checks=INFER_CHECKS)
