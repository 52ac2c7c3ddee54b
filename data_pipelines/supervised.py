"""Supervised (SFT) examples → `input_ids` and `labels`, with LLaMA-Factory's masking rules.

Prompt tokens get the label -100 unless `train_on_prompt`; with `mask_history` only the last
turn is learned; `cutoff_len` is shared between prompt and answer by `split_budget`, turn by
turn, so long prompts are cut before long answers. A turn's prompt may be a user message or a
tool result (`observation`), its answer an assistant message or a tool call (`function`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from data_pipelines.templates import Template

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SupervisedOptions:
    """The tokenization switches that change ids or labels."""

    cutoff_len: int
    train_on_prompt: bool = False
    mask_history: bool = False


def split_budget(source_len: int, target_len: int, budget: int) -> tuple[int, int]:
    """How many prompt and answer tokens fit in `budget` (LLaMA-Factory's rule).

    A short answer (under half the budget) is kept whole and the prompt cut; else a short
    prompt is kept whole and the answer cut; else both shrink in proportion to their lengths.
    """
    if target_len * 2 < budget:
        max_target = budget
    elif source_len * 2 < budget:
        max_target = budget - source_len
    else:
        max_target = int(budget * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(budget - new_target, 0), source_len)
    return new_source, new_target


def check_options(template: Template, options: SupervisedOptions) -> None:
    """Reject option combinations LLaMA-Factory rejects.

    Raises:
        ValueError: `train_on_prompt` with an `efficient_eos` template (its prompt labels carry
            the previous answer's eos, which training on the prompt would overwrite).
    """
    if options.train_on_prompt and template.efficient_eos:
        raise ValueError(
            f"train_on_prompt: template `{template.name}` uses efficient_eos and does not "
            "support it; set train_on_prompt: false or pick another template"
        )


def encode_supervised(
    tokenizer: Any,
    template: Template,
    messages: Sequence[Mapping[str, str]],
    system: str | None,
    options: SupervisedOptions,
    tools: str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation that ends with an answer.

    Args:
        tokenizer: a tokenizer prepared with `prepare_tokenizer` for this template.
        template: the chat template.
        messages: query (user/observation) and answer (assistant/function) messages,
            alternating, starting with a query.
        system: the row's system prompt (None uses the template default).
        options: cutoff and masking switches.
        tools: the row's tool definitions as a JSON string (the `tools` column), or None.

    Returns:
        (input_ids, labels) of equal length, at most `cutoff_len` long.

    Raises:
        ValueError: options the template does not support (see `check_options`).
        BadMessage: malformed tool definitions or tool-call JSON in the row.
    """
    check_options(template, options)
    pairs = template.encode_pairs(
        tokenizer, messages, system, tools, mask_history=options.mask_history
    )
    input_ids: list[int] = []
    labels: list[int] = []
    total = 1 if template.efficient_eos else 0
    if options.mask_history:
        pairs = pairs[::-1]  # the last turn gets the budget first
    for turn, (source, target) in enumerate(pairs):
        if total >= options.cutoff_len:
            break
        source_len, target_len = split_budget(len(source), len(target), options.cutoff_len - total)
        # Cut only what is too long and extend in place: the copies of whole turns took 9% of
        # a row's Python. `source` and `target` are only read from here on, never changed.
        if source_len < len(source):
            source = source[:source_len]
        if target_len < len(target):
            target = target[:target_len]
        total += source_len + target_len
        if options.train_on_prompt:
            source_labels = source
        elif template.efficient_eos and turn != 0:
            source_labels = [tokenizer.eos_token_id] + [IGNORE_INDEX] * (source_len - 1)
        else:
            source_labels = [IGNORE_INDEX] * source_len
        if options.mask_history and turn != 0:
            target_labels = [IGNORE_INDEX] * target_len
        else:
            target_labels = target
        if options.mask_history:
            input_ids = source + target + input_ids
            labels = source_labels + target_labels + labels
        else:
            input_ids += source
            input_ids += target
            labels += source_labels
            labels += target_labels
    if template.efficient_eos:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return input_ids, labels
