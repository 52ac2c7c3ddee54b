"""The Ray Data pipeline: read the declared files, convert, template, tokenize — once, in parallel.

The driver builds a lazy `ray.data.Dataset`; tokenization runs as Ray Data tasks on whatever
nodes have room (each loads the tokenizer once per process), bad rows are counted by reason,
and the clean rows are handed to Ray Train, which streams a shard to each worker.

Example:
    >>> data = prepare_supervised(config, cpus_per_task=0.25)
    >>> data.report.summary()
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipelines.cache import (
    DATA_SUBDIR,
    REPORT_FILE,
    cache_key,
    is_complete,
    publish,
    staging_dir,
)
from data_pipelines.converters import BadRow, Conversation, convert_row
from data_pipelines.dataset_info import DatasetError, DatasetSpec, RowFormat, resolve_dataset
from data_pipelines.families import (
    ONES_MASKS,
    OPTIONAL_COLUMNS,
    ROWS_COLUMN,
    SKIP_COLUMN,
    EncodeOptions,
    check_row_kinds,
    get_family,
)
from data_pipelines.mixing import (
    SOURCE_COLUMN,
    TEXT_COLUMN,
    interleave_sources,
    write_mixed,
)
from data_pipelines.readers import read_dataset, unwrap_read_error
from data_pipelines.streaming import StreamedRows, stream_rows
from data_pipelines.supervised import SupervisedOptions
from data_pipelines.templates import (
    Template,
    configure_template,
    prepare_tokenizer,
    resolve_template,
)

# Where the interleaved raw rows are staged before tokenizing (removed afterwards).
MIXED_SUBDIR = "mixed"
# Inputs this small start tokenizing on one actor (see `tokenizer_actors`).
SMALL_INPUT_ROWS = 10_000
SMALL_INPUT_BYTES = 16 * 1024 * 1024
# Blocks a preprocessing pipeline may hold in the object store (see `_bounded_buffers`): a
# tokenizing actor needs a few blocks of a few MiB queued, not the whole dataset.
BUFFER_BYTES_MIN = 512 << 20
BUFFER_BYTES_PER_CPU = 32 << 20
# Largest block a preprocessing task emits (Ray Data's default is 128 MiB; see
# `_bounded_buffers`).
BLOCK_BYTES = 8 << 20
# Where the tokenizing actors write their batches, before `_order_parts` names them in order.
PARTS_SUBDIR = "parts"
# The one column the actors yield when they write their batches: the file's name.
PART_COLUMN = "part"
# How the actors write token columns: dictionary pages do not pay for ids drawn from a whole
# vocabulary, and zstd level 1 without them writes a tokenized batch in 18% less CPU than
# parquet's default (dictionary + snappy), and files ~8% smaller. Min/max statistics of token
# lists serve no reader here and cost another 7% of the write.
TOKENIZED_PARQUET: dict[str, Any] = {
    "use_dictionary": False,
    "compression": "zstd",
    "compression_level": 1,
    "write_statistics": False,
}


class TooManyBadRows(ValueError):
    """More rows were malformed than `max_bad_fraction` allows."""


@dataclass
class DataReport:
    """What happened to the rows: kept, and skipped per reason."""

    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: int | None = None

    @property
    def training_examples(self) -> int:
        """Records training reads: the kept rows, or the blocks they were packed into."""
        return self.kept if self.examples is None else self.examples

    def summary(self) -> str:
        """One line for the terminal."""
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())
        packed = "" if self.examples is None else f" (packed into {self.examples} blocks)"
        line = f"{self.kept}/{self.total} rows kept{packed}"
        return line + (f"; skipped {reasons}" if reasons else "")

    def as_dict(self) -> dict[str, Any]:
        """The counts as JSON-ready data."""
        data = {"total": self.total, "kept": self.kept, "skipped": dict(self.skipped)}
        return data | ({} if self.examples is None else {"examples": self.examples})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        """Inverse of `as_dict`."""
        return cls(
            total=data["total"],
            kept=data["kept"],
            skipped=Counter(data["skipped"]),
            examples=data.get("examples"),
        )

    def check(self, max_bad_fraction: float, *, note: str = "") -> None:
        """Fail when more than `max_bad_fraction` of the rows were skipped.

        Raises:
            TooManyBadRows: naming the counts, the key and the fix (`note` adds context).
        """
        if self.total and (self.total - self.kept) / self.total > max_bad_fraction:
            raise TooManyBadRows(
                f"{self.summary()}: more than max_bad_fraction={max_bad_fraction} of the rows "
                f"are malformed{note}; fix the data or raise `max_bad_fraction`"
            )

    def write(self, output_dir: str | Path) -> Path:
        """Write the counts to `output_dir/data_report.json`."""
        path = Path(output_dir) / REPORT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2))
        return path


@dataclass(frozen=True)
class TemplateSpec:
    """Which tokenizer and template, with LLaMA-Factory's template options; hashable."""

    tokenizer_path: str
    trust_remote_code: bool
    template: str | None
    default_system: str | None
    tool_format: str | None
    enable_thinking: bool


