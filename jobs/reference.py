"""The frozen reference policy of DPO and KTO.

As in LLaMA-Factory: a LoRA run without `ref_model` uses the policy itself with its adapter
switched off (no second copy in memory); otherwise a separate frozen model is loaded from
`ref_model` (with `ref_model_adapters`) or, for full and freeze fine-tuning, from the base
`model_name_or_path`. The separate copy is not sharded by ZeRO/FSDP: every rank holds it whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from configs import RayftConfig
from jobs.losses import kept_sequence_logps, predicting_positions


def labelled_logps(model: Any, group: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log-probs of the labelled tokens, and their counts.

    Logits are computed only at positions that predict a label (`logits_to_keep`), which skips
    the vocabulary projection for prompts and padding.
    """
    positions = predicting_positions(group["labels"])
    logits = model(
        input_ids=group["input_ids"],
        attention_mask=group["attention_mask"],
        logits_to_keep=positions,
        use_cache=False,
    ).logits
    return kept_sequence_logps(logits, group["labels"], positions)


class Reference:
    """Log-probabilities under the reference model, without gradients."""

    def __init__(
        self, model: Any, context: Callable[[], contextlib.AbstractContextManager]
    ) -> None:
        self._model = model
        self._context = context

    def logps(self, group: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`labelled_logps` of the reference model, in eval mode (no dropout, no NEFTune
        noise, even when the reference is the training policy with its adapter off)."""
        was_training = self._model.training
        self._model.eval()
        try:
            with torch.no_grad(), self._context():
                return labelled_logps(self._model, group)
        finally:
            self._model.train(was_training)


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def make_reference(config: RayftConfig, policy: Any, *, dtype: torch.dtype) -> Reference:
    """The reference for a run.

    Args:
        config: the run's config.
        policy: the unwrapped trained model (a PEFT model for LoRA).
        dtype: the dtype to load a separate reference model in.
    """
    if config.finetuning_type == "lora" and config.ref_model is None:
        return Reference(policy, policy.disable_adapter)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        config.ref_model or config.model_name_or_path,
        dtype=dtype,
        trust_remote_code=config.trust_remote_code,
    )
    if config.ref_model_adapters:
        from peft import PeftModel

        for adapter in config.ref_model_adapters.split(","):
            model = PeftModel.from_pretrained(model, adapter.strip()).merge_and_unload()
    model.requires_grad_(False)
    model.eval()
    return Reference(model, _nothing)
