"""Data families: how converted conversations become the token columns a stage trains on.

A stage names the family it reads (`pt` → pretrain, `sft` → supervised, `rm`/`dpo` → pairwise,
`kto` → feedback, `ppo` → prompt). Each family follows the matching LLaMA-Factory 0.9.5 dataset
processor, so the same data and template give the same ids and labels:

- pretrain: the prompt text plus eos; packed into `cutoff_len` blocks (the default for `pt`) or
  truncated per row.
- supervised: see `data_pipelines.supervised`; with `packing`, whole examples are packed into
  rows of `cutoff_len` tokens (LLaMA-Factory's greedy knapsack per batch of 1000 rows), with
  position ids that restart per example and, for `neat_packing`, the example's number as its
  attention mask value (1, 2, …) so that attention can stay within each example.
- pairwise: one prompt, two answers; both answers share the prompt's truncation, sized by the
  longer answer.
- feedback (KTO): one answer with its desirable/undesirable tag, plus a mismatched "KL" pair
  (the previous row's answer to this row's prompt) that KTO uses to estimate its reference point.
- prompt: the prompt as `input_ids` and the reference answer (if one) as `labels`, for rollouts.

Families work on whole batches because two of them look across rows (packing, the KL shift);
every bad row keeps its place with an empty result and its reason, so nothing is dropped
silently.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from data_pipelines.converters import ANSWER_ROLES, ASSISTANT, BadRow, Conversation
from data_pipelines.dataset_info import DatasetError, DatasetSpec
from data_pipelines.supervised import (
    IGNORE_INDEX,
    SupervisedOptions,
    encode_supervised,
    split_budget,
)
from data_pipelines.templates import BadMessage, Template

SKIP_COLUMN = "skip_reason"
# Id columns some records carry (packed sft rows); written when an encoder returns them.
OPTIONAL_COLUMNS = ("position_ids",)
# Mask columns of all ones, which encoders leave out: the pipeline builds each from the row
# lengths of the ids column named here. Lists of ones per row, then converted to Arrow, took
# ~3% of a batch. Packing, whose masks are not all ones, writes its own.
ONES_MASKS = {
    "attention_mask": "input_ids",
    "chosen_attention_mask": "chosen_input_ids",
    "rejected_attention_mask": "rejected_input_ids",
    "kl_attention_mask": "kl_input_ids",
}
# How many source rows a record stands for: 1, except for packed pretraining blocks.
ROWS_COLUMN = "source_rows"
PACKING_REMAINDER = "packing remainder shorter than one block (dropped, as LLaMA-Factory does)"
# LLaMA-Factory ends llama3 pretraining text with this token instead of the tokenizer's eos.
LLAMA3_TEXT_EOS = "<|end_of_text|>"


@dataclass(frozen=True)
class EncodeOptions:
    """The tokenization switches of every family; small, hashable and picklable."""

    supervised: SupervisedOptions
    packing: bool = False
    neat_packing: bool = False
    template_name: str | None = None

    @property
    def cutoff_len(self) -> int:
        """Max tokens per example (the block size when packing)."""
        return self.supervised.cutoff_len


# One converted row, or the reason it could not be converted.
Item = Conversation | str
BatchEncoder = Callable[[Sequence[Item], Any, Template, EncodeOptions], dict[str, list]]


@dataclass(frozen=True)
class Family:
    """One data family.

    Attributes:
        name: registry name.
        id_columns: list-of-int columns the family writes (all int32 in parquet); the
            `ONES_MASKS` among them are built by the pipeline unless `encode` returns them.
        flag_columns: boolean columns (KTO's tag).
        row_kinds: `RowFormat.kind`s it reads (plain, pairwise, kto).
        needs: what the dataset must provide, for the error when a kind does not fit.
        encode: converted rows → columns, one record per row (bad rows: empty + reason), except
            packing, which may emit any number of records (see `ROWS_COLUMN`).
        batch_size: rows per encode call; 1000 where LLaMA-Factory's batch matters (the KL
            shift and packing happen within one batch, as in its `map`).
    """

    name: str
    id_columns: tuple[str, ...]
    row_kinds: tuple[str, ...]
    needs: str
    encode: BatchEncoder
    flag_columns: tuple[str, ...] = ()
    batch_size: int = 256


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family; each name once."""
    if family.name in FAMILIES:
        raise ValueError(f"data family `{family.name}` registered twice")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """Look a family up by name."""
    if name not in FAMILIES:
        raise ValueError(f"unknown data family `{name}`; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def check_row_kinds(specs: Sequence[DatasetSpec], family: Family, stage: str) -> None:
    """Refuse datasets whose rows the family cannot read, naming what it needs.

    Raises:
        DatasetError: e.g. `dpo` on an alpaca SFT file.
    """
    for spec in specs:
        if spec.row_format.kind not in family.row_kinds:
            raise DatasetError(
                f"dataset `{spec.name}` holds {spec.row_format.kind} rows, but stage `{stage}` "
                f"reads {family.name} data: {family.needs}"
            )


def _empty(family_columns: Sequence[str], flags: Sequence[str]) -> dict[str, list]:
    return {name: [] for name in (*family_columns, *flags, SKIP_COLUMN, ROWS_COLUMN)}


def _row_by_row(
    id_columns: tuple[str, ...],
    flag_columns: tuple[str, ...],
    encode_one: Callable[[Conversation, Any, Template, EncodeOptions], dict[str, Any]],
) -> BatchEncoder:
    """A batch encoder from a per-row one: a `BadRow` becomes that row's reason."""

    def encode(
        items: Sequence[Item], tokenizer: Any, template: Template, options: EncodeOptions
    ) -> dict[str, list]:
        out = _empty(id_columns, flag_columns)
        for item in items:
            try:
                if isinstance(item, str):
                    raise BadRow(item)
                record, reason = encode_one(item, tokenizer, template, options), ""
            except (BadRow, BadMessage) as bad:
                record = {name: [] for name in id_columns} | dict.fromkeys(flag_columns, False)
                reason = str(bad)
            for name, value in record.items():
                out[name].append(value)
            out[SKIP_COLUMN].append(reason)
            out[ROWS_COLUMN].append(1)
        return out

    return encode


def _truncated(prompt: list[int], answer: list[int], cutoff: int) -> tuple[list[int], list[int]]:
    source_len, target_len = split_budget(len(prompt), len(answer), cutoff)
    return prompt[:source_len], answer[:target_len]


def _masked(prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
    """(ids, labels) of a prompt + answer pair, with the prompt masked."""
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def _require_answer(conversation: Conversation) -> None:
    if conversation.messages[-1]["role"] not in ANSWER_ROLES:
        raise BadRow("no answer to learn (prompt-only row)")


# --- supervised --------------------------------------------------------------------------------


def _encode_supervised(
    conversation: Conversation, tokenizer: Any, template: Template, options: EncodeOptions
) -> dict[str, Any]:
    _require_answer(conversation)
    input_ids, labels = encode_supervised(
        tokenizer,
        template,
        conversation.messages,
        conversation.system,
        options.supervised,
        tools=conversation.tools,
    )
    if labels.count(IGNORE_INDEX) == len(labels):  # counted in C: a generator costs 4% of a batch
        raise BadRow("no answer tokens left after truncation")
    return {"input_ids": input_ids, "labels": labels}


_LM_COLUMNS = ("input_ids", "attention_mask", "labels")
# What the encoders return of them: the mask is all ones (see `ONES_MASKS`).
_LM_IDS = ("input_ids", "labels")
_encode_supervised_rows = _row_by_row(_LM_IDS, (), _encode_supervised)


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group lengths into rows of at most `capacity`: each row takes the longest remaining
    length that still fits, again and again (LLaMA-Factory's greedy knapsack, whose row
    contents and order decide which examples share a row)."""
    remaining = sorted(lengths)
    rows = []
    while remaining:
        room, row = capacity, []
        while (fit := bisect.bisect_right(remaining, room)) > 0:
            length = remaining.pop(fit - 1)
            room -= length
            row.append(length)
        if not row:
            raise ValueError(f"an example of {remaining[0]} tokens cannot fit {capacity}")
        rows.append(row)
    return rows


def _pack_supervised(
    encoded: dict[str, list], pad_id: int, capacity: int, *, neat: bool
) -> dict[str, list]:
    """Pack a batch's good examples into rows of `capacity + 1` tokens (LF pads one past the
    shortened block); bad rows stay as their own records."""
    out = _empty((*_LM_COLUMNS, "position_ids"), ())
    good, by_length = [], defaultdict(list)
    for ids, labels, reason in zip(
        encoded["input_ids"], encoded["labels"], encoded[SKIP_COLUMN], strict=True
    ):
        if not reason and len(ids) > capacity:
            reason = f"longer than cutoff_len ({len(ids)} > {capacity} tokens)"
        if reason:
            for name in (*_LM_COLUMNS, "position_ids"):
                out[name].append([])
            out[SKIP_COLUMN].append(reason)
            out[ROWS_COLUMN].append(1)
            continue
        by_length[len(ids)].append(len(good))
        good.append((ids, labels))
    for lengths in pack_lengths([len(ids) for ids, _ in good], capacity):
        row: dict[str, list] = {name: [] for name in (*_LM_COLUMNS, "position_ids")}
        for number, length in enumerate(lengths, start=1):
            ids, labels = good[by_length[length].pop()]  # the latest example of that length
            row["input_ids"] += ids
            row["labels"] += labels
            row["position_ids"] += range(length)
            row["attention_mask"] += [number if neat else 1] * length
        pad = capacity + 1 - len(row["input_ids"])
        row["input_ids"] += [pad_id] * pad
        row["labels"] += [IGNORE_INDEX] * pad
        row["position_ids"] += [0] * pad
        row["attention_mask"] += [0 if neat else 1] * pad
        for name, values in row.items():
            out[name].append(values)
        out[SKIP_COLUMN].append("")
        out[ROWS_COLUMN].append(len(lengths))
    return out


def _encode_supervised_batch(
    items: Sequence[Item], tokenizer: Any, template: Template, options: EncodeOptions
) -> dict[str, list]:
    """One record per row, or (`packing`) the batch's examples packed into full rows."""
    encoded = _encode_supervised_rows(items, tokenizer, template, options)
    if not options.packing:
        return encoded
    return _pack_supervised(
        encoded, tokenizer.pad_token_id, options.cutoff_len, neat=options.neat_packing
    )


register_family(
    Family(
        name="supervised",
        id_columns=_LM_COLUMNS,
        row_kinds=("plain",),
        needs="conversations that end with an answer (alpaca instruction/output, or sharegpt "
        "messages ending with an assistant turn), without `ranking` or a `kto_tag` column",
        encode=_encode_supervised_batch,
        batch_size=1000,
    )
)


# --- pairwise ----------------------------------------------------------------------------------


def _encode_pairwise(
    conversation: Conversation, tokenizer: Any, template: Template, options: EncodeOptions
) -> dict[str, Any]:
    if conversation.chosen is None or conversation.rejected is None:
        raise BadRow("ranking row without a chosen and a rejected answer")
    prompt, chosen = template.encode_oneturn(
        tokenizer,
        [*conversation.messages, conversation.chosen],
        conversation.system,
        conversation.tools,
    )
    _, rejected = template.encode_oneturn(
        tokenizer,
        [*conversation.messages, conversation.rejected],
        conversation.system,
        conversation.tools,
    )
    if template.efficient_eos:
        chosen, rejected = chosen + [tokenizer.eos_token_id], rejected + [tokenizer.eos_token_id]
    # Both answers keep the same prompt, so the budget is sized by the longer answer.
    source_len, target_len = split_budget(
        len(prompt), max(len(chosen), len(rejected)), options.cutoff_len
    )
    prompt, chosen, rejected = prompt[:source_len], chosen[:target_len], rejected[:target_len]
    record: dict[str, Any] = {}
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = _masked(prompt, answer)
        record |= {f"{side}_input_ids": ids, f"{side}_labels": labels}
    return record


_PAIR_COLUMNS = tuple(f"{side}_{name}" for side in ("chosen", "rejected") for name in _LM_COLUMNS)
_PAIR_IDS = tuple(f"{side}_{name}" for side in ("chosen", "rejected") for name in _LM_IDS)
register_family(
    Family(
        name="pairwise",
        id_columns=_PAIR_COLUMNS,
        row_kinds=("pairwise",),
        needs="preference pairs: a dataset_info.json entry with `ranking: true` and `chosen` "
        "and `rejected` columns (alpaca: two answer strings; sharegpt: two answer messages)",
        encode=_row_by_row(_PAIR_IDS, (), _encode_pairwise),
    )
)


# --- feedback (KTO) ----------------------------------------------------------------------------


def _oneturn_example(
    tokenizer: Any,
    template: Template,
    conversation: Conversation,
    answer: dict[str, str],
    cutoff: int,
) -> tuple[list[int], list[int]]:
    prompt, response = template.encode_oneturn(
        tokenizer, [*conversation.messages[:-1], answer], conversation.system, conversation.tools
    )
    if template.efficient_eos:
        response = response + [tokenizer.eos_token_id]
    return _masked(*_truncated(prompt, response, cutoff))


_KTO_COLUMNS = (*_LM_COLUMNS, "kl_input_ids", "kl_attention_mask", "kl_labels")
_KTO_IDS = (*_LM_IDS, "kl_input_ids", "kl_labels")
_KTO_FLAGS = ("kto_tags",)


def _feedback_record(
    item: Item,
    kl_answer: dict[str, str] | None,
    tokenizer: Any,
    template: Template,
    options: EncodeOptions,
) -> dict[str, Any]:
    if isinstance(item, str):
        raise BadRow(item)
    if item.kto_tag is None:
        raise BadRow("no kto_tag (the dataset needs a `kto_tag` column)")
    _require_answer(item)
    ids, labels = _oneturn_example(tokenizer, template, item, item.messages[-1], options.cutoff_len)
    # The previous row's answer; for a malformed neighbour, the row's own.
    kl_ids, kl_labels = _oneturn_example(
        tokenizer, template, item, kl_answer or item.messages[-1], options.cutoff_len
    )
    return {
        "input_ids": ids,
        "labels": labels,
        "kl_input_ids": kl_ids,
        "kl_labels": kl_labels,
        "kto_tags": bool(item.kto_tag),
    }


def _encode_feedback(
    items: Sequence[Item], tokenizer: Any, template: Template, options: EncodeOptions
) -> dict[str, list]:
    """KTO rows; row i's KL example answers its prompt with row i-1's answer (the batch's
    last answer for row 0), LLaMA-Factory's mismatched pairs."""
    answers = [item.messages[-1] if isinstance(item, Conversation) else None for item in items]
    shifted = [answers[-1], *answers[:-1]] if answers else []
    out = _empty(_KTO_IDS, _KTO_FLAGS)
    for item, kl_answer in zip(items, shifted, strict=True):
        try:
            record, reason = _feedback_record(item, kl_answer, tokenizer, template, options), ""
        except (BadRow, BadMessage) as bad:
            record = {name: [] for name in _KTO_IDS} | {"kto_tags": False}
            reason = str(bad)
        for name, value in record.items():
            out[name].append(value)
        out[SKIP_COLUMN].append(reason)
        out[ROWS_COLUMN].append(1)
    return out


register_family(
    Family(
        name="feedback",
        id_columns=_KTO_COLUMNS,
        flag_columns=_KTO_FLAGS,
        row_kinds=("kto",),
        needs="unpaired feedback: conversations ending with an answer plus a boolean "
        "`kto_tag` column declared in dataset_info.json (`columns: {kto_tag: ...}`)",
        encode=_encode_feedback,
        batch_size=1000,
    )
)


# --- prompt-only (PPO rollouts) ----------------------------------------------------------------


def _encode_prompt(
    conversation: Conversation, tokenizer: Any, template: Template, options: EncodeOptions
) -> dict[str, Any]:
    messages = list(conversation.messages)
    if conversation.kto_tag is not None:  # LF reads a KTO row as two answers: none is kept
        messages = messages[:-1]
    if messages[-1]["role"] not in ANSWER_ROLES:
        messages.append({"role": ASSISTANT, "content": ""})
    prompt, answer = template.encode_oneturn(
        tokenizer, messages, conversation.system, conversation.tools
    )
    if template.efficient_eos:
        answer = answer + [tokenizer.eos_token_id]
    prompt, answer = _truncated(prompt, answer, options.cutoff_len)
    return {"input_ids": prompt, "labels": answer}


register_family(
    Family(
        name="prompt",
        id_columns=_LM_COLUMNS,
        row_kinds=("plain", "pairwise", "kto"),
        needs="prompts (any alpaca or sharegpt conversation; a single answer, if any, is kept "
        "as the reference)",
        encode=_row_by_row(_LM_IDS, (), _encode_prompt),
    )
)


# --- pretrain ----------------------------------------------------------------------------------


def _pretrain_text(item: Conversation, tokenizer: Any, options: EncodeOptions) -> str:
    eos = LLAMA3_TEXT_EOS if options.template_name == "llama3" else tokenizer.eos_token
    return item.messages[0]["content"] + eos


def _encode_pretrain(
    items: Sequence[Item], tokenizer: Any, template: Template, options: EncodeOptions
) -> dict[str, list]:
    """Text + eos per row: truncated to `cutoff_len`, or concatenated and cut into blocks.

    Packed blocks stand for all the batch's good rows (recorded on the first block); the tail
    shorter than a block is dropped, as LLaMA-Factory drops it per batch.
    """
    out = _empty(_LM_IDS, ())
    add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    texts: list[str] = []
    for item in items:
        if isinstance(item, str) or not item.messages[0]["content"]:
            reason = item if isinstance(item, str) else "empty text"
            for name in _LM_IDS:
                out[name].append([])
            out[SKIP_COLUMN].append(reason)
            out[ROWS_COLUMN].append(1)
            continue
        texts.append(_pretrain_text(item, tokenizer, options))
    if not texts:
        return out
    if not options.packing:
        prefix = tokenizer.bos_token if add_bos else ""
        encoded = tokenizer(
            [prefix + text for text in texts],
            add_special_tokens=False,
            truncation=True,
            max_length=options.cutoff_len,
        )["input_ids"]
        blocks = [list(ids) for ids in encoded]
        rows = [1] * len(blocks)
    else:
        ids = list(chain.from_iterable(tokenizer(texts, add_special_tokens=False)["input_ids"]))
        size = options.cutoff_len
        blocks = [ids[i : i + size] for i in range(0, len(ids) // size * size, size)]
        if add_bos:
            blocks = [[tokenizer.bos_token_id, *block[1:]] for block in blocks]
        rows = [len(texts)] + [0] * (len(blocks) - 1) if blocks else []
        if not blocks:  # the batch's text is shorter than one block
            for name in _LM_IDS:
                out[name].append([])
            out[SKIP_COLUMN].append(PACKING_REMAINDER)
            out[ROWS_COLUMN].append(len(texts))
            return out
    for block, count in zip(blocks, rows, strict=True):
        out["input_ids"].append(block)
        out["labels"].append(list(block))
        out[SKIP_COLUMN].append("")
        out[ROWS_COLUMN].append(count)
    return out


register_family(
    Family(
        name="pretrain",
        id_columns=_LM_COLUMNS,
        row_kinds=("plain",),
        needs="plain text: a dataset_info.json entry whose `columns.prompt` names the text "
        'column (e.g. `{"prompt": "text"}`)',
        encode=_encode_pretrain,
        batch_size=1000,
    )
)
