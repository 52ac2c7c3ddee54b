"""Dataset specs → lazy Ray Datasets of raw rows, one reader per source type.

Readers (registered in `READERS` under `DatasetSpec.loader`):
- `json`: `.json` and `.jsonl` alike, as LF reads them: a JSON array of objects, or one object
  per line. Parsed with the `json` module in the read tasks, so a bad line is reported as
  `file:line` (Ray's pyarrow reader would name neither, and falls back to `json.load` for
  arrays with a warning per file).
- `csv`, `parquet`, `text` (one `text` row per non-empty line): Ray's own readers.
- `arrow`: Arrow IPC files, stream format (what `datasets` writes) or file format.
- `hf_disk`: a `save_to_disk` folder, opened with `datasets.load_from_disk` (which picks the
  split and validates the folder) and read through its Arrow shards in parallel.
- `hf_hub` / `ms_hub`: `datasets.load_dataset` / modelscope `MsDataset.load`, then
  `ray.data.from_huggingface`; any failure names the hub id (and says when the hub is offline).

Reading is lazy: errors inside files surface when the pipeline executes the dataset, which it
does (materializing the tokenized rows) before training starts.

Example:
    >>> from data_pipelines.dataset_info import resolve_dataset
    >>> ds = read_dataset(resolve_dataset("identity", "data"), cpus_per_task=0.25)
    >>> ds.count()
    91
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from data_pipelines.dataset_info import DatasetError, DatasetSpec

if TYPE_CHECKING:
    import ray.data

# A block is cut once this many bytes of JSON have been parsed: a read task holds one block of
# parsed rows (several times the JSON bytes as Python objects), while small files (the usual
# case) stay one block with one inferred schema. Reading the 1M-row benchmark file in one
# process held ~230 MiB above the interpreter with 16 MiB blocks and chunks, ~85 MiB with 4.
JSON_BLOCK_BYTES = 4 << 20
# JSON Lines files are read in chunks of this size (the whole file would be held otherwise).
READ_CHUNK_BYTES = 4 << 20
UTF8_BOM = b"\xef\xbb\xbf"
ARROW_FILE_MAGIC = b"ARROW1"


@dataclass(frozen=True)
class ReadOptions:
    """Run-level reading choices (the spec says what to read, these say how)."""

    cpus_per_task: float
    streaming: bool


Reader = Callable[[DatasetSpec, ReadOptions], "ray.data.Dataset"]
READERS: dict[str, Reader] = {}


def reader(loader: str) -> Callable[[Reader], Reader]:
    """Register a reader for a `DatasetSpec.loader` name."""

    def add(fn: Reader) -> Reader:
        READERS[loader] = fn
        return fn

    return add


def read_dataset(
    spec: DatasetSpec, *, cpus_per_task: float, streaming: bool = False
) -> ray.data.Dataset:
    """A lazy Ray Dataset of the raw rows a spec declares.

    Args:
        spec: a resolved dataset spec.
        cpus_per_task: CPUs each read task asks for (fractional on small machines).
        streaming: load hub datasets as `IterableDataset`s instead of downloading them whole.

    Returns:
        The dataset; file contents are read when it executes.

    Raises:
        DatasetError: a declared file is gone, or a hub dataset cannot be loaded. Malformed
            file contents raise `DatasetError` (naming file and line) when the dataset executes.
    """
    for file in spec.files:
        if not Path(file).exists():
            raise DatasetError(f"dataset `{spec.name}`: file not found: {file}")
    return READERS[spec.loader](spec, ReadOptions(cpus_per_task=cpus_per_task, streaming=streaming))


def unwrap_read_error(err: DatasetError) -> DatasetError:
    """The `DatasetError` a read task raised, without the Ray task traceback wrapped around it.

    Ray re-raises a task's exception as `RayTaskError(DatasetError)`, whose message starts with
    the worker's stack; the user needs only the file and line.
    """
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, DatasetError) else err


# --- local files ------------------------------------------------------------------------------


class JsonRowsDatasource(FileBasedDatasource):
    """JSON arrays and JSON Lines, parsed with the `json` module; errors name file and line."""

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from json_blocks(file_chunks(f), path)


class ArrowIpcDatasource(FileBasedDatasource):
    """Arrow IPC files in stream format (`datasets`' cache/shards) or file format."""

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        buffer = f.read_buffer()
        try:
            if buffer.to_pybytes()[: len(ARROW_FILE_MAGIC)] == ARROW_FILE_MAGIC:
                yield pa.ipc.open_file(buffer).read_all()
            else:
                yield pa.ipc.open_stream(buffer).read_all()
        except pa.ArrowInvalid as err:
            raise DatasetError(f"{path} is not an Arrow IPC file: {err}") from err


def json_blocks(
    data: bytes | Iterable[bytes], path: str, block_bytes: int = JSON_BLOCK_BYTES
) -> Iterator[pa.Table]:
    """Parse a JSON array of objects or JSON Lines into Arrow tables.

    `data` is the file's bytes, whole or as consecutive chunks. JSON Lines are parsed line by
    line as the chunks arrive, so reading a file of any size holds one block of rows (plus one
    chunk) in memory; a JSON array has to be parsed whole.

    Raises:
        DatasetError: not UTF-8 (with the line), invalid JSON (with line and column), a row
            that is not an object, no rows at all, or a column whose values mix types across
            rows.
    """
    chunks = _after_bom(iter([data] if isinstance(data, bytes) else data))
    head = b""
    for chunk in chunks:
        head += chunk
        if head.lstrip():
            break
    rest = itertools.chain([head], chunks)
    rows = _json_array(rest, path) if head.lstrip().startswith(b"[") else _json_lines(rest, path)
    batch: list[dict[str, Any]] = []
    size = 0
    empty = True
    for row, row_bytes in rows:
        batch.append(row)
        size += row_bytes
        if size >= block_bytes:
            yield _table(batch, path)
            batch, size, empty = [], 0, False
    if batch:
        yield _table(batch, path)
    elif empty:
        raise DatasetError(f"{path} holds no rows")


def file_chunks(f: pa.NativeFile, size: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """A file's bytes in chunks of `size`."""
    while chunk := f.read(size):
        yield chunk


def _after_bom(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks without a leading UTF-8 byte order mark (a BOM cut across chunks included)."""
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= len(UTF8_BOM):
            break
    yield head.removeprefix(UTF8_BOM)
    yield from chunks


def _json_array(chunks: Iterable[bytes], path: str) -> Iterator[tuple[dict[str, Any], int]]:
    text = _decoded(b"".join(chunks), path, None)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from err
    average = len(text) // max(len(items), 1)
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DatasetError(f"{path}: item {index} of the JSON array is not an object")
        yield item, average


def _json_lines(chunks: Iterable[bytes], path: str) -> Iterator[tuple[dict[str, Any], int]]:
    # Split on b"\n" only: str.splitlines() would also split on U+2028 and friends, which JSON
    # strings may hold unescaped; in UTF-8 the byte 0x0A never occurs inside a character.
    number = 0
    tail = b""
    for chunk in chunks:
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            number += 1
            if line.strip():
                yield _json_line(line, number, path), len(line)
    if tail.strip():
        yield _json_line(tail, number + 1, path), len(tail)


def _json_line(line: bytes, number: int, path: str) -> dict[str, Any]:
    try:
        row = json.loads(_decoded(line, path, number))
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{path}:{number}: invalid JSON line ({err.msg}, column {err.colno}); expected "
            "a JSON array of objects or one JSON object per line"
        ) from err
    if not isinstance(row, dict):
        raise DatasetError(f"{path}:{number}: a JSON line must hold an object")
    return row


def _decoded(data: bytes, path: str, line: int | None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        where = path if line is None else f"{path}:{line}"
        raise DatasetError(f"{where}: not UTF-8 text ({err})") from err


def _table(rows: list[dict[str, Any]], path: str) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        for column in dict.fromkeys(key for row in rows for key in row):
            try:
                pa.array([row.get(column) for row in rows])
            except (pa.ArrowInvalid, pa.ArrowTypeError) as column_err:
                raise DatasetError(
                    f"{path}: column `{column}` mixes value types across rows ({column_err})"
                ) from err
        raise DatasetError(f"{path}: rows cannot form one table ({err})") from err


@reader("json")
def _read_json(spec: DatasetSpec, options: ReadOptions) -> ray.data.Dataset:
    import ray.data

    source = JsonRowsDatasource(list(spec.files))
    return ray.data.read_datasource(source, num_cpus=options.cpus_per_task)


@reader("arrow")
def _read_arrow(spec: DatasetSpec, options: ReadOptions) -> ray.data.Dataset:
    import ray.data

    source = ArrowIpcDatasource(list(spec.files))
    return ray.data.read_datasource(source, num_cpus=options.cpus_per_task)


@reader("csv")
def _read_csv(spec: DatasetSpec, options: ReadOptions) -> ray.data.Dataset:
    import ray.data

    return ray.data.read_csv(list(spec.files), num_cpus=options.cpus_per_task)


@reader("parquet")
def _read_parquet(spec: DatasetSpec, options: ReadOptions) -> ray.data.Dataset:
    import ray.data

    return ray.data.read_parquet(list(spec.files), num_cpus=options.cpus_per_task)


@reader("text")
def _read_text(spec: DatasetSpec, options: ReadOptions) -> ray.data.Dataset:
    import ray.data

    return ray.data.read_text(list(spec.files), num_cpus=options.cpus_per_task)


# --- Hugging Face datasets on disk and on hubs -------------------------------------------------


@reader("hf_disk")
def _read_saved(spec: DatasetSpec, options: ReadOptions) -> ray.data.Dataset:
    """A `save_to_disk` folder: `load_from_disk` picks the split, its Arrow shards are read.

    `ray.data.from_huggingface` is not used for local folders: it first re-loads the dataset
    under its original hub name to compare fingerprints (a download when online), then copies
    the whole table through the driver. `save_to_disk` writes the rows already flattened, so
    the shards hold exactly the dataset's rows.
    """
    import datasets

    folder = spec.files[0]
    loaded = datasets.load_from_disk(folder)
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split not in loaded:
            raise DatasetError(
                f"dataset `{spec.name}`: split `{spec.split}` is not in {folder}; "
                f"set `split` to one of {', '.join(loaded)}"
            )
        loaded = loaded[spec.split]
    elif spec.split != "train":
        raise DatasetError(
            f"dataset `{spec.name}`: {folder} holds a single saved Dataset without splits; "
            f"remove `split: {spec.split}`"
        )
    shards = [entry["filename"] for entry in loaded.cache_files]
    return _read_arrow(spec.model_copy(update={"files": tuple(shards)}), options)


@reader("hf_hub")
def _read_hf_hub(spec: DatasetSpec, options: ReadOptions) -> ray.data.Dataset:
    import datasets
    import ray.data
    from huggingface_hub import constants as hf_constants

    try:
        loaded = datasets.load_dataset(
            spec.hub_id,
            name=spec.subset,
            data_dir=spec.folder,
            split=spec.split,
            streaming=options.streaming,
        )
    # datasets raises many unrelated types (connection, not found, bad config, offline mode);
    # each becomes one error naming the hub id, with the original chained.
    except Exception as err:  # noqa: BLE001
        offline = (
            "; the hub is offline (HF_HUB_OFFLINE=1): only datasets already in the HF cache load"
            if hf_constants.HF_HUB_OFFLINE
            else ""
        )
        raise _hub_error(spec, "hf_hub_url", err, offline) from err
    return ray.data.from_huggingface(loaded)


@reader("ms_hub")
def _read_ms_hub(spec: DatasetSpec, options: ReadOptions) -> ray.data.Dataset:
    import ray.data

    try:
        from modelscope import MsDataset
    except ImportError as err:
        raise DatasetError(
            f"dataset `{spec.name}`: ms_hub_url `{spec.hub_id}` needs the `modelscope` package "
            "(pip install modelscope), or give the entry an `hf_hub_url`"
        ) from err
    try:
        loaded = MsDataset.load(
            dataset_name=spec.hub_id,
            subset_name=spec.subset,
            data_dir=spec.folder,
            split=spec.split,
            use_streaming=options.streaming,
        )
    except Exception as err:  # noqa: BLE001 - as in _read_hf_hub
        raise _hub_error(spec, "ms_hub_url", err, "") from err
    if isinstance(loaded, MsDataset):
        loaded = loaded.to_hf_dataset()
    return ray.data.from_huggingface(loaded)


def _hub_error(spec: DatasetSpec, key: str, err: Exception, hint: str) -> DatasetError:
    where = ", ".join(
        f"{name} `{value}`"
        for name, value in (("subset", spec.subset), ("folder", spec.folder), ("split", spec.split))
        if value is not None
    )
    return DatasetError(
        f"dataset `{spec.name}`: cannot load {key} `{spec.hub_id}` ({where}): "
        f"{type(err).__name__}: {err}{hint}"
    )
