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
        "input_ids",
        "attention_mask",
        "labels",
        "skip_reason",
        "source_rows",
    }
    assert table.num_rows == 100 and set(table.column("skip_reason").to_pylist()) == {""}
    capsys.readouterr()
    loaded = prepare_supervised(
        _config(tiny_model_dir, tmp_path, f"tokenized_path={out}"), cpus_per_task=0.25
    )
    assert "reusing the tokenized dataset" in capsys.readouterr().out
    assert loaded.report.kept == 100


def test_preprocessing_bounds_its_blocks_and_buffers_then_restores_ray_data(
    ray_cluster: float,
) -> None:
    """Inside `_bounded_buffers` tasks emit blocks of at most `BLOCK_BYTES` (Ray Data's own
    128 MiB let the read task hold that much) within the object-store budget; after it, Ray
    Data's settings are the user's again."""
    import ray.data

    from data_pipelines import pipeline

    context = ray.data.DataContext.get_current()
    before = (context.target_max_block_size, context.execution_options.resource_limits)
    with pipeline._bounded_buffers():
        assert context.target_max_block_size == pipeline.BLOCK_BYTES < before[0]
        limits = context.execution_options.resource_limits
        assert limits.object_store_memory == pipeline.buffer_budget()
    assert (context.target_max_block_size, context.execution_options.resource_limits) == before


def test_tokenizing_actors_write_their_batches_and_yield_only_the_file_name(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Without a write task, the tokenized rows never pass through the object store: what the
    actor yields is one file name, and the file holds the rows it would have yielded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipelines import pipeline

    config = _config(tiny_model_dir, tmp_path)
    spec = pipeline.TokenizeSpec(
        template=pipeline.template_spec(config),
        row_format=pipeline.resolve_dataset("alpaca_en_demo", config.dataset_dir).row_format,
        options=pipeline.encode_options(config),
        family="supervised",
    )
    batch = pa.table(
        {
            "instruction": ["Say hi", "Say nothing"],
            "input": ["", ""],
            "output": ["Hi!", ""],
        }
    )
    expected = pipeline.BatchTokenizer(spec)(batch)
    written = pipeline.BatchTokenizer(spec, parts=str(tmp_path))(batch)
    assert written.column_names == [pipeline.PART_COLUMN] and written.num_rows == 1
    assert pq.read_table(tmp_path / written[pipeline.PART_COLUMN][0].as_py()) == expected
    assert expected[pipeline.SKIP_COLUMN].to_pylist()[0] == ""
    assert expected[pipeline.SKIP_COLUMN].to_pylist()[1] != ""  # the bad row is kept, flagged


def test_written_batches_are_named_in_the_order_ray_data_yields_them(tmp_path: Path) -> None:
    """`_load` reads the cache sorted by file name, so the names carry the yielded order; a
    file no one yielded (its actor died and the batch was retried) is not part of the cache."""
    from data_pipelines.pipeline import _order_parts

    parts, data = tmp_path / "parts", tmp_path / "data"
    parts.mkdir()
    for name in ("c.parquet", "a.parquet", "b.parquet", "orphan.parquet"):
        (parts / name).write_text(name)
    _order_parts(parts, ["c.parquet", "a.parquet", "b.parquet"], data)
    assert [(f.name, f.read_text()) for f in sorted(data.iterdir())] == [
        ("000000.parquet", "c.parquet"),
        ("000001.parquet", "a.parquet"),
        ("000002.parquet", "b.parquet"),
    ]
    assert not parts.exists()


def test_preprocessing_alone_does_not_read_the_rows_back(
    ray_cluster: float, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`rayft preprocess` wants the parquet and the counts: a small cache would otherwise be
    read into the driver's memory for nothing (~200 MiB at 10k alpaca rows)."""
    from data_pipelines.pipeline import prepare_dataset

    config = _config(tiny_model_dir, tmp_path)
    written = prepare_dataset(config, family="supervised", cpus_per_task=0.25, load=False)
    assert written.dataset is None
    loaded = prepare_dataset(config, family="supervised", cpus_per_task=0.25)
    assert loaded.report == written.report
    assert loaded.dataset.count() == written.report.kept == 100
