"""Templates: the exported Jinja renders prompts exactly as the template encodes them.

Conversations are written the way Hugging Face and vLLM pass them to a chat template (tool
calls as `tool_calls`, results as `tool` messages, `tools` as a list); `_canonical` turns them
into LLaMA-Factory's canonical rows (`function`/`observation` roles, JSON content, a tools JSON
string), which is what the template's Python side encodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest
from transformers import AutoTokenizer

from data_pipelines.supervised import SupervisedOptions, encode_supervised
from data_pipelines.templates import (
    TEMPLATES,
    BadMessage,
    Template,
    configure_template,
    get_template,
    prepare_tokenizer,
    resolve_template,
    template_from_tokenizer,
)

WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name, e.g. Zürich"},
            "unit": {"type": "string", "description": "Unit", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "array", "items": {"type": "integer"}, "description": "Days ahead"},
        },
        "required": ["city"],
    },
}
CONVERT = {
    "type": "function",
    "function": {
        "name": "convert_currency",
        "description": "Convert 'money'",
        "parameters": {
            "type": "object",
            "properties": {"amount": {"type": "number", "description": "Amount"}},
            "required": ["amount"],
        },
    },
}
TOOLS = [WEATHER, CONVERT]
THOUGHT = "<think>\nThe user wants a name.\n</think>\n\n"


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "one": ([{"role": "user", "content": "Who are you?"}], None),
    "system": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        None,
    ),
    "multi": (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke about 'quotes' and \\ slashes."},
        ],
        None,
    ),
    "system-multi": (
        [
            {"role": "system", "content": "You are Rayft.\nAnswer in one line."},
            {"role": "user", "content": "Name?"},
            {"role": "assistant", "content": "Rayft."},
            {"role": "user", "content": "Author?"},
        ],
        None,
    ),
    "thoughts": (
        [
            {"role": "user", "content": "Name?"},
            {"role": "assistant", "content": THOUGHT + "Rayft."},
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": THOUGHT,
                "tool_calls": [_call("get_weather", city="Oslo")],
            },
            {"role": "tool", "content": '{"temperature": 3}'},
        ],
        [WEATHER],
    ),
    "tools-system": (
        [
            {"role": "system", "content": "You are a travel helper."},
            {"role": "user", "content": "How warm is Zürich?"},
            {"role": "assistant", "tool_calls": [_call("get_weather", city="Zürich", days=[1, 2])]},
            {"role": "tool", "content": '{"temperature": 21}'},
            {"role": "assistant", "content": "21 °C."},
            {"role": "user", "content": "And 5 CHF in EUR?"},
        ],
        TOOLS,
    ),
    "tool-result": (
        [
            {"role": "user", "content": "Convert 5 CHF."},
            {"role": "assistant", "tool_calls": [_call("convert_currency", amount=5)]},
            {"role": "observation", "content": '{"result": 5.2}'},
        ],
        TOOLS,
    ),
    "parallel": (
        [
            {"role": "user", "content": "Oslo and Rome?"},
            {
                "role": "assistant",
                "tool_calls": [
                    _call("get_weather", city="Oslo"),
                    _call("get_weather", city="Rome"),
                ],
            },
            {"role": "tool", "content": "[3, 19]"},
        ],
        [WEATHER],
    ),
    "empty-tools": ([{"role": "user", "content": "Hi"}], []),
}


def _canonical(messages: list[dict[str, Any]]) -> tuple[list[dict[str, str]], str | None]:
    """Hugging Face chat messages → LLaMA-Factory's canonical turns and system prompt."""
    turns, system = [], None
    for message in messages:
        if message["role"] == "system":
            system = message["content"]
        elif message.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in message["tool_calls"]
            ]
            payload = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            turns.append({"role": "function", "content": (message.get("content") or "") + payload})
        elif message["role"] in ("tool", "observation"):
            turns.append({"role": "observation", "content": message["content"]})
        else:
            turns.append({"role": message["role"], "content": message["content"]})
    return turns, system


