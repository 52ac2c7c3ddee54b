"""Supervised fine-tuning: next-token loss on the answer tokens of each conversation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from configs import RayftConfig
from data_pipelines.pipeline import PreparedData, prepare_supervised
from jobs.losses import IGNORE_INDEX, causal_lm_loss_sum_kept, predicting_positions
from jobs.registry import Stage, register_stage


def prepare_data(config: RayftConfig, cpus_per_task: float) -> PreparedData:
    """Tokenize the `dataset` list with the template, masking prompts."""
    return prepare_supervised(config, cpus_per_task=cpus_per_task)


def collate(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: ids with `pad_id`, labels with -100, attention with 0."""
    rows = [np.asarray(ids, dtype=np.int64) for ids in batch["input_ids"]]
    labels = [np.asarray(lab, dtype=np.int64) for lab in batch["labels"]]
    width = max(len(r) for r in rows)
    out_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    out_labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, (ids, lab) in enumerate(zip(rows, labels, strict=True)):
        out_ids[i, : len(ids)] = ids
        out_labels[i, : len(lab)] = lab
        mask[i, : len(ids)] = 1
    return {
        "input_ids": torch.from_numpy(out_ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(out_labels),
    }


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed token loss of the answer tokens (logits computed only where a label follows)."""
    positions = predicting_positions(batch["labels"])
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=positions,
    ).logits
    return causal_lm_loss_sum_kept(logits, batch["labels"], positions)


register_stage(Stage(name="sft", prepare_data=prepare_data, collate=collate, loss_sum=loss_sum))
