"""Converters, truncation and bad-row reasons (no Ray)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from data_pipelines.converters import BadRow, convert_alpaca
from data_pipelines.dataset_info import Columns, RowFormat
from data_pipelines.families import ONES_MASKS, EncodeOptions, get_family
from data_pipelines.pipeline import (
    SKIP_COLUMN,
    DataReport,
    TemplateSpec,
    TokenizeSpec,
    TooManyBadRows,
    _tokenize_batch,
    int32_lists,
    tokenize_rows,
)
from data_pipelines.supervised import SupervisedOptions, split_budget

COLUMNS = RowFormat(columns=Columns(history="history", system="system"))


@pytest.mark.parametrize(
    ("source", "target", "budget", "expected"),
    [
        (10, 5, 100, (10, 5)),  # everything fits
        (100, 5, 20, (15, 5)),  # short answer kept, prompt cut
        (5, 100, 20, (5, 15)),  # short prompt kept, answer cut
        (60, 40, 20, (12, 8)),  # both long: proportional
    ],
)
def test_split_budget_follows_llamafactory(
    source: int, target: int, budget: int, expected: tuple
) -> None:
    assert split_budget(source, target, budget) == expected


def test_alpaca_joins_instruction_and_input_and_keeps_history() -> None:
    row = {
        "instruction": "Translate",
        "input": "hola",
        "output": "hello",
        "history": [["hi", "hey"]],
        "system": "Be brief.",
    }
    conversation = convert_alpaca(row, COLUMNS)
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert conversation.messages[2]["content"] == "Translate\nhola"
    assert conversation.system == "Be brief."


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"input": "x", "output": "y"}, "missing field `instruction`"),
        ({"instruction": "x", "input": ""}, "missing field `output`"),
        ({"instruction": "x", "output": ""}, "empty response"),
        ({"instruction": 3, "output": "y"}, "non-string `instruction`"),
        ({"instruction": "x", "output": ["y"]}, "non-string `output`"),
        ({"instruction": "x", "output": "y", "history": "oops"}, "not a list"),
        ({"instruction": "x", "output": "y", "history": [["only one"]]}, "not a list"),
        ({"instruction": "x", "output": "y", "system": 5}, "non-string `system`"),
    ],
)
def test_bad_rows_get_a_reason(row: dict, reason: str) -> None:
    with pytest.raises(BadRow, match=reason):
        convert_alpaca(row, COLUMNS)


def _qwen(tokenizer_dir: Path) -> TemplateSpec:
    """The tiny tokenizer with the qwen template, as the tokenizing tests here use it."""
    return TemplateSpec(
        tokenizer_path=str(tokenizer_dir),
        trust_remote_code=False,
        template="qwen",
        default_system=None,
        tool_format=None,
        enable_thinking=True,
    )


def test_tokenize_rows_counts_instead_of_dropping(tiny_tokenizer_dir: Path) -> None:
    spec = TokenizeSpec(
        template=_qwen(tiny_tokenizer_dir),
        row_format=COLUMNS,
        options=SupervisedOptions(cutoff_len=64),
    )
    rows = [
        {"instruction": "Who are you?", "output": "I am Rayft."},
        {"instruction": "x", "output": ""},
        {"instruction": "y" * 400, "output": "z"},
    ]
    out = tokenize_rows(rows, spec)
    assert out[SKIP_COLUMN] == ["", "empty response", ""]
    assert out["input_ids"][1] == [] and len(out["input_ids"][2]) <= 64
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    answer = [t for t in out["labels"][0] if t != -100]
    assert tokenizer.decode(answer) == "I am Rayft.<|im_end|>\n"


def test_report_check_fails_past_max_bad_fraction_only() -> None:
    report = DataReport(total=10, kept=7, skipped=Counter({"empty response": 3}))
    report.check(0.3)  # exactly at the limit is allowed
    with pytest.raises(
        TooManyBadRows,
        match=r"7/10 rows kept; skipped empty response: 3: more "
        r"than max_bad_fraction=0.2 .*\(streamed\); fix the data",
    ):
        report.check(0.2, note=" (streamed)")
    DataReport().check(0.0)  # no rows: nothing to hold against the limit


@pytest.mark.parametrize(
    "rows",
    [[[1, 2, 3], [], [-100, 151643, 0]], [], [[]], [[2**31 - 1, -(2**31)]]],
    ids=["mixed", "no-rows", "one-empty-row", "int32-limits"],
)
def test_int32_lists_equals_arrow_conversion(rows: list[list[int]]) -> None:
    built = int32_lists(rows)
    assert built.type == pa.list_(pa.int32())
    assert built.equals(pa.array(rows, type=pa.list_(pa.int32())))


def test_int32_lists_refuses_ids_past_int32() -> None:
    with pytest.raises((OverflowError, ValueError)):
        int32_lists([[2**31]])


_FAMILY_ROWS = {
    "supervised": (COLUMNS, [{"instruction": "Hi", "output": "Hello there."}]),
    "prompt": (COLUMNS, [{"instruction": "Hi", "output": "Hello there."}]),
    "pretrain": (
        RowFormat(columns=Columns(prompt="text", query=None, response=None)),
        [{"text": "Some plain text to learn."}],
    ),
    "pairwise": (
        RowFormat(ranking=True, columns=Columns(chosen="chosen", rejected="rejected")),
        [{"instruction": "Hi", "chosen": "Hello there.", "rejected": "Go away, now."}],
    ),
    "feedback": (
        RowFormat(columns=Columns(kto_tag="label")),
        [{"instruction": "Hi", "output": "Hello there.", "label": True}],
    ),
}


@pytest.mark.parametrize("family", sorted(_FAMILY_ROWS))
def test_all_ones_masks_follow_their_ids_row_for_row(family: str, tiny_tokenizer_dir: Path) -> None:
    """Encoders leave the all-ones masks out; the batch still has them, as long as the ids."""
    row_format, rows = _FAMILY_ROWS[family]
    rows = [*rows, {"instruction": "x", "output": ""}, rows[0]]  # a bad row in the middle
    spec = TokenizeSpec(
        template=_qwen(tiny_tokenizer_dir),
        row_format=row_format,
        options=EncodeOptions(SupervisedOptions(cutoff_len=64)),
        family=family,
    )
    table = _tokenize_batch(pa.Table.from_pylist(rows), spec)
    masks = [name for name in get_family(family).id_columns if name in ONES_MASKS]
    assert masks, family
    for mask in masks:
        ids = table.column(ONES_MASKS[mask]).to_pylist()
        assert any(ids), mask
        assert table.column(mask).type == pa.list_(pa.int32())
        assert table.column(mask).to_pylist() == [[1] * len(row) for row in ids]
