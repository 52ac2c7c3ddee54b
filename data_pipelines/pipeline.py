"""The Ray Data pipeline: read the declared files, convert, template, tokenize — once, in parallel.

The driver builds a lazy `ray.data.Dataset`; tokenization runs as Ray Data tasks on whatever
nodes have room (each loads the tokenizer once per process), bad rows are counted by reason,
and the clean rows are handed to Ray Train, which streams a shard to each worker.

Example:
    >>> data = prepare_supervised(config, cpus_per_task=0.25)
    >>> data.report.summary()
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_pipelines.converters import CONVERTERS, BadRow
from data_pipelines.dataset_info import AlpacaColumns, DatasetError, DatasetSpec, resolve_dataset
from data_pipelines.supervised import SupervisedOptions, encode_supervised
from data_pipelines.templates import Template, get_template, prepare_tokenizer

SKIP_COLUMN = "skip_reason"
TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels")


class TooManyBadRows(ValueError):
    """More rows were malformed than `max_bad_fraction` allows."""


@dataclass
class DataReport:
    """What happened to the rows: kept, and skipped per reason."""

    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        """One line for the terminal."""
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())
        return f"{self.kept}/{self.total} rows kept" + (f"; skipped {reasons}" if reasons else "")

    def write(self, output_dir: str | Path) -> Path:
        """Write the counts to `output_dir/data_report.json`."""
        path = Path(output_dir) / "data_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"total": self.total, "kept": self.kept, "skipped": dict(self.skipped)}
        path.write_text(json.dumps(payload, indent=2))
        return path


@dataclass(frozen=True)
class TokenizeSpec:
    """Everything a tokenization task needs; small and picklable."""

    tokenizer_path: str
    trust_remote_code: bool
    template: str
    default_system: str | None
    columns: AlpacaColumns
    formatting: str
    options: SupervisedOptions


@functools.lru_cache(maxsize=4)
def load_prepared_tokenizer(path: str, template_name: str, trust_remote_code: bool) -> Any:
    """Load a tokenizer and give it the template's special tokens; cached per process."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    prepare_tokenizer(tokenizer, get_template(template_name))
    return tokenizer


def tokenize_rows(rows: list[dict[str, Any]], spec: TokenizeSpec) -> dict[str, list]:
    """Convert and tokenize rows; a bad row yields empty ids and its reason."""
    tokenizer = load_prepared_tokenizer(spec.tokenizer_path, spec.template, spec.trust_remote_code)
    template: Template = get_template(spec.template)
    convert = CONVERTERS[spec.formatting]
    out: dict[str, list] = {name: [] for name in (*TOKEN_COLUMNS, SKIP_COLUMN)}
    for row in rows:
        try:
            conversation = convert(row, spec.columns)
            input_ids, labels = encode_supervised(
                tokenizer,
                template,
                conversation.messages,
                conversation.system or spec.default_system,
                spec.options,
            )
            if all(label == -100 for label in labels):
                raise BadRow("no answer tokens left after truncation")
            reason = ""
        except BadRow as bad:
            input_ids, labels, reason = [], [], str(bad)
        out["input_ids"].append(input_ids)
        out["attention_mask"].append([1] * len(input_ids))
        out["labels"].append(labels)
        out[SKIP_COLUMN].append(reason)
    return out


def _tokenize_batch(batch: pa.Table, spec: TokenizeSpec) -> pa.Table:
    columns = tokenize_rows(batch.to_pylist(), spec)
    return pa.table(
        {
            **{name: pa.array(columns[name], type=pa.list_(pa.int32())) for name in TOKEN_COLUMNS},
            SKIP_COLUMN: pa.array(columns[SKIP_COLUMN], type=pa.string()),
        }
    )


def read_spec(spec: DatasetSpec, *, cpus_per_task: float) -> Any:
    """A lazy Ray Dataset over a spec's files (json arrays, jsonl, csv, parquet)."""
    import ray.data

    readers = {
        ".json": lambda paths: ray.data.read_json(paths, num_cpus=cpus_per_task),
        ".jsonl": lambda paths: ray.data.read_json(paths, lines=True, num_cpus=cpus_per_task),
        ".csv": lambda paths: ray.data.read_csv(paths, num_cpus=cpus_per_task),
        ".parquet": lambda paths: ray.data.read_parquet(paths, num_cpus=cpus_per_task),
    }
    suffixes = {Path(f).suffix for f in spec.files}
    if len(suffixes) != 1:
        raise DatasetError(f"dataset `{spec.name}` mixes file types {sorted(suffixes)}")
    return readers[suffixes.pop()](list(spec.files))


@dataclass
class PreparedData:
    """Tokenized rows ready for Ray Train, and the report of what was kept."""

    dataset: Any
    report: DataReport


def prepare_supervised(config: Any, *, cpus_per_task: float) -> PreparedData:
    """Build the tokenized SFT dataset for a validated config.

    Args:
        config: a `RayftConfig`.
        cpus_per_task: CPUs each Ray Data task asks for (fractional on small machines).

    Returns:
        The clean, materialized dataset and the row report.

    Raises:
        DatasetError: a dataset cannot be read as declared.
        TooManyBadRows: skipped rows exceed `max_bad_fraction`.
    """
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    options = SupervisedOptions(
        cutoff_len=config.cutoff_len,
        train_on_prompt=config.train_on_prompt,
        mask_history=config.mask_history,
    )
    parts = []
    for name in config.dataset_names:
        spec = resolve_dataset(name, config.dataset_dir)
        ds = read_spec(spec, cpus_per_task=cpus_per_task)
        limit = min(filter(None, (config.max_samples, spec.num_samples)), default=None)
        if limit:
            ds = ds.limit(limit)
        task = TokenizeSpec(
            tokenizer_path=config.model_name_or_path,
            trust_remote_code=config.trust_remote_code,
            template=config.template,
            default_system=config.default_system,
            columns=spec.columns,
            formatting=spec.formatting,
            options=options,
        )
        parts.append(
            ds.map_batches(
                _tokenize_batch,
                fn_kwargs={"spec": task},
                batch_format="pyarrow",
                batch_size=256,
                num_cpus=cpus_per_task,
                concurrency=config.preprocessing_num_workers,
            )
        )
    tokenized = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    tokenized = tokenized.materialize()
    counts: Counter = Counter()
    for batch in tokenized.select_columns([SKIP_COLUMN]).iter_batches(batch_format="pyarrow"):
        counts.update(batch.column(SKIP_COLUMN).to_pylist())
    report = DataReport(total=sum(counts.values()), kept=counts.pop("", 0), skipped=counts)
    if report.total and (report.total - report.kept) / report.total > config.max_bad_fraction:
        raise TooManyBadRows(
            f"{report.summary()}: more than max_bad_fraction={config.max_bad_fraction} of the rows "
            "are malformed; fix the data or raise `max_bad_fraction`"
        )
    clean = tokenized.filter(
        lambda row: row[SKIP_COLUMN] == "", num_cpus=cpus_per_task
    ).drop_columns([SKIP_COLUMN])
    return PreparedData(dataset=clean.materialize(), report=report)
