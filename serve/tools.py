"""Tool calls in generated text: parsed back into OpenAI ``tool_calls``, per tool format.

The prompt side needs nothing here: a rayft template's Jinja export (`ServeArgs.chat_template`)
renders the request's ``tools`` into the system prompt, earlier ``tool_calls`` into assistant
turns and ``tool`` messages as observations, exactly as training's `Template.render` does.
This module reads the answer: the model writes calls in its template's tool format
(`data_pipelines.templates.TOOL_FORMATS`), and each format has an extractor here with
LLaMA-Factory 0.9.5's rules (`tool_utils.*.tool_extractor`), so a model fine-tuned with rayft or
LF is understood the same way. Text that does not parse as calls stays an ordinary answer.

Example:
    >>> parse_tool_calls("qwen", '<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
    ('', [ParsedCall(name='f', arguments='{"x": 1}')])
    >>> parse_tool_calls("qwen", "Paris.")
    ('Paris.', [])
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, NamedTuple


class ParsedCall(NamedTuple):
    """One call found in generated text; ``arguments`` is JSON text (``ensure_ascii=False``)."""

    name: str
    arguments: str


# format name -> extractor(text) -> (text outside the calls, calls) or None when no call parses
EXTRACTORS: dict[str, Callable[[str], tuple[str, list[ParsedCall]] | None]] = {}


def extractor(name: str) -> Callable:
    """Register the tool-call extractor of one tool format."""

    def register(fn: Callable[[str], tuple[str, list[ParsedCall]] | None]) -> Callable:
        EXTRACTORS[name] = fn
        return fn

    return register


def parse_tool_calls(tool_format: str, text: str) -> tuple[str, list[ParsedCall]]:
    """Split generated text into its plain text and the tool calls it makes.

    Args:
        tool_format: the template's tool format name (``default``, ``qwen``, ``glm4``,
            ``llama3``, ``mistral``).
        text: the generated answer, special tokens kept (tags like ``<tool_call>`` may be
            special tokens).

    Returns:
        ``(text, [])`` when the answer makes no (well-formed) call, else the text written
        outside the calls (stripped) and the calls in order.

    Raises:
        ValueError: an unknown tool format.
    """
    if tool_format not in EXTRACTORS:
        raise ValueError(
            f"no tool-call parser for tool format {tool_format!r}: {sorted(EXTRACTORS)}"
        )
    found = EXTRACTORS[tool_format](text)
    return (text, []) if found is None else found


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _calls(objects: Any, arguments_key: str) -> list[ParsedCall] | None:
    objects = objects if isinstance(objects, list) else [objects]
    calls = []
    for obj in objects:
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            return None
        if arguments_key not in obj:
            return None
        calls.append(ParsedCall(obj["name"], _dumps(obj[arguments_key])))
    return calls or None


_ACTION = re.compile(
    r"Action:\s*([a-zA-Z0-9_]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL
)


@extractor("default")
def _default(text: str) -> tuple[str, list[ParsedCall]] | None:
    """``Action: name`` / ``Action Input: {json}`` pairs; any invalid JSON means no call."""
    matches = _ACTION.findall(text)
    if not matches:
        return None
    calls = []
    for name, raw in matches:
        try:
            arguments = json.loads(raw.strip().strip('"').strip("`"))
        except json.JSONDecodeError:
            return None
        calls.append(ParsedCall(name.strip(), _dumps(arguments)))
    return text[: text.find("Action:")].strip(), calls


_TOOL_CALL = re.compile(r"<tool_call>(.+?)</tool_call>(?=\s*<tool_call>|\s*$)", re.DOTALL)


@extractor("qwen")
def _qwen(text: str) -> tuple[str, list[ParsedCall]] | None:
    """JSON ``{"name", "arguments"}`` objects in ``<tool_call>`` tags at the end of the answer."""
    matches = list(_TOOL_CALL.finditer(text))
    if not matches:
        return None
    calls = []
    for match in matches:
        try:
            parsed = _calls(json.loads(match.group(1).strip()), "arguments")
        except json.JSONDecodeError:
            return None
        if parsed is None:
            return None
        calls += parsed
    return text[: matches[0].start()].strip(), calls


@extractor("glm4")
def _glm4(text: str) -> tuple[str, list[ParsedCall]] | None:
    """``name\\n{json}``: one call, the whole answer."""
    if "\n" not in text:
        return None
    name, raw = text.split("\n", maxsplit=1)
    try:
        arguments = json.loads(raw.strip())
    except json.JSONDecodeError:
        return None
    return "", [ParsedCall(name.strip(), _dumps(arguments))]


def _json_answer(arguments_key: str) -> Callable[[str], tuple[str, list[ParsedCall]] | None]:
    def extract(text: str) -> tuple[str, list[ParsedCall]] | None:
        try:
            parsed = json.loads(text.strip().removeprefix("[TOOL_CALLS]").strip())
        except json.JSONDecodeError:
            return None
        calls = _calls(parsed, arguments_key)
        return None if calls is None else ("", calls)

    return extract


# Llama 3.1 writes {"name", "parameters"}; Mistral a JSON list of {"name", "arguments"}.
extractor("llama3")(_json_answer("parameters"))
extractor("mistral")(_json_answer("arguments"))
