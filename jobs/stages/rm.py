"""Pairwise reward model: a scalar head scores each answer; chosen should beat rejected.

The model is transformers' `AutoModelForSequenceClassification` with one label (what TRL's
RewardTrainer trains and what `from_pretrained` loads back); its score is read at the last
real token of each row, as LLaMA-Factory's value head reads it. The loss is Bradley-Terry,
-log sigma(r_chosen - r_rejected), averaged over pairs.
"""

from __future__ import annotations

from typing import Any

import torch

from jobs.losses import pairwise_rm_loss
from jobs.registry import Stage, StepContext, StepOutput, register_stage
from jobs.stages.dpo import collate as pair_collate


def reward_pad_id(tokenizer: Any) -> int:
    """A pad id that is never a row's last real token.

    transformers scores a sequence at its rightmost non-pad token, so a pad token that is also
    the eos (which ends every answer) would move the score one token early. Padding is masked,
    so any other id serves.
    """
    eos = tokenizer.eos_token_id
    for candidate in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id, 0):
        if candidate is not None and candidate != eos:
            return int(candidate)
    return 1 if eos == 0 else 0


def collate(batch: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, padded to one width."""
    return pair_collate(batch, pad_id)


def scores(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One scalar per row."""
    return (
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        .logits.squeeze(-1)
        .float()
    )


def loss(context: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
    """Summed pairwise losses and accuracy (the loop averages over pairs)."""
    values = scores(context.model, batch)
    half = values.size(0) // 2
    chosen, rejected = values[:half], values[half:]
    losses = pairwise_rm_loss(chosen, rejected)
    pairs = float(half)
    metrics = {
        "rewards/chosen": (float(chosen.detach().sum()), pairs),
        "rewards/rejected": (float(rejected.detach().sum()), pairs),
        "rewards/accuracies": (float((chosen > rejected).float().sum()), pairs),
        "rewards/margins": (float((chosen - rejected).detach().sum()), pairs),
    }
    return StepOutput(losses.sum(), metrics)


def count(batch: dict[str, torch.Tensor]) -> int:
    """Pairs."""
    return batch["input_ids"].size(0) // 2


register_stage(
    Stage(
        name="rm",
        family="pairwise",
        collate=collate,
        loss=loss,
        count=count,
        metrics=("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"),
        head="reward",
    )
)
