"""The subset of the OpenAI chat-completions and completions protocol that rayft serves.

Requests are validated strictly on types (a string where a number belongs is an error, not a
coercion) but unknown fields are ignored, because the official clients send fields we do not
implement (``user``, ``metadata`` …) and must keep working. Features we do not implement but
whose silent omission would change the answer (``n > 1`` while streaming, several prompts) are
rejected with a 400 that names the field, never faked.

Streams are server-sent events: one ``data: <chunk JSON>`` per event, ended by ``data: [DONE]``.

Example:
    >>> req = parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    >>> req.max_new_tokens() is None
    True
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls"]

# Fields of the OpenAI API that rayft does not implement and whose omission would change the
# answer: each maps to the test of a value that is a no-op (accepted) — anything else is a 400.
_UNSUPPORTED: dict[str, Callable[[object], bool]] = {
    "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none", "auto"),
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "best_of": lambda v: v in (None, 1),
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: not v,
}


class ProtocolError(ValueError):
    """A request that breaks the protocol: answered with HTTP 400 and an OpenAI error body.

    Attributes:
        message: what is wrong and how to fix it.
        param: the offending request field in dotted form (``messages.0.role``), if one is.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class _Request(BaseModel):
    # strict: no str -> number or str -> bool coercion; ignore: clients send fields we lack.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class FunctionCallSpec(_Request):
    """``tool_calls[].function`` of an assistant message: arguments are JSON text."""

    name: Annotated[str, Field(min_length=1)]
    arguments: str


class ToolCallSpec(_Request):
    """One tool call of an earlier assistant turn, as the client sends it back."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallSpec


class FunctionSpec(_Request):
    """``tools[].function``: a function the model may call (a JSON schema of its parameters)."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: str | None = None
    parameters: dict | None = None


class ToolSpec(_Request):
    """One entry of ``tools``."""

    type: Literal["function"]
    function: FunctionSpec


class ChatMessage(_Request):
    """One chat turn as the client sends it.

    ``content`` may also arrive as OpenAI content parts; text parts are joined into one string
    (as OpenAI does) and any other part (images, audio) is rejected. An assistant turn that made
    tool calls carries them in ``tool_calls`` (its content may then be null); a ``tool`` turn is
    a tool's result.
    """

    role: Role
    content: str
    tool_calls: list[ToolCallSpec] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _calls_may_have_no_content(cls, data: object) -> object:
        if (
            isinstance(data, dict)
            and data.get("role") == "assistant"
            and data.get("tool_calls")
            and data.get("content") is None
        ):
            return {**data, "content": ""}
        return data

    @model_validator(mode="after")
    def _calls_only_from_the_assistant(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError(
                "tool_calls_role", "only assistant messages may carry tool_calls", {}
            )
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, content: object) -> object:
        # Normalising here (not a `str | list[...]` union) keeps error locations plain field
        # paths: pydantic would add the union member's type to every location.
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise PydanticCustomError(
                    "unsupported_content",
                    "only text content parts are supported, got {kind!r}",
                    {"kind": kind},
                )
            if not isinstance(part.get("text"), str):
                raise PydanticCustomError("text_part", "a text part needs a string 'text'", {})
            texts.append(part["text"])
        return "".join(texts)


MAX_N = 16


