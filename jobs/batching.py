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


def packed_group(batch: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed sft rows (see `data_pipelines.families`): ids, labels and the restarting
    position ids as tensors.

    With `neat_packing` (attention values 1, 2, … per example) no attention mask is given: the
    model then derives a block-diagonal causal mask from the position ids, so no token
    attends across examples. Plain packing keeps LF's all-ones mask, as LLaMA-Factory does.
    """
    ids = batch["input_ids"]
    width = max(len(row) for row in ids)
    out = {
        "input_ids": pad_rows(ids, pad_id, width),
        "labels": pad_rows(batch["labels"], IGNORE_INDEX, width),
        "position_ids": pad_rows(batch["position_ids"], 0, width),
    }
    attention = pad_rows(batch["attention_mask"], 0, width)
    if int(attention.max()) <= 1:
        out["attention_mask"] = attention
    return out


def labelled_tokens(labels: torch.Tensor) -> int:
    """Tokens whose next-token loss counts (labels shifted by one, as the loss reads them)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