def _tokenizer(tiny_tokenizer_dir: Path, template: Template) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prepare_tokenizer(tokenizer, template)
    tokenizer.chat_template = template.to_jinja()
    return tokenizer


def _render_both(template: Template, tokenizer: Any, name: str, **kwargs: Any) -> tuple[str, str]:
    """(the template's own render, the Jinja export's render) of one conversation."""
    messages, tools = CONVERSATIONS[name]
    turns, system = _canonical(messages)
    tools_json = None if tools is None else json.dumps(tools, ensure_ascii=False)
    expected = template.render(tokenizer, turns, system, tools_json)
    rendered = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
    )
    return expected, rendered


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_jinja_export_renders_like_the_template(
    name: str, conversation: str, tiny_tokenizer_dir: Path
) -> None:
    template = get_template(name)
    tokenizer = _tokenizer(tiny_tokenizer_dir, template)
    parallel = any(len(m.get("tool_calls", [])) > 1 for m in CONVERSATIONS[conversation][0])
    if parallel and not template.tools.parallel_calls:
        with pytest.raises(BadMessage, match="parallel"):
            _render_both(template, tokenizer, conversation)
        with pytest.raises(jinja2.TemplateError, match="parallel"):
            tokenizer.apply_chat_template(
                CONVERSATIONS[conversation][0], tools=CONVERSATIONS[conversation][1], tokenize=False
            )
        return
    expected, rendered = _render_both(template, tokenizer, conversation)
    assert rendered == expected


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", [c for c in CONVERSATIONS if c != "parallel"])
def test_jinja_export_tokenizes_like_the_template(
    name: str, conversation: str, tiny_tokenizer_dir: Path
) -> None:
    """Ids of the rendered prompt equal the element-wise encoding (what vLLM feeds the model).

    They could differ where BPE merges across element boundaries; with these conversations
    and the tiny tokenizer every boundary is a special token or a split the tokenizer keeps.
    (`parallel` is left out: glm4 rejects it, which the render test checks.)
    """
    template = get_template(name)
    tokenizer = _tokenizer(tiny_tokenizer_dir, template)
    messages, tools = CONVERSATIONS[conversation]
    turns, system = _canonical(messages)
    tools_json = None if tools is None else json.dumps(tools)
    rendered = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids == template.encode_prompt(tokenizer, turns, system, tools_json)


@pytest.mark.parametrize("enable_thinking", [False, None])
@pytest.mark.parametrize("conversation", ["one", "thoughts", "system-multi"])
def test_thinking_switches_render_alike(
    enable_thinking: bool | None, conversation: str, tiny_tokenizer_dir: Path
) -> None:
    template = configure_template(get_template("qwen3"), enable_thinking=enable_thinking)
    tokenizer = _tokenizer(tiny_tokenizer_dir, template)
    expected, rendered = _render_both(template, tokenizer, conversation)
    assert rendered == expected
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_thinking_can_be_switched_off_at_render_time(tiny_tokenizer_dir: Path) -> None:
    """vLLM's `chat_template_kwargs={"enable_thinking": False}` works as in Qwen's own template."""
    tokenizer = _tokenizer(tiny_tokenizer_dir, get_template("qwen3"))
    off = configure_template(get_template("qwen3"), enable_thinking=False)
    expected, rendered = _render_both(off, tokenizer, "multi", enable_thinking=False)
    assert rendered == expected


def test_history_thoughts_are_kept_when_preserved(tiny_tokenizer_dir: Path) -> None:
    template = configure_template(get_template("qwen3"), preserve_thinking=True)
    tokenizer = _tokenizer(tiny_tokenizer_dir, template)
    expected, rendered = _render_both(template, tokenizer, "thoughts")
    assert rendered == expected
    assert THOUGHT + "Rayft." in rendered


