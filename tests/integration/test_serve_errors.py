"""Bad requests over HTTP: every one gets an OpenAI error body with a 4xx status, never a 500.

Shares the session's Ray cluster and applications with test_serve.py (its fixtures are imported
below), so no extra application starts. Bodies are sent raw (urllib), because the official
client refuses to send most of these.

Run: ``python -m pytest tests/integration/test_serve_errors.py -x -q``
"""

# F811: the tests take the imported session fixtures as parameters, as pytest injects them.
# ruff: noqa: F811

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.integration.test_serve import (  # noqa: F401  (session fixtures shared with this module)
    FILE_KEY,
    MESSAGES,
    WEATHER_TOOL,
    adapter_dir,
    base_args,
    lora_args,
    second_adapter_dir,
    secure_args,
    tool_args,
    tool_model_dir,
    urls,
)

pytestmark = pytest.mark.ray

USER = [{"role": "user", "content": "hi"}]
JSON = {"Content-Type": "application/json"}


def _chat(**fields: object) -> bytes:
    return json.dumps({"model": "tiny", "messages": USER, **fields}).encode()


def _completion(**fields: object) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "Once", **fields}).encode()


# (case id, app, method, route, body, headers, status, param)
CASES = [
    ("malformed-json", "tiny", "POST", "/chat/completions", b'{"model": "tiny", "messages": [', JSON, 400, None),
    ("json-array-body", "tiny", "POST", "/chat/completions", b"[1, 2]", JSON, 400, None),
    ("missing-body", "tiny", "POST", "/chat/completions", b"", JSON, 400, None),
    ("missing-model", "tiny", "POST", "/chat/completions", json.dumps({"messages": USER}).encode(), JSON, 400, "model"),
    ("unknown-model", "tiny", "POST", "/chat/completions", _chat(model="gpt-4o"), JSON, 404, "model"),
    ("empty-messages", "tiny", "POST", "/chat/completions", _chat(messages=[]), JSON, 400, "messages"),
    ("assistant-first", "tiny", "POST", "/chat/completions", _chat(messages=[{"role": "assistant", "content": "a"}, *USER]), JSON, 400, "messages"),
    ("ends-with-assistant", "tiny", "POST", "/chat/completions", _chat(messages=[*USER, {"role": "assistant", "content": "a"}]), JSON, 400, "messages"),
    ("two-user-turns", "tiny", "POST", "/chat/completions", _chat(messages=[*USER, *USER]), JSON, 400, "messages"),
    ("system-not-first", "tiny", "POST", "/chat/completions", _chat(messages=[*USER, {"role": "system", "content": "s"}, *USER]), JSON, 400, "messages"),
    ("unknown-role", "tiny", "POST", "/chat/completions", _chat(messages=[{"role": "robot", "content": "beep"}]), JSON, 400, "messages.0.role"),
    ("non-string-content", "tiny", "POST", "/chat/completions", _chat(messages=[{"role": "user", "content": 42}]), JSON, 400, "messages.0.content"),
    ("image-content", "tiny", "POST", "/chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]), JSON, 400, "messages.0.content"),
    ("prompt-over-context", "tiny", "POST", "/chat/completions", _chat(messages=[{"role": "user", "content": "hello world " * 800}]), JSON, 400, "messages"),
    ("max-tokens-zero", "tiny", "POST", "/chat/completions", _chat(max_tokens=0), JSON, 400, "max_tokens"),
    ("max-tokens-negative", "tiny", "POST", "/chat/completions", _chat(max_completion_tokens=-5), JSON, 400, "max_completion_tokens"),
    ("max-tokens-over-context", "tiny", "POST", "/chat/completions", _chat(max_tokens=100_000), JSON, 400, "max_tokens"),
    ("max-tokens-over-limit", "tiny-secure", "POST", "/chat/completions", _chat(model="tiny-secure", max_tokens=9), {**JSON, "Authorization": f"Bearer {FILE_KEY}"}, 400, "max_tokens"),
    ("n-zero", "tiny", "POST", "/chat/completions", _chat(n=0), JSON, 400, "n"),
    ("n-too-many", "tiny", "POST", "/chat/completions", _chat(n=17), JSON, 400, "n"),
    ("n-with-stream", "tiny", "POST", "/chat/completions", _chat(n=2, stream=True), JSON, 400, "n"),
    ("temperature-negative", "tiny", "POST", "/chat/completions", _chat(temperature=-0.5), JSON, 400, "temperature"),
    ("temperature-string", "tiny", "POST", "/chat/completions", _chat(temperature="hot"), JSON, 400, "temperature"),
    ("top-p-over-one", "tiny", "POST", "/chat/completions", _chat(top_p=1.5), JSON, 400, "top_p"),
    ("top-p-zero", "tiny", "POST", "/chat/completions", _chat(top_p=0), JSON, 400, "top_p"),
    ("stop-wrong-type", "tiny", "POST", "/chat/completions", _chat(stop=7), JSON, 400, "stop"),
    ("stop-empty-string", "tiny", "POST", "/chat/completions", _chat(stop=["ok", ""]), JSON, 400, "stop"),
    ("seed-float", "tiny", "POST", "/chat/completions", _chat(seed=1.5), JSON, 400, "seed"),
    ("logprobs-unsupported", "tiny", "POST", "/chat/completions", _chat(logprobs=True), JSON, 400, "logprobs"),
    ("response-format-unsupported", "tiny", "POST", "/chat/completions", _chat(response_format={"type": "json_object"}), JSON, 400, "response_format"),
    ("tools-without-tool-format", "tiny", "POST", "/chat/completions", _chat(tools=[WEATHER_TOOL]), JSON, 400, "tools"),
    ("tool-choice-required", "tiny-tools", "POST", "/chat/completions", _chat(model="tiny-tools", tools=[WEATHER_TOOL], tool_choice="required"), JSON, 400, "tool_choice"),
    ("tool-result-without-call", "tiny-tools", "POST", "/chat/completions", _chat(model="tiny-tools", messages=[*USER, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "r"}]), JSON, 400, "messages"),
    ("stream-options-without-stream", "tiny", "POST", "/chat/completions", _chat(stream_options={"include_usage": True}), JSON, 400, "stream_options"),
    ("oversize-body", "tiny-secure", "POST", "/chat/completions", _chat(model="tiny-secure", messages=[{"role": "user", "content": "x" * 3_000}]), {**JSON, "Authorization": f"Bearer {FILE_KEY}"}, 413, None),
    ("wrong-content-type", "tiny", "POST", "/chat/completions", _chat(), {"Content-Type": "text/plain"}, 415, None),
    ("form-content-type", "tiny", "POST", "/completions", _completion(), {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
    ("missing-api-key", "tiny-secure", "POST", "/chat/completions", _chat(model="tiny-secure"), JSON, 401, None),
    ("get-on-post-route", "tiny", "GET", "/chat/completions", None, {}, 405, None),
    ("put-on-post-route", "tiny", "PUT", "/completions", _completion(), JSON, 405, None),
    ("unknown-route", "tiny", "POST", "/embeddings", _chat(), JSON, 404, None),
    ("completion-token-ids", "tiny", "POST", "/completions", _completion(prompt=[[1, 2, 3]]), JSON, 400, "prompt"),
    ("completion-empty-prompt", "tiny", "POST", "/completions", _completion(prompt=""), JSON, 400, "prompt"),
    ("completion-unknown-model", "tiny", "POST", "/completions", _completion(model="davinci"), JSON, 404, "model"),
    ("completion-echo-unsupported", "tiny", "POST", "/completions", _completion(echo=True), JSON, 400, "echo"),
    ("completion-best-of-unsupported", "tiny", "POST", "/completions", _completion(best_of=3), JSON, 400, "best_of"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("app", "method", "route", "body", "headers", "status", "param"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_request_gets_an_openai_error_with_a_4xx(
    urls: dict[str, str],
    app: str,
    method: str,
    route: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
    param: str | None,
) -> None:
    request = urllib.request.Request(urls[app] + route, data=body, method=method, headers=headers)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == status
    error = json.loads(err.value.read())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert error["param"] == param


def test_there_are_at_least_twenty_distinct_cases() -> None:
    assert len({case[0] for case in CASES}) == len(CASES) >= 20


def test_the_server_still_answers_after_the_bad_requests(urls: dict[str, str]) -> None:
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 2}).encode()
    request = urllib.request.Request(urls["tiny"] + "/chat/completions", data=body, headers=JSON)
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200
        assert json.loads(resp.read())["choices"][0]["message"]["role"] == "assistant"
