"""SFT packing: LLaMA-Factory's row layout, and neat packing's attention kept within examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.families import ROWS_COLUMN, SKIP_COLUMN, _pack_supervised, pack_lengths
from jobs.losses import IGNORE_INDEX
from jobs.stages import sft


def test_each_row_takes_the_longest_lengths_that_still_fit() -> None:
    assert pack_lengths([5, 3, 8, 2, 9, 1], 10) == [[9, 1], [8, 2], [5, 3]]
    assert pack_lengths([4, 4, 4], 8) == [[4, 4], [4]]
    assert pack_lengths([], 8) == []


def test_an_example_longer_than_a_row_is_refused_not_looped_on() -> None:
    with pytest.raises(ValueError, match="cannot fit"):
        pack_lengths([12], 10)


def _encoded(examples: list[tuple[list[int], list[int]]], bad: int = 0) -> dict[str, list]:
    rows = [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "reason": ""}
        for ids, labels in examples
    ] + [{"input_ids": [], "attention_mask": [], "labels": [], "reason": "empty answer"}] * bad
    return {
        "input_ids": [r["input_ids"] for r in rows],
        "attention_mask": [r["attention_mask"] for r in rows],
        "labels": [r["labels"] for r in rows],
        SKIP_COLUMN: [r["reason"] for r in rows],
        ROWS_COLUMN: [1] * len(rows),
    }


def test_packed_rows_are_padded_one_past_the_block_with_restarting_positions() -> None:
    a = ([1, 2, 3], [IGNORE_INDEX, 2, 3])
    b = ([4, 5], [IGNORE_INDEX, 5])
    out = _pack_supervised(_encoded([a, b], bad=1), pad_id=0, capacity=6, neat=True)
    # The bad row keeps its own record and reason; the two examples share one row.
    assert out[SKIP_COLUMN] == ["empty answer", ""]
    assert out[ROWS_COLUMN] == [1, 2]
    assert out["input_ids"][1] == [1, 2, 3, 4, 5, 0, 0]
    assert out["labels"][1] == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX]
    assert out["position_ids"][1] == [0, 1, 2, 0, 1, 0, 0]
    assert out["attention_mask"][1] == [1, 1, 1, 2, 2, 0, 0]
    plain = _pack_supervised(_encoded([a, b]), pad_id=0, capacity=6, neat=False)
    assert plain["attention_mask"][0] == [1] * 7


def _forward_loss(
    model: torch.nn.Module, rows: list[tuple[list[int], list[int]]], **packed
) -> float:
    batch = {
        "input_ids": np.array([ids for ids, _ in rows], dtype=object),
        "labels": np.array([labels for _, labels in rows], dtype=object),
        **packed,
    }
    with torch.no_grad():
        return float(sft.token_loss(model, sft.collate(batch, pad_id=0)))


def test_neat_packing_loss_equals_the_examples_trained_apart(tiny_model_dir: Path) -> None:
    """The summed loss of a neat-packed row is the sum of its examples' own losses; plain
    packing (LF's default) lets the second example attend to the first, so it differs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    a = ([5, 9, 17, 33, 41], [IGNORE_INDEX, IGNORE_INDEX, 17, 33, 41])
    b = ([7, 11, 13, 50], [IGNORE_INDEX, 11, 13, 50])
    apart = _forward_loss(model, [a]) + _forward_loss(model, [b])
    packed = _pack_supervised(_encoded([a, b]), pad_id=0, capacity=11, neat=True)
    row = {
        name: np.array(packed[name], dtype=object) for name in ("attention_mask", "position_ids")
    }
    neat = _forward_loss(model, [(packed["input_ids"][0], packed["labels"][0])], **row)
    assert neat == pytest.approx(apart, rel=1e-5)
    plain = _pack_supervised(_encoded([a, b]), pad_id=0, capacity=11, neat=False)
    row = {name: np.array(plain[name], dtype=object) for name in ("attention_mask", "position_ids")}
    crossing = _forward_loss(model, [(plain["input_ids"][0], plain["labels"][0])], **row)
    assert abs(crossing - apart) > 1e-4
