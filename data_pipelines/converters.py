"""Dataset formats → one canonical row (`Conversation`), with LLaMA-Factory's reading of each.

Formats (registered in `CONVERTERS` under their `formatting` name):
- `alpaca`: instruction / input / output (+ history, system, tools), prompt-only rows for
  pretraining (`columns: {prompt: text}`), pairwise (`chosen`/`rejected` strings) and KTO.
- `sharegpt`: a list of `{from, value}` turns named by `tags`; roles alternate user/observation
  vs assistant/function; an optional leading system turn; pairwise (`chosen`/`rejected` turns)
  and KTO.
- `openai`: `{role, content}` messages; assistant `tool_calls` become a `function` turn holding
  the JSON list of calls, consecutive `tool` results become one `observation` turn.

LF drops a malformed row with a log line; rayft raises `BadRow` with a short reason instead, so
the pipeline counts rows per reason and can fail a run that loses too many. Reasons name columns
and tags but no row values or positions, so they stay few and countable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from data_pipelines.dataset_info import RowFormat, Tags

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
FUNCTION, OBSERVATION = "function", "observation"
# Turn 0, 2, 4… is something the model answers; turn 1, 3, 5… is the model's answer.
PROMPT_ROLES: tuple[str, ...] = (USER, OBSERVATION)
ANSWER_ROLES: tuple[str, ...] = (ASSISTANT, FUNCTION)
# LF joins consecutive OpenAI tool results into one observation turn with this separator.
TOOL_RESULT_SEPARATOR = "\n</tool_response>\n<tool_response>\n"

Message = dict[str, str]


@dataclass(frozen=True)
class Conversation:
    """A canonical training example.

    `messages` alternate prompt roles (`user`/`observation`) and answer roles
    (`assistant`/`function`). A supervised or KTO row ends with an answer; a ranking row ends
    with a prompt and carries its two answers in `chosen`/`rejected`; a prompt-only row (e.g.
    pretraining text) is a single `user` message.
    """

    messages: list[Message]
    system: str | None
    tools: str | None = None
    chosen: Message | None = None
    rejected: Message | None = None
    kto_tag: bool | None = None


class BadRow(ValueError):
    """A row that cannot become a training example; the message is its counted reason."""


Converter = Callable[[Mapping[str, Any], RowFormat], Conversation]
CONVERTERS: dict[str, Converter] = {}


def converter(name: str) -> Callable[[Converter], Converter]:
    """Register a converter under a `formatting` name."""

    def add(fn: Converter) -> Converter:
        CONVERTERS[name] = fn
        return fn

    return add


def convert_row(row: Mapping[str, Any], row_format: RowFormat) -> Conversation:
    """Convert one raw row with the converter its `formatting` names.

    Raises:
        BadRow: the row is malformed; the message is the reason.
    """
    return CONVERTERS[row_format.formatting](row, row_format)


# --- field readers --------------------------------------------------------------------------


def _text(row: Mapping[str, Any], column: str, *, required: bool) -> str:
    value = row.get(column)
    if value is None:
        if required:
            raise BadRow(f"missing field `{column}`")
        return ""
    if not isinstance(value, str):
        raise BadRow(f"non-string `{column}`")
    return value


def _optional_text(row: Mapping[str, Any], column: str | None) -> str | None:
    """An optional string column; an unset column, null and "" all mean absent."""
    return (_text(row, column, required=False) or None) if column else None


def _tools(row: Mapping[str, Any], column: str | None) -> str | None:
    """Tool definitions as a JSON string; already-parsed JSON lists/objects are dumped back."""
    value = row.get(column) if column else None
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(_plain(value), ensure_ascii=False)
    raise BadRow(f"non-string `{column}`")


def _plain(value: Any) -> Any:
    """Tuples and read-only mappings (from Arrow) → lists and dicts, for json.dumps."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _kto_tag(row: Mapping[str, Any], column: str | None) -> bool | None:
    if column is None:
        return None
    value = row.get(column)
    if value is None:
        raise BadRow(f"missing field `{column}`")
    if not isinstance(value, bool):
        raise BadRow(f"non-boolean `{column}`")
    return value


def _check_answer(message: Message, what: str) -> Message:
    if not message["content"]:
        raise BadRow(f"empty {what}")
    return message


