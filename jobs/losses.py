"""Training losses as pure, typed functions (CPU-testable, no Ray, no model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions, and how many there were.

    Returning the sum (not the mean) lets the caller divide by the token count of the whole
    optimizer step across micro-batches and ranks, so the gradient of gradient accumulation
    1x8 equals that of 8x1 and does not depend on how tokens fall into micro-batches.

    Args:
        logits: [batch, seq, vocab] model outputs.
        labels: [batch, seq] target ids, `IGNORE_INDEX` where no loss is taken.

    Returns:
        (sum of token losses, number of labelled tokens).
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((shift_labels != IGNORE_INDEX).sum().item())


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is labelled in at least one row of the batch.

    Only these positions need logits: passing them as `logits_to_keep` skips the vocabulary
    projection for prompt and padding positions (the costliest matmul of small models with
    large vocabularies, e.g. Gemma's 262k entries).
    """
    return torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(dim=0), as_tuple=False).flatten()


def causal_lm_loss_sum_kept(
    kept_logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """`causal_lm_loss_sum` for logits computed only at `positions` (see `predicting_positions`).

    Args:
        kept_logits: [batch, len(positions), vocab] logits at `positions`.
        labels: [batch, seq] full labels.
        positions: the sequence positions the logits belong to.

    Returns:
        (sum of token losses, number of labelled tokens), equal to the full computation.
    """
    targets = labels[:, positions + 1].reshape(-1)
    flat = kept_logits.reshape(-1, kept_logits.size(-1)).float()
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum().item())
