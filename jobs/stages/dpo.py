"""Preference optimisation on chosen/rejected pairs: DPO (sigmoid, hinge, ipo), ORPO, SimPO.

LLaMA-Factory's `stage: dpo` with `pref_loss` choosing the objective (`stage: orpo|simpo` are
accepted spellings). Chosen and rejected rows go through the model in one concatenated
forward; ipo/orpo/simpo use per-token mean log-probs. ORPO and SimPO are reference-free; DPO
compares with the reference (`jobs.reference`). `pref_ftx` adds the chosen answers' mean
token NLL, as LLaMA-Factory does.
"""

from __future__ import annotations

from typing import Any

import torch

from configs import RayftConfig
from jobs.batching import pad_group
from jobs.losses import dpo_loss, orpo_loss, simpo_loss
from jobs.reference import labelled_logps
from jobs.registry import Stage, StepContext, StepOutput, register_stage

AVERAGED = ("ipo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")


def collate(batch: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, padded to one width (one forward for both)."""
    width = max(
        max(len(row) for row in batch["chosen_input_ids"]),
        max(len(row) for row in batch["rejected_input_ids"]),
    )
    chosen = pad_group(batch, pad_id, prefix="chosen_", width=width)
    rejected = pad_group(batch, pad_id, prefix="rejected_", width=width)
    return {name: torch.cat((chosen[name], rejected[name])) for name in chosen}


def pair_logps(
    logps: torch.Tensor, counts: torch.Tensor, *, average: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected) values used by the loss, and the chosen per-token mean."""
    half = logps.size(0) // 2
    mean = logps / counts.clamp(min=1)
    values = mean if average else logps
    return values[:half], values[half:], mean[:half]


def preference_losses(
    config: RayftConfig,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_mean: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards for `pref_loss` (LLaMA-Factory's composition)."""
    beta = config.pref_beta
    if config.pref_loss == "orpo":
        losses, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, beta=beta)
        losses = losses - chosen  # ORPO's NLL term on the chosen answer (per-token mean)
    elif config.pref_loss == "simpo":
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            chosen, rejected, beta=beta, gamma=config.simpo_gamma
        )
    else:
        assert reference is not None, "DPO needs reference log-probs"
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            *reference,
            beta=beta,
            loss_type=config.pref_loss,
            label_smoothing=config.dpo_label_smoothing,
        )
    if config.pref_ftx > 1e-6:
        losses = losses + config.pref_ftx * -chosen_mean
    return losses, chosen_rewards, rejected_rewards


def loss(context: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
    """Summed per-pair losses and the reward metrics (sums; the loop averages over pairs)."""
    config = context.config
    average = config.pref_loss in AVERAGED
    logps, counts = labelled_logps(context.model, batch)
    chosen, rejected, chosen_mean = pair_logps(logps, counts, average=average)
    reference = None
    if config.pref_loss not in REFERENCE_FREE:
        ref_chosen, ref_rejected, _ = pair_logps(*context.reference.logps(batch), average=average)
        reference = (ref_chosen, ref_rejected)
    losses, chosen_rewards, rejected_rewards = preference_losses(
        config, chosen, rejected, chosen_mean, reference
    )
    return StepOutput(
        losses.sum(), preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected)
    )


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
) -> dict[str, tuple[float, float]]:
    """Reward metrics of a batch of pairs as (sum, pairs) (TRL's and LLaMA-Factory's names)."""
    pairs = float(chosen_rewards.numel())
    return {
        "rewards/chosen": (float(chosen_rewards.sum()), pairs),
        "rewards/rejected": (float(rejected_rewards.sum()), pairs),
        "rewards/accuracies": (float((chosen_rewards > rejected_rewards).float().sum()), pairs),
        "rewards/margins": (float((chosen_rewards - rejected_rewards).sum()), pairs),
        "logps/chosen": (float(chosen.detach().sum()), pairs),
        "logps/rejected": (float(rejected.detach().sum()), pairs),
    }


def count(batch: dict[str, torch.Tensor]) -> int:
    """Pairs: the loss is a mean over the step's pairs."""
    return batch["input_ids"].size(0) // 2


def uses_reference(config: RayftConfig) -> bool:
    """DPO variants compare with a reference; ORPO and SimPO do not."""
    return config.pref_loss not in REFERENCE_FREE


register_stage(
    Stage(
        name="dpo",
        family="pairwise",
        collate=collate,
        loss=loss,
        count=count,
        metrics=(
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ),
        uses_reference=uses_reference,
    )
)
