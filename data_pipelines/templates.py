"""Chat templates: how a conversation becomes token ids, and the same rules as Jinja.

A template is data: format strings ("slots") per role with LLaMA-Factory's facts (default
systems, stop words, eos handling), a tool format for function calling and, for reasoning
models, a small `Reasoning` record. Each message is encoded element by element, as
LLaMA-Factory does, so the token ids equal its ids even where tokenizing the joined string would
merge differently. Every template also exports itself as a Jinja `chat_template`, so a served
model formats prompts exactly as training did.

Messages use LLaMA-Factory's canonical roles: `user`, `assistant`, `function` (an assistant tool
call whose content is the JSON `{"name": ..., "arguments": {...}}`, or a list of them) and
`observation` (a tool result). The system prompt and the tool definitions (a JSON string, the
`tools` column) are passed separately.

Example:
    >>> template = get_template("qwen")
    >>> pairs = template.encode_pairs(tokenizer, [{"role": "user", "content": "hi"},
    ...                                          {"role": "assistant", "content": "hello"}])
    >>> tokenizer.chat_template = template.to_jinja()  # serving renders the same prompts
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, ClassVar, NamedTuple

Message = Mapping[str, str]


@dataclass(frozen=True)
class SpecialToken:
    """A tokenizer special token by attribute name, e.g. `bos_token`."""

    attr: str


# A slot is literal text (with `{{content}}` where the message goes) and special tokens,
# each encoded separately.
Slot = tuple[str | SpecialToken, ...]
Element = str | SpecialToken
BOS = SpecialToken("bos_token")
EOS = SpecialToken("eos_token")
PLACEHOLDER = "{{content}}"


class BadMessage(ValueError):
    """A message or tools column the template cannot encode (malformed tool JSON).

    It is row data, not a bug: the pipeline counts it as a bad row's reason.
    """


# Roles that end a prompt (the assistant answers next) and roles the assistant speaks in.
QUERY_ROLES = ("user", "observation")
ANSWER_ROLES = ("assistant", "function")


# --------------------------------------------------------------------------------------------
# Tool formats: how tool definitions enter the system prompt and how tool calls are written.
# --------------------------------------------------------------------------------------------


class FunctionCall(NamedTuple):
    """One tool call; `arguments` is JSON text (`json.dumps(..., ensure_ascii=False)`)."""

    name: str
    arguments: str


class ToolFormat(ABC):
    """LLaMA-Factory's tool utils for one model family, in Python and as Jinja macros.

    The Jinja side must define two macros, `rayft_tool_text(tools)` (the list of tool dicts →
    text appended to the system prompt) and `rayft_call_text(calls)` (a list of
    `{"name", "arguments"}` dicts, arguments already JSON text → the assistant's call text),
    that render exactly what `describe` and `format_calls` return.
    """

    name: ClassVar[str]
    parallel_calls: ClassVar[bool] = True

    @abstractmethod
    def describe(self, tools: list[dict[str, Any]]) -> str:
        """The text appended to the system prompt for these tool definitions."""

    @abstractmethod
    def format_calls(self, calls: Sequence[FunctionCall]) -> str:
        """The assistant text that makes these calls."""

    @abstractmethod
    def jinja_macros(self) -> str:
        """Jinja definitions of `rayft_tool_text` and `rayft_call_text`."""


def _unwrap(tool: dict[str, Any]) -> Any:
    """`{"type": "function", "function": {...}}` → the inner function (LF's reading)."""
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _wrap(tool: dict[str, Any]) -> dict[str, Any]:
    """A bare function schema → the OpenAI `{"type": "function", ...}` wrapper."""
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _dumps(value: Any, indent: int | None = None) -> str:
    # Same as the `tojson` filter Hugging Face installs for chat templates.
    return json.dumps(value, ensure_ascii=False, indent=indent)


# Jinja snippets shared by the tool formats (inside a `for tool in tools` loop).
_JINJA_UNWRAP = "(tool.get('function', '') if tool.get('type') == 'function' else tool)"
_JINJA_WRAP = "(tool if tool.get('type') == 'function' else {'type': 'function', 'function': tool})"
_JINJA_CALL_JSON = (
    "'{\"name\": ' ~ (call['name'] | tojson) ~ ', \"{key}\": ' ~ call['arguments'] ~ '}'"
)


def _call_json_jinja(key: str) -> str:
    """Jinja expression for `json.dumps({"name": name, key: arguments})` of `call`."""
    return _JINJA_CALL_JSON.replace("{key}", key)


DEFAULT_TOOL_HEADER = "You have access to the following tools:\n"
DEFAULT_TOOL_FOOTER = (
    "Use the following format if using a tool:\n```\nAction: tool name (one of [{names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n'
)


@dataclass(frozen=True)
class DefaultTools(ToolFormat):
    """LF's `default` tool format: a prose tool list and `Action:`/`Action Input:` calls."""

    name: ClassVar[str] = "default"

    def describe(self, tools: list[dict[str, Any]]) -> str:
        """Each tool with its arguments (type, required, enum, item type) in prose."""
        text, names = "", []
        for tool in tools:
            function = _unwrap(tool)
            args = ""
            parameters = function["parameters"]
            for arg, param in parameters["properties"].items():
                required = ", required" if arg in parameters.get("required", []) else ""
                enum = (
                    f", should be one of [{', '.join(param['enum'])}]" if param.get("enum") else ""
                )
                items = (
                    f", where each item should be {param['items'].get('type', '')}"
                    if param.get("items")
                    else ""
                )
                args += (
                    f"  - {arg} ({param.get('type', '')}{required}): "
                    f"{param.get('description', '')}{enum}{items}\n"
                )
            text += (
                f"> Tool Name: {function['name']}\n"
                f"Tool Description: {function.get('description', '')}\nTool Args:\n{args}\n"
            )
            names.append(function["name"])
        return DEFAULT_TOOL_HEADER + text + DEFAULT_TOOL_FOOTER.replace("{names}", ", ".join(names))

    def format_calls(self, calls: Sequence[FunctionCall]) -> str:
        """`Action: name` / `Action Input: {json}` per call, one after another."""
        return "\n".join(f"Action: {call.name}\nAction Input: {call.arguments}" for call in calls)

    def jinja_macros(self) -> str:
        """The same prose and call lines in Jinja."""
        head, tail = DEFAULT_TOOL_FOOTER.split("{names}")
        return (
            "{%- macro rayft_tool_text(tools) -%}"
            "{%- set ns = namespace(names=[]) -%}"
            "{{- " + _jinja_str(DEFAULT_TOOL_HEADER) + " -}}"
            "{%- for tool in tools -%}"
            "{%- set function = " + _JINJA_UNWRAP + " -%}"
            "{%- set parameters = function['parameters'] -%}"
            "{{- '> Tool Name: ' ~ function['name'] ~ '\\nTool Description: '"
            " ~ function.get('description', '') ~ '\\nTool Args:\\n' -}}"
            "{%- for arg, param in parameters['properties'].items() -%}"
            "{{- '  - ' ~ arg ~ ' (' ~ param.get('type', '') -}}"
            "{%- if arg in parameters.get('required', []) -%}{{- ', required' -}}{%- endif -%}"
            "{{- '): ' ~ param.get('description', '') -}}"
            "{%- if param.get('enum') -%}"
            "{{- ', should be one of [' ~ (param['enum'] | join(', ')) ~ ']' -}}{%- endif -%}"
            "{%- if param.get('items') -%}"
            "{{- ', where each item should be ' ~ param['items'].get('type', '') -}}{%- endif -%}"
            "{{- '\\n' -}}"
            "{%- endfor -%}"
            "{{- '\\n' -}}"
            "{%- set ns.names = ns.names + [function['name']] -%}"
            "{%- endfor -%}"
            "{{- " + _jinja_str(head) + " ~ (ns.names | join(', ')) ~ " + _jinja_str(tail) + " -}}"
            "{%- endmacro -%}"
            "{%- macro rayft_call_text(calls) -%}"
            "{%- for call in calls -%}"
            "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
            "{{- 'Action: ' ~ call['name'] ~ '\\nAction Input: ' ~ call['arguments'] -}}"
            "{%- endfor -%}"
            "{%- endmacro -%}"
        )


QWEN_TOOL_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
QWEN_TOOL_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


@dataclass(frozen=True)
class QwenTools(ToolFormat):
    """LF's `qwen` format (Qwen 2.5/3): JSON tool list, calls in `<tool_call>` tags."""

    name: ClassVar[str] = "qwen"

    def describe(self, tools: list[dict[str, Any]]) -> str:
        """One wrapped JSON schema per line inside `<tools>`."""
        listed = "".join("\n" + _dumps(_wrap(tool)) for tool in tools)
        return QWEN_TOOL_HEADER + listed + QWEN_TOOL_FOOTER

    def format_calls(self, calls: Sequence[FunctionCall]) -> str:
        """Each call as `<tool_call>\\n{"name", "arguments"}\\n</tool_call>`."""
        return "\n".join(
            "<tool_call>\n"
            + _dumps({"name": call.name, "arguments": json.loads(call.arguments)})
            + "\n</tool_call>"
            for call in calls
        )

    def jinja_macros(self) -> str:
        """The same tool list and tags in Jinja."""
        return (
            "{%- macro rayft_tool_text(tools) -%}"
            "{{- " + _jinja_str(QWEN_TOOL_HEADER) + " -}}"
            "{%- for tool in tools -%}{{- '\\n' ~ (" + _JINJA_WRAP + " | tojson) -}}{%- endfor -%}"
            "{{- " + _jinja_str(QWEN_TOOL_FOOTER) + " -}}"
            "{%- endmacro -%}"
            "{%- macro rayft_call_text(calls) -%}"
            "{%- for call in calls -%}"
            "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
            "{{- '<tool_call>\\n' ~ " + _call_json_jinja("arguments") + " ~ '\\n</tool_call>' -}}"
            "{%- endfor -%}"
            "{%- endmacro -%}"
        )


GLM4_TOOL_HEADER = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)
GLM4_TOOL_NOTE = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


@dataclass(frozen=True)
class Glm4Tools(ToolFormat):
    """LF's `glm4` format: a Chinese tool section; one call per turn as `name\\n{args}`."""

    name: ClassVar[str] = "glm4"
    parallel_calls: ClassVar[bool] = False

    def describe(self, tools: list[dict[str, Any]]) -> str:
        """A `## name` section with the indented JSON schema per tool."""
        sections = ""
        for tool in tools:
            function = _unwrap(tool)
            sections += f"\n\n## {function['name']}\n\n{_dumps(function, indent=4)}{GLM4_TOOL_NOTE}"
        return GLM4_TOOL_HEADER + sections

    def format_calls(self, calls: Sequence[FunctionCall]) -> str:
        """`name\\n{args}`.

        Raises:
            BadMessage: more than one call in a turn (GLM-4 has no parallel calls).
        """
        if len(calls) > 1:
            raise BadMessage("glm4 tool format does not support parallel function calls")
        return f"{calls[0].name}\n{calls[0].arguments}"

    def jinja_macros(self) -> str:
        """The same sections and call in Jinja."""
        return (
            "{%- macro rayft_tool_text(tools) -%}"
            "{{- " + _jinja_str(GLM4_TOOL_HEADER) + " -}}"
            "{%- for tool in tools -%}"
            "{%- set function = " + _JINJA_UNWRAP + " -%}"
            "{{- '\\n\\n## ' ~ function['name'] ~ '\\n\\n' ~ (function | tojson(indent=4)) ~ "
            + _jinja_str(GLM4_TOOL_NOTE)
            + " -}}"
            "{%- endfor -%}"
            "{%- endmacro -%}"
            "{%- macro rayft_call_text(calls) -%}"
            "{%- if calls | length > 1 -%}"
            "{{- raise_exception('glm4 tool format does not support parallel function calls') -}}"
            "{%- endif -%}"
            "{{- calls[0]['name'] ~ '\\n' ~ calls[0]['arguments'] -}}"
            "{%- endmacro -%}"
        )


LLAMA3_TOOL_HEADER = "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
LLAMA3_TOOL_INTRO = (
    "You have access to the following functions. To call a function, please respond with JSON "
    'for a function call. Respond in the format {"name": function name, "parameters": '
    "dictionary of argument name and its value}. Do not use variables.\n\n"
)
LLAMA3_DATE_FORMAT = "%d %b %Y"


@dataclass(frozen=True)
class Llama3Tools(ToolFormat):
    """LF's `llama3` format (JSON-based tool calling of Llama 3.1, tools in the system).

    Attributes:
        date: the "Today Date" written into the prompt; None uses the current day, as LF and
            the Llama 3.1 chat template do (pin it for reproducible data).
    """

    name: ClassVar[str] = "llama3"
    date: str | None = None

    def describe(self, tools: list[dict[str, Any]]) -> str:
        """Date header, instructions, and one indented wrapped JSON schema per tool."""
        date = self.date or datetime.now().strftime(LLAMA3_DATE_FORMAT)
        listed = "".join(_dumps(_wrap(tool), indent=4) + "\n\n" for tool in tools)
        return LLAMA3_TOOL_HEADER.replace("{date}", date) + LLAMA3_TOOL_INTRO + listed

    def format_calls(self, calls: Sequence[FunctionCall]) -> str:
        """`{"name", "parameters"}`, or a JSON list of them for parallel calls."""
        objects = [{"name": c.name, "parameters": json.loads(c.arguments)} for c in calls]
        return _dumps(objects[0] if len(objects) == 1 else objects)

    def jinja_macros(self) -> str:
        """The same header and calls in Jinja (the date from `strftime_now` unless pinned)."""
        head, tail = LLAMA3_TOOL_HEADER.split("{date}")
        date = _jinja_str(self.date) if self.date else f"strftime_now('{LLAMA3_DATE_FORMAT}')"
        return (
            "{%- macro rayft_tool_text(tools) -%}"
            "{{- "
            + _jinja_str(head)
            + " ~ "
            + date
            + " ~ "
            + _jinja_str(tail + LLAMA3_TOOL_INTRO)
            + " -}}"
            "{%- for tool in tools -%}{{- (" + _JINJA_WRAP + " | tojson(indent=4)) ~ '\\n\\n' -}}"
            "{%- endfor -%}"
            "{%- endmacro -%}"
            "{%- macro rayft_call_text(calls) -%}"
            "{%- if calls | length > 1 -%}{{- '[' -}}{%- endif -%}"
            "{%- for call in calls -%}"
            "{%- if not loop.first -%}{{- ', ' -}}{%- endif -%}"
            "{{- " + _call_json_jinja("parameters") + " -}}"
            "{%- endfor -%}"
            "{%- if calls | length > 1 -%}{{- ']' -}}{%- endif -%}"
            "{%- endmacro -%}"
        )


@dataclass(frozen=True)
class MistralTools(ToolFormat):
    """LF's `mistral` format (v0.3): `[AVAILABLE_TOOLS]` JSON list, calls as a JSON list."""

    name: ClassVar[str] = "mistral"

    def describe(self, tools: list[dict[str, Any]]) -> str:
        """The wrapped schemas as one JSON list between the markers."""
        return "[AVAILABLE_TOOLS] " + _dumps([_wrap(tool) for tool in tools]) + "[/AVAILABLE_TOOLS]"

    def format_calls(self, calls: Sequence[FunctionCall]) -> str:
        """A JSON list of `{"name", "arguments"}`."""
        return _dumps([{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls])

    def jinja_macros(self) -> str:
        """The same list in Jinja."""
        return (
            "{%- macro rayft_tool_text(tools) -%}"
            "{%- set ns = namespace(wrapped=[]) -%}"
            "{%- for tool in tools -%}{%- set ns.wrapped = ns.wrapped + [" + _JINJA_WRAP + "] -%}"
            "{%- endfor -%}"
            "{{- '[AVAILABLE_TOOLS] ' ~ (ns.wrapped | tojson) ~ '[/AVAILABLE_TOOLS]' -}}"
            "{%- endmacro -%}"
            "{%- macro rayft_call_text(calls) -%}"
            "{{- '[' -}}"
            "{%- for call in calls -%}"
            "{%- if not loop.first -%}{{- ', ' -}}{%- endif -%}"
            "{{- " + _call_json_jinja("arguments") + " -}}"
            "{%- endfor -%}"
            "{{- ']' -}}"
            "{%- endmacro -%}"
        )


TOOL_FORMATS: dict[str, ToolFormat] = {
    fmt.name: fmt
    for fmt in (DefaultTools(), QwenTools(), Glm4Tools(), Llama3Tools(), MistralTools())
}


def get_tool_format(name: str) -> ToolFormat:
    """Look a tool format up by LF's `tool_format` name.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in TOOL_FORMATS:
        raise ValueError(f"unknown tool_format `{name}` (known: {', '.join(sorted(TOOL_FORMATS))})")
    return TOOL_FORMATS[name]


# --------------------------------------------------------------------------------------------
# Reasoning (thinking) behaviour.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reasoning:
    """How a reasoning template (LF's `ReasoningTemplate`, e.g. qwen3) treats thoughts.

    Answers without a thought get an empty one (`<think>\\n\\n</think>\\n\\n`) so the model
    always sees the format it generates with.

    Attributes:
        enable_thinking: True: the empty thought is part of the answer and learned. False:
            thoughts are removed from every answer and the empty thought goes into the prompt
            (not learned), which is how a thinking model is told not to think. None: LF's
            in-between: existing thoughts stay, the empty thought goes into the prompt.
        preserve_thinking: keep the thoughts of history turns; otherwise they are removed in
            prompts, and in training with `mask_history` (where only the last turn is learned).
    """

    enable_thinking: bool | None = True
    preserve_thinking: bool = False


def _thought_pattern(thought_words: tuple[str, str]) -> re.Pattern[str]:
    return re.compile(f"{re.escape(thought_words[0])}(.*?){re.escape(thought_words[1])}", re.DOTALL)


# --------------------------------------------------------------------------------------------
# The template.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """One chat format.

    Attributes:
        name: registry name (LLaMA-Factory's).
        user: slot for a user turn; it ends with the assistant header (generation prompt).
        assistant: slot for an assistant turn.
        system: slot for the system prompt (tool definitions are appended to its content).
        prefix: emitted once before the first message (e.g. BOS).
        function: slot for an assistant tool call (None: the assistant slot).
        observation: slot for a tool result (None: the user slot).
        tools: how tool definitions and tool calls are written.
        default_system: system prompt used when a row has none.
        stop_words: strings that end an answer; the first replaces eos when `replace_eos`.
        replace_eos: make stop_words[0] the tokenizer's eos token.
        efficient_eos: eos is appended once at the end and taught on prompt starts.
        system_in_user: the system text is folded into the first user turn (Llama-2 style);
            the system slot must then be a single text element.
        reasoning: thinking-model behaviour (None: thoughts are plain text).
        thought_words: the strings that open and close a thought.
        tool_call_words: tags that may wrap the JSON in a `function` message's content.
    """

    name: str
    user: Slot
    assistant: Slot
    system: Slot
    prefix: Slot = ()
    function: Slot | None = None
    observation: Slot | None = None
    tools: ToolFormat = DefaultTools()
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    replace_eos: bool = False
    efficient_eos: bool = False
    system_in_user: bool = False
    reasoning: Reasoning | None = None
    thought_words: tuple[str, str] = ("<think>\n", "\n</think>\n\n")
    tool_call_words: tuple[str, str] = ("<tool_call>", "</tool_call>")

    def __post_init__(self) -> None:
        """Reject templates LLaMA-Factory could not express, when they are defined."""
        for role in ("user", "assistant", "system", "function", "observation"):
            slot = getattr(self, role)
            if slot is not None and not any(PLACEHOLDER in e for e in slot if isinstance(e, str)):
                raise ValueError(f"template `{self.name}`: the {role} slot has no {PLACEHOLDER}")
        if any(PLACEHOLDER in e for e in self.prefix if isinstance(e, str)):
            raise ValueError(f"template `{self.name}`: the prefix cannot hold {PLACEHOLDER}")
        if self.system_in_user and (len(self.system) != 1 or not isinstance(self.system[0], str)):
            raise ValueError(
                f"template `{self.name}`: system_in_user needs a one-string system slot"
            )
        if self.replace_eos and not self.stop_words:
            raise ValueError(f"template `{self.name}`: replace_eos needs stop_words")

    # ---- public encoding --------------------------------------------------------------------

    def encode_pairs(
        self,
        tokenizer: Any,
        messages: Sequence[Message],
        system: str | None = None,
        tools: str | None = None,
        *,
        mask_history: bool = False,
    ) -> list[tuple[list[int], list[int]]]:
        """Encode a conversation into (prompt ids, answer ids) pairs, one per turn.

        Args:
            tokenizer: a tokenizer prepared with `prepare_tokenizer`.
            messages: alternating query (user/observation) and answer (assistant/function)
                messages, starting with a query and ending with an answer.
            system: the system prompt (None or empty: the template default).
            tools: tool definitions as a JSON string (the `tools` column), or None.
            mask_history: the pairs train the last turn only; reasoning templates then drop the
                thoughts of history turns, as LF does (unless `preserve_thinking`).

        Raises:
            BadMessage: malformed tool JSON or tool call.
            ValueError: a role the template does not know.
        """
        messages = [dict(m) for m in messages]
        discard = self._prepare_reasoning_training(messages, mask_history=mask_history)
        encoded = self._encode_messages(tokenizer, messages, system, tools)
        if self.reasoning is not None:
            turns = [len(messages) - 2] if discard else range(0, len(messages) - 1, 2)
            for i in turns:
                self._add_empty_thought(tokenizer, encoded, i, messages[i + 1]["content"])
        return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded) - 1, 2)]

    def encode_oneturn(
        self,
        tokenizer: Any,
        messages: Sequence[Message],
        system: str | None = None,
        tools: str | None = None,
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids): everything before the last message, and the last message.

        What the pairwise, feedback and prompt-only families train on (LF's `encode_oneturn`).
        Reasoning templates remove history thoughts (unless `preserve_thinking`), the last
        answer's thought when thinking is off, and give a thought-less answer an empty thought:
        learned with thinking on, in the prompt otherwise.
        """
        messages = [dict(m) for m in messages]
        if self.reasoning is not None:
            if not self.reasoning.preserve_thinking:
                for i in range(1, len(messages) - 2, 2):
                    messages[i]["content"] = self.remove_thought(messages[i]["content"])
            if self.reasoning.enable_thinking is False:
                messages[-1]["content"] = self.remove_thought(messages[-1]["content"])
        encoded = self._encode_messages(tokenizer, messages, system, tools)
        prompt = [i for part in encoded[:-1] for i in part]
        answer = encoded[-1]
        if self.reasoning is not None and not self.has_thought(messages[-1]["content"]):
            if self.reasoning.enable_thinking:
                answer = self._empty_thought_ids(tokenizer) + answer
            else:
                prompt = prompt + self._empty_thought_ids(tokenizer)
        return prompt, answer

    def encode_prompt(
        self,
        tokenizer: Any,
        messages: Sequence[Message],
        system: str | None = None,
        tools: str | None = None,
    ) -> list[int]:
        """Ids of a conversation that ends with a query, ready for generation."""
        messages = self._prompt_view(messages)
        ids = [
            i for part in self._encode_messages(tokenizer, messages, system, tools) for i in part
        ]
        if self._prompt_gets_empty_thought(messages):
            ids += self._empty_thought_ids(tokenizer)
        return ids

    def render(
        self,
        tokenizer: Any,
        messages: Sequence[Message],
        system: str | None = None,
        tools: str | None = None,
    ) -> str:
        """The prompt as text (special tokens written out), as the Jinja export renders it."""
        messages = self._prompt_view(messages)
        text = "".join(
            "".join(_element_texts(tokenizer, elements))
            for elements in self._message_elements(messages, system, tools)
        )
        if self._prompt_gets_empty_thought(messages):
            text += self.empty_thought
        return text

    # ---- reasoning --------------------------------------------------------------------------

    @property
    def empty_thought(self) -> str:
        """The thought a reasoning template writes when there is none."""
        return self.thought_words[0] + self.thought_words[1]

    def remove_thought(self, content: str) -> str:
        """`content` without its thoughts (and the newlines that led into the answer)."""
        return _thought_pattern(self.thought_words).sub("", content).lstrip("\n")

    def has_thought(self, content: str) -> bool:
        """Whether `content` already opens or closes a thought (LF's test)."""
        return any(word.strip() in content for word in self.thought_words)

    def _prepare_reasoning_training(
        self, messages: list[dict[str, str]], *, mask_history: bool
    ) -> bool:
        """Remove thoughts LF removes before training; True if history thoughts were dropped."""
        if self.reasoning is None:
            return False
        discard = mask_history and not self.reasoning.preserve_thinking
        for i in range(1, len(messages), 2):
            if self.reasoning.enable_thinking is False or (discard and i < len(messages) - 2):
                messages[i]["content"] = self.remove_thought(messages[i]["content"])
        return discard

    def _add_empty_thought(
        self, tokenizer: Any, encoded: list[list[int]], i: int, answer: str
    ) -> None:
        """Give turn `i` an empty thought: learned in the answer, or fed in the prompt."""
        if self.reasoning is None or self.has_thought(answer):
            return
        if self.reasoning.enable_thinking:
            encoded[i + 1] = self._empty_thought_ids(tokenizer) + encoded[i + 1]
        else:
            encoded[i] = encoded[i] + self._empty_thought_ids(tokenizer)

    def _empty_thought_ids(self, tokenizer: Any) -> list[int]:
        return tokenizer.encode(self.empty_thought, add_special_tokens=False)

    def _prompt_view(self, messages: Sequence[Message]) -> list[dict[str, str]]:
        """Messages as a reasoning model sees them at inference: past thoughts removed."""
        messages = [dict(m) for m in messages]
        if self.reasoning is None or self.reasoning.preserve_thinking:
            return messages
        last_query = max(
            (i for i, m in enumerate(messages) if m["role"] in QUERY_ROLES), default=-1
        )
        for message in messages[:last_query]:
            if message["role"] in ANSWER_ROLES:
                message["content"] = self.remove_thought(message["content"])
        return messages

    def _prompt_gets_empty_thought(self, messages: Sequence[Message]) -> bool:
        """A prompt for generation ends with the empty thought when thinking is off."""
        return (
            self.reasoning is not None
            and not self.reasoning.enable_thinking
            and bool(messages)
            and messages[-1]["role"] in QUERY_ROLES
        )

    # ---- tools ------------------------------------------------------------------------------

    def tool_text(self, tools: str | None) -> str:
        """The system-prompt text for a `tools` JSON string ("" for none or an empty list).

        Raises:
            BadMessage: `tools` is not a JSON list of tool definitions.
        """
        if not tools:
            return ""
        try:
            parsed = json.loads(tools)
        except json.JSONDecodeError as err:
            raise BadMessage(f"invalid tools JSON: {err}") from err
        if not isinstance(parsed, list):
            raise BadMessage("tools must be a JSON list of tool definitions")
        if not parsed:
            return ""
        try:
            return self.tools.describe(parsed)
        except (KeyError, TypeError, AttributeError) as err:
            raise BadMessage(f"malformed tool definition: {err!r}") from err

    def split_function_message(self, content: str) -> tuple[str, list[FunctionCall]]:
        """A `function` message → (text written before the calls, the calls), as LF reads it.

        The JSON may be wrapped in `tool_call_words` (then the rest of the content is the
        text), or preceded by a thought (then the thought is the text).

        Raises:
            BadMessage: the JSON is invalid or a call lacks `name`/`arguments`.
        """
        tag = re.search(
            f"{re.escape(self.tool_call_words[0])}(.*?){re.escape(self.tool_call_words[1])}",
            content,
            re.DOTALL,
        )
        if tag is not None:
            return content.replace(tag.group(0), ""), _parse_calls(tag.group(1))
        thought = _thought_pattern(self.thought_words).search(content)
        if thought is not None:
            return thought.group(0), _parse_calls(content.replace(thought.group(0), ""))
        return "", _parse_calls(content)

    def _function_text(self, content: str) -> str:
        text, calls = self.split_function_message(content)
        return text + self.tools.format_calls(calls)

    # ---- elements ---------------------------------------------------------------------------

    def slot_for(self, role: str) -> Slot:
        """The slot a message role is written with.

        Raises:
            ValueError: a role other than user/assistant/function/observation.
        """
        slots = {
            "user": self.user,
            "assistant": self.assistant,
            "function": self.function if self.function is not None else self.assistant,
            "observation": self.observation if self.observation is not None else self.user,
        }
        if role not in slots:
            raise ValueError(
                f"role `{role}` is not supported by template `{self.name}` "
                f"(use {', '.join(slots)}; the system prompt is passed separately)"
            )
        return slots[role]

    def _encode_messages(
        self, tokenizer: Any, messages: Sequence[Message], system: str | None, tools: str | None
    ) -> list[list[int]]:
        return [
            _element_ids(tokenizer, elements)
            for elements in self._message_elements(messages, system, tools)
        ]

    def _message_elements(
        self, messages: Sequence[Message], system: str | None, tools: str | None
    ) -> list[list[Element]]:
        """Each message's elements; the first also carries the prefix and the system."""
        system_text = system or self.default_system
        result: list[list[Element]] = []
        for index, message in enumerate(messages):
            elements: list[Element] = []
            folded = ""
            if index == 0:
                elements += self.prefix
                # LF tests the raw tools string: "[]" still writes an (empty-tool) system.
                if system_text or tools:
                    system_slot = _fill(self.system, system_text + self.tool_text(tools))
                    if self.system_in_user:
                        folded = str(system_slot[0])
                    else:
                        elements += system_slot
            role = message["role"]
            content = message["content"]
            if role == "function":
                content = self._function_text(content)
            elif role == "user":
                content = folded + content
            elements += _fill(self.slot_for(role), content)
            result.append(elements)
        return result

    # ---- Jinja ------------------------------------------------------------------------------

    def to_jinja(self) -> str:
        """This template as a Hugging Face `chat_template` (Jinja) string.

        It takes the messages Hugging Face and vLLM pass: `system`, `user`, `assistant` (tool
        calls as `tool_calls`, arguments a dict or JSON text) and `tool` or `observation`
        results, plus the `tools` list. A reasoning template also reads `enable_thinking`.
        LF's `function` role (content = call JSON) cannot be parsed in Jinja and raises.
        A system message with empty content renders an empty system turn, where training's
        `system=""` means the default system: only the former can be told apart from "no
        system message" by a Jinja reader such as `template_from_tokenizer`.
        """
        return "".join(
            [
                self.tools.jinja_macros(),
                _jinja_strip_thought_macro(self.thought_words) if self.reasoning else "",
                self._jinja_system(),
                self._jinja_loop(),
                self._jinja_prompt_thought(),
            ]
        )

    def _jinja_system(self) -> str:
        """System selection and the system turn (or, Llama-2 style, the text to fold)."""
        default = _jinja_str(self.default_system)
        lines = [
            # An explicit system message is used as given, even empty (Hugging Face's
            # convention, which LF's parse_template relies on); without one, the default.
            "{%- if messages[0]['role'] == 'system' -%}",
            "{%- set system_message = messages[0]['content'] -%}",
            "{%- set has_system = true -%}",
            "{%- set loop_messages = messages[1:] -%}",
            "{%- else -%}",
            f"{{%- set system_message = {default} -%}}",
            f"{{%- set has_system = {'true' if self.default_system else 'false'} -%}}",
            "{%- set loop_messages = messages -%}",
            "{%- endif -%}",
            "{%- set has_tools = tools is defined and tools is not none -%}",
            "{%- set system_content = system_message ~ "
            "(rayft_tool_text(tools) if has_tools and tools | length > 0 else '') -%}",
            _jinja_slot(self.prefix, "''"),
        ]
        if self.system_in_user:
            lines.append(
                "{%- set folded = "
                + _jinja_concat(self.system, "system_content")
                + " if has_system or has_tools else '' -%}"
            )
        else:
            system = _jinja_slot(self.system, "system_content")
            lines.append("{%- if has_system or has_tools -%}" + system + "{%- endif -%}")
        return "".join(lines)

    def _jinja_loop(self) -> str:
        function = self.function if self.function is not None else self.assistant
        observation = self.observation if self.observation is not None else self.user
        strip = ""
        if self.reasoning is not None and not self.reasoning.preserve_thinking:
            strip = (
                "{%- if loop.index0 < ns.last_query -%}"
                "{%- set content = rayft_strip_thought(content) -%}{%- endif -%}"
            )
        fold = "{%- if loop.first -%}{%- set content = folded ~ content -%}{%- endif -%}"
        return "".join(
            [
                "{%- set ns = namespace(last_query=-1) -%}",
                "{%- for message in loop_messages -%}",
                "{%- if message['role'] in ['user', 'observation', 'tool'] -%}",
                "{%- set ns.last_query = loop.index0 -%}{%- endif -%}",
                "{%- endfor -%}",
                "{%- for message in loop_messages -%}",
                "{%- set content = message['content'] if message['content'] is string else '' -%}",
                "{%- if message['role'] == 'user' -%}",
                fold if self.system_in_user else "",
                _jinja_slot(self.user, "content"),
                "{%- elif message['role'] in ['observation', 'tool'] -%}",
                _jinja_slot(observation, "content"),
                "{%- elif message['role'] == 'assistant' -%}",
                strip,
                "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}",
                "{%- set calls = namespace(items=[]) -%}",
                "{%- for call in message['tool_calls'] -%}",
                "{%- set fn = call['function'] if call['function'] is defined else call -%}",
                "{%- set args = fn['arguments'] if fn['arguments'] is string"
                " else fn['arguments'] | tojson -%}",
                "{%- set calls.items = calls.items + [{'name': fn['name'], 'arguments': args}] -%}",
                "{%- endfor -%}",
                "{%- set content = content ~ rayft_call_text(calls.items) -%}",
                _jinja_slot(function, "content"),
                "{%- else -%}",
                _jinja_slot(self.assistant, "content"),
                "{%- endif -%}",
                "{%- else -%}",
                "{{- raise_exception('role ' ~ message['role'] ~ ' is not supported; tool calls "
                "go in an assistant message with tool_calls, results in a tool message') -}}",
                "{%- endif -%}",
                "{%- endfor -%}",
            ]
        )

    def _jinja_prompt_thought(self) -> str:
        if self.reasoning is None:
            return ""
        default = {True: "true", False: "false", None: "none"}[self.reasoning.enable_thinking]
        return (
            f"{{%- set thinking = enable_thinking if enable_thinking is defined else {default} -%}}"
            "{%- if not thinking and loop_messages and ns.last_query == loop_messages | length - 1 -%}"
            "{{- " + _jinja_str(self.empty_thought) + " -}}{%- endif -%}"
        )


def _parse_calls(text: str) -> list[FunctionCall]:
    """Call JSON (one object or a list) → calls with their arguments re-dumped, as LF does."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadMessage(f"invalid function call JSON: {err}") from err
    calls = parsed if isinstance(parsed, list) else [parsed]
    try:
        return [FunctionCall(call["name"], _dumps(call["arguments"])) for call in calls]
    except (KeyError, TypeError) as err:
        raise BadMessage(f"a function call needs `name` and `arguments`: {err!r}") from err


def _fill(slot: Slot, content: str) -> list[Element]:
    return [e.replace(PLACEHOLDER, content) if isinstance(e, str) else e for e in slot]


def _element_ids(tokenizer: Any, elements: Sequence[Element]) -> list[int]:
    """Encode each element on its own: text without special tokens, special tokens by id.

    A fast tokenizer's Rust backend is called directly: transformers' `encode` wraps the same
    call in per-call bookkeeping that costs about as much as the encoding of a short element.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ids: list[int] = []
    for element in elements:
        if isinstance(element, SpecialToken):
            token_id = getattr(tokenizer, f"{element.attr}_id")
            if token_id is not None:
                ids.append(token_id)
        elif element:
            if backend is not None:
                ids += _backend_ids(backend, element)
            else:
                ids += tokenizer.encode(element, add_special_tokens=False)
    return ids


@functools.lru_cache(maxsize=256)
def _backend_ids(backend: Any, text: str) -> tuple[int, ...]:
    """Ids of one element (the tuple is shared: callers copy it into their own list).

    Cached because one element repeats in nearly every row of a dataset: the system turn with
    the template's default system prompt (a tenth of the tokens of an alpaca row with qwen).
    The cache is small, so it only catches texts that repeat within a few hundred elements.

    `encode_batch_fast` of one text gives the ids `encode` gives, without the character
    offsets nobody here reads: 23% less CPU, and encoding is three quarters of tokenizing.
    """
    return tuple(backend.encode_batch_fast([text], add_special_tokens=False)[0].ids)


def _element_texts(tokenizer: Any, elements: Sequence[Element]) -> list[str]:
    return [
        (getattr(tokenizer, e.attr) or "") if isinstance(e, SpecialToken) else e for e in elements
    ]


# ---- Jinja helpers ---------------------------------------------------------------------------


def _jinja_str(text: str) -> str:
    escaped = (
        text.replace("\\", "\\\\")
        .replace("'", "\\'")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f"'{escaped}'"


def _jinja_concat(slot: Slot, variable: str) -> str:
    """A Jinja expression concatenating a slot's parts with `variable` for `{{content}}`."""
    parts: list[str] = []
    for element in slot:
        if isinstance(element, SpecialToken):
            parts.append(f"({element.attr} or '')")
            continue
        pieces = element.split(PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if piece:
                parts.append(_jinja_str(piece))
            if i < len(pieces) - 1:
                parts.append(variable)
    return " ~ ".join(parts) if parts else "''"


def _jinja_slot(slot: Slot, variable: str) -> str:
    if not slot:
        return ""
    return "{{- " + _jinja_concat(slot, variable) + " -}}"


def _jinja_strip_thought_macro(thought_words: tuple[str, str]) -> str:
    """`rayft_strip_thought(text)`: Python's `remove_thought` (non-greedy regex) in Jinja.

    Splitting on the opening word and buffering until a closing word is found removes exactly
    what `re.sub(open(.*?)close, "", text)` removes; an unclosed thought is kept.
    """
    opening, closing = (_jinja_str(word) for word in thought_words)
    return (
        "{%- macro rayft_strip_thought(text) -%}"
        f"{{%- set parts = text.split({opening}) -%}}"
        "{%- set st = namespace(out=parts[0], pending='', open=false) -%}"
        "{%- for part in parts[1:] -%}"
        f"{{%- if {closing} in part -%}}"
        f"{{%- set st.out = st.out ~ part.split({closing}, 1)[1] -%}}"
        "{%- set st.pending = '' -%}{%- set st.open = false -%}"
        "{%- else -%}"
        f"{{%- set st.pending = st.pending ~ {opening} ~ part -%}}"
        "{%- set st.open = true -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{{- (st.out ~ st.pending).lstrip('\\n') -}}"
        "{%- endmacro -%}"
    )


# --------------------------------------------------------------------------------------------
# Registry, tokenizer preparation, and templates read from a tokenizer.
# --------------------------------------------------------------------------------------------


TEMPLATES: dict[str, Template] = {}


def register(template: Template) -> Template:
    """Add a template to the registry; names are unique."""
    if template.name in TEMPLATES:
        raise ValueError(f"template `{template.name}` registered twice")
    TEMPLATES[template.name] = template
    return template


def get_template(name: str) -> Template:
    """Look a template up by name.

    Raises:
        ValueError: for an unknown name, listing close names.
    """
    if name not in TEMPLATES:
        close = difflib.get_close_matches(name, list(TEMPLATES), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown template `{name}`{hint} (known: {', '.join(sorted(TEMPLATES))})")
    return TEMPLATES[name]


def configure_template(
    template: Template,
    *,
    default_system: str | None = None,
    tool_format: str | None = None,
    enable_thinking: bool | None = True,
    preserve_thinking: bool = False,
) -> Template:
    """Apply LF's data arguments that change a template (a copy; the registry is untouched).

    Args:
        template: the registered (or tokenizer-derived) template.
        default_system: replaces the template's default system prompt.
        tool_format: replaces the tool format; as in LF, the tool-call slot then becomes the
            plain answer slot (`{{content}}` plus eos unless `efficient_eos`).
        enable_thinking: see `Reasoning`; only reasoning templates read it.
        preserve_thinking: see `Reasoning`; only reasoning templates read it.

    Raises:
        ValueError: an unknown `tool_format`.
    """
    changes: dict[str, Any] = {}
    if default_system is not None:
        changes["default_system"] = default_system
    if tool_format is not None:
        changes["tools"] = get_tool_format(tool_format)
        changes["function"] = (PLACEHOLDER,) if template.efficient_eos else (PLACEHOLDER, EOS)
    if template.reasoning is not None:
        changes["reasoning"] = Reasoning(enable_thinking, preserve_thinking)
    return replace(template, **changes)


def prepare_tokenizer(tokenizer: Any, template: Template) -> list[str]:
    """Give the tokenizer the eos/pad tokens the template trains with, as LLaMA-Factory does.

    A template with `replace_eos` makes its first stop word the eos token (so generation stops at
    the end of a turn); the other stop words become special tokens; a tokenizer without pad pads
    with eos.

    Returns:
        Human-readable notes on what changed (for the log).
    """
    notes: list[str] = []
    stop_words = list(template.stop_words)
    if template.replace_eos:
        new_eos = stop_words.pop(0)
        if tokenizer.eos_token != new_eos:
            tokenizer.add_special_tokens({"eos_token": new_eos})
            notes.append(f"eos token set to {new_eos}")
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
        notes.append("added eos token <|endoftext|>")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(f"pad token set to {tokenizer.eos_token}")
    if stop_words:
        added = tokenizer.add_special_tokens(
            {"additional_special_tokens": stop_words}, replace_extra_special_tokens=False
        )
        if added:
            notes.append(f"stop words added as special tokens: {stop_words}")
    return notes


TOKENIZER_TEMPLATE_NAME = "tokenizer"


def template_from_tokenizer(tokenizer: Any) -> Template:
    """Read a template from the tokenizer's own Jinja `chat_template`, as LF does with no `template`.

    Why LF's way: a config without `template` must train exactly as LLaMA-Factory does, and LF
    derives slots by rendering placeholder conversations (`parse_template`). The tokenizer's
    encode of "" gives the prefix (e.g. BOS); a system, a user turn (with and without an empty
    system, to find a built-in default system) and a user+assistant exchange give the slots; a
    `<think>` in the answer slot makes it a reasoning template. No stop words are taken and eos
    is not replaced, as in LF. Tool calls use the default tool format.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        raise ValueError("the tokenizer has no chat_template; set `template` to a registered name")
    prefix = tokenizer.decode(tokenizer.encode(""))

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation, tokenize=False
        )
        return text[len(prefix) :]

    system_slot = render([{"role": "system", "content": PLACEHOLDER}], False)
    user_with_empty_system = render(
        [{"role": "system", "content": ""}, {"role": "user", "content": PLACEHOLDER}], True
    )
    user_slot = render([{"role": "user", "content": PLACEHOLDER}], True)
    exchange = [
        {"role": "user", "content": PLACEHOLDER},
        {"role": "assistant", "content": PLACEHOLDER},
    ]
    assistant_slot = render(exchange, False)[len(user_slot) :]
    reasoning = Reasoning() if "<think>" in assistant_slot else None
    assistant_slot = assistant_slot.replace("<think>", "").replace("</think>", "").lstrip("\n")
    default_system = ""
    if len(user_slot) > len(user_with_empty_system):
        default_system = _inserted_chars(user_with_empty_system, user_slot)
        user_slot = user_slot[len(system_slot.replace(PLACEHOLDER, default_system, 1)) :]
    return Template(
        name=TOKENIZER_TEMPLATE_NAME,
        user=(user_slot,),
        assistant=(assistant_slot,),
        system=(system_slot,),
        prefix=(prefix,) if prefix else (),
        default_system=default_system,
        reasoning=reasoning,
    )


def _inserted_chars(short: str, long: str) -> str:
    """The characters of `long` skipped while matching `short` in order (LF's `find_diff`)."""
    i, diff = 0, []
    for char in long:
        if i == len(short):
            break
        if short[i] == char:
            i += 1
        else:
            diff.append(char)
    return "".join(diff)


def resolve_template(name: str | None, tokenizer: Any) -> Template:
    """The template a config means: a registered name, else the tokenizer's own (LF's rule).

    With `template` unset, LF parses the tokenizer's chat_template, or falls back to `empty`
    when there is none.

    Raises:
        ValueError: an unknown name.
    """
    if name is not None:
        return get_template(name)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        return template_from_tokenizer(tokenizer)
    return get_template("empty")


# --------------------------------------------------------------------------------------------
# The templates (facts from LLaMA-Factory 0.9.5's registrations).
# --------------------------------------------------------------------------------------------

_CHATML_USER = "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"
_CHATML_ASSISTANT = "{{content}}<|im_end|>\n"
_CHATML_SYSTEM = "<|im_start|>system\n{{content}}<|im_end|>\n"
_QWEN_OBSERVATION = (
    "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
)
_GEMMA_USER = "<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n"
_GEMMA_OBSERVATION = "<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n"
_ANSWER_EOS: Slot = (PLACEHOLDER, EOS)  # LF's default answer slot


def _chatml_family(name: str, **fields: Any) -> Template:
    """The `<|im_start|>role` layout shared by qwen, chatml, yi and intern2."""
    return Template(
        name=name,
        user=(_CHATML_USER,),
        assistant=(_CHATML_ASSISTANT,),
        system=(_CHATML_SYSTEM,),
        **fields,
    )


def _gemma_family(name: str, **fields: Any) -> Template:
    """Gemma's turns; the system text is folded into the first user turn."""
    return Template(
        name=name,
        user=(_GEMMA_USER,),
        assistant=("{{content}}<end_of_turn>\n",),
        system=("{{content}}\n\n",),
        observation=(_GEMMA_OBSERVATION,),
        prefix=(BOS,),
        system_in_user=True,
        **fields,
    )


def _qwen_family(name: str, **fields: Any) -> Template:
    """Qwen 2.5/3: chatml with `<tool_response>` observations and the qwen tool format."""
    return _chatml_family(
        name,
        observation=(_QWEN_OBSERVATION,),
        tools=QwenTools(),
        stop_words=("<|im_end|>",),
        replace_eos=True,
        **fields,
    )


register(
    Template(
        name="default",
        user=("Human: {{content}}", EOS, "\nAssistant:"),
        assistant=("{{content}}", EOS, "\n"),
        system=("System: {{content}}", EOS, "\n"),
    )
)
register(
    Template(name="empty", user=(PLACEHOLDER,), assistant=(PLACEHOLDER,), system=(PLACEHOLDER,))
)
register(
    Template(
        name="alpaca",
        user=("### Instruction:\n{{content}}\n\n### Response:\n",),
        assistant=("{{content}}", EOS, "\n\n"),
        system=(PLACEHOLDER,),
        default_system=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
        ),
    )
)
register(
    Template(
        name="vicuna",
        user=("USER: {{content}} ASSISTANT:",),
        assistant=_ANSWER_EOS,
        system=(PLACEHOLDER,),
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
    )
)
register(
    _qwen_family(
        "qwen",
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    )
)
register(_qwen_family("qwen3", reasoning=Reasoning()))
register(_qwen_family("qwen3_nothink"))
register(
    _chatml_family(
        "chatml",
        observation=("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
        stop_words=("<|im_end|>", "<|im_start|>"),
        replace_eos=True,
    )
)
register(_chatml_family("yi", stop_words=("<|im_end|>",)))
register(
    _chatml_family(
        "intern2",
        prefix=(BOS,),
        default_system=(
            "You are an AI assistant whose name is InternLM (书生·浦语).\n"
            "- InternLM (书生·浦语) is a conversational language model that is developed by "
            "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, "
            "and harmless.\n"
            "- InternLM (书生·浦语) can understand and communicate fluently in the language "
            "chosen by the user such as English and 中文."
        ),
        stop_words=("<|im_end|>",),
    )
)
register(_gemma_family("gemma", stop_words=("<end_of_turn>",), replace_eos=True))
# Gemma 3's text format is Gemma's; LF's gemma3 differs only by its multimodal plugin.
register(_gemma_family("gemma3", stop_words=("<end_of_turn>",), replace_eos=True))
register(_gemma_family("gemma2", stop_words=("<eos>", "<end_of_turn>"), efficient_eos=True))
register(
    Template(
        name="llama3",
        user=(
            "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        assistant=("{{content}}<|eot_id|>",),
        system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
        observation=(
            "<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        tools=Llama3Tools(),
        prefix=(BOS,),
        stop_words=("<|eot_id|>", "<|eom_id|>"),
        replace_eos=True,
    )
)
register(
    Template(
        name="llama2",
        user=(BOS, "[INST] {{content}} [/INST]"),
        assistant=_ANSWER_EOS,
        system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
        system_in_user=True,
    )
)
register(
    Template(
        name="mistral",
        user=("[INST] {{content}}[/INST]",),
        assistant=(" {{content}}", EOS),
        system=("{{content}}\n\n",),
        function=("[TOOL_CALLS] {{content}}", EOS),
        observation=('[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]',),
        tools=MistralTools(),
        prefix=(BOS,),
        system_in_user=True,
    )
)
register(
    Template(
        name="phi",
        user=("<|user|>\n{{content}}<|end|>\n<|assistant|>\n",),
        assistant=("{{content}}<|end|>\n",),
        system=("<|system|>\n{{content}}<|end|>\n",),
        stop_words=("<|end|>",),
        replace_eos=True,
    )
)
register(
    Template(
        name="phi4",
        user=("<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>",),
        assistant=("{{content}}<|im_end|>",),
        system=("<|im_start|>system<|im_sep|>{{content}}<|im_end|>",),
        stop_words=("<|im_end|>",),
        replace_eos=True,
    )
)
register(
    Template(
        name="deepseek",
        user=("User: {{content}}\n\nAssistant:",),
        assistant=_ANSWER_EOS,
        system=("{{content}}\n\n",),
        prefix=(BOS,),
    )
)
register(
    Template(
        name="deepseek3",
        user=("<｜User｜>{{content}}<｜Assistant｜>",),
        assistant=_ANSWER_EOS,
        system=(PLACEHOLDER,),
        prefix=(BOS,),
    )
)
register(
    Template(
        name="glm4",
        user=("<|user|>\n{{content}}<|assistant|>",),
        assistant=("\n{{content}}",),
        system=("<|system|>\n{{content}}",),
        function=(PLACEHOLDER,),
        observation=("<|observation|>\n{{content}}<|assistant|>",),
        tools=Glm4Tools(),
        prefix=("[gMASK]<sop>",),
        stop_words=("<|user|>", "<|observation|>"),
        efficient_eos=True,
    )
)
register(
    Template(
        name="cohere",
        user=(
            "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>"
            "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        ),
        assistant=_ANSWER_EOS,
        system=("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>",),
        prefix=(BOS,),
    )
)
register(
    Template(
        name="falcon",
        user=("User: {{content}}\nFalcon:",),
        assistant=("{{content}}\n",),
        system=(PLACEHOLDER,),
        efficient_eos=True,
    )
)
register(
    Template(
        name="zephyr",
        user=("<|user|>\n{{content}}", EOS, "<|assistant|>\n"),
        assistant=_ANSWER_EOS,
        system=("<|system|>\n{{content}}", EOS),
        default_system="You are Zephyr, a helpful assistant.",
    )
)
register(
    Template(
        name="olmo",
        user=("<|user|>\n{{content}}<|assistant|>\n",),
        assistant=_ANSWER_EOS,
        system=(PLACEHOLDER,),
        prefix=(EOS,),
    )
)
