"""KTO on unpaired feedback: each answer is tagged desirable or not (Ethayarajh et al. 2024).

As LLaMA-Factory's `stage: kto` (TRL's KTOTrainer underneath): the policy and the reference
score each row's answer and a mismatched "KL" answer; the KL estimate (averaged over ranks,
clamped at 0) is the reference point of the desirable/undesirable losses, weighted by
`kto_chosen_weight` / `kto_rejected_weight`. `pref_ftx` adds the desirable answers' mean
token NLL, scaled as LLaMA-Factory scales it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from configs import RayftConfig
from jobs.batching import pad_group
from jobs.losses import kto_kl_estimate, kto_loss
from jobs.reference import labelled_logps
from jobs.registry import Stage, StepContext, StepOutput, register_stage


def collate(batch: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    """The rows, their KL rows (`kl_*`) and the desirable tags."""
    target = pad_group(batch, pad_id)
    kl = pad_group(batch, pad_id, prefix="kl_")
    tags = torch.from_numpy(np.asarray(batch["kto_tags"], dtype=bool))
    return target | {f"kl_{name}": value for name, value in kl.items()} | {"kto_tags": tags}


def _group(batch: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name: batch[f"{prefix}{name}"] for name in ("input_ids", "attention_mask", "labels")}


def global_kl(local: torch.Tensor) -> torch.Tensor:
    """The KL estimate averaged over ranks (TRL gathers it before clamping)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return local
    value = local.detach().clone().reshape(1)
    dist.all_reduce(value)
    return value[0] / dist.get_world_size()


def loss(context: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
    """The batch's mean KTO loss times its rows (the loop averages over the step's rows)."""
    config = context.config
    target, kl_group = _group(batch, ""), _group(batch, "kl_")
    logps, counts = labelled_logps(context.model, target)
    with torch.no_grad():
        kl_logps, _ = labelled_logps(context.model, kl_group)
    ref_logps, _ = context.reference.logps(target)
    ref_kl_logps, _ = context.reference.logps(kl_group)
    tags = batch["kto_tags"]
    kl = global_kl(kto_kl_estimate(kl_logps, ref_kl_logps))
    losses, chosen_rewards, rejected_rewards = kto_loss(
        logps[tags],
        logps[~tags],
        ref_logps[tags],
        ref_logps[~tags],
        kl=kl,
        beta=config.pref_beta,
        desirable_weight=config.kto_chosen_weight,
        undesirable_weight=config.kto_rejected_weight,
    )
    rows = tags.numel()
    batch_loss = losses.nanmean()
    chosen = int(tags.sum())
    if config.pref_ftx > 1e-6 and chosen > 0:
        chosen_mean = logps[tags] / counts[tags].clamp(min=1)
        batch_loss = batch_loss + config.pref_ftx * (-chosen_mean).nanmean() / chosen * rows
    metrics = {
        "rewards/chosen": (float(chosen_rewards.sum()), float(chosen)),
        "rewards/rejected": (float(rejected_rewards.sum()), float(rows - chosen)),
        "logps/chosen": (float(logps[tags].detach().sum()), float(chosen)),
        "logps/rejected": (float(logps[~tags].detach().sum()), float(rows - chosen)),
        "kl": (float(kl) * rows, float(rows)),
    }
    return StepOutput(batch_loss * rows, metrics)


def count(batch: dict[str, torch.Tensor]) -> int:
    """Rows: the loss is a mean over the step's rows."""
    return int(batch["kto_tags"].numel())


def uses_reference(config: RayftConfig) -> bool:
    """KTO always compares with a reference."""
    return True


register_stage(
    Stage(
        name="kto",
        family="feedback",
        collate=collate,
        loss=loss,
        count=count,
        metrics=("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"),
        uses_reference=uses_reference,
    )
)