class StreamOptions(_Request):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class _SamplingRequest(_Request):
    """Fields chat completions and completions share."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: object) -> object:
        # Checked before field validation, so the 400 names the unsupported field first.
        if isinstance(data, dict):
            for name, harmless in _UNSUPPORTED.items():
                if name in data and not harmless(data[name]):
                    raise PydanticCustomError(
                        "unsupported",
                        "'{param}' is not supported by this server (got {value}): remove it",
                        {"param": name, "value": json.dumps(data[name])[:80]},
                    )
        return data

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _one_choice_when_streaming(self) -> _SamplingRequest:
        if self.stream and self.n != 1:
            raise PydanticCustomError(
                "unsupported",
                "n={n} is not supported with stream=true: stream one choice (n=1) per request",
                {"n": self.n, "param": "n"},
            )
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError(
                "stream_options",
                "stream_options is only allowed with stream=true",
                {"param": "stream_options"},
            )
        return self

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, stop: object) -> object:
        # The protocol allows a bare string or null; a list keeps one shape downstream.
        if stop is None:
            return []
        return [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise PydanticCustomError("empty_stop", "stop strings must not be empty", {})
        return stop

    def sampling(self) -> dict[str, object]:
        """The engine's sampling keyword arguments (``max_tokens`` … ``n``)."""
        return {
            "max_tokens": self.max_new_tokens(),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
            "n": self.n,
        }

    def max_new_tokens(self) -> int | None:
        """The completion budget the request asks for."""
        return self.max_tokens


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions`` body."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _supported_tool_choice(cls, choice: object) -> object:
        if choice is not None and choice not in ("none", "auto"):
            raise PydanticCustomError(
                "tool_choice",
                "tool_choice {choice} is not supported: use 'auto' (the model decides) or 'none'",
                {"choice": json.dumps(choice)[:80]},
            )
        return choice

    @model_validator(mode="after")
    def _conversation_order(self) -> ChatCompletionRequest:
        problem = conversation_problem([m.role for m in self.messages], self.messages)
        if problem is not None:
            raise PydanticCustomError("message_order", problem, {"param": "messages"})
        return self

    def wants_tools(self) -> bool:
        """Whether the model is offered tools (and so its answer is parsed for tool calls)."""
        return bool(self.tools) and self.tool_choice != "none"

    def uses_tools(self) -> bool:
        """Whether the request needs a tool format: tools offered, or tool turns in history."""
        return bool(self.tools) or any(m.role == "tool" or m.tool_calls for m in self.messages)

    def tool_dicts(self) -> list[dict] | None:
        """``tools`` as the chat template reads them (None when the model is not offered any)."""
        if not self.wants_tools():
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def max_new_tokens(self) -> int | None:
        """The completion budget: ``max_completion_tokens`` wins over the legacy ``max_tokens``."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def plain_messages(self) -> list[dict]:
        """Messages as the dicts chat templates expect: ``{"role", "content"}``, plus
        ``tool_calls`` (name and JSON arguments) on assistant turns that called tools."""
        out: list[dict] = []
        for m in self.messages:
            message: dict = {"role": m.role, "content": m.content}
            if m.tool_calls:
                message["tool_calls"] = [
                    {"type": "function", "function": c.function.model_dump()} for c in m.tool_calls
                ]
            out.append(message)
        return out


def conversation_problem(roles: list[str], messages: list[ChatMessage]) -> str | None:
    """What is wrong with the order of a conversation's roles, or None when it is servable.

    The rule is what chat templates are trained on (LLaMA-Factory's): an optional system
    message first, then queries (``user``, or the ``tool`` results answering the previous
    assistant turn's tool calls) and ``assistant`` answers alternate, starting and ending with a
    query, so that the model answers the last one.
    """
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        return "a system message may only come first: merge it into the first message"
    if not body:
        return "the conversation has no user message: add one after the system message"
    if body[0] != "user":
        return f"after the system message the conversation must start with user, not {body[0]}"
    offset = len(roles) - len(body)
    for i in range(1, len(body)):
        prev, role = body[i - 1], body[i]
        if role == "assistant" and prev == "assistant":
            return f"messages {offset + i - 1} and {offset + i} are both assistant turns"
        if role == "user" and prev == "user":
            return (
                f"messages {offset + i - 1} and {offset + i} are both user turns: user and "
                "assistant turns must alternate (join consecutive user messages)"
            )
        if role == "tool" and not (
            prev == "tool" or (prev == "assistant" and messages[offset + i - 1].tool_calls)
        ):
            return (
                f"message {offset + i} is a tool result but does not follow an assistant "
                "message with tool_calls"
            )
    if body[-1] == "assistant":
        return (
            "the last message is an assistant turn: end with a user (or tool) message for the "
            "model to answer"
        )
    return None


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions`` body: one prompt, continued as raw text (no chat template)."""

    prompt: str

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: object) -> object:
        # The protocol allows a batch of prompts; one prompt per request keeps choices simple.
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise PydanticCustomError(
                    "one_prompt",
                    "prompt must be a string or a list of exactly one string (token ids and "
                    "several prompts are not supported: send one request per prompt)",
                    {},
                )
            return prompt[0]
        return prompt


def parse_completion_request(body: bytes | str) -> CompletionRequest:
    """Parse and validate a completions body.

    Raises:
        ProtocolError: as for `parse_chat_request`.
    """
    try:
        return CompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _protocol_error(exc) from exc


def parse_chat_request(body: bytes | str) -> ChatCompletionRequest:
    """Parse and validate a chat-completions body.

    Args:
        body: the raw JSON request body.

    Returns:
        The validated request.

    Raises:
        ProtocolError: the body is not a JSON object, or a field is missing or invalid; the
            message lists every problem and ``param`` names the first offending field.
    """
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _protocol_error(exc) from exc


def _protocol_error(exc: ValidationError) -> ProtocolError:
    """Turn pydantic's errors into one OpenAI-style message naming every bad field."""
    errors = exc.errors(include_url=False)
    # Whole-request checks have no location: they name their field in the error's context.
    params = [
        ".".join(str(part) for part in err["loc"]) or (err.get("ctx") or {}).get("param", "")
        for err in errors
    ]
    details = "; ".join(
        f"'{param}': {err['msg']}" if param else err["msg"]
        for param, err in zip(params, errors, strict=True)
    )
    return ProtocolError(f"invalid request: {details}", param=params[0] or None)


class ErrorDetail(BaseModel):
    """The ``error`` object of an OpenAI error body."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """An OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class FunctionCallOut(BaseModel):
    """The function a generated tool call names, with its arguments as JSON text."""

    name: str
    arguments: str


class ToolCallOut(BaseModel):
    """One generated tool call (``index`` is set in stream deltas only)."""

    index: int | None = None
    id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: Literal["function"] = "function"
    function: FunctionCallOut


class _OmitNoToolCalls(BaseModel):
    """Leaves ``tool_calls`` out of the JSON when there are none (as OpenAI does)."""

    @model_serializer(mode="wrap")
    def _drop_empty_calls(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class AssistantMessage(_OmitNoToolCalls):
    """The generated turn: text, or (``finish_reason: tool_calls``) tool calls."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    """One generated choice."""

    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class Usage(BaseModel):
    """Token counts: prompt as rendered by the chat template, completion as generated."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    """``POST /v1/chat/completions`` answer."""

    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "rayft"


class ModelList(BaseModel):
    """``GET /v1/models`` answer."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class DeltaMessage(_OmitNoToolCalls):
    """What a chat stream chunk adds: the role once, then content pieces."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a chat stream chunk."""

    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    """One generated completion choice (also the choice of a completion stream chunk)."""

    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    """``POST /v1/completions`` answer; streamed chunks share its shape."""

    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


def sse(chunk: BaseModel) -> str:
    """One server-sent event carrying `chunk` as JSON (``usage`` kept even when null)."""
    return f"data: {chunk.model_dump_json()}\n\n"


SSE_DONE = "data: [DONE]\n\n"
