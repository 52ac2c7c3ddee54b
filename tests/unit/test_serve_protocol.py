"""The OpenAI protocol subset, ServeArgs, API keys and stop strings, without Ray or a model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve.args import ServeArgs
from serve.auth import ApiKeyConfigError, bearer_ok, load_api_keys
from serve.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    ProtocolError,
    parse_chat_request,
    parse_completion_request,
    sse,
)
from serve.text import first_stop, trim_at_stop

REPO_ROOT = Path(__file__).resolve().parents[2]
USER_HI = [{"role": "user", "content": "hi"}]


def _body(**fields: object) -> bytes:
    return json.dumps({"model": "tiny", "messages": USER_HI, **fields}).encode()


def _rejected(body: bytes | str) -> ProtocolError:
    with pytest.raises(ProtocolError) as err:
        parse_chat_request(body)
    return err.value


def test_minimal_request_has_openai_defaults() -> None:
    req = parse_chat_request(_body())
    assert (req.model, req.n, req.stream, req.stop, req.max_new_tokens()) == (
        "tiny",
        1,
        False,
        [],
        None,
    )
    assert req.plain_messages() == USER_HI


def test_unknown_fields_are_ignored_not_errors() -> None:
    # What the official clients send besides the fields we implement.
    req = parse_chat_request(
        _body(
            user="u1", metadata={"a": "b"}, stream_options=None, logit_bias={}, frequency_penalty=0
        )
    )
    assert req.model == "tiny"
    msg = parse_chat_request(
        _body(messages=[{"role": "user", "content": "hi", "name": "ann"}])
    ).messages[0]
    assert msg.content == "hi"


def test_text_content_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    req = parse_chat_request(_body(messages=[{"role": "user", "content": parts}]))
    assert req.plain_messages() == [{"role": "user", "content": "Hello, world"}]


def test_non_text_content_parts_are_rejected() -> None:
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    err = _rejected(_body(messages=[{"role": "user", "content": image}]))
    assert err.param == "messages.0.content"
    assert "only text content parts are supported" in err.message


def test_n_and_stream_are_accepted() -> None:
    assert parse_chat_request(_body(n=3)).n == 3
    req = parse_chat_request(_body(stream=True, stream_options={"include_usage": True}))
    assert (req.stream, req.include_usage()) == (True, True)
    assert parse_chat_request(_body(stream=True)).include_usage() is False
    assert parse_chat_request(_body(stream=False)).stream is False


def test_n_with_stream_is_rejected_naming_n() -> None:
    err = _rejected(_body(n=2, stream=True))
    assert err.param == "n"
    assert "n=2 is not supported with stream=true" in err.message


def test_n_is_capped() -> None:
    err = _rejected(_body(n=17))
    assert err.param == "n"


def test_sampling_collects_the_engine_arguments() -> None:
    req = parse_chat_request(_body(max_completion_tokens=4, temperature=0, stop="x", seed=1, n=2))
    assert req.sampling() == {
        "max_tokens": 4,
        "temperature": 0.0,
        "top_p": None,
        "stop": ["x"],
        "seed": 1,
        "n": 2,
    }


def test_completion_request_takes_one_prompt() -> None:
    def body(**fields: object) -> bytes:
        return json.dumps({"model": "tiny", **fields}).encode()

    assert parse_completion_request(body(prompt="Once")).prompt == "Once"
    assert parse_completion_request(body(prompt=["Once"])).prompt == "Once"
    for bad in (["a", "b"], [[1, 2]], [], 3):
        with pytest.raises(ProtocolError) as err:
            parse_completion_request(body(prompt=bad))
        assert err.value.param == "prompt"
    with pytest.raises(ProtocolError) as err:
        parse_completion_request(body())
    assert err.value.param == "prompt"
    req = parse_completion_request(body(prompt="x", max_tokens=3, stream=True))
    assert (req.max_new_tokens(), req.stream) == (3, True)


def test_stream_chunks_are_server_sent_events() -> None:
    chunk = ChatCompletionChunk.model_validate(
        {
            "id": "chatcmpl-1",
            "created": 1,
            "model": "tiny",
            "choices": [{"index": 0, "delta": {"content": "hi"}}],
        }
    )
    event = sse(chunk)
    assert event.startswith("data: ") and event.endswith("\n\n")
    body = json.loads(event.removeprefix("data: "))
    assert body["object"] == "chat.completion.chunk"
    assert body["choices"][0]["delta"]["content"] == "hi"
    assert body["choices"][0]["finish_reason"] is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "0.5"}, "temperature"),  # types are validated, not coerced
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"n": 0}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"seed": 1.5}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ["ok", 3]}, "stop.1"),
        ({"stop": 3}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"model": 3}, "model"),
    ],
)
def test_invalid_fields_name_the_field(fields: dict[str, object], param: str) -> None:
    err = _rejected(_body(**fields))
    assert err.param == param
    assert f"'{param}'" in err.message


def test_every_bad_field_is_reported_together() -> None:
    err = _rejected(_body(n=0, stream="yes", temperature=-1))
    assert err.param == "temperature"
    for name in ("'n'", "'stream'", "'temperature'"):
        assert name in err.message


def test_missing_model_is_rejected() -> None:
    err = _rejected(json.dumps({"messages": USER_HI}))
    assert err.param == "model"


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_bodies_that_are_not_json_objects_are_rejected(body: bytes) -> None:
    err = _rejected(body)
    assert err.param is None
    assert err.message.startswith("invalid request:")


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert parse_chat_request(_body(max_tokens=9)).max_new_tokens() == 9
    assert parse_chat_request(_body(max_tokens=9, max_completion_tokens=4)).max_new_tokens() == 4


def test_stop_may_be_a_string_or_a_list() -> None:
    assert parse_chat_request(_body(stop="###")).stop == ["###"]
    assert parse_chat_request(_body(stop=["a", "b"])).stop == ["a", "b"]


def test_response_has_the_openai_shape() -> None:
    body = ChatCompletionResponse.model_validate(
        {
            "model": "tiny",
            "choices": [
                {"index": 0, "message": {"content": "ok"}, "finish_reason": "length"},
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
    ).model_dump()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "ok"}


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("Paris.\nUser: and Rome?", ["\nUser:"], ("Paris.", True)),
        ("no stop here", ["###"], ("no stop here", False)),
        ("a###b<end>c", ["<end>", "###"], ("a", True)),  # earliest position wins, not list order
        ("###rest", ["###"], ("", True)),
        ("abc", [], ("abc", False)),
        ("abc", [""], ("abc", False)),  # an empty stop would cut everything: ignored
        ("xx<end", ["<end>"], ("xx<end", False)),  # a partial stop is not a stop
    ],
)
def test_trim_at_stop(text: str, stops: list[str], expected: tuple[str, bool]) -> None:
    assert trim_at_stop(text, stops) == expected
    assert (first_stop(text, stops) >= 0) is expected[1]


def test_serve_args_name_defaults_to_the_basename() -> None:
    assert ServeArgs(model_path="saves/qwen2-sft/merged/").model_name == "merged"
    assert ServeArgs(model_path="Qwen/Qwen2.5-0.5B-Instruct").model_name == "Qwen2.5-0.5B-Instruct"
    with_adapter = ServeArgs(model_path="Qwen/Qwen2.5-0.5B", adapter_path="saves/lora-sft")
    assert with_adapter.model_name == "lora-sft"
    assert ServeArgs(model_path="m", model_name="prod").model_name == "prod"


def test_serve_args_defaults_are_safe() -> None:
    args = ServeArgs(model_path="m")
    assert (args.host, args.port, args.route_prefix) == ("127.0.0.1", 8000, "/")
    assert (args.dtype, args.trust_remote_code, args.max_new_tokens) == ("auto", False, 512)


def test_serve_args_are_frozen_and_strict() -> None:
    args = ServeArgs(model_path="m")
    with pytest.raises(ValidationError):
        args.port = 9000  # type: ignore[misc]
    with pytest.raises(ValidationError, match="prot"):
        ServeArgs(model_path="m", prot=9000)
    with pytest.raises(ValidationError, match="route_prefix"):
        ServeArgs(model_path="m", route_prefix="v1")
    with pytest.raises(ValidationError, match="num_cpus_per_replica"):
        ServeArgs(model_path="m", num_cpus_per_replica=0)
    with pytest.raises(ValidationError, match="stop_words"):
        ServeArgs(model_path="m", stop_words=["<end_of_turn>", ""])
    with pytest.raises(ValidationError, match="dtype"):
        ServeArgs(model_path="m", dtype="fp8")


def test_protocol_and_args_do_not_import_torch_or_ray() -> None:
    # The CLI validates arguments and request bodies before anything heavy is loaded.
    code = (
        "import sys, serve, serve.args, serve.protocol, serve.text, serve.auth, serve.engines; "
        "heavy = sorted({'torch', 'ray', 'transformers'} & set(sys.modules)); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_serve_args_replicas_or_autoscaling() -> None:
    assert ServeArgs(model_path="m", num_replicas=3).num_replicas == 3
    auto = ServeArgs(model_path="m", autoscaling={"min_replicas": 1, "max_replicas": 4})
    assert (auto.autoscaling.max_replicas, auto.autoscaling.target_ongoing_requests) == (4, 2.0)
    with pytest.raises(ValidationError, match="exclusive"):
        ServeArgs(model_path="m", num_replicas=2, autoscaling={"max_replicas": 2})
    with pytest.raises(ValidationError, match="min_replicas=3 exceeds max_replicas=2"):
        ServeArgs(model_path="m", autoscaling={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValidationError, match="max_replicass"):
        ServeArgs(model_path="m", autoscaling={"max_replicass": 2})


def test_serve_args_limits_and_engine() -> None:
    args = ServeArgs(model_path="m")
    assert (args.engine, args.max_tokens_limit, args.api_keys_file, args.api_keys_env) == (
        "auto",
        None,
        None,
        None,
    )
    with pytest.raises(ValidationError, match="max_new_tokens=512 exceeds max_tokens_limit=64"):
        ServeArgs(model_path="m", max_tokens_limit=64)
    with pytest.raises(ValidationError, match="engine"):
        ServeArgs(model_path="m", engine="tgi")


def test_api_keys_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nsk-a\n\n  sk-b  \n")
    monkeypatch.setenv("RAYFT_UNIT_KEYS", "sk-c, sk-d,")
    assert load_api_keys(ServeArgs(model_path="m")) is None
    assert load_api_keys(ServeArgs(model_path="m", api_keys_file=str(keys_file))) == {
        "sk-a",
        "sk-b",
    }
    both = ServeArgs(model_path="m", api_keys_file=str(keys_file), api_keys_env="RAYFT_UNIT_KEYS")
    assert load_api_keys(both) == {"sk-a", "sk-b", "sk-c", "sk-d"}


def test_api_key_misconfiguration_refuses_to_serve_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAYFT_UNIT_UNSET", raising=False)
    with pytest.raises(ApiKeyConfigError, match="RAYFT_UNIT_UNSET, which is not set"):
        load_api_keys(ServeArgs(model_path="m", api_keys_env="RAYFT_UNIT_UNSET"))
    with pytest.raises(ApiKeyConfigError, match="cannot be read"):
        load_api_keys(ServeArgs(model_path="m", api_keys_file=str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.write_text("# no keys yet\n")
    with pytest.raises(ApiKeyConfigError, match="none was found"):
        load_api_keys(ServeArgs(model_path="m", api_keys_file=str(empty)))


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer sk-a", True),
        ("bearer sk-a", True),
        ("Bearer  sk-a ", True),
        ("Bearer sk-b", False),
        ("Bearer sk-", False),
        ("Basic sk-a", False),
        ("sk-a", False),
        ("", False),
        (None, False),
    ],
)
def test_bearer_ok(header: str | None, ok: bool) -> None:
    assert bearer_ok(header, frozenset({"sk-a"})) is ok
