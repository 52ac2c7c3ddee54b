"""`tune:` mistakes are reported before any trial starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs import ConfigError, load_config
from jobs.tune import check_tune, param_space

ROOT = Path(__file__).resolve().parents[2]


def _load(*overrides: str):
    return load_config(
        None,
        ["model_name_or_path=m", "dataset=identity", "output_dir=o", *overrides],
        checks=(check_tune,),
    )


def test_search_space_on_an_unknown_key_names_the_key() -> None:
    with pytest.raises(
        ConfigError, match=r"tune.search_space.learning_rat.*did you mean `learning_rate`"
    ):
        _load("tune={search_space: {learning_rat: {choice: [1.0e-4]}}}")


def test_metric_that_is_never_reported_is_refused() -> None:
    with pytest.raises(ConfigError, match="`eval_loss` is never reported"):
        _load("tune={search_space: {lora_rank: {choice: [8]}}, metric: eval_loss}")


def test_empty_choice_list_is_refused() -> None:
    with pytest.raises(ConfigError, match="`lora_rank`: the `choice` list is empty"):
        _load("tune={search_space: {lora_rank: {choice: []}}}")


def test_two_distributions_for_one_key_are_refused() -> None:
    with pytest.raises(ConfigError, match="exactly one distribution"):
        _load("tune={search_space: {learning_rate: {choice: [1.0], uniform: [0, 1]}}}")


def test_missing_tune_section_is_refused() -> None:
    with pytest.raises(ConfigError, match="`tune`: is required"):
        _load()


def test_param_space_maps_every_distribution() -> None:
    config = _load(
        "tune={search_space: {learning_rate: {loguniform: [1.0e-5, 1.0e-3]}, "
        "lora_rank: {choice: [8, 16]}, seed: {grid: [1, 2]}, warmup_ratio: {uniform: [0, 0.1]}, "
        "max_samples: {randint: [10, 20]}}}"
    )
    space = param_space(config)
    assert space["seed"] == {"grid_search": [1, 2]}
    assert space["lora_rank"].categories == [8, 16]
    assert (space["max_samples"].lower, space["max_samples"].upper) == (10, 21)
    assert 1e-5 <= space["learning_rate"].sample() <= 1e-3


def test_eval_and_stage_metrics_are_tunable_when_reported() -> None:
    config = _load(
        "val_size=0.1",
        "eval_strategy=steps",
        "tune={search_space: {lora_rank: {choice: [8]}}, metric: eval_loss}",
    )
    assert config.tune.metric == "eval_loss"
    _load(
        "stage=dpo",
        "dataset=dpo_en_demo",
        "tune={search_space: {pref_beta: {choice: [0.1]}}, metric: rewards/accuracies, mode: max}",
    )
    with pytest.raises(ConfigError, match="`rewards/accuracies` is never reported"):
        _load("tune={search_space: {lora_rank: {choice: [8]}}, metric: rewards/accuracies}")


def test_default_metric_is_eval_loss_when_the_run_evaluates() -> None:
    evaluating = _load(
        "val_size=0.1", "eval_strategy=steps", "tune={search_space: {lora_rank: {choice: [8]}}}"
    )
    assert evaluating.tune.metric is None and evaluating.tune_metric == "eval_loss"
    plain = _load("tune={search_space: {lora_rank: {choice: [8]}}}")
    assert plain.tune_metric == "loss"