def _finish(
    row: Mapping[str, Any],
    row_format: RowFormat,
    messages: list[Message],
    system: str | None,
    pair: tuple[Message, Message] | None,
) -> Conversation:
    """Check the turn count for the row's kind and assemble the conversation."""
    if row_format.ranking:
        if not messages or messages[-1]["role"] not in PROMPT_ROLES:
            raise BadRow("ranking prompt does not end with a user turn")
    elif not messages or messages[-1]["role"] not in ANSWER_ROLES:
        raise BadRow("conversation does not end with an assistant turn")
    else:
        _check_answer(messages[-1], "response")
    chosen, rejected = pair if pair else (None, None)
    return Conversation(
        messages=messages,
        system=system or None,
        tools=_tools(row, row_format.columns.tools),
        chosen=chosen,
        rejected=rejected,
        kto_tag=_kto_tag(row, row_format.columns.kto_tag),
    )


# --- alpaca ---------------------------------------------------------------------------------


@converter("alpaca")
def convert_alpaca(row: Mapping[str, Any], row_format: RowFormat) -> Conversation:
    """instruction/input/output (+ history, system, tools) → conversation, as LF reads it.

    The user turn is the instruction and the input joined by a newline (empty parts left out).
    Without a `response` column the row is prompt-only (pretraining text). With
    `ranking: true` the answers are the `chosen`/`rejected` strings.

    Raises:
        BadRow: missing or non-string fields, an empty answer, or malformed history.
    """
    cols = row_format.columns
    messages = _alpaca_history(row, cols.history)
    parts = [
        _text(row, cols.prompt, required=True) if cols.prompt else "",
        _text(row, cols.query, required=False) if cols.query else "",
    ]
    messages.append({"role": USER, "content": "\n".join(part for part in parts if part)})
    pair = None
    if row_format.ranking:
        pair = (_alpaca_answer(row, cols.chosen), _alpaca_answer(row, cols.rejected))
    elif cols.response:
        messages.append({"role": ASSISTANT, "content": _text(row, cols.response, required=True)})
    else:  # prompt-only, e.g. pretraining text
        return Conversation(
            messages=messages,
            system=_optional_text(row, cols.system),
            tools=_tools(row, cols.tools),
        )
    return _finish(row, row_format, messages, _optional_text(row, cols.system), pair)


def _alpaca_history(row: Mapping[str, Any], column: str | None) -> list[Message]:
    history = row.get(column) if column else None
    if history is None:
        return []
    if not isinstance(history, list | tuple):
        raise BadRow(f"`{column}` is not a list of [prompt, response] pairs")
    messages: list[Message] = []
    for turn in history:
        if (
            not isinstance(turn, list | tuple)
            or len(turn) != 2
            or not all(isinstance(part, str) for part in turn)
        ):
            raise BadRow(f"`{column}` is not a list of [prompt, response] pairs")
        messages += [{"role": USER, "content": turn[0]}, {"role": ASSISTANT, "content": turn[1]}]
    return messages


def _alpaca_answer(row: Mapping[str, Any], column: str | None) -> Message:
    assert column is not None, "RowFormat guarantees chosen/rejected columns when ranking"
    answer = {"role": ASSISTANT, "content": _text(row, column, required=True)}
    return _check_answer(answer, f"`{column}`")


# --- sharegpt and openai ----------------------------------------------------------------------


def _role_names(tags: Tags) -> dict[str, str]:
    """Tag value in the data → canonical role; a tag set to None is not accepted."""
    pairs = (
        (tags.user_tag, USER),
        (tags.assistant_tag, ASSISTANT),
        (tags.observation_tag, OBSERVATION),
        (tags.function_tag, FUNCTION),
        (tags.system_tag, SYSTEM),
    )
    return {tag: role for tag, role in pairs if tag is not None}


def _turns(row: Mapping[str, Any], column: str | None) -> Sequence[Any]:
    assert column is not None, "RowFormat guarantees a messages column for sharegpt/openai"
    turns = row.get(column)
    if turns is None:
        raise BadRow(f"missing field `{column}`")
    if not isinstance(turns, list | tuple):
        raise BadRow(f"`{column}` is not a list of messages")
    if not turns:
        raise BadRow(f"empty `{column}`")
    return turns


def _role(turn: Any, tags: Tags, where: str) -> str:
    """The canonical role of a raw turn (a mapping with the role and content tags)."""
    if not isinstance(turn, Mapping):
        raise BadRow(f"{where} is not an object")
    tag = turn.get(tags.role_tag)
    if tag is None:
        raise BadRow(f"{where} without `{tags.role_tag}`")
    role = _role_names(tags).get(tag) if isinstance(tag, str) else None
    if role is None:
        raise BadRow(f"{where} has unknown role {json.dumps(tag, ensure_ascii=False)[:40]}")
    return role


def _content(turn: Mapping[str, Any], tags: Tags, where: str) -> str:
    content = turn.get(tags.content_tag)
    if content is None:
        raise BadRow(f"{where} without `{tags.content_tag}`")
    if not isinstance(content, str):
        raise BadRow(f"{where} has non-string `{tags.content_tag}`")
    return content


