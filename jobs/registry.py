"""Stage name → stage. Each stage registers itself from its own file under `jobs/stages/`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from configs import ConfigProblem, RayftConfig


@dataclass(frozen=True)
class StepContext:
    """What a stage's loss sees besides the batch.

    Attributes:
        model: the policy as the strategy wrapped it (call it for forward passes with grad).
        reference: log-prob source of the frozen reference model, or None (see `jobs.reference`).
        config: the run's config (stage hyperparameters: `pref_beta`, `pref_loss`, …).
        world: number of ranks (KTO averages its KL estimate over them).
    """

    model: Any
    reference: Any
    config: RayftConfig
    world: int = 1


@dataclass
class StepOutput:
    """One micro-batch's contribution: the summed loss and its metrics.

    The loop divides the loss by the step's global `Stage.count`, so a stage whose loss is a
    mean over pairs returns the sum over its pairs, and one whose loss is a token mean the token
    sum. Metrics are (sum, how many) pairs, summed over micro-batches and ranks and then divided.
    """

    loss_sum: torch.Tensor
    metric_sums: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """What differs between training stages; the loop in `jobs.loop` does the rest.

    Attributes:
        name: the `stage:` value.
        family: the data family it reads (`data_pipelines.families`).
        collate: numpy batch from Ray Data, pad id → tensors for `loss`.
        loss: context, batch → `StepOutput`.
        count: batch → the units the loss sums over (labelled tokens, pairs or rows).
        head: `causal_lm`, or `reward` for a scalar value head (sequence classification).
        uses_reference: config → whether the stage needs a reference model.
        metrics: names the loss reports besides `loss` (for `tune.metric` checks).
        train_loop: a per-worker loop of its own (PPO's rollout/update cycle) taking the same
            `LoopPlan` dict; None uses the shared loop in `jobs.loop`.
    """

    name: str
    family: str
    collate: Callable[[dict[str, Any], int], dict[str, torch.Tensor]]
    loss: Callable[[StepContext, dict[str, torch.Tensor]], StepOutput]
    count: Callable[[dict[str, torch.Tensor]], int]
    head: Literal["causal_lm", "reward"] = "causal_lm"
    uses_reference: Callable[[RayftConfig], bool] = lambda config: False
    metrics: tuple[str, ...] = ()
    train_loop: Callable[[dict[str, Any]], None] | None = None

    def prepare_data(self, config: RayftConfig, cpus_per_task: float, *, load: bool = True) -> Any:
        """Tokenize the `dataset` list into this stage's family (cached; see the pipeline);
        `load=False` writes the parquet without reading the rows back."""
        from data_pipelines.pipeline import prepare_dataset

        return prepare_dataset(config, family=self.family, cpus_per_task=cpus_per_task, load=load)


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
        raise ValueError(
            f"stage `{name}` is not supported; valid stages: {', '.join(sorted(STAGES))}"
        )
    return STAGES[name]


def check_stage(config: RayftConfig) -> list[ConfigProblem]:
    """Config check: the stage is registered."""
    try:
        get_stage(config.stage)
    except ValueError as err:
        return [ConfigProblem("stage", str(err))]
    return []
