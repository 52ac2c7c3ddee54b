"""Dataset mixing and SFT packing through the Ray Data pipeline, against LLaMA-Factory 0.9.5.

The goldens (`tests/goldens/lf095_packing_mix.json`) are LF's own train datasets, in order,
for the same files, tokenizer and options. The tokenizer directory is given as the model:
preparing data loads only the tokenizer, and the goldens were made from that directory (a
model directory's `config.json` can make transformers pick a model-specific tokenizer class).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs import load_config
from data_pipelines.pipeline import MIXED_SUBDIR, prepare_supervised

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests/goldens/lf095_packing_mix.json").read_text(encoding="utf-8"))

pytestmark = pytest.mark.ray


def _config(tiny_tokenizer_dir: Path, tmp_path: Path, *extra: str):
    return load_config(
        None,
        [
            f"model_name_or_path={tiny_tokenizer_dir}",
            "template=qwen",
            "dataset=alpaca_en_demo,identity",
            f"dataset_dir={ROOT / 'data'}",
            "max_samples=30",
            "cutoff_len=1024",
            f"tokenized_cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'out'}",
            *extra,
        ],
    )


def _column(data, name: str) -> list[list[int]]:
    return [list(map(int, row[name])) for row in data.dataset.take_all()]


@pytest.mark.slow  # the packed test below runs the same mixing path; the order is unit-tested
def test_interleaved_rows_equal_llamafactory(
    ray_cluster: float, tiny_tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    golden = GOLDEN["mixing"]["interleave_over/probs=0.7,0.3/seed=42"]
    mixed = prepare_supervised(
        _config(
            tiny_tokenizer_dir, tmp_path, "mix_strategy=interleave_over", "interleave_probs=0.7,0.3"
        ),
        cpus_per_task=0.25,
    )
    assert "mixed 2 datasets (interleave_over)" in capsys.readouterr().out
    assert _column(mixed, "input_ids") == [row["input_ids"] for row in golden["rows"]]
    assert mixed.report.total == golden["num_rows"] == 105
    assert not any(p.name == MIXED_SUBDIR for p in (tmp_path / "cache").rglob("*"))


def test_packed_mixed_rows_equal_llamafactory(
    ray_cluster: float, tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    key = "qwen/alpaca_en_demo+identity[:30]/cutoff=256/packing,mix=interleave_under,probs=0.5,0.5"
    golden = GOLDEN["packing"][key]
    packed = prepare_supervised(
        _config(
            tiny_tokenizer_dir,
            tmp_path,
            "cutoff_len=256",
            "packing=true",
            "mix_strategy=interleave_under",
            "interleave_probs=0.5,0.5",
        ),
        cpus_per_task=0.25,
    )
    for name in ("input_ids", "labels", "attention_mask", "position_ids"):
        assert _column(packed, name) == [row[name] for row in golden["rows"]], name
    assert packed.report.kept == golden["source_rows"]
    assert packed.report.examples == golden["num_packed_rows"]
