"""Pre-training (continued): next-token loss on every token of raw text blocks.

As LLaMA-Factory's `pt` (transformers' `DataCollatorForLanguageModeling`), the labels are the
ids with every pad-id token masked; when the pad token is the eos token, that masks the eos
that ends each text too.
"""

from __future__ import annotations

from typing import Any

import torch

from jobs.batching import labelled_tokens, pad_group
from jobs.losses import IGNORE_INDEX
from jobs.registry import Stage, StepContext, StepOutput, register_stage
from jobs.stages.sft import token_loss


def collate(batch: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad blocks; labels are the ids, with the pad id masked."""
    out = pad_group(batch, pad_id)
    out["labels"] = out["labels"].masked_fill(out["labels"] == pad_id, IGNORE_INDEX)
    return out


def loss(context: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
    """Summed token loss over the blocks."""
    return StepOutput(token_loss(context.model, batch))


def count(batch: dict[str, torch.Tensor]) -> int:
    """Labelled tokens (token mean over the optimizer step)."""
    return labelled_tokens(batch["labels"])


register_stage(Stage(name="pt", family="pretrain", collate=collate, loss=loss, count=count))
