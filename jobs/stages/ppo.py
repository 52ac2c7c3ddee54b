"""`stage: ppo`: PPO with a reward model or reward functions (LLaMA-Factory's keys).

Reads prompt rows (family `prompt`: any alpaca/sharegpt data) and runs its own per-worker loop,
`jobs.ppo.worker.ppo_train_loop` (rollouts by generation, reward actor, GAE, clipped policy
and value losses, adaptive KL); see `jobs.ppo` for which role runs where.

    python -m jobs.train configs/examples/qwen_lora_ppo.yaml
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from configs import RayftConfig
from jobs.ppo.rewards import check_reward_source, reward_spec
from jobs.ppo.rollout import left_pad
from jobs.ppo.worker import PPO_METRICS, ppo_train_loop
from jobs.registry import Stage, StepContext, StepOutput, register_stage


def collate(batch: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded (as they are generated from)."""
    ids, mask = left_pad([[int(t) for t in row] for row in batch["input_ids"]], pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def loss(context: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
    """Not a per-batch loss: PPO trains in `Stage.train_loop`."""
    raise RuntimeError(f"stage {context.config.stage} trains in its own loop (jobs.ppo.worker)")


def count(batch: dict[str, torch.Tensor]) -> int:
    """Prompts."""
    return batch["input_ids"].size(0)


@dataclass(frozen=True)
class RolloutStage(Stage):
    """A stage that samples from the policy and needs a reward (ppo, grpo)."""

    def prepare_data(self, config: RayftConfig, cpus_per_task: float, *, load: bool = True) -> Any:
        """Check the reward model dir / reward functions on the driver, then tokenize."""
        check_reward_source(reward_spec(config, pad_id=0, threads=1))
        return super().prepare_data(config, cpus_per_task, load=load)


register_stage(
    RolloutStage(
        name="ppo",
        family="prompt",
        collate=collate,
        loss=loss,
        count=count,
        metrics=PPO_METRICS,
        uses_reference=lambda config: True,
        train_loop=ppo_train_loop,
    )
)
