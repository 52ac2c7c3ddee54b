"""`stage: grpo` (beyond LLaMA-Factory): group-relative policy optimisation, TRL's GRPOTrainer.

Each prompt gets `num_generations` sampled completions, scored by `reward_funcs` (or a
`reward_model`) in the reward actor; advantages are group-relative (`grpo_scale_rewards`), the
loss is TRL's clipped per-token objective (`grpo_loss_type`, `grpo_epsilon[_high]`) with an
optional KL term to the reference (`grpo_beta`; 0 needs no reference). The loop is
`jobs.ppo.worker.grpo_train_loop`, sharing PPO's rollout code.

    python -m jobs.train configs/examples/qwen_lora_grpo.yaml
"""

from __future__ import annotations

from jobs.ppo.worker import GRPO_METRICS, grpo_train_loop
from jobs.registry import register_stage
from jobs.stages.ppo import RolloutStage, collate, count, loss

register_stage(
    RolloutStage(
        name="grpo",
        family="prompt",
        collate=collate,
        loss=loss,
        count=count,
        metrics=GRPO_METRICS,
        uses_reference=lambda config: config.grpo_beta > 0,
        train_loop=grpo_train_loop,
    )
)
