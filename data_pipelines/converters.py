"""Dataset formats → one canonical row: `messages` (user/assistant turns) and `system`.

Each converter returns either a canonical row or the reason the row cannot be used; the
pipeline counts reasons instead of dropping rows silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from data_pipelines.dataset_info import AlpacaColumns


@dataclass(frozen=True)
class Conversation:
    """A canonical training example."""

    messages: list[dict[str, str]]
    system: str | None


class BadRow(ValueError):
    """A row that cannot become a training example; the message is its counted reason."""


Converter = Callable[[Mapping[str, Any], Any], Conversation]
CONVERTERS: dict[str, Converter] = {}


def converter(name: str) -> Callable[[Converter], Converter]:
    """Register a converter under a `formatting` name."""

    def add(fn: Converter) -> Converter:
        CONVERTERS[name] = fn
        return fn

    return add


def _text(row: Mapping[str, Any], column: str, *, required: bool) -> str:
    if column not in row or row[column] is None:
        if required:
            raise BadRow(f"missing field `{column}`")
        return ""
    value = row[column]
    if not isinstance(value, str):
        raise BadRow(f"non-string `{column}`")
    return value


@converter("alpaca")
def convert_alpaca(row: Mapping[str, Any], columns: AlpacaColumns) -> Conversation:
    """instruction/input/output (+ history, system) → conversation, as LLaMA-Factory reads it.

    The user turn is the instruction and the input joined by a newline (empty parts left out).

    Raises:
        BadRow: missing or non-string fields, an empty response, or malformed history.
    """
    messages: list[dict[str, str]] = []
    if columns.history and row.get(columns.history) is not None:
        history = row[columns.history]
        if not isinstance(history, list | tuple):
            raise BadRow(f"`{columns.history}` is not a list of [prompt, response] pairs")
        for turn in history:
            if len(turn) != 2 or not all(isinstance(part, str) for part in turn):
                raise BadRow(f"`{columns.history}` is not a list of [prompt, response] pairs")
            messages += [
                {"role": "user", "content": turn[0]},
                {"role": "assistant", "content": turn[1]},
            ]
    parts = [_text(row, columns.prompt, required=True), _text(row, columns.query, required=False)]
    messages.append({"role": "user", "content": "\n".join(part for part in parts if part)})
    response = _text(row, columns.response, required=True)
    if not response:
        raise BadRow("empty response")
    messages.append({"role": "assistant", "content": response})
    system = _text(row, columns.system, required=False) if columns.system else ""
    return Conversation(messages=messages, system=system or None)
