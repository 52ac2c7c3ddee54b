"""Tool calling through the API, without Ray: the prompt a request renders equals training's,
generated calls parse back into OpenAI ``tool_calls``, and conversation order is enforced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipelines.templates import FunctionCall, configure_template, get_template
from serve.args import ServeArgs
from serve.protocol import ProtocolError, parse_chat_request
from serve.tools import EXTRACTORS, ParsedCall, parse_tool_calls

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
CALL_ARGS = {"city": "Paris"}
# The same conversation twice: as an OpenAI client sends it, and in LLaMA-Factory's canonical
# roles as training sees it (function = the assistant's call, observation = the tool result).
OPENAI_MESSAGES = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps(CALL_ARGS)},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
]
TRAINING_MESSAGES = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "function", "content": json.dumps({"name": "get_weather", "arguments": CALL_ARGS})},
    {"role": "observation", "content": '{"temp_c": 21}'},
]


def _request(**fields: object) -> bytes:
    return json.dumps({"model": "tiny", **fields}).encode()


@pytest.mark.parametrize(
    ("template_name", "tool_format"),
    [
        ("qwen", None),
        ("llama3", None),
        ("mistral", None),
        ("glm4", None),
        ("chatml", None),  # the `default` tool format (Action: / Action Input:)
        ("chatml", "qwen"),  # LF's tool_format key swaps the format
    ],
)
def test_served_prompt_with_tools_equals_the_training_template(
    tiny_tokenizer_dir: Path, template_name: str, tool_format: str | None
) -> None:
    from transformers import AutoTokenizer

    from serve.engine import PromptBuilder

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    template = configure_template(get_template(template_name), tool_format=tool_format)
    request = parse_chat_request(
        _request(messages=OPENAI_MESSAGES, tools=[WEATHER_TOOL], tool_choice="auto")
    )
    builder = PromptBuilder(
        ServeArgs(model_path="m", chat_template=template.to_jinja(), tool_format=tool_format),
        tokenizer,
        context_window=None,
    )
    served = builder.render(request.plain_messages(), request.tool_dicts())
    trained = template.render(
        tokenizer,
        TRAINING_MESSAGES,
        system="You are a weather bot.",
        tools=json.dumps([WEATHER_TOOL]),
    )
    assert served == trained
    assert "get_weather" in served


@pytest.mark.parametrize("tool_format", sorted(EXTRACTORS))
def test_calls_written_in_each_format_parse_back(tool_format: str) -> None:
    from data_pipelines.templates import get_tool_format

    fmt = get_tool_format(tool_format)
    calls = [FunctionCall("get_weather", json.dumps(CALL_ARGS))]
    if fmt.parallel_calls:
        calls.append(FunctionCall("get_time", json.dumps({"tz": "Europe/Paris"})))
    text = fmt.format_calls(calls)
    assert parse_tool_calls(tool_format, text) == ("", [ParsedCall(*c) for c in calls])


@pytest.mark.parametrize(
    ("tool_format", "text", "expected"),
    [
        (
            "qwen",
            'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": "é"}}\n</tool_call>',
            ("Let me check.", [ParsedCall("f", '{"a": "é"}')]),
        ),
        (
            "default",
            'Action: f\nAction Input: {"a": 1}',
            ("", [ParsedCall("f", '{"a": 1}')]),
        ),
        ("glm4", 'f\n{"a": 1}', ("", [ParsedCall("f", '{"a": 1}')])),
        ("llama3", '{"name": "f", "parameters": {"a": 1}}', ("", [ParsedCall("f", '{"a": 1}')])),
        ("mistral", '[{"name": "f", "arguments": {}}]', ("", [ParsedCall("f", "{}")])),
    ],
)
def test_known_generated_text_parses(
    tool_format: str, text: str, expected: tuple[str, list[ParsedCall]]
) -> None:
    assert parse_tool_calls(tool_format, text) == expected


@pytest.mark.parametrize(
    ("tool_format", "text"),
    [
        ("qwen", "The weather is fine."),
        ("qwen", "<tool_call>\n{not json}\n</tool_call>"),
        ("qwen", '<tool_call>\n{"name": "f"}\n</tool_call>'),  # no arguments
        ("default", "Action: f\nAction Input: {oops"),
        ("glm4", "just one line"),
        ("llama3", '{"name": "f", "arguments": {}}'),  # llama3 writes `parameters`
        ("mistral", "Sure, here you go."),
    ],
)
def test_text_that_is_no_call_stays_text(tool_format: str, text: str) -> None:
    assert parse_tool_calls(tool_format, text) == (text, [])


def test_unknown_tool_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="no tool-call parser"):
        parse_tool_calls("hermes", "x")


def test_tool_fields_parse_and_map_for_the_template() -> None:
    req = parse_chat_request(_request(messages=OPENAI_MESSAGES, tools=[WEATHER_TOOL]))
    assert req.wants_tools() and req.uses_tools()
    assert req.tool_dicts() == [WEATHER_TOOL]
    assert req.plain_messages()[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    assert req.plain_messages()[3] == {"role": "tool", "content": '{"temp_c": 21}'}
    none = parse_chat_request(
        _request(messages=OPENAI_MESSAGES, tools=[WEATHER_TOOL], tool_choice="none")
    )
    assert (none.wants_tools(), none.tool_dicts(), none.uses_tools()) == (False, None, True)


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tool_choice": "required"}, "tool_choice", "not supported"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "auto"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "function"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools.0.function.name",
            "",
        ),
        ({"tools": "get_weather"}, "tools", ""),
    ],
)
def test_bad_tool_fields_are_rejected(fields: dict, param: str, words: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_chat_request(_request(messages=[{"role": "user", "content": "hi"}], **fields))
    assert err.value.param == param
    assert words in err.value.message


USER = {"role": "user", "content": "u"}
ASSISTANT = {"role": "assistant", "content": "a"}
SYSTEM = {"role": "system", "content": "s"}
TOOL = {"role": "tool", "content": "r", "tool_call_id": "c"}
CALLING = OPENAI_MESSAGES[2]


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([SYSTEM], "no user message"),
        ([ASSISTANT, USER], "must start with user"),
        ([USER, SYSTEM, USER], "system message may only come first"),
        ([USER, USER], "both user turns"),
        ([USER, ASSISTANT, ASSISTANT, USER], "both assistant turns"),
        ([USER, ASSISTANT], "last message is an assistant turn"),
        ([USER, ASSISTANT, TOOL], "does not follow an assistant message with tool_calls"),
        ([USER, TOOL], "tool result"),
        (
            [USER, {"role": "user", "content": "x", "tool_calls": CALLING["tool_calls"]}],
            "only assistant",
        ),
    ],
)
def test_wrongly_ordered_conversations_are_rejected(messages: list[dict], words: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_chat_request(_request(messages=messages))
    assert words in err.value.message
    assert err.value.param is not None and err.value.param.startswith("messages")


@pytest.mark.parametrize(
    "messages",
    [
        [USER],
        [SYSTEM, USER, ASSISTANT, USER],
        [USER, CALLING, TOOL, TOOL],  # parallel calls: one result each
        [USER, CALLING, TOOL, ASSISTANT, USER],
    ],
)
def test_servable_conversations_are_accepted(messages: list[dict]) -> None:
    assert parse_chat_request(_request(messages=messages)).messages


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ],
)
def test_unsupported_parameters_are_400s_naming_them(fields: dict, param: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_chat_request(_request(messages=[USER], **fields))
    assert err.value.param == param
    assert param in err.value.message


def test_harmless_values_of_unsupported_parameters_are_accepted() -> None:
    fields = {
        "logprobs": False,
        "logit_bias": {},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "response_format": {"type": "text"},
        "modalities": ["text"],
    }
    assert parse_chat_request(_request(messages=[USER], **fields)).model == "tiny"
