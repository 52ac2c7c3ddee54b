"""`streaming: true`: what it needs and what it cannot be combined with (checked at load
time), and how a stream knows a batch it has already counted."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from configs import ConfigError, load_config
from data_pipelines.streaming import batch_digest
from jobs.loop import epoch_progress, plan_steps, shuffle_buffer

ROOT = Path(__file__).resolve().parents[2]


def _load(tmp_path: Path, model_dir: Path, **extra: object):
    values = {
        "model_name_or_path": str(model_dir),
        "template": "qwen",
        "dataset": "alpaca_en_demo",
        "dataset_dir": str(ROOT / "data"),
        "output_dir": str(tmp_path / "out"),
        "streaming": True,
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return load_config(path)


def test_a_stream_with_max_steps_loads_and_plans_without_a_row_count(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = _load(tmp_path, tiny_model_dir, max_steps=7, buffer_size=64)
    assert config.streaming and config.buffer_size == 64
    assert plan_steps(config, rows=None, world_size=2) == (None, None, None, 7)
    assert shuffle_buffer(config) == 64  # LLaMA-Factory's streaming shuffle buffer
    assert shuffle_buffer(config.model_copy(update={"streaming": False})) == 4 * 1
    assert epoch_progress(2, 5, None) == 2.0 and epoch_progress(1, 5, 10) == 1.5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, r"max_steps \(a stream has no length"),
        ({"max_steps": 5, "val_size": 0.1, "eval_strategy": "steps"}, "use eval_dataset"),
        (
            {"max_steps": 5, "eval_dataset": "identity", "eval_strategy": "epoch"},
            "use eval_strategy: steps",
        ),
        ({"max_steps": 5, "tokenized_path": "tok"}, "remove tokenized_path"),
        (
            {
                "max_steps": 5,
                "dataset": "alpaca_en_demo,identity",
                "mix_strategy": "interleave_under",
            },
            "use mix_strategy: concat",
        ),
    ],
)
def test_what_a_stream_cannot_do_is_named_with_its_fix(
    extra: dict, message: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        _load(tmp_path, tiny_model_dir, **extra)
    assert "streaming: true cannot be combined with" in str(caught.value)


def test_several_conflicts_are_reported_together(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, tiny_model_dir, tokenized_path="tok")
    text = str(caught.value)
    assert "max_steps (" in text and "tokenized_path (" in text


def test_a_batch_digest_depends_on_the_rows_not_on_their_memory_layout() -> None:
    """Zero-copy slices of one block share buffers; they must still count as different rows,
    and a re-read batch (a fresh table, or several chunks) as the same rows."""

    def table(start: int, stop: int) -> pa.Table:
        ids = [[i, i + 1] for i in range(start, stop)]
        return pa.table({"input_ids": ids, "skip_reason": [""] * len(ids)})

    block = table(0, 10)
    first, second = block.slice(0, 5), block.slice(5, 5)
    assert batch_digest(first) != batch_digest(second)
    assert batch_digest(second) == batch_digest(table(5, 10))
    assert batch_digest(pa.concat_tables([table(5, 7), table(7, 10)])) == batch_digest(second)
