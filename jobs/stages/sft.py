"""Supervised fine-tuning: next-token loss on the answer tokens of each conversation."""

from __future__ import annotations

from typing import Any

import torch

from jobs.batching import labelled_tokens, packed_group, pad_group
from jobs.losses import causal_lm_loss_sum_kept, predicting_positions
from jobs.registry import Stage, StepContext, StepOutput, register_stage


def collate(batch: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: ids with `pad_id`, labels with -100, attention with 0; packed
    rows (`packing`) also carry their position ids."""
    return packed_group(batch, pad_id) if "position_ids" in batch else pad_group(batch, pad_id)


def token_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token loss of the labelled tokens (logits computed only where a label follows).

    No KV cache: besides saving memory, a cache would stop the model from reading packed
    examples' boundaries from `position_ids` when there is no attention mask (neat packing).
    """
    positions = predicting_positions(batch["labels"])
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        logits_to_keep=positions,
    ).logits
    return causal_lm_loss_sum_kept(logits, batch["labels"], positions)[0]


def loss(context: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
    """The summed answer-token loss; the loop divides by the step's labelled tokens."""
    return StepOutput(token_loss(context.model, batch))


def count(batch: dict[str, torch.Tensor]) -> int:
    """Labelled tokens: the loss is a token mean over the whole optimizer step."""
    return labelled_tokens(batch["labels"])


register_stage(Stage(name="sft", family="supervised", collate=collate, loss=loss, count=count))