def _leading_system(
    row: Mapping[str, Any], row_format: RowFormat, turns: Sequence[Any]
) -> tuple[str | None, Sequence[Any]]:
    """A first turn with the system tag is the system prompt (and beats the system column)."""
    tags = row_format.tags
    first = turns[0]
    if (
        tags.system_tag
        and isinstance(first, Mapping)
        and first.get(tags.role_tag) == tags.system_tag
    ):
        if len(turns) == 1:
            raise BadRow(f"`{row_format.columns.messages}` holds only a system message")
        return _content(first, tags, "system message"), turns[1:]
    return _optional_text(row, row_format.columns.system), turns


def _check_order(messages: list[Message]) -> None:
    """Turns alternate: prompt roles at even positions, answer roles at odd ones."""
    for index, message in enumerate(messages):
        if message["role"] == SYSTEM:
            raise BadRow("system message after the first turn")
        expected, slot = (
            (PROMPT_ROLES, "a user") if index % 2 == 0 else (ANSWER_ROLES, "an assistant")
        )
        if message["role"] not in expected:
            raise BadRow(f"wrong role order: {message['role']} turn where {slot} turn belongs")


def _pair(row: Mapping[str, Any], row_format: RowFormat) -> tuple[Message, Message] | None:
    """The `chosen`/`rejected` answer turns of a ranking row (None otherwise)."""
    if not row_format.ranking:
        return None
    tags = row_format.tags
    answers = []
    for column in (row_format.columns.chosen, row_format.columns.rejected):
        assert column is not None, "RowFormat guarantees chosen/rejected columns when ranking"
        turn = row.get(column)
        if turn is None:
            raise BadRow(f"missing field `{column}`")
        where = f"`{column}`"
        message = {"role": _role(turn, tags, where), "content": _content(turn, tags, where)}
        if message["role"] not in ANSWER_ROLES:
            raise BadRow(f"`{column}` is not an assistant turn")
        answers.append(_check_answer(message, where))
    return answers[0], answers[1]


@converter("sharegpt")
def convert_sharegpt(row: Mapping[str, Any], row_format: RowFormat) -> Conversation:
    """Role-tagged turns → conversation, as LF's sharegpt converter reads them.

    Raises:
        BadRow: missing/empty/non-list messages, a turn that is not an object, a missing or
            unknown role, missing or non-string content, roles out of order, a wrong ending
            for the row's kind, or malformed `chosen`/`rejected`/`kto_tag`/`tools`/`system`.
    """
    tags = row_format.tags
    system, turns = _leading_system(row, row_format, _turns(row, row_format.columns.messages))
    messages = [
        {"role": _role(turn, tags, "message"), "content": _content(turn, tags, "message")}
        for turn in turns
    ]
    _check_order(messages)
    return _finish(row, row_format, messages, system, _pair(row, row_format))


@converter("openai")
def convert_openai(row: Mapping[str, Any], row_format: RowFormat) -> Conversation:
    """OpenAI chat messages → conversation, as LF's openai converter reads them.

    An assistant message with `tool_calls` becomes a `function` turn whose content is the JSON
    list of the calls' `function` objects; consecutive tool results become one observation.

    Raises:
        BadRow: as `convert_sharegpt`, plus malformed `tool_calls`.
    """
    system, turns = _leading_system(row, row_format, _turns(row, row_format.columns.messages))
    messages: list[Message] = []
    results: list[str] = []
    for turn in turns:
        message = _openai_message(turn, row_format.tags)
        if message["role"] == OBSERVATION:
            results.append(message["content"])
            continue
        if results:
            messages.append({"role": OBSERVATION, "content": TOOL_RESULT_SEPARATOR.join(results)})
            results = []
        messages.append(message)
    if results:  # LF forgets trailing results; a ranking prompt may end with them
        messages.append({"role": OBSERVATION, "content": TOOL_RESULT_SEPARATOR.join(results)})
    _check_order(messages)
    return _finish(row, row_format, messages, system, _pair(row, row_format))


def _openai_message(turn: Any, tags: Tags) -> Message:
    role = _role(turn, tags, "message")
    calls = turn.get("tool_calls") if role in ANSWER_ROLES else None
    if calls:
        if not isinstance(calls, list | tuple) or not all(
            isinstance(call, Mapping) and isinstance(call.get("function"), Mapping)
            for call in calls
        ):
            raise BadRow("malformed `tool_calls` (each needs a `function` object)")
        functions = [_plain(call["function"]) for call in calls]
        return {"role": FUNCTION, "content": json.dumps(functions, ensure_ascii=False)}
    return {"role": role, "content": _content(turn, tags, "message")}
