"""`streaming: true`: rows are tokenized while the trainers read them, and still counted.

The streamed run trains on exactly what the cached run trains on (same tokens, masks and
order: the loss curve of the shared DDP reference run is reproduced), and its
`data_report.json` is written when training ends. The counting layer is also run on its own:
bad rows are dropped and counted per reason once however often the stream is read, and a
stream with too many bad rows fails with the key to change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import ray.data
import yaml

from data_pipelines.families import ROWS_COLUMN, SKIP_COLUMN
from data_pipelines.pipeline import TooManyBadRows
from data_pipelines.streaming import stream_rows
from jobs.launch import run_training
from jobs.preflight import load_run_config


def _losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "trainer_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_a_streamed_run_trains_on_the_same_rows_as_the_cached_run(
    strategy_runs, tmp_path: Path
) -> None:
    cached = strategy_runs("ddp")
    raw = yaml.safe_load((cached.parent / "ddp.yaml").read_text())
    # The cached run shuffles within 4 micro-batches of 2 rows; the stream's buffer is its own.
    raw |= {"streaming": True, "buffer_size": 8, "output_dir": str(tmp_path / "streamed")}
    raw["tokenized_cache_dir"] = str(tmp_path / "cache")  # nothing may be written there
    path = tmp_path / "streamed.yaml"
    path.write_text(yaml.safe_dump(raw))
    outcome = run_training(load_run_config(path), total_cpus=strategy_runs.cpus)

    assert _losses(outcome.output_dir) == pytest.approx(_losses(cached), abs=1e-4)
    assert not (tmp_path / "cache" / "tokenized").exists()
    report = json.loads((outcome.output_dir / "data_report.json").read_text())
    assert report == {"total": 40, "kept": 40, "skipped": {}}


def _tokenized_rows(reasons: list[str]) -> ray.data.Dataset:
    table = pa.table(
        {
            "input_ids": [[i, i + 1] if not r else [] for i, r in enumerate(reasons)],
            SKIP_COLUMN: reasons,
            ROWS_COLUMN: [1] * len(reasons),
        }
    )
    return ray.data.from_arrow(table)


def test_bad_rows_are_dropped_and_counted_once_per_row(ray_cluster: float) -> None:
    reasons = ["", "empty response", "", "", "missing field", "", "empty response", ""]
    rows, stream = stream_rows(
        _tokenized_rows(reasons), max_bad_fraction=0.5, packed=False, cpus_per_task=0.25
    )
    for _ in range(2):  # a second epoch reads the stream again
        taken = rows.take_all()
        assert [row["input_ids"] for row in taken] == [[0, 1], [2, 3], [3, 4], [5, 6], [7, 8]]
        assert set(taken[0]) == {"input_ids"}
    report = stream.report()
    assert (report.total, report.kept) == (8, 5)
    assert dict(report.skipped) == {"empty response": 2, "missing field": 1}


def test_a_stream_with_too_many_bad_rows_fails_naming_the_key(ray_cluster: float) -> None:
    rows, _ = stream_rows(
        _tokenized_rows(["", "empty response", "empty response", ""]),
        max_bad_fraction=0.1,
        packed=False,
        cpus_per_task=0.25,
        min_rows=4,
    )
    with pytest.raises(Exception, match="max_bad_fraction") as caught:
        rows.take_all()
    assert "2 of the first 4 streamed rows" in str(caught.value)
    assert isinstance(caught.value, TooManyBadRows) or "TooManyBadRows" in str(caught.value)
