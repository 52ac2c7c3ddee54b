"""`dataset_info.json` entries → strict dataset specs, with LLaMA-Factory's meaning.

A spec says where the rows come from (local files, a saved Hugging Face dataset folder, or a
hub dataset) and how one row reads (`RowFormat`: formatting, ranking, columns, tags). Everything
a user wrote is checked here, before any Ray work starts: an unknown name or key, a file that is
not on disk, mixed file types, or a feature rayft does not implement yet is one clear error each.

LLaMA-Factory semantics kept on purpose:
- `columns` / `tags`, when given, replace the defaults entirely: a column or tag the entry does
  not list is `None` (absent), exactly as LF's `DatasetAttr.join` does. Without `columns`, the
  alpaca/sharegpt defaults apply (`instruction`/`input`/`output`, `conversations`, `from`/`value`,
  `human`/`gpt`/`observation`/`function_call`/`system`).
- A hub URL wins over `file_name`; `hf_hub_url` wins over `ms_hub_url`.

Example:
    >>> spec = resolve_dataset("identity", "data")
    >>> spec.loader, spec.row_format.formatting
    ('json', 'alpaca')
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

logger = logging.getLogger(__name__)

Formatting = Literal["alpaca", "sharegpt", "openai"]
RowKind = Literal["plain", "pairwise", "kto"]
Loader = Literal["json", "csv", "parquet", "arrow", "text", "hf_disk", "hf_hub", "ms_hub"]

DEFAULT_FORMATTING: Formatting = "alpaca"
# LLaMA-Factory's FILEEXT2TYPE: .json and .jsonl share one reader (arrays and JSON Lines alike).
FILE_LOADERS: dict[str, Loader] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
SUPPORTED_EXTENSIONS: tuple[str, ...] = tuple(FILE_LOADERS)
FILE_LOADER_NAMES: frozenset[str] = frozenset(FILE_LOADERS.values())
HUB_LOADERS: frozenset[str] = frozenset({"hf_hub", "ms_hub"})
MEDIA_COLUMNS: tuple[str, ...] = ("images", "videos", "audios")


class DatasetError(ValueError):
    """A dataset cannot be found or read as declared."""


class Columns(BaseModel):
    """Which column of a row holds what (LLaMA-Factory's `columns`; `None` = absent)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prompt: str | None = "instruction"
    query: str | None = "input"
    response: str | None = "output"
    history: str | None = None
    messages: str | None = "conversations"
    system: str | None = None
    tools: str | None = None
    images: str | None = None
    videos: str | None = None
    audios: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    kto_tag: str | None = None


class Tags(BaseModel):
    """Keys and role names inside sharegpt/openai messages (LF's `tags`; `None` = not accepted)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    role_tag: str | None = "from"
    content_tag: str | None = "value"
    user_tag: str | None = "human"
    assistant_tag: str | None = "gpt"
    observation_tag: str | None = "observation"
    function_tag: str | None = "function_call"
    system_tag: str | None = "system"


# Defaults used when an entry has no `columns` / `tags`. LF uses sharegpt's for "openai" too,
# which cannot read a single OpenAI-style row; rayft uses OpenAI's own names there instead.
FORMAT_DEFAULTS: dict[str, tuple[Columns, Tags]] = {
    "alpaca": (Columns(), Tags()),
    "sharegpt": (Columns(), Tags()),
    "openai": (
        Columns(messages="messages"),
        Tags(
            role_tag="role",
            content_tag="content",
            user_tag="user",
            assistant_tag="assistant",
            observation_tag="tool",
            function_tag=None,
            system_tag="system",
        ),
    ),
}
# What a formatting cannot do without, as (section, field).
REQUIRED_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "alpaca": (),
    "sharegpt": (("columns", "messages"), ("tags", "role_tag"), ("tags", "content_tag")),
    "openai": (("columns", "messages"), ("tags", "role_tag"), ("tags", "content_tag")),
}


class RowFormat(BaseModel):
    """How to read one row: everything a converter needs, small and picklable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    formatting: Formatting = DEFAULT_FORMATTING
    ranking: bool = False
    columns: Columns = Field(default_factory=Columns)
    tags: Tags = Field(default_factory=Tags)

    @property
    def kind(self) -> RowKind:
        """What a row carries besides a conversation.

        Stages read one kind: LF refuses ranking data outside pairwise stages and drops KTO
        rows (two answers) in supervised ones, so a stage should check this up front.
        """
        if self.ranking:
            return "pairwise"
        return "kto" if self.columns.kto_tag is not None else "plain"

    @model_validator(mode="after")
    def _consistent(self) -> RowFormat:
        """Reject combinations LF would crash on or silently ignore."""
        problems = [*self._media_problems(), *self._pairing_problems(), *self._required_problems()]
        problems += self._tag_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _media_problems(self) -> list[str]:
        media = [name for name in MEDIA_COLUMNS if getattr(self.columns, name) is not None]
        if media:
            return [f"media columns ({', '.join(media)}) are not supported yet; rayft is text-only"]
        return []

    def _pairing_problems(self) -> list[str]:
        cols = self.columns
        problems = []
        if self.ranking and (cols.chosen is None or cols.rejected is None):
            problems.append("`ranking: true` needs both `chosen` and `rejected` in `columns`")
        if not self.ranking and (cols.chosen is not None or cols.rejected is not None):
            problems.append(
                "`columns.chosen`/`rejected` are only read with `ranking: true`; set it or drop them"
            )
        if self.ranking and cols.kto_tag is not None:
            problems.append("`kto_tag` (KTO) and `ranking: true` (pairwise) exclude each other")
        if self.formatting == "alpaca" and cols.kto_tag is not None and cols.response is None:
            problems.append("`kto_tag` needs a `response` column to label")
        return problems

    def _required_problems(self) -> list[str]:
        missing = [
            f"`{section}.{name}`"
            for section, name in REQUIRED_FIELDS[self.formatting]
            if getattr(getattr(self, section), name) is None
        ]
        if (
            self.formatting == "alpaca"
            and self.columns.prompt is None
            and self.columns.query is None
        ):
            missing.append("`columns.prompt` (or `query`)")
        if missing:
            return [f"formatting `{self.formatting}` needs {', '.join(missing)}"]
        return []

    def _tag_problems(self) -> list[str]:
        roles = ("user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
        seen: dict[str, str] = {}
        problems = []
        for role in roles:
            value = getattr(self.tags, role)
            if value is not None and value in seen:
                problems.append(f"`tags.{seen[value]}` and `tags.{role}` are both `{value}`")
            elif value is not None:
                seen[value] = role
        return problems


class DatasetSpec(BaseModel):
    """One `dataset_info.json` entry, resolved against `dataset_dir`.

    `files` holds absolute paths of local files (all one file type), or the folder of a saved
    Hugging Face dataset (`loader == "hf_disk"`); hub datasets have `hub_id` instead.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str
    loader: Loader
    files: tuple[str, ...] = ()
    hub_id: str | None = None
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: PositiveInt | None = None
    row_format: RowFormat = Field(default_factory=RowFormat)

    @model_validator(mode="after")
    def _source_keys_fit(self) -> DatasetSpec:
        """`subset`/`folder` select hub data; a plain local file has only the `train` split."""
        if self.loader in HUB_LOADERS:
            if not self.hub_id:
                raise ValueError(f"loader `{self.loader}` needs a hub id")
            return self
        if not self.files:
            raise ValueError(f"loader `{self.loader}` needs files")
        if self.loader in FILE_LOADER_NAMES:
            other = [
                f for f in self.files if FILE_LOADERS.get(Path(f).suffix.lower()) != self.loader
            ]
            if other:
                raise ValueError(
                    f"{', '.join(other)}: not `{self.loader}` files; a dataset reads one file type"
                )
        for key in ("subset", "folder"):
            if getattr(self, key) is not None:
                raise ValueError(f"`{key}` only applies to hub datasets (hf_hub_url / ms_hub_url)")
        if self.loader != "hf_disk" and self.split != "train":
            raise ValueError(
                f"`split: {self.split}`: local files have only the `train` split; splits apply "
                "to hub datasets and saved DatasetDict folders"
            )
        return self

    def content_files(self) -> list[str]:
        """Every local file whose bytes make up the data (for content hashes).

        A saved Hugging Face dataset is all files in its folder; hub datasets have none here.
        """
        if self.loader == "hf_disk":
            folder = Path(self.files[0])
            return sorted(str(path) for path in folder.rglob("*") if path.is_file())
        return list(self.files)


def load_dataset_info(dataset_dir: str | Path) -> dict[str, Any]:
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
    """Turn a dataset name into a spec whose local files exist.

    Args:
        name: a key of dataset_info.json.
        dataset_dir: the folder holding dataset_info.json and the data files.

    Returns:
        The resolved spec.

    Raises:
        DatasetError: unknown name (with close names) or anything `parse_entry` rejects.
    """
    info = load_dataset_info(dataset_dir)
    if name not in info:
        close = difflib.get_close_matches(name, list(info), n=3, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise DatasetError(
            f"dataset `{name}` is not in {Path(dataset_dir) / 'dataset_info.json'}{hint}"
        )
    return parse_entry(name, info[name], dataset_dir)


# Entry keys LF defines, in the order LF picks the data source (first present wins).
SOURCE_KEYS: tuple[str, ...] = (
    "hf_hub_url",
    "ms_hub_url",
    "om_hub_url",
    "script_url",
    "cloud_file_name",
    "file_name",
)
# Keys copied onto DatasetSpec as they are (pydantic checks their types).
SPEC_KEYS: tuple[str, ...] = ("subset", "split", "folder", "num_samples")
ENTRY_KEYS: frozenset[str] = frozenset(
    {*SOURCE_KEYS, *SPEC_KEYS, "formatting", "ranking", "columns", "tags"}
)


def parse_entry(name: str, entry: Any, dataset_dir: str | Path) -> DatasetSpec:
    """Validate one dataset_info.json entry and resolve its data source.

    Args:
        name: the entry's name (for messages).
        entry: the entry's JSON value.
        dataset_dir: the folder `file_name` is relative to.

    Returns:
        The resolved spec.

    Raises:
        DatasetError: unknown or ill-typed keys, no or unsupported data source, missing
            files, mixed file types, or columns/tags that contradict each other.
    """
    where = f"dataset `{name}`"
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: the entry must be a JSON object, got {entry!r}")
    for key in entry:
        if key not in ENTRY_KEYS:
            close = difflib.get_close_matches(key, sorted(ENTRY_KEYS), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise DatasetError(
                f"{where}: unknown key `{key}` in dataset_info.json{hint} "
                f"(valid keys: {', '.join(sorted(ENTRY_KEYS))})"
            )
    source_key = next((key for key in SOURCE_KEYS if key in entry), None)
    if source_key is None:
        raise DatasetError(f"{where}: give `file_name`, `hf_hub_url` or `ms_hub_url`")
    source = SOURCES[source_key](where, entry[source_key], Path(dataset_dir))
    try:
        return DatasetSpec(
            name=name,
            row_format=_row_format(entry),
            **source,
            **{key: entry[key] for key in SPEC_KEYS if key in entry},
        )
    except ValidationError as err:
        raise DatasetError(f"{where} in dataset_info.json: {describe(err)}") from err


def describe(err: ValidationError) -> str:
    """pydantic's errors as one line: `key`: problem; `key`: problem."""
    parts = []
    for problem in err.errors():
        message = problem["msg"].removeprefix("Value error, ")
        loc = ".".join(str(part) for part in problem["loc"])
        parts.append(f"`{loc}`: {message}" if loc else message)
    return "; ".join(parts)


def _row_format(entry: dict[str, Any]) -> RowFormat:
    formatting = entry.get("formatting", DEFAULT_FORMATTING)
    if formatting not in FORMAT_DEFAULTS:
        # Let pydantic word the error (it lists the valid names).
        return RowFormat.model_validate({"formatting": formatting})
    columns, tags = FORMAT_DEFAULTS[formatting]
    fields: dict[str, Any] = {"formatting": formatting, "columns": columns, "tags": tags}
    if "ranking" in entry:
        fields["ranking"] = entry["ranking"]
    # LF semantics: a listed section replaces the defaults; what it does not list is absent.
    for section, model in (("columns", Columns), ("tags", Tags)):
        if section in entry:
            given = entry[section]
            fields[section] = (
                {name: None for name in model.model_fields} | given
                if isinstance(given, dict)
                else given
            )
    return RowFormat.model_validate(fields)


# --- data sources: (where, value of the source key, dataset_dir) -> DatasetSpec fields ---------

SourceResolver = Callable[[str, Any, Path], dict[str, Any]]


def _hub(loader: Loader) -> SourceResolver:
    def resolve(where: str, hub_id: Any, dataset_dir: Path) -> dict[str, Any]:
        if not isinstance(hub_id, str) or not hub_id.strip():
            raise DatasetError(f"{where}: the hub URL must be a dataset id like `org/name`")
        return {"loader": loader, "hub_id": hub_id.strip()}

    return resolve


def _unsupported(key: str) -> SourceResolver:
    def resolve(where: str, value: Any, dataset_dir: Path) -> dict[str, Any]:
        raise DatasetError(
            f"{where}: `{key}` sources are not supported yet; use `file_name`, `hf_hub_url` "
            "or `ms_hub_url`"
        )

    return resolve


def _local(where: str, file_name: Any, dataset_dir: Path) -> dict[str, Any]:
    """Files, folders (their supported files) or one saved HF dataset folder."""
    names = [file_name] if isinstance(file_name, str) else file_name
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DatasetError(
            f"{where}: `file_name` must be a file or folder name, or a list of them; "
            f"got {file_name!r}"
        )
    paths = [dataset_dir / n for n in names]
    for path in paths:
        if not path.exists():
            raise DatasetError(f"{where}: file not found: {path.resolve()}")
    saved = [path for path in paths if is_saved_dataset(path)]
    if saved:
        if len(paths) > 1:
            raise DatasetError(
                f"{where}: {saved[0]} is a saved Hugging Face dataset; it must be the only "
                "`file_name` of its entry"
            )
        return {"loader": "hf_disk", "files": (str(saved[0].resolve()),)}
    files = [
        file for path in paths for file in (_folder_files(where, path) if path.is_dir() else [path])
    ]
    loaders = {file: _file_loader(where, file) for file in files}
    if len(set(loaders.values())) > 1:
        found = ", ".join(f"{file.name} ({loader})" for file, loader in loaders.items())
        raise DatasetError(
            f"{where} mixes file types: {found}; one entry reads one type (.json and .jsonl "
            "count as one), so split it into several dataset_info.json entries"
        )
    return {
        "loader": next(iter(loaders.values())),
        "files": tuple(str(file.resolve()) for file in files),
    }


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def _folder_files(where: str, folder: Path) -> list[Path]:
    """The supported files directly in `folder`, sorted; hidden and `_`-prefixed names skipped."""
    entries = sorted(
        path for path in folder.iterdir() if path.is_file() and not path.name.startswith((".", "_"))
    )
    files = [path for path in entries if path.suffix.lower() in FILE_LOADERS]
    skipped = [path.name for path in entries if path.suffix.lower() not in FILE_LOADERS]
    if skipped:
        logger.warning("%s: skipping files of unsupported types in %s: %s", where, folder, skipped)
    if not files:
        raise DatasetError(
            f"{where}: folder {folder.resolve()} holds no data files "
            f"(looked for {', '.join(SUPPORTED_EXTENSIONS)})"
        )
    return files


def _file_loader(where: str, path: Path) -> Loader:
    loader = FILE_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DatasetError(
            f"{where}: {path.name} has an unsupported extension; "
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)} or a saved Hugging Face dataset folder"
        )
    return loader


SOURCES: dict[str, SourceResolver] = {
    "hf_hub_url": _hub("hf_hub"),
    "ms_hub_url": _hub("ms_hub"),
    "om_hub_url": _unsupported("om_hub_url"),
    "script_url": _unsupported("script_url"),
    "cloud_file_name": _unsupported("cloud_file_name"),
    "file_name": _local,
}
