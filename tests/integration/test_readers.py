"""Readers on a real local Ray cluster: every file type, every demo dataset, every read error.

Rows are taken the way the pipeline takes them (pyarrow batches → `to_pylist`), so what the
converters see here is what they see in the tokenization tasks.

Run: ``python -m pytest tests/integration/test_readers.py -x -q``
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from data_pipelines.converters import convert_row
from data_pipelines.dataset_info import DatasetError, DatasetSpec, load_dataset_info, parse_entry
from data_pipelines.readers import READERS, json_blocks, read_dataset, unwrap_read_error
from tests.unit.test_converters import GOLDEN, lf_view

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"
ROWS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
CPUS = 0.25


def _rows(ds: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += batch.to_pylist()
    return rows


def _read(entry: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    return _rows(read_dataset(parse_entry("t", entry, folder), cpus_per_task=CPUS))


def _local_entries() -> list[str]:
    info = load_dataset_info(DATA)
    return [name for name, entry in info.items() if (DATA / str(entry.get("file_name"))).is_file()]


# --- pure parsing (no cluster) ------------------------------------------------------------------


def test_json_blocks_reads_arrays_and_lines_alike() -> None:
    array = json.dumps(ROWS).encode()
    lines = "\n".join(json.dumps(row) for row in ROWS).encode()
    assert [t.to_pylist() for t in json_blocks(array, "a.json")] == [ROWS]
    assert [t.to_pylist() for t in json_blocks(b"\xef\xbb\xbf" + lines + b"\n\n", "a.jsonl")] == [
        ROWS
    ]
    blocks = list(json_blocks(lines, "a.jsonl", block_bytes=1))
    assert len(blocks) == len(ROWS)


def test_json_lines_stream_across_chunk_boundaries() -> None:
    """Chunks cut anywhere (inside a BOM, a line, a multi-byte character) give the same rows
    and line numbers as the whole file."""
    rows = [{"text": f"caf\u00e9 \u2028 {i}"} for i in range(7)]
    data = b"\xef\xbb\xbf\n" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
    for size in (1, 2, 3, 5, 64):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        assert [r for t in json_blocks(chunks, "a.jsonl") for r in t.to_pylist()] == rows
    broken = data + b"\n{oops}\n"
    chunks = [broken[i : i + 3] for i in range(0, len(broken), 3)]
    with pytest.raises(DatasetError, match=r"a.jsonl:9: invalid JSON line"):
        list(json_blocks(chunks, "a.jsonl"))
    array = b"\xef\xbb\xbf  \n" + json.dumps(rows).encode()
    chunks = [array[i : i + 2] for i in range(0, len(array), 2)]
    assert [r for t in json_blocks(chunks, "a.json") for r in t.to_pylist()] == rows


def test_json_lines_split_on_newlines_only() -> None:
    line = json.dumps({"text": "a\u2028b"}, ensure_ascii=False).encode()
    assert next(json_blocks(line, "a.jsonl")).to_pylist() == [{"text": "a\u2028b"}]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a": 1}\n{"a": 2}\n{"a": 3,}\n', r"x.jsonl:3: invalid JSON line"),
        (b'{"a": 1}\n\n["a"]\n', r"x.jsonl:3: a JSON line must hold an object"),
        (b'[{"a": 1},\n {"a": 2]', r"x.jsonl:2:9: invalid JSON: Expecting .,. delimiter"),
        (b'[{"a": 1}, 3]', r"x.jsonl: item 1 of the JSON array is not an object"),
        (b"", r"x.jsonl holds no rows"),
        (b"[]", r"x.jsonl holds no rows"),
        (b"\xff\xfe", r"x.jsonl:1: not UTF-8 text"),
        (b'{"a": 1}\n{"a": "\xff"}\n', r"x.jsonl:2: not UTF-8 text"),
        (b'[{"a": "\xff"}]', r"x.jsonl: not UTF-8 text"),
        (b'{"a": "x", "b": 1}\n{"a": ["y"], "b": 2}\n', r"column `a` mixes value types"),
    ],
)
def test_json_errors_name_file_and_line(data: bytes, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        list(json_blocks(data, "x.jsonl"))


def test_readers_cover_every_loader() -> None:
    assert set(READERS) == {
        "json",
        "csv",
        "parquet",
        "arrow",
        "text",
        "hf_disk",
        "hf_hub",
        "ms_hub",
    }


def test_missing_file_at_read_time_names_the_path(tmp_path: Path) -> None:
    spec = DatasetSpec(name="gone", loader="json", files=(str(tmp_path / "gone.json"),))
    with pytest.raises(DatasetError, match=f"dataset `gone`: file not found: {tmp_path}/gone.json"):
        read_dataset(spec, cpus_per_task=CPUS)


def test_hub_dataset_offline_names_the_hub_id(tmp_path: Path) -> None:
    code = (
        "from data_pipelines.dataset_info import DatasetError, DatasetSpec\n"
        "from data_pipelines.readers import read_dataset\n"
        "spec = DatasetSpec(name='alpaca_gpt4_en', loader='hf_hub', hub_id='llamafactory/nope')\n"
        "try:\n"
        "    read_dataset(spec, cpus_per_task=0.25)\n"
        "except DatasetError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_DATASETS_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "dataset `alpaca_gpt4_en`: cannot load hf_hub_url `llamafactory/nope`" in done.stdout
    assert "(split `train`)" in done.stdout and "HF_HUB_OFFLINE=1" in done.stdout


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None, reason="has modelscope")
def test_modelscope_dataset_without_modelscope_says_what_to_install() -> None:
    spec = DatasetSpec(name="ms", loader="ms_hub", hub_id="AI-ModelScope/alpaca")
    with pytest.raises(
        DatasetError, match="ms_hub_url `AI-ModelScope/alpaca` needs the `modelscope`"
    ):
        read_dataset(spec, cpus_per_task=CPUS)


# --- on the cluster ---------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize("name", _local_entries())
def test_every_local_llamafactory_entry_loads_and_converts(name: str, ray_cluster: float) -> None:
    spec = parse_entry(name, load_dataset_info(DATA)[name], DATA)
    rows = _rows(read_dataset(spec, cpus_per_task=CPUS))
    source = Path(spec.files[0]).read_text(encoding="utf-8")
    expected = source.count("\n") if spec.files[0].endswith(".jsonl") else len(json.loads(source))
    assert len(rows) == expected
    conversations = [convert_row(row, spec.row_format) for row in rows]  # no BadRow
    golden = GOLDEN["datasets"].get(name)
    if golden is not None:  # Arrow round trip included, still LF's rows
        for row in golden["rows"]:
            ours = lf_view(conversations[row["index"]])
            assert ours["_prompt"] == row["_prompt"] and ours["_response"] == row["_response"]
            assert (ours["_system"], ours["_tools"]) == (row["_system"] or "", row["_tools"] or "")


@pytest.mark.ray
def test_every_demo_file_is_covered(ray_cluster: float) -> None:
    assert set(_local_entries()) == {
        "identity",
        "alpaca_en_demo",
        "dpo_en_demo",
        "kto_en_demo",
        "c4_demo",
        "glaive_toolcall_en_demo",
    }


@pytest.mark.ray
def test_bad_jsonl_line_fails_with_file_and_line(tmp_path: Path, ray_cluster: float) -> None:
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": }\n')
    ds = read_dataset(parse_entry("bad", {"file_name": "bad.jsonl"}, tmp_path), cpus_per_task=CPUS)
    with pytest.raises(DatasetError, match=rf"{tmp_path}/bad.jsonl:2: invalid JSON line") as caught:
        ds.materialize()
    assert str(unwrap_read_error(caught.value)).startswith(f"{tmp_path}/bad.jsonl:2: invalid JSON")


@pytest.mark.ray
def test_csv_parquet_arrow_and_text(tmp_path: Path, ray_cluster: float) -> None:
    table = pa.Table.from_pylist(ROWS)
    pa_csv.write_csv(table, tmp_path / "d.csv")
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.ipc.new_stream(tmp_path / "stream.arrow", table.schema) as writer:
        writer.write_table(table)
    with pa.ipc.new_file(tmp_path / "file.arrow", table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "d.txt").write_text("first line\n\nsecond line\n")
    for name in ("d.parquet", "stream.arrow", "file.arrow"):
        assert _read({"file_name": name}, tmp_path) == ROWS, name
    csv_rows = _read({"file_name": "d.csv"}, tmp_path)
    assert [row["instruction"] for row in csv_rows] == [row["instruction"] for row in ROWS]
    assert _read({"file_name": "d.txt", "columns": {"prompt": "text"}}, tmp_path) == [
        {"text": "first line"},
        {"text": "second line"},
    ]


@pytest.mark.ray
def test_not_an_arrow_file(tmp_path: Path, ray_cluster: float) -> None:
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DatasetError, match="junk.arrow is not an Arrow IPC file"):
        _read({"file_name": "junk.arrow"}, tmp_path)


@pytest.mark.ray
def test_a_folder_of_json_and_jsonl(tmp_path: Path, ray_cluster: float) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(ROWS[:2]))
    (folder / "b.jsonl").write_text("\n".join(json.dumps(row) for row in ROWS[2:]))
    rows = _read({"file_name": "parts"}, tmp_path)
    assert sorted(rows, key=lambda row: row["instruction"]) == ROWS


@pytest.mark.ray
def test_saved_hf_datasets(tmp_path: Path, ray_cluster: float) -> None:
    import datasets

    whole = datasets.Dataset.from_list(ROWS)
    whole.select([4, 0, 2]).save_to_disk(str(tmp_path / "picked"))
    assert _read({"file_name": "picked"}, tmp_path) == [ROWS[4], ROWS[0], ROWS[2]]
    datasets.DatasetDict({"train": whole, "dev": whole.select([1])}).save_to_disk(
        str(tmp_path / "splits")
    )
    assert _read({"file_name": "splits", "split": "dev"}, tmp_path) == [ROWS[1]]
    with pytest.raises(
        DatasetError, match="split `test` is not in .*set `split` to one of train, dev"
    ):
        _read({"file_name": "splits", "split": "test"}, tmp_path)
    with pytest.raises(DatasetError, match="single saved Dataset without splits"):
        _read({"file_name": "picked", "split": "dev"}, tmp_path)


@pytest.mark.ray
def test_a_file_named_with_underscore_is_read(tmp_path: Path, ray_cluster: float) -> None:
    # Ray's directory listing skips "_" names; a file named explicitly must still be read.
    (tmp_path / "_train.json").write_text(json.dumps(ROWS))
    assert _read({"file_name": "_train.json"}, tmp_path) == ROWS
