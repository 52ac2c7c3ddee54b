"""`dataset_info.json` entries → strict dataset specs, with LLaMA-Factory's meaning.

A name that is not in the registry, a file that is not on disk, or an entry that uses a feature
rayft does not implement yet is one clear error each, raised before any Ray work starts.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".json", ".jsonl", ".csv", ".parquet")


class DatasetError(ValueError):
    """A dataset cannot be found or read as declared."""


class AlpacaColumns(BaseModel):
    """Column names of an alpaca-format dataset (LLaMA-Factory's defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = "instruction"
    query: str = "input"
    response: str = "output"
    history: str | None = None
    system: str | None = None


class DatasetSpec(BaseModel):
    """One `dataset_info.json` entry, resolved against `dataset_dir`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    files: tuple[str, ...]
    formatting: Literal["alpaca"] = "alpaca"
    columns: AlpacaColumns = Field(default_factory=AlpacaColumns)
    num_samples: int | None = None


# Keys of a dataset_info.json entry that LLaMA-Factory defines and rayft does not read yet.
_UNSUPPORTED_ENTRY_KEYS = (
    "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "ranking",
    "subset", "split", "folder", "tags",
)


def load_dataset_info(dataset_dir: str | Path) -> dict[str, dict]:
    """Read `<dataset_dir>/dataset_info.json`.

    Raises:
        DatasetError: when the file is missing or is not a JSON object.
    """
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        raise DatasetError(
            f"no dataset_info.json in dataset_dir {Path(dataset_dir).resolve()}; "
            "set `dataset_dir` to the folder that holds it"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(info, dict):
        raise DatasetError(f"{path} must be a JSON object mapping names to entries")
    return info


def resolve_dataset(name: str, dataset_dir: str | Path) -> DatasetSpec:
    """Turn a dataset name into a spec whose files exist.

    Args:
        name: a key of dataset_info.json.
        dataset_dir: the folder holding dataset_info.json and the data files.

    Returns:
        The resolved spec.

    Raises:
        DatasetError: unknown name (with close names), missing file (with the path looked
            for), or an entry using a feature not supported yet.
    """
    info = load_dataset_info(dataset_dir)
    if name not in info:
        close = difflib.get_close_matches(name, list(info), n=3, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise DatasetError(f"dataset `{name}` is not in {Path(dataset_dir) / 'dataset_info.json'}{hint}")
    entry = dict(info[name])
    for key in _UNSUPPORTED_ENTRY_KEYS:
        if key in entry:
            raise DatasetError(
                f"dataset `{name}`: `{key}` entries are not supported yet; use a local `file_name`"
            )
    if "file_name" not in entry:
        raise DatasetError(f"dataset `{name}` has no `file_name` in dataset_info.json")
    formatting = entry.pop("formatting", "alpaca")
    if formatting != "alpaca":
        raise DatasetError(
            f"dataset `{name}`: formatting `{formatting}` is not supported yet (only `alpaca`)"
        )
    file_names = entry.pop("file_name")
    names = file_names if isinstance(file_names, list) else [file_names]
    files = tuple(str(_existing_file(name, Path(dataset_dir) / f)) for f in names)
    try:
        return DatasetSpec(
            name=name,
            files=files,
            formatting="alpaca",
            columns=AlpacaColumns(**entry.pop("columns", {})),
            num_samples=entry.pop("num_samples", None),
            **entry,
        )
    except ValidationError as err:
        raise DatasetError(f"dataset `{name}` in dataset_info.json: {err}") from err


def _existing_file(name: str, path: Path) -> Path:
    if not path.exists():
        raise DatasetError(f"dataset `{name}`: file not found: {path.resolve()}")
    if path.is_dir():
        raise DatasetError(f"dataset `{name}`: {path} is a folder; folders are not supported yet")
    if path.suffix not in SUPPORTED_EXTENSIONS:
        raise DatasetError(
            f"dataset `{name}`: {path.name} has an unsupported extension; "
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    return path