@dataclass(frozen=True)
class TokenizeSpec:
    """Everything a tokenization task needs; small and picklable."""

    template: TemplateSpec
    row_format: RowFormat
    options: SupervisedOptions | EncodeOptions
    family: str = "supervised"
    # Mixed streams (`data_pipelines.mixing`): the row format of each source dataset.
    source_formats: tuple[RowFormat, ...] = ()

    @property
    def encode_options(self) -> EncodeOptions:
        """The options as every family reads them."""
        if isinstance(self.options, EncodeOptions):
            return self.options
        return EncodeOptions(supervised=self.options, template_name=self.template.template)


@functools.lru_cache(maxsize=4)
def load_prepared_tokenizer(spec: TemplateSpec) -> tuple[Any, Template]:
    """The tokenizer with the template's special tokens, and the configured template (a named
    one, else the tokenizer's own chat_template, as LLaMA-Factory does); cached per process."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        spec.tokenizer_path, trust_remote_code=spec.trust_remote_code
    )
    template = configured_template(spec, tokenizer)
    prepare_tokenizer(tokenizer, template)
    return tokenizer, template


def configured_template(spec: TemplateSpec, tokenizer: Any) -> Template:
    """The template a config means, with its LLaMA-Factory options applied."""
    return configure_template(
        resolve_template(spec.template, tokenizer),
        default_system=spec.default_system,
        tool_format=spec.tool_format,
        enable_thinking=spec.enable_thinking,
    )


def template_spec(config: Any) -> TemplateSpec:
    """The template settings of a `RayftConfig`."""
    return TemplateSpec(
        tokenizer_path=config.model_name_or_path,
        trust_remote_code=config.trust_remote_code,
        template=config.template,
        default_system=config.default_system,
        tool_format=config.tool_format,
        enable_thinking=config.enable_thinking,
    )


def tokenize_rows(
    rows: list[dict[str, Any]], spec: TokenizeSpec, *, sources: list[int] | None = None
) -> dict[str, list]:
    """Convert and tokenize rows with the spec's family; a bad row yields empty ids and its
    reason (see `data_pipelines.families`). `sources` gives each row's dataset in a mixed
    stream (its format is `spec.source_formats[source]`)."""
    tokenizer, template = load_prepared_tokenizer(spec.template)
    items: list[Conversation | str] = []
    for i, row in enumerate(rows):
        row_format = spec.row_format if sources is None else spec.source_formats[sources[i]]
        try:
            items.append(convert_row(row, row_format))
        except BadRow as bad:
            items.append(str(bad))
    return get_family(spec.family).encode(items, tokenizer, template, spec.encode_options)


def _tokenize_batch(batch: pa.Table, spec: TokenizeSpec) -> pa.Table:
    with cyclic_gc_paused():
        return _tokenize_batch_columns(batch, spec)


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Python's cycle collector off for one batch, on again after (if it was on).

    A batch allocates a few lists and dicts per row and drops them all by reference counting:
    it makes no cycles. The collector still ran every ~50 rows, scanning what the batch had
    built so far, for 7% of a batch's CPU (200 → 185 µs a row). A batch is bounded, so
    whatever cyclic garbage a library does make in it waits one batch at most."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _tokenize_batch_columns(batch: pa.Table, spec: TokenizeSpec) -> pa.Table:
    if SOURCE_COLUMN in batch.column_names:  # a mixed stream: rows are stored as JSON text
        rows = [json.loads(text) for text in batch.column(TEXT_COLUMN).to_pylist()]
        columns = tokenize_rows(rows, spec, sources=batch.column(SOURCE_COLUMN).to_pylist())
    else:
        columns = tokenize_rows(batch.to_pylist(), spec)
    family = get_family(spec.family)
    id_columns = [*family.id_columns, *(name for name in OPTIONAL_COLUMNS if name in columns)]
    lists = {name: int32_lists(columns[name]) for name in id_columns if name in columns}
    for name in id_columns:
        if name not in lists:  # an all-ones mask the encoder left out
            lists[name] = ones_like(lists[ONES_MASKS[name]])
    return pa.table(
        {
            **{name: lists[name] for name in id_columns},
            **{name: pa.array(columns[name], type=pa.bool_()) for name in family.flag_columns},
            SKIP_COLUMN: pa.array(columns[SKIP_COLUMN], type=pa.string()),
            ROWS_COLUMN: pa.array(columns[ROWS_COLUMN], type=pa.int32()),
        }
    )


def int32_lists(rows: list[list[int]]) -> pa.ListArray:
    """A list<int32> column from Python lists of ints, through one flat numpy array: 1.7× as
    fast as `pa.array` on the lists, which took ~8% of a tokenized batch's CPU."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    values = np.fromiter(chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def ones_like(ids: pa.ListArray) -> pa.ListArray:
    """A list<int32> column of ones, row for row as long as `ids` (an all-ones mask)."""
    return pa.ListArray.from_arrays(ids.offsets, pa.array(np.ones(len(ids.values), np.int32)))


