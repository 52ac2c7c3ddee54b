"""Losses: the kept-positions SFT loss equals the full computation; accumulation invariance."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jobs.losses import causal_lm_loss_sum, causal_lm_loss_sum_kept, predicting_positions


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(3, 12, 50)
    labels = torch.randint(0, 50, (3, 12))
    labels[:, :5] = -100  # prompt
    labels[1, 9:] = -100  # padding
    labels[2, :8] = -100
    return logits, labels


def test_sum_and_count_match_mean_cross_entropy() -> None:
    logits, labels = _batch()
    total, count = causal_lm_loss_sum(logits, labels)
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total / count, reference)


def test_kept_positions_give_the_same_loss() -> None:
    logits, labels = _batch()
    positions = predicting_positions(labels)
    assert positions.tolist() == list(range(4, 11))
    kept_total, kept_count = causal_lm_loss_sum_kept(logits[:, positions], labels, positions)
    total, count = causal_lm_loss_sum(logits, labels)
    assert kept_count == count
    torch.testing.assert_close(kept_total, total)


def test_token_normalised_accumulation_is_invariant_to_micro_batching() -> None:
    """1 micro-batch of 3 rows and 3 micro-batches of 1 row give the same step loss."""
    logits, labels = _batch()
    whole_total, whole_count = causal_lm_loss_sum(logits, labels)
    parts = [causal_lm_loss_sum(logits[i : i + 1], labels[i : i + 1]) for i in range(3)]
    denominator = sum(count for _, count in parts)
    split = sum(total / denominator for total, _ in parts)
    torch.testing.assert_close(split, whole_total / whole_count)