def test_qwen3_history_thoughts_are_dropped_from_prompts(tiny_tokenizer_dir: Path) -> None:
    template = get_template("qwen3")
    tokenizer = _tokenizer(tiny_tokenizer_dir, template)
    expected, _ = _render_both(template, tokenizer, "thoughts")
    assert "<think>" not in expected
    assert "<|im_start|>assistant\nRayft.<|im_end|>" in expected


def test_unknown_template_names_close_ones() -> None:
    with pytest.raises(ValueError, match="did you mean qwen"):
        get_template("qwne")


def test_replace_eos_makes_the_stop_word_eos(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prepare_tokenizer(tokenizer, get_template("gemma"))
    assert tokenizer.eos_token == "<end_of_turn>"
    assert tokenizer.pad_token == "<pad>"


def test_malformed_tool_json_is_a_bad_message(tiny_tokenizer_dir: Path) -> None:
    template = get_template("qwen")
    tokenizer = _tokenizer(tiny_tokenizer_dir, template)
    turns = [{"role": "user", "content": "x"}, {"role": "function", "content": "{not json"}]
    with pytest.raises(BadMessage, match="function call JSON"):
        template.encode_pairs(tokenizer, turns)
    with pytest.raises(BadMessage, match="JSON list"):
        template.encode_pairs(
            tokenizer, turns[:1] + [{"role": "assistant", "content": "y"}], None, "{}"
        )


def test_efficient_eos_templates_refuse_train_on_prompt(tiny_tokenizer_dir: Path) -> None:
    template = get_template("glm4")
    tokenizer = _tokenizer(tiny_tokenizer_dir, template)
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(ValueError, match="train_on_prompt"):
        encode_supervised(
            tokenizer, template, turns, None, SupervisedOptions(64, train_on_prompt=True)
        )


CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize("conversation", ["one", "system", "multi", "system-multi"])
@pytest.mark.parametrize(
    "options", [SupervisedOptions(1024), SupervisedOptions(12, mask_history=True)]
)
def test_tokenizer_chat_template_encodes_like_chatml(
    conversation: str, options: SupervisedOptions, tiny_tokenizer_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = CHATML_JINJA
    parsed = resolve_template(None, tokenizer)
    assert parsed.name == "tokenizer"
    turns, system = _canonical(CONVERSATIONS[conversation][0])
    turns = [*turns, {"role": "assistant", "content": "Fine, thanks."}]
    chatml = get_template("chatml")
    chatml_tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prepare_tokenizer(chatml_tokenizer, chatml)
    prepare_tokenizer(tokenizer, parsed)
    assert encode_supervised(tokenizer, parsed, turns, system, options) == encode_supervised(
        chatml_tokenizer, chatml, turns, system, options
    )


@pytest.mark.parametrize("name", ["qwen", "chatml", "phi4", "qwen3_nothink"])
def test_tokenizer_template_reads_back_an_exported_template(
    name: str, tiny_tokenizer_dir: Path
) -> None:
    """A model exported by rayft and trained again with `template` unset keeps its format."""
    template = get_template(name)
    tokenizer = _tokenizer(tiny_tokenizer_dir, template)
    parsed = template_from_tokenizer(tokenizer)
    assert (parsed.user, parsed.assistant, parsed.system) == (
        template.user,
        template.assistant,
        template.system,
    )
    assert parsed.default_system == template.default_system


def test_tokenizer_template_detects_reasoning(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = CHATML_JINJA.replace(
        "message['content'] + '<|im_end|>'",
        "(('<think>\\n\\n</think>\\n\\n' if message['role'] == 'assistant' else '')"
        " + message['content']) + '<|im_end|>'",
    )
    parsed = template_from_tokenizer(tokenizer)
    assert parsed.reasoning is not None
    assert parsed.assistant == ("{{content}}<|im_end|>\n",)


def test_without_template_or_chat_template_lf_uses_empty(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert resolve_template(None, tokenizer).name == "empty"
