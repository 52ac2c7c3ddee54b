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

import time
import uuid
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]


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


class ChatMessage(_Request):
    """One chat turn as the client sends it.

    ``content`` may also arrive as OpenAI content parts; text parts are joined into one string
    (as OpenAI does) and any other part (images, audio) is rejected.
    """

    role: Role
    content: str

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

    def max_new_tokens(self) -> int | None:
        """The completion budget: ``max_completion_tokens`` wins over the legacy ``max_tokens``."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def plain_messages(self) -> list[dict[str, str]]:
        """Messages as the ``{"role", "content"}`` dicts chat templates expect."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


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


class AssistantMessage(BaseModel):
    """The generated turn."""

    role: Literal["assistant"] = "assistant"
    content: str


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


class DeltaMessage(BaseModel):
    """What a chat stream chunk adds: the role once, then content pieces."""

    role: Literal["assistant"] | None = None
    content: str | None = None


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
