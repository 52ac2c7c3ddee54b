"""The subset of the OpenAI chat-completions protocol that rayft serves.

Requests are validated strictly on types (a string where a number belongs is an error, not a
coercion) but unknown fields are ignored, because the official clients send fields we do not
implement (``stream_options``, ``user``, ``metadata`` …) and must keep working. Features we do
not implement yet but whose silent omission would change the answer (``n > 1``, streaming) are
rejected with a 400 that names the field, never faked.

Example:
    >>> req = parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    >>> req.max_new_tokens() is None
    True
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
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


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions`` body."""

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    stream: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise PydanticCustomError(
                "unsupported", "n={n} is not supported yet: only n=1 (one choice)", {"n": n}
            )
        return n

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, stream: bool) -> bool:
        if stream:
            raise PydanticCustomError(
                "unsupported", "streaming is not supported yet: send stream=false", {}
            )
        return stream

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
    params = [".".join(str(part) for part in err["loc"]) for err in errors]
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
    """One generated choice (rayft produces exactly one)."""

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
