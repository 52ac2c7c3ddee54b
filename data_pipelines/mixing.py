"""Mixing several datasets into one stream, with LLaMA-Factory's `mix_strategy` meanings.

`concat` puts the datasets one after the other. The interleave strategies alternate between
them, as LLaMA-Factory does through Hugging Face `datasets.interleave_datasets`:

- `interleave_under`: stop when the first dataset runs out (undersamples the larger ones);
- `interleave_over`: go on, restarting used-up datasets, until every one has run out once
  (oversamples the smaller ones);
- `interleave_once`: go on until every one has run out, without restarting any.

`interleave_probs` turns strict alternation into a seeded random choice of the next dataset.

The order itself comes from `datasets.interleave_datasets`, run on a tiny table of
(source, row) pairs rather than on the data, so it is the library's order by construction
and costs a few bytes per row. Every source is read front to back (cycling when restarted),
which lets the rows be streamed dataset by dataset instead of being held in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SOURCE_COLUMN = "mix_source"
ROW_COLUMN = "mix_row"
# The staged mixed stream: each raw row as JSON text, next to its SOURCE_COLUMN.
TEXT_COLUMN = "mix_text"

# rayft's strategy name -> `datasets.interleave_datasets(stopping_strategy=...)`.
STOPPING_STRATEGIES: dict[str, str] = {
    "interleave_under": "first_exhausted",
    "interleave_over": "all_exhausted",
    "interleave_once": "all_exhausted_without_replacement",
}
# Rows per parquet file of the mixed stream.
CHUNK_ROWS = 8192


def interleave_sources(
    lengths: Sequence[int], strategy: str, probabilities: Sequence[float] | None, seed: int
) -> np.ndarray:
    """The source dataset of each mixed row, in order (`int32`, one entry per mixed row).

    Args:
        lengths: rows per dataset, in `dataset` order.
        strategy: one of `STOPPING_STRATEGIES`.
        probabilities: chance of drawing each dataset next; `None` alternates strictly.
        seed: the draw's seed (the run's `seed`, as LLaMA-Factory passes it).

    Raises:
        ValueError: an unknown strategy, or a dataset with no rows.
    """
    from datasets import Dataset, interleave_datasets

    if strategy not in STOPPING_STRATEGIES:
        raise ValueError(
            f"unknown mix_strategy {strategy}; known: concat, {', '.join(STOPPING_STRATEGIES)}"
        )
    if any(n == 0 for n in lengths):
        empty = [i for i, n in enumerate(lengths) if n == 0]
        raise ValueError(f"dataset(s) at position {empty} have no rows; interleaving needs rows")
    tables = [
        Dataset.from_dict(
            {SOURCE_COLUMN: np.full(n, i, dtype=np.int32), ROW_COLUMN: np.arange(n, dtype=np.int64)}
        )
        for i, n in enumerate(lengths)
    ]
    mixed = interleave_datasets(
        tables,
        probabilities=list(probabilities) if probabilities is not None else None,
        seed=seed,
        stopping_strategy=STOPPING_STRATEGIES[strategy],
    )
    sources = np.asarray(mixed[SOURCE_COLUMN], dtype=np.int32)
    rows = np.asarray(mixed[ROW_COLUMN], dtype=np.int64)
    _check_front_to_back(sources, rows, lengths)
    return sources


def _check_front_to_back(sources: np.ndarray, rows: np.ndarray, lengths: Sequence[int]) -> None:
    """Streaming relies on each source being read in order, cycling: refuse anything else."""
    for i, n in enumerate(lengths):
        taken = rows[sources == i]
        if not np.array_equal(taken, np.arange(len(taken)) % n):
            raise RuntimeError(
                f"datasets.interleave_datasets reads dataset {i} out of order; rayft's streaming "
                "mix cannot follow this `datasets` version"
            )


def write_mixed(
    parts: Sequence[Any], sources: np.ndarray, folder: Path, *, chunk_rows: int = CHUNK_ROWS
) -> int:
    """Stream the rows of `parts` (Ray Datasets, read in order) to parquet in the mixed order.

    Each row is stored as JSON text with its source index, because the datasets may have
    different columns (alpaca next to sharegpt). Memory holds one chunk, whatever the sizes.

    Returns:
        The number of rows written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    readers = [_cycle(part) for part in parts]
    written = 0
    for start in range(0, len(sources), chunk_rows):
        chunk = sources[start : start + chunk_rows]
        texts = [json.dumps(next(readers[int(i)]), default=str, ensure_ascii=False) for i in chunk]
        pq.write_table(
            pa.table(
                {
                    SOURCE_COLUMN: pa.array(chunk, pa.int32()),
                    TEXT_COLUMN: pa.array(texts, pa.string()),
                }
            ),
            folder / f"part-{start // chunk_rows:06d}.parquet",
        )
        written += len(chunk)
    return written


def _cycle(part: Any) -> Iterator[dict[str, Any]]:
    """A dataset's rows front to back (as plain Python values, like the tokenizer tasks see
    them), starting over when they run out. The caller keeps Ray Data's order."""
    while True:
        for batch in part.iter_batches(batch_format="pyarrow", batch_size=1024):
            yield from batch.to_pylist()