@dataclass
class PreparedData:
    """Tokenized rows ready for Ray Train, and the report of what was kept."""

    dataset: Any
    """The rows as a `ray.data.Dataset`; None when they were not to be read back."""
    report: DataReport
    stream: StreamedRows | None = None
    """Set when `streaming`: the rows are counted while training reads them, and `report` is
    empty until `stream.report()` is asked for at the end."""


def prepare_supervised(config: Any, *, cpus_per_task: float) -> PreparedData:
    """The tokenized SFT dataset for a validated config (see `prepare_dataset`)."""
    return prepare_dataset(config, family="supervised", cpus_per_task=cpus_per_task)


def prepare_dataset(
    config: Any, *, family: str, cpus_per_task: float, load: bool = True
) -> PreparedData:
    """The tokenized dataset of a data family for a validated config, tokenized at most once.

    `tokenized_path`, when it holds a tokenized dataset, is used as it is. Otherwise the
    content-addressed cache under `tokenized_cache_dir` is used when it has this exact input
    (same data bytes, specs, tokenizer files, template and options), else the data are tokenized
    with Ray Data and written there (and to `tokenized_path`, if set) as parquet.

    Args:
        config: a `RayftConfig`.
        family: the data family the stage reads (`data_pipelines.families`).
        cpus_per_task: CPUs each Ray Data task asks for (fractional on small machines).
        load: False when only the parquet and the report are wanted (`rayft preprocess`): the
            rows are not read back (a small cache would otherwise be read into memory).

    Returns:
        The clean rows (streamed from parquet; None unless `load`) and the row report.

    Raises:
        DatasetError: a dataset cannot be read as declared, or holds rows of the wrong kind.
        TooManyBadRows: skipped rows exceed `max_bad_fraction`.
    """
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    specs = [resolve_dataset(name, config.dataset_dir) for name in config.dataset_names]
    check_row_kinds(specs, get_family(family), config.stage)
    if config.streaming:
        return _stream(config, specs, family=family, cpus_per_task=cpus_per_task)
    target = tokenized_location(config, specs, family=family)
    if is_complete(target) and (config.tokenized_path or not config.overwrite_cache):
        print(f"[rayft] reusing the tokenized dataset in {target}", flush=True)
        return _load(target, cpus_per_task=cpus_per_task, read_rows=load)
    # One streaming pass: every row (bad ones with their reason and no ids) goes to parquet,
    # so memory stays bounded whatever the dataset size; the reasons are then counted from the
    # narrow reason column alone.
    staging = staging_dir(target)
    parts = staging / PARTS_SUBDIR
    parts.mkdir()
    try:
        with _bounded_buffers():
            written = _tokenize(
                config,
                specs,
                family=family,
                cpus_per_task=cpus_per_task,
                staging=staging,
                parts=parts,
            ).take_all()
    except DatasetError as err:  # a bad file line, raised inside a Ray read task
        raise unwrap_read_error(err) from None
    finally:
        shutil.rmtree(staging / MIXED_SUBDIR, ignore_errors=True)
    _order_parts(parts, [row[PART_COLUMN] for row in written], staging / DATA_SUBDIR)
    report = _count_reasons(staging / DATA_SUBDIR, packed=packing_enabled(config))
    report.check(config.max_bad_fraction)
    publish(staging, target, report.as_dict())
    print(f"[rayft] tokenized {report.total} rows once; cached in {target}", flush=True)
    return _load(target, cpus_per_task=cpus_per_task, read_rows=load)


