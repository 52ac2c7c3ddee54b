"""rayft's own per-row work with no Ray at all: the bound any orchestration of it can reach.

Splits a JSON Lines file into byte ranges at line ends and hands them to N plain processes
(a `multiprocessing` spawn pool). Each parses its ranges with rayft's reader, tokenizes and
writes them with the pipeline's `BatchTokenizer` (the same class the Ray actors run, batch
size and parquet options included), so the time is that work spread perfectly over N CPUs:
no cluster to start or stop, no read task beside the tokenizers, no object store, no
scheduler. `preprocess_vs_llamafactory.py` runs it from a fresh process and prints its time
next to the 2x target; a Ray pipeline of the same work can only be slower.

    .venv/bin/python benchmarks/plain_processes.py CONFIG.yaml DATA.jsonl OUT_DIR --processes 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Bytes a process reads at a time, and ranges per process (so one slow range does not leave
# a CPU idle at the end).
READ_BYTES = 4 << 20
RANGES_PER_PROCESS = 32


def line_ranges(path: Path, pieces: int) -> list[tuple[int, int]]:
    """`pieces` byte ranges covering the file, each starting at a line's first byte."""
    size = path.stat().st_size
    starts = [0]
    with path.open("rb") as f:
        for i in range(1, pieces):
            f.seek(size * i // pieces)
            f.readline()
            starts.append(max(f.tell(), starts[-1]))
    return list(zip(starts, [*starts[1:], size], strict=True))


def _range_bytes(path: Path, start: int, end: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        left = end - start
        while left > 0 and (chunk := f.read(min(READ_BYTES, left))):
            left -= len(chunk)
            yield chunk


def tokenize_range(job: tuple[str, str, str, int, int]) -> int:
    """Parse, tokenize and write one byte range; returns its rows."""
    if str(ROOT) not in sys.path:  # a spawned process starts without the checkout on its path
        sys.path.insert(0, str(ROOT))
    from configs.loader import load_config
    from data_pipelines.dataset_info import resolve_dataset
    from data_pipelines.families import get_family
    from data_pipelines.pipeline import TokenizeSpec, encode_options, template_spec
    from data_pipelines.readers import json_blocks

    config_path, data, parts, start, end = job
    config = load_config(config_path, [])
    spec = resolve_dataset(config.dataset, config.dataset_dir)
    task = TokenizeSpec(
        template=template_spec(config),
        row_format=spec.row_format,
        options=encode_options(config),
        family="supervised",
    )
    tokenizer = _actor(task, parts)
    batch = get_family(task.family).batch_size
    rows = 0
    for block in json_blocks(_range_bytes(Path(data), start, end), data):
        for offset in range(0, block.num_rows, batch):
            rows_in = block.slice(offset, batch)
            tokenizer(rows_in)
            rows += rows_in.num_rows
    return rows


# One `BatchTokenizer` per process and task, as one Ray actor holds one.
_ACTORS: dict[tuple[Any, str], Any] = {}


def _actor(task: Any, parts: str) -> Any:
    from data_pipelines.pipeline import BatchTokenizer

    key = (task, parts)
    if key not in _ACTORS:
        _ACTORS[key] = BatchTokenizer(task, parts=parts)
    return _ACTORS[key]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path)
    parser.add_argument("data", type=Path, help="a JSON Lines file")
    parser.add_argument("out", type=Path, help="an empty folder for the parquet parts")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(args.config), str(args.data), str(args.out), start, end)
        for start, end in line_ranges(args.data, args.processes * RANGES_PER_PROCESS)
    ]
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        rows = sum(pool.imap_unordered(tokenize_range, jobs))
    print(f"{rows} {time.perf_counter() - started:.2f}")


if __name__ == "__main__":
    main()
