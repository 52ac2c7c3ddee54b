"""Templates: the exported Jinja renders prompts exactly as the template encodes them."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data_pipelines.templates import TEMPLATES, get_template, prepare_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 'quotes' and \\ slashes."},
    ],
    [
        {"role": "system", "content": "You are Rayft.\nAnswer in one line."},
        {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Rayft."},
        {"role": "user", "content": "Author?"},
    ],
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one", "system", "multi", "system-multi"])
def test_jinja_export_renders_like_the_template(
    name: str, messages: list[dict[str, str]], tiny_tokenizer_dir: Path
) -> None:
    template = get_template(name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prepare_tokenizer(tokenizer, template)
    tokenizer.chat_template = template.to_jinja()
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    expected = template.render(tokenizer, turns, system)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == expected
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids == template.encode_prompt(tokenizer, turns, system)


def test_unknown_template_names_close_ones() -> None:
    with pytest.raises(ValueError, match="did you mean qwen"):
        get_template("qwne")


def test_replace_eos_makes_the_stop_word_eos(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prepare_tokenizer(tokenizer, get_template("gemma"))
    assert tokenizer.eos_token == "<end_of_turn>"
    assert tokenizer.pad_token == "<pad>"
