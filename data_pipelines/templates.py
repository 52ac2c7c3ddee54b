"""Chat templates: how a conversation becomes token ids, and the same rules as Jinja.

A template is data (format strings per role, with LLaMA-Factory's facts: slots, default
systems, stop words). Each message is encoded element by element, as LLaMA-Factory does, so the
token ids equal its ids even where tokenizing the joined string would merge differently. Every
template also exports itself as a Jinja `chat_template`, so a served model formats prompts
exactly as training did.

Example:
    >>> template = get_template("qwen")
    >>> pairs = template.encode_pairs(tokenizer, [{"role": "user", "content": "hi"},
    ...                                          {"role": "assistant", "content": "hello"}])
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SpecialToken:
    """A tokenizer special token by attribute name, e.g. `bos_token`."""

    attr: str


# A slot is literal text (with `{{content}}` where the message goes) and special tokens,
# each encoded separately.
Slot = tuple[str | SpecialToken, ...]
BOS = SpecialToken("bos_token")
EOS = SpecialToken("eos_token")


@dataclass(frozen=True)
class Template:
    """One chat format.

    Attributes:
        name: registry name (LLaMA-Factory's).
        user: slot for a user turn; it ends with the assistant header (generation prompt).
        assistant: slot for an assistant turn.
        system: slot for the system prompt.
        prefix: emitted once before the first message (e.g. BOS).
        default_system: system prompt used when a row has none.
        stop_words: strings that end an answer; the first replaces eos when `replace_eos`.
        replace_eos: make stop_words[0] the tokenizer's eos token.
        efficient_eos: eos is appended once at the end and taught on prompt starts.
        system_in_user: the system text is folded into the first user turn (Llama-2 style).
    """

    name: str
    user: Slot
    assistant: Slot
    system: Slot
    prefix: Slot = ()
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    replace_eos: bool = False
    efficient_eos: bool = False
    system_in_user: bool = False

    def encode_pairs(
        self, tokenizer: Any, messages: Sequence[dict[str, str]], system: str | None = None
    ) -> list[tuple[list[int], list[int]]]:
        """Encode alternating user/assistant messages into (prompt ids, answer ids) pairs."""
        encoded = self._encode_messages(tokenizer, messages, system)
        return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded) - 1, 2)]

    def encode_prompt(
        self, tokenizer: Any, messages: Sequence[dict[str, str]], system: str | None = None
    ) -> list[int]:
        """Ids of a conversation that ends with a user turn, ready for generation."""
        return [i for ids in self._encode_messages(tokenizer, messages, system) for i in ids]

    def render(self, tokenizer: Any, messages: Sequence[dict[str, str]], system: str | None = None) -> str:
        """The conversation as text (special tokens written out), as the Jinja export renders it."""
        return "".join(
            "".join(self._element_texts(tokenizer, elements))
            for elements in self._message_elements(messages, system)
        )

    def _encode_messages(
        self, tokenizer: Any, messages: Sequence[dict[str, str]], system: str | None
    ) -> list[list[int]]:
        out: list[list[int]] = []
        for elements in self._message_elements(messages, system):
            ids: list[int] = []
            for element in elements:
                if isinstance(element, SpecialToken):
                    token_id = getattr(tokenizer, f"{element.attr}_id")
                    if token_id is not None:
                        ids.append(token_id)
                elif element:
                    ids += tokenizer.encode(element, add_special_tokens=False)
            out.append(ids)
        return out

    def _message_elements(
        self, messages: Sequence[dict[str, str]], system: str | None
    ) -> list[list[str | SpecialToken]]:
        system_text = system or self.default_system
        result: list[list[str | SpecialToken]] = []
        for index, message in enumerate(messages):
            elements: list[str | SpecialToken] = []
            folded = ""
            if index == 0:
                elements += self.prefix
                if system_text:
                    if self.system_in_user:
                        folded = "".join(_fill(self.system, system_text))
                    else:
                        elements += _fill(self.system, system_text)
            role = message["role"]
            if role == "user":
                elements += _fill(self.user, folded + message["content"])
            elif role == "assistant":
                elements += _fill(self.assistant, message["content"])
            else:
                raise ValueError(f"role `{role}` is not supported by template `{self.name}` yet")
            result.append(elements)
        return result

    @staticmethod
    def _element_texts(tokenizer: Any, elements: Sequence[str | SpecialToken]) -> list[str]:
        return [
            (getattr(tokenizer, e.attr) or "") if isinstance(e, SpecialToken) else e
            for e in elements
        ]

    def to_jinja(self) -> str:
        """This template as a Hugging Face `chat_template` (Jinja) string.

        Roles other than system/user/assistant raise in the template, as they do in training.
        """
        system_block = _jinja_slot(self.system, "system_message")
        lines = [
            "{%- if messages[0]['role'] == 'system' -%}",
            "{%- set system_message = messages[0]['content'] -%}",
            "{%- set loop_messages = messages[1:] -%}",
            "{%- else -%}",
            f"{{%- set system_message = {_jinja_str(self.default_system)} -%}}",
            "{%- set loop_messages = messages -%}",
            "{%- endif -%}",
            _jinja_slot(self.prefix, "''"),
        ]
        if self.system_in_user:
            lines += [
                "{%- for message in loop_messages -%}",
                "{%- set content = message['content'] -%}",
                "{%- if loop.first and system_message -%}",
                "{%- set content = " + _jinja_concat(self.system, "system_message") + " + content -%}",
                "{%- endif -%}",
            ]
        else:
            lines += [
                "{%- if system_message -%}" + system_block + "{%- endif -%}",
                "{%- for message in loop_messages -%}",
                "{%- set content = message['content'] -%}",
            ]
        lines += [
            "{%- if message['role'] == 'user' -%}" + _jinja_slot(self.user, "content"),
            "{%- elif message['role'] == 'assistant' -%}" + _jinja_slot(self.assistant, "content"),
            "{%- else -%}{{ raise_exception('role ' + message['role'] + ' is not supported') }}",
            "{%- endif -%}",
            "{%- endfor -%}",
        ]
        return "".join(lines)


def _fill(slot: Slot, content: str) -> list[str | SpecialToken]:
    return [e.replace("{{content}}", content) if isinstance(e, str) else e for e in slot]


def _jinja_str(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def _jinja_concat(slot: Slot, variable: str) -> str:
    """A Jinja expression concatenating a slot's parts with `variable` for `{{content}}`."""
    parts: list[str] = []
    for element in slot:
        if isinstance(element, SpecialToken):
            parts.append(element.attr)
            continue
        pieces = element.split("{{content}}")
        for i, piece in enumerate(pieces):
            if piece:
                parts.append(_jinja_str(piece))
            if i < len(pieces) - 1:
                parts.append(variable)
    return " + ".join(parts) if parts else "''"


def _jinja_slot(slot: Slot, variable: str) -> str:
    if not slot:
        return ""
    return "{{ " + _jinja_concat(slot, variable) + " }}"


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


def prepare_tokenizer(tokenizer: Any, template: Template) -> list[str]:
    """Give the tokenizer the eos/pad tokens the template trains with, as LLaMA-Factory does.

    A template with `replace_eos` makes its first stop word the eos token (so generation stops at
    the end of a turn); a tokenizer without pad pads with eos.

    Returns:
        Human-readable notes on what changed (for the log).
    """
    notes: list[str] = []
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
        notes.append("added eos token <|endoftext|>")
    stop_words = list(template.stop_words)
    if template.replace_eos and stop_words:
        new_eos = stop_words.pop(0)
        if tokenizer.eos_token != new_eos:
            tokenizer.add_special_tokens({"eos_token": new_eos})
            notes.append(f"eos token set to {new_eos}")
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


register(
    Template(
        name="default",
        user=("Human: {{content}}", EOS, "\nAssistant:"),
        assistant=("{{content}}", EOS, "\n"),
        system=("System: {{content}}", EOS, "\n"),
    )
)
register(
    Template(
        name="empty",
        user=("{{content}}",),
        assistant=("{{content}}",),
        system=("{{content}}",),
    )
)
register(
    Template(
        name="qwen",
        user=("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
        assistant=("{{content}}<|im_end|>\n",),
        system=("<|im_start|>system\n{{content}}<|im_end|>\n",),
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        stop_words=("<|im_end|>",),
        replace_eos=True,
    )
)
register(
    Template(
        name="chatml",
        user=("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
        assistant=("{{content}}<|im_end|>\n",),
        system=("<|im_start|>system\n{{content}}<|im_end|>\n",),
        stop_words=("<|im_end|>", "<|im_start|>"),
        replace_eos=True,
    )
)
register(
    Template(
        name="gemma",
        user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
        assistant=("{{content}}<end_of_turn>\n",),
        system=("{{content}}\n\n",),
        prefix=(BOS,),
        stop_words=("<end_of_turn>",),
        replace_eos=True,
        system_in_user=True,
    )
)