def _stream(
    config: Any, specs: list[DatasetSpec], *, family: str, cpus_per_task: float
) -> PreparedData:
    """The lazy read → tokenize → count plan, executed by the trainers' data ingest."""
    print("[rayft] streaming: rows are tokenized while training and counted at the end")
    # The config refuses interleaving with streaming, so no staging folder is needed.
    tokenized = _tokenize(config, specs, family=family, cpus_per_task=cpus_per_task, staging=None)
    rows, stream = stream_rows(
        tokenized,
        max_bad_fraction=config.max_bad_fraction,
        packed=packing_enabled(config),
        cpus_per_task=cpus_per_task,
    )
    return PreparedData(dataset=rows, report=DataReport(), stream=stream)


def packing_enabled(config: Any) -> bool:
    """LLaMA-Factory's rule: `packing` when set (or implied by `neat_packing`), else on for
    `pt` only."""
    if config.neat_packing:
        return True
    return config.packing if config.packing is not None else config.stage == "pt"


def block_size(config: Any) -> int:
    """Packed block length: LF shortens `cutoff_len` by one when `packing` (or
    `neat_packing`) is set explicitly; packed sft rows are then padded back to `cutoff_len`."""
    return config.cutoff_len - 1 if config.packing or config.neat_packing else config.cutoff_len


def mixing(config: Any) -> str:
    """The mix strategy in effect: one dataset is never interleaved."""
    return config.mix_strategy if len(config.dataset_names) > 1 else "concat"


def _count_reasons(folder: Path, *, packed: bool) -> DataReport:
    """Source rows kept and skipped per reason, from the two narrow bookkeeping columns."""
    import pyarrow.dataset as pads

    counts: Counter = Counter()
    records = 0
    for batch in pads.dataset(str(folder), format="parquet").to_batches(
        columns=[SKIP_COLUMN, ROWS_COLUMN]
    ):
        reasons = batch.column(SKIP_COLUMN).to_pylist()
        for reason, rows in zip(reasons, batch.column(ROWS_COLUMN).to_pylist(), strict=True):
            counts[reason] += rows
            records += reason == ""
    kept = counts.pop("", 0)
    return DataReport(
        total=kept + sum(counts.values()),
        kept=kept,
        skipped=counts,
        examples=records if packed else None,
    )


