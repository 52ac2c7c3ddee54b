"""Tokenize once: a content-addressed parquet cache of tokenized datasets.

The key hashes everything that changes the tokens — the data files' bytes, the dataset specs,
the tokenizer files, the template and every tokenization option — so a second run, a retry after
a failure or a sweep's trials reuse the first run's tokens, and any change re-tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Bump when tokenization code changes in a way that changes ids or labels.
TOKENIZATION_VERSION = "1"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
DATA_SUBDIR = "data"
REPORT_FILE = "data_report.json"


def file_digest(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_digest(name_or_path: str) -> str:
    """A local tokenizer's files' hash; a hub id stands for itself (its revision is pinned by the
    hub cache, and a change of files there is out of our hands)."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return f"hub:{name_or_path}"
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(name.encode())
            digest.update(file_digest(folder / name).encode())
    return digest.hexdigest()


def cache_key(
    *,
    files: Iterable[str],
    specs: Iterable[Mapping[str, Any]],
    tokenizer: str,
    options: Mapping[str, Any],
) -> str:
    """The content address of a tokenized dataset."""
    payload = {
        "version": TOKENIZATION_VERSION,
        "files": [file_digest(f) for f in files],
        "specs": list(specs),
        "tokenizer": tokenizer_digest(tokenizer),
        "options": dict(options),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :24
    ]


def is_complete(folder: Path) -> bool:
    """A cache entry counts only once its report is written (the last step of `publish`)."""
    return (folder / REPORT_FILE).is_file() and (folder / DATA_SUBDIR).is_dir()


def staging_dir(folder: Path) -> Path:
    """A fresh sibling folder to write into before `publish` moves it in place."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, folder: Path, report: Mapping[str, Any]) -> Path:
    """Write the report and move the staged entry to its final place (atomic on one filesystem)."""
    (staging / REPORT_FILE).write_text(json.dumps(dict(report), indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder
