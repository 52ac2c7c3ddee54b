"""`streaming: true`: rows are tokenized while the trainers consume them, never cached.

The cached path tokenizes everything first and counts the skipped rows before training. A
stream has no such moment, so the rows are counted as they pass: each tokenized batch reports
its kept and skipped rows (by reason) to a `RowCounter` actor, then loses its bad rows and
bookkeeping columns. The counts are printed and written to `data_report.json` when training
ends, and `max_bad_fraction` is enforced as soon as `MIN_ROWS_FOR_FRACTION` rows have passed.

A stream is read again for every epoch and after a restarted worker group; the counter knows
each batch by a digest of its contents, so those passes do not count rows twice.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from data_pipelines.families import ROWS_COLUMN, SKIP_COLUMN

MIN_ROWS_FOR_FRACTION = 1000
"""Rows a stream must have passed before `max_bad_fraction` is enforced (a few bad rows at
the start of a file say little about the whole)."""


class RowCounter:
    """Kept and skipped source rows of a stream, per distinct batch (a Ray actor)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.counts: Counter = Counter()
        self.records = 0

    def add(self, digest: str, counts: dict[str, int], records: int) -> tuple[int, int]:
        """Count a batch once; returns (source rows so far, skipped rows so far)."""
        if digest not in self.seen:
            self.seen.add(digest)
            self.counts.update(counts)
            self.records += records
        total = sum(self.counts.values())
        return total, total - self.counts.get("", 0)

    def totals(self) -> dict[str, Any]:
        """What `DataReport` is built from."""
        counts = Counter(self.counts)
        kept = counts.pop("", 0)
        return {"kept": kept, "skipped": dict(counts), "records": self.records}


@dataclass
class StreamedRows:
    """The handle a run keeps to read its stream's counts when training is over."""

    counter: Any  # an actor handle of `RowCounter`
    packed: bool

    def report(self) -> Any:
        """The final `DataReport` (rows that passed the stream at least once)."""
        import ray

        from data_pipelines.pipeline import DataReport

        totals = ray.get(self.counter.totals.remote())
        skipped = Counter(totals["skipped"])
        return DataReport(
            total=totals["kept"] + sum(skipped.values()),
            kept=totals["kept"],
            skipped=skipped,
            examples=totals["records"] if self.packed else None,
        )


def batch_digest(batch: pa.Table) -> str:
    """A digest of a tokenized batch's rows: equal rows give equal digests whatever their
    memory layout. Hashing the raw buffers would not do: a zero-copy slice shares its parent's
    buffers, so two different slices of one block would look alike. The Arrow IPC stream of
    the combined batch holds exactly the batch's rows."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_table(batch.combine_chunks())
    return hashlib.sha1(sink.getvalue().to_pybytes(), usedforsecurity=False).hexdigest()


def count_and_drop(
    batch: pa.Table, *, counter: Any, max_bad_fraction: float, min_rows: int
) -> pa.Table:
    """Report the batch's rows to the counter, fail past `max_bad_fraction`, keep good rows."""
    import ray

    from data_pipelines.pipeline import TooManyBadRows

    counts: Counter = Counter()
    for reason, rows in zip(
        batch[SKIP_COLUMN].to_pylist(), batch[ROWS_COLUMN].to_pylist(), strict=True
    ):
        counts[reason] += rows
    kept = pc.equal(batch[SKIP_COLUMN], "")
    records = pc.sum(kept).as_py() or 0
    total, bad = ray.get(counter.add.remote(batch_digest(batch), dict(counts), records))
    if total >= min_rows and bad / total > max_bad_fraction:
        raise TooManyBadRows(
            f"{bad} of the first {total} streamed rows are malformed, more than "
            f"max_bad_fraction={max_bad_fraction}; fix the data or raise `max_bad_fraction` "
            "(run without streaming to get every reason counted before training)"
        )
    return batch.filter(kept).drop_columns([SKIP_COLUMN, ROWS_COLUMN])


def stream_rows(
    tokenized: Any,
    *,
    max_bad_fraction: float,
    packed: bool,
    cpus_per_task: float,
    min_rows: int = MIN_ROWS_FOR_FRACTION,
) -> tuple[Any, StreamedRows]:
    """The lazy plan `tokenized` (with bookkeeping columns) as training rows plus its counter."""
    import ray

    counter = ray.remote(num_cpus=0)(RowCounter).remote()
    rows = tokenized.map_batches(
        count_and_drop,
        batch_format="pyarrow",
        fn_kwargs={
            "counter": counter,
            "max_bad_fraction": max_bad_fraction,
            "min_rows": min_rows,
        },
        num_cpus=cpus_per_task,
    )
    return rows, StreamedRows(counter=counter, packed=packed)
