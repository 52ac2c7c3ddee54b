"""Streaming (server-sent events) and /v1/completions on the served tiny model.

Shares the session's Ray cluster and applications with test_serve.py (its fixtures are imported
below). Streamed answers are checked against the non-streamed ones and against
`TransformersEngine` in this process: streaming must change how text arrives, never what it is.

Run: ``python -m pytest tests/integration/test_serve_chunks.py -x -q``
"""

# F811: the tests take the imported session fixtures as parameters, as pytest injects them.
# ruff: noqa: F811

from __future__ import annotations

import json
import urllib.request

import pytest
from openai import OpenAI

from serve import TransformersEngine

# The same module object pytest loaded (tests/integration is a package): a second copy's
# fixtures could not see that the servers are already running.
from tests.integration.test_serve import (  # noqa: F401  (session fixtures shared with this module)
    GREEDY,
    MESSAGES,
    adapter_dir,
    base_args,
    client,
    engine,
    lora_args,
    second_adapter_dir,
    secure_args,
    tool_args,
    tool_model_dir,
    urls,
)

pytestmark = pytest.mark.ray


def _stream_chat(client: OpenAI, **kwargs: object) -> list:
    return list(
        client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **kwargs)
    )


def test_streamed_deltas_join_to_the_greedy_answer(
    client: OpenAI, engine: TransformersEngine
) -> None:
    expected = client.chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY)
    chunks = _stream_chat(client, **GREEDY)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected.choices[0].message.content == engine.chat(MESSAGES, **GREEDY).text
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1  # really incremental
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == expected.choices[0].finish_reason
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1


def test_include_usage_adds_a_final_usage_chunk(client: OpenAI) -> None:
    expected = client.chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY).usage
    chunks = _stream_chat(client, stream_options={"include_usage": True}, **GREEDY)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == expected.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string_while_streaming_never_leaks_past_the_stop(
    client: OpenAI, engine: TransformersEngine
) -> None:
    full = engine.chat(MESSAGES, temperature=0.0, max_tokens=24).text
    stop = next(
        full[i : i + 3]
        for i in range(1, len(full) - 3)
        if full[i : i + 3].isalpha() and full.find(full[i : i + 3]) == i
    )
    chunks = _stream_chat(client, temperature=0.0, max_tokens=24, stop=[stop])
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == full[: full.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_raw_event_stream_ends_with_done(urls: dict[str, str]) -> None:
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "stream": True, **GREEDY}).encode()
    request = urllib.request.Request(
        urls["tiny"] + "/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in resp.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"]


def test_completions_continue_raw_text(client: OpenAI, engine: TransformersEngine) -> None:
    prompt = "Once upon a time"
    expected = engine.complete(prompt, **GREEDY)
    response = client.completions.create(model="tiny", prompt=prompt, **GREEDY)
    assert expected.text
    assert response.object == "text_completion"
    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == expected.completion_tokens
    as_list = client.completions.create(model="tiny", prompt=[prompt], **GREEDY)
    assert as_list.choices[0].text == expected.text


def test_completions_stream_and_n(client: OpenAI, engine: TransformersEngine) -> None:
    prompt = "The weather today"
    expected = engine.complete(prompt, **GREEDY).text
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == engine.complete(prompt, **GREEDY).completion_tokens
    several = client.completions.create(model="tiny", prompt=prompt, n=2, **GREEDY)
    assert [c.text for c in several.choices] == [expected, expected]
