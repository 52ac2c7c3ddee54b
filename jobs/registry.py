"""Stage name → stage. Each stage registers itself from its own file under `jobs/stages/`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from configs import ConfigProblem, RayftConfig


@dataclass(frozen=True)
class Stage:
    """What differs between training stages; the loop in `jobs.loop` does the rest.

    Attributes:
        name: the `stage:` value.
        prepare_data: config, CPUs per data task → `PreparedData` (tokenized rows + report).
        collate: numpy batch from Ray Data, pad id → tensors for `loss_sum`.
        loss_sum: model, batch → (summed loss, number of items it sums over).
    """

    name: str
    prepare_data: Callable[[RayftConfig, float], Any]
    collate: Callable[[dict[str, Any], int], dict[str, torch.Tensor]]
    loss_sum: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Add a stage; each name once."""
    if stage.name in STAGES:
        raise ValueError(f"stage `{stage.name}` registered twice")
    STAGES[stage.name] = stage
    return stage


def get_stage(name: str) -> Stage:
    """Look a stage up, naming the valid ones when it is unknown."""
    import jobs.stages  # noqa: F401  (fills STAGES)

    if name not in STAGES:
        raise ValueError(f"stage `{name}` is not supported; valid stages: {', '.join(sorted(STAGES))}")
    return STAGES[name]


def check_stage(config: RayftConfig) -> list[ConfigProblem]:
    """Config check: the stage is registered."""
    try:
        get_stage(config.stage)
    except ValueError as err:
        return [ConfigProblem("stage", str(err))]
    return []
