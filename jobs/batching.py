"""Padding of tokenized rows into tensors, shared by the stages' collate functions.

Rows are right-padded (LLaMA-Factory's and TRL's side for training): ids with the pad id,
labels with -100 and the attention mask with 0, so a sample's values do not depend on how much
padding its batch adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from jobs.losses import IGNORE_INDEX


def pad_rows(rows: Sequence[Any], fill: int, width: int | None = None) -> torch.Tensor:
    """Right-pad int sequences to one width (the longest, unless given)."""
    arrays = [np.asarray(row, dtype=np.int64) for row in rows]
    width = width or max(len(a) for a in arrays)
    out = np.full((len(arrays), width), fill, dtype=np.int64)
    for i, array in enumerate(arrays):
        out[i, : len(array)] = array
    return torch.from_numpy(out)


def pad_group(
    batch: dict[str, Any], pad_id: int, *, prefix: str = "", width: int | None = None
) -> dict[str, torch.Tensor]:
    """`{prefix}input_ids/attention_mask/labels` of a numpy batch as padded tensors (keys
    without the prefix)."""
    ids = batch[f"{prefix}input_ids"]
    width = width or max(len(row) for row in ids)
    return {
        "input_ids": pad_rows(ids, pad_id, width),
        "attention_mask": pad_rows([np.ones(len(row)) for row in ids], 0, width),
        "labels": pad_rows(batch[f"{prefix}labels"], IGNORE_INDEX, width),
    }


def labelled_tokens(labels: torch.Tensor) -> int:
    """Tokens whose next-token loss counts (labels shifted by one, as the loss reads them)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