def tokenized_location(config: Any, specs: list[DatasetSpec], *, family: str) -> Path:
    """`tokenized_path` if set, else the content-addressed cache entry for this input."""
    if config.tokenized_path:
        return Path(config.tokenized_path).expanduser().resolve()
    key = cache_key(
        files=[f for spec in specs for f in spec.content_files()],
        specs=[spec.model_dump(mode="json") for spec in specs],
        tokenizer=config.model_name_or_path,
        options={
            "stage": config.stage,
            "family": family,
            "packing": packing_enabled(config),
            "neat_packing": config.neat_packing,
            "block_size": block_size(config),
            "mix": _mix_key(config),
            "template": config.template,
            "default_system": config.default_system,
            "tool_format": config.tool_format,
            "enable_thinking": config.enable_thinking,
            "cutoff_len": config.cutoff_len,
            "train_on_prompt": config.train_on_prompt,
            "mask_history": config.mask_history,
            "max_samples": config.max_samples,
        },
    )
    return Path(config.tokenized_cache_dir).expanduser().resolve() / "tokenized" / key


def _mix_key(config: Any) -> dict[str, Any] | str:
    """What decides the mixed order: the strategy, and the seed only when it draws."""
    strategy = mixing(config)
    if strategy == "concat":
        return strategy
    probs = config.mixing_probabilities
    return {"strategy": strategy, "probs": probs, "seed": config.seed if probs else None}


SMALL_CACHE_BYTES = 64 * 1024**2
"""A tokenized cache under this size reaches the trainers as one in-memory block: reading it
with Ray Data tasks costs seconds of task-process start-up (on 2 cores about 5 s per run),
more than the data itself. Larger caches are streamed from their files."""


def _load(folder: Path, *, cpus_per_task: float, read_rows: bool = True) -> PreparedData:
    import ray.data
    from ray.data.expressions import col

    report = DataReport.from_dict(json.loads((folder / REPORT_FILE).read_text()))
    if not read_rows:
        return PreparedData(dataset=None, report=report)
    files = sorted((folder / DATA_SUBDIR).glob("*.parquet"))  # named in order (`_order_parts`)
    if files and sum(path.stat().st_size for path in files) < SMALL_CACHE_BYTES:
        return PreparedData(dataset=ray.data.from_arrow(_training_table(files)), report=report)
    dataset = ray.data.read_parquet(str(folder / DATA_SUBDIR), num_cpus=cpus_per_task)
    names = dataset.schema().names
    if SKIP_COLUMN in names:
        dataset = dataset.filter(expr=col(SKIP_COLUMN) == "")
    bookkeeping = [name for name in (SKIP_COLUMN, ROWS_COLUMN) if name in names]
    if bookkeeping:
        dataset = dataset.drop_columns(bookkeeping)
    return PreparedData(dataset=dataset, report=report)


