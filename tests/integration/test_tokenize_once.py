"""Tokenize once: a second preparation reuses the content-addressed parquet cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main as rayft_main
from configs import load_config
from data_pipelines.pipeline import prepare_supervised

ROOT = Path(__file__).resolve().parents[2]


def _config(tiny_model_dir: Path, tmp_path: Path, *extra: str):
    return load_config(
        None,
        [
            f"model_name_or_path={tiny_model_dir}",
            "template=qwen",
            "dataset=identity,alpaca_en_demo",
            f"dataset_dir={ROOT / 'data'}",
            "max_samples=50",
            "cutoff_len=64",
            f"tokenized_cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'out'}",
            *extra,
        ],
    )


def _rows(data) -> list[tuple]:
    return sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in data.dataset.take_all())


def _assert_streamed_equals_in_memory(config, small) -> None:
    """A cache over `SMALL_CACHE_BYTES` is read by Ray Data tasks instead of handed over in
    memory: same columns, same rows, same order."""
    import ray.data

    from data_pipelines import pipeline

    context = ray.data.DataContext.get_current()
    saved = (pipeline.SMALL_CACHE_BYTES, context.execution_options.preserve_order)
    pipeline.SMALL_CACHE_BYTES, context.execution_options.preserve_order = 0, True
    try:
        streamed = prepare_supervised(config, cpus_per_task=0.25)
        assert streamed.dataset.schema().names == small.dataset.schema().names
        assert streamed.dataset.take_all() == small.dataset.take_all()
    finally:
        pipeline.SMALL_CACHE_BYTES, context.execution_options.preserve_order = saved


def test_second_run_reuses_the_cache_and_changes_invalidate_it(
    ray_cluster: float, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tiny_model_dir, tmp_path)
    first = prepare_supervised(config, cpus_per_task=0.25)
    assert "tokenized 100 rows once" in capsys.readouterr().out
    second = prepare_supervised(config, cpus_per_task=0.25)
    assert "reusing the tokenized dataset" in capsys.readouterr().out
    assert _rows(first) == _rows(second) and second.report.kept == 100
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 1
    _assert_streamed_equals_in_memory(config, second)

    prepare_supervised(_config(tiny_model_dir, tmp_path, "cutoff_len=32"), cpus_per_task=0.25)
    assert "tokenized 100 rows once" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2


def test_preprocess_writes_parquet_that_training_loads(
    ray_cluster: float, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow.parquet as pq
    import yaml

    config = _config(tiny_model_dir, tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    out = tmp_path / "tokenized"
    assert rayft_main(["preprocess", str(path), "--output", str(out)]) == 0
    table = pq.read_table(out / "data")
    # The two bookkeeping columns keep each skipped row's reason and the rows a record stands
    # for; training drops them when it loads the folder.
    assert set(table.column_names) == {
        "input_ids", "attention_mask", "labels", "skip_reason", "source_rows"
    }
    assert table.num_rows == 100 and set(table.column("skip_reason").to_pylist()) == {""}
    capsys.readouterr()
    loaded = prepare_supervised(
        _config(tiny_model_dir, tmp_path, f"tokenized_path={out}"), cpus_per_task=0.25
    )
    assert "reusing the tokenized dataset" in capsys.readouterr().out
    assert loaded.report.kept == 100
