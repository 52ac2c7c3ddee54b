"""Hold out evaluation rows (`val_size`) without materialising the dataset.

Each tokenized row gets a key in [0, 1) from a hash of its token ids and the run's seed; rows
whose key falls under the held-out share form the evaluation set. The split is a pure function
of row content, so it is the same on every node, in every retry and for every Tune trial, and a
duplicated row never lands on both sides. LLaMA-Factory samples the split with the seed
instead, so the held-out rows differ from its choice (the share is the same in expectation;
an integer `val_size` is turned into the share it is of the kept rows).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

HELD_OUT = "_held_out"


def row_key(ids: Any, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for a row's ids."""
    digest = hashlib.blake2b(
        np.asarray(ids, dtype=np.int64).tobytes(), digest_size=8, key=str(seed).encode()
    ).digest()
    return int.from_bytes(digest, "big") / 2**64


def held_out_share(val_size: float, kept_rows: int) -> float:
    """`val_size` as a share of the rows: itself when < 1, else a count of `kept_rows`.

    Raises:
        ValueError: a count that leaves no training rows.
    """
    if val_size < 1:
        return val_size
    if val_size >= kept_rows:
        raise ValueError(
            f"val_size={int(val_size)} holds out every one of the {kept_rows} rows; lower it"
        )
    return val_size / kept_rows


def _mark(batch: pa.Table, column: str, share: float, seed: int) -> pa.Table:
    flags = [row_key(ids, seed) < share for ids in batch.column(column).to_pylist()]
    return batch.append_column(HELD_OUT, pa.array(flags, type=pa.bool_()))


def split_validation(
    dataset: Any, *, id_column: str, share: float, seed: int, cpus_per_task: float
) -> tuple[Any, Any]:
    """(training rows, held-out rows) of a Ray dataset, decided row by row."""
    marked = dataset.map_batches(
        _mark,
        fn_kwargs={"column": id_column, "share": share, "seed": seed},
        batch_format="pyarrow",
        num_cpus=cpus_per_task,
    )
    train = marked.filter(lambda row: not row[HELD_OUT]).drop_columns([HELD_OUT])
    held_out = marked.filter(lambda row: row[HELD_OUT]).drop_columns([HELD_OUT])
    return train, held_out