def _training_table(files: list[Path]) -> pa.Table:
    """The cache's files in order, without skipped rows and bookkeeping columns (the same
    rows and columns as the streamed path)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(path) for path in files], promote_options="default")
    if SKIP_COLUMN in table.column_names:
        table = table.filter(pc.equal(table[SKIP_COLUMN], ""))
    return table.drop_columns(
        [name for name in (SKIP_COLUMN, ROWS_COLUMN) if name in table.column_names]
    )


def encode_options(config: Any) -> EncodeOptions:
    """The tokenization options of a config."""
    packed = packing_enabled(config)
    return EncodeOptions(
        supervised=SupervisedOptions(
            cutoff_len=block_size(config) if packed else config.cutoff_len,
            train_on_prompt=config.train_on_prompt,
            mask_history=config.mask_history,
        ),
        packing=packed,
        neat_packing=config.neat_packing,
        template_name=config.template,
    )


def _tokenize(
    config: Any,
    specs: list[DatasetSpec],
    *,
    family: str,
    cpus_per_task: float,
    staging: Path | None,
    parts: Path | None = None,
) -> Any:
    """The lazy Ray Data plan: read → limit → (mix) → convert + template + tokenize.

    `staging` holds the mixed raw rows when interleaving (not available to a stream). With
    `parts`, the tokenizing actors write their batches there and yield one row per file
    (`PART_COLUMN`); without, they yield the tokenized rows."""
    task = TokenizeSpec(
        template=template_spec(config),
        row_format=specs[0].row_format,
        options=encode_options(config),
        family=family,
    )
    if mixing(config) != "concat":
        if staging is None:
            raise ValueError(f"mix_strategy {config.mix_strategy} needs a staging folder")
        with _ordered():
            mixed = _mix(config, specs, cpus_per_task=cpus_per_task, folder=staging / MIXED_SUBDIR)
            return _tokenized(
                config,
                mixed,
                replace(task, source_formats=tuple(spec.row_format for spec in specs)),
                cpus_per_task=cpus_per_task,
                specs=specs,
                parts=parts,
            )
    tokenized = [
        _tokenized(
            config,
            _read_limited(config, spec, cpus_per_task=cpus_per_task),
            replace(task, row_format=spec.row_format),
            cpus_per_task=cpus_per_task,
            specs=[spec],
            parts=parts,
        )
        for spec in specs
    ]
    return tokenized[0].union(*tokenized[1:]) if len(tokenized) > 1 else tokenized[0]


def _read_limited(config: Any, spec: DatasetSpec, *, cpus_per_task: float) -> Any:
    """A dataset's raw rows, cut to `max_samples` / its `num_samples` (per dataset, as in LF)."""
    ds = read_dataset(spec, cpus_per_task=cpus_per_task, streaming=config.streaming)
    limit = min(filter(None, (config.max_samples, spec.num_samples)), default=None)
    return ds.limit(limit) if limit else ds


def _mix(config: Any, specs: list[DatasetSpec], *, cpus_per_task: float, folder: Path) -> Any:
    """The raw rows of all datasets in the interleaved order, streamed to parquet in `folder`.

    The mix is decided on raw rows, before tokenizing, so packing sees the mixed stream as in
    LLaMA-Factory. Counting the rows costs one extra read of each dataset.
    """
    import ray.data

    parts = [_read_limited(config, spec, cpus_per_task=cpus_per_task) for spec in specs]
    sources = interleave_sources(
        [part.count() for part in parts],
        config.mix_strategy,
        config.mixing_probabilities,
        config.seed,
    )
    write_mixed(parts, sources, folder)
    print(
        f"[rayft] mixed {len(specs)} datasets ({config.mix_strategy}): {len(sources)} rows",
        flush=True,
    )
    return ray.data.read_parquet(str(folder), num_cpus=cpus_per_task)


class BatchTokenizer:
    """A Ray Data actor that loads the tokenizer and template once, then tokenizes batches.

    Importing transformers and loading a tokenizer takes seconds per process, longer than
    tokenizing a thousand rows; an actor pool pays it once per actor, where plain tasks pay it
    in every worker process they land on.

    Given `parts`, a folder every node can reach, the actor writes each tokenized batch there
    as a parquet file and yields only the file's name: Ray Data's `write_parquet` would run
    one more worker process (~230 MiB at 1M rows) and pass every tokenized row (4.5× the JSON)
    through the object store to it.
    """

    def __init__(self, spec: TokenizeSpec, parts: str | None = None) -> None:
        self.spec = spec
        self.parts = parts
        load_prepared_tokenizer(spec.template)

    def __call__(self, batch: pa.Table) -> pa.Table:
        tokenized = _tokenize_batch(batch, self.spec)
        if self.parts is None:
            return tokenized
        import pyarrow.parquet as pq

        name = f"{uuid.uuid4().hex}.parquet"
        pq.write_table(tokenized, f"{self.parts}/{name}", **TOKENIZED_PARQUET)
        return pa.table({PART_COLUMN: [name]})


def _order_parts(parts: Path, names: list[str], folder: Path) -> None:
    """Move the written batch files into `folder`, named in the order Ray Data yielded them
    (the input order when it is kept), which `_load` reads back sorted by name.

    Only the named files move: one written by an actor that died before its batch was
    retried elsewhere is left behind with `parts`."""
    folder.mkdir()
    width = max(6, len(str(len(names))))
    for index, name in enumerate(names):
        (parts / name).rename(folder / f"{index:0{width}d}.parquet")
    shutil.rmtree(parts)


def tokenizer_actors(config: Any, specs: list[DatasetSpec]) -> Any:
    """The tokenizing actor pool: `preprocessing_num_workers` actors, else one per CPU of the
    cluster. A small input (at most `SMALL_INPUT_ROWS` rows asked for, or local files under
    `SMALL_INPUT_BYTES`) starts with one actor that the pool grows only while batches queue:
    every actor pays seconds of imports, more than a small dataset takes to tokenize, while a
    large one tokenizes faster on a full pool from the start (100k rows: 97 s fixed, 108 s
    grown from one)."""
    import ray
    from ray.data import ActorPoolStrategy

    if config.preprocessing_num_workers:
        return ActorPoolStrategy(size=config.preprocessing_num_workers)
    actors = max(1, int(ray.cluster_resources().get("CPU", 1)))
    source_bytes = _local_bytes(specs)
    small = (config.max_samples or SMALL_INPUT_ROWS + 1) <= SMALL_INPUT_ROWS or (
        source_bytes is not None and source_bytes < SMALL_INPUT_BYTES
    )
    return (
        ActorPoolStrategy(min_size=1, max_size=actors) if small else ActorPoolStrategy(size=actors)
    )


def _local_bytes(specs: list[DatasetSpec]) -> int | None:
    """The size of the datasets' local files (folders walked), or None when one is remote."""
    total = 0
    for spec in specs:
        if not spec.files:
            return None
        for name in spec.files:
            path = Path(name)
            files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
            total += sum(f.stat().st_size for f in files)
    return total


def _tokenized(
    config: Any,
    rows: Any,
    task: TokenizeSpec,
    *,
    cpus_per_task: float,
    specs: list[DatasetSpec],
    parts: Path | None = None,
) -> Any:
    return rows.map_batches(
        BatchTokenizer,
        fn_constructor_kwargs={"spec": task, "parts": None if parts is None else str(parts)},
        batch_format="pyarrow",
        batch_size=get_family(task.family).batch_size,
        num_cpus=cpus_per_task,
        compute=tokenizer_actors(config, specs),
    )


@contextlib.contextmanager
def _bounded_buffers() -> Iterator[None]:
    """Datasets created and run inside hold at most `buffer_budget()` bytes of blocks, in
    blocks of at most `BLOCK_BYTES`.

    Reading is faster than tokenizing, so by default the blocks read ahead queue up until Ray
    Data's share of the object store is full (1.1–1.3 GiB on this 24 GiB machine at 1M rows,
    next to nothing at 10k): the pipeline's memory grew with the dataset. A fixed budget keeps
    it flat; the tokenizers still always have blocks waiting. And a task merges what it yields
    into blocks of up to Ray Data's `target_max_block_size` (128 MiB) before handing them on,
    so the read task held that much parsed data plus the merged copy: 646 MiB PSS at 1M rows,
    against 401 MiB with 16 MiB blocks and 264 MiB with these 8 MiB ones (and 4 MiB reads).
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    options = context.execution_options
    before, block_before = options.resource_limits, context.target_max_block_size
    options.resource_limits = before.copy(object_store_memory=buffer_budget())
    context.target_max_block_size = BLOCK_BYTES
    try:
        yield
    finally:
        options.resource_limits = before
        context.target_max_block_size = block_before


def buffer_budget() -> int:
    """Object store bytes a preprocessing pipeline may fill: `BUFFER_BYTES_MIN`, or
    `BUFFER_BYTES_PER_CPU` per CPU of the cluster on a larger one."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(BUFFER_BYTES_MIN, cpus * BUFFER_BYTES_PER_CPU)


@contextlib.contextmanager
def _ordered() -> Iterator[None]:
    """Datasets created inside keep their row order (each captures the setting when made)."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before
