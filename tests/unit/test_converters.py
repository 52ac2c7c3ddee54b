"""Converters: parity with LLaMA-Factory 0.9.5's aligned rows, and one reason per bad row (no Ray).

The goldens come from `tests/goldens/generate_lf_converted.py` (LF's own loader + converter).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from data_pipelines.converters import (
    ANSWER_ROLES,
    CONVERTERS,
    BadRow,
    Conversation,
    convert_alpaca,
    convert_row,
)
from data_pipelines.dataset_info import Columns, RowFormat, Tags, parse_entry, resolve_dataset

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests/goldens/lf095_converted.json").read_text(encoding="utf-8"))
DEMO_DATASETS = (
    "alpaca_en_demo",
    "identity",
    "dpo_en_demo",
    "kto_en_demo",
    "c4_demo",
    "glaive_toolcall_en_demo",
)
EMPTY_ANSWER = {"role": "assistant", "content": ""}


def lf_view(conversation: Conversation) -> dict[str, Any]:
    """A conversation in LF's aligned layout (`_prompt`, `_response`, `_system`, `_tools`)."""
    messages = conversation.messages
    if conversation.chosen is not None:
        prompt, response = messages, [conversation.chosen, conversation.rejected]
    elif messages[-1]["role"] in ANSWER_ROLES:
        prompt, response = messages[:-1], messages[-1:]
    else:
        prompt, response = messages, []
    if conversation.kto_tag is not None:  # LF marks KTO rows with an empty second answer
        response = response + [EMPTY_ANSWER] if conversation.kto_tag else [EMPTY_ANSWER] + response
    return {
        "_prompt": prompt,
        "_response": response,
        "_system": conversation.system or "",
        "_tools": conversation.tools or "",
    }


def lf_openai_system(system: str, tools: str) -> str:
    """LF 0.9.5's openai converter appends a Nemotron switch to the system prompt; rayft does not."""
    if not tools:
        if not system:
            return "detailed thinking off"
        return system + "\ndetailed thinking off"
    return system + "\n" if system else system


def _golden_rows(name: str) -> list[dict[str, Any]]:
    return [
        {**row, "_system": row["_system"] or "", "_tools": row["_tools"] or ""}
        for row in GOLDEN["datasets"][name]["rows"]
    ]


@cache
def _file_rows(path: str) -> list[dict[str, Any]]:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def test_goldens_cover_every_demo_dataset_and_formatting() -> None:
    assert GOLDEN["llamafactory_version"] == "0.9.5"
    assert set(DEMO_DATASETS) <= set(GOLDEN["datasets"])
    formattings = {
        entry["entry"].get("formatting", "alpaca")
        for entry in GOLDEN["datasets"].values()
        if "entry" in entry
    }
    assert formattings == set(CONVERTERS) == {"alpaca", "sharegpt", "openai"}


@pytest.mark.parametrize(
    "name", [name for name, d in GOLDEN["datasets"].items() if d["dataset_dir"] is not None]
)
def test_file_datasets_equal_llamafactory(name: str) -> None:
    spec = resolve_dataset(name, ROOT / GOLDEN["datasets"][name]["dataset_dir"])
    rows = _file_rows(spec.files[0])
    expected = _golden_rows(name)
    assert len(expected) == min(len(rows), GOLDEN["rows_per_dataset"])
    for golden in expected:
        ours = lf_view(convert_row(rows[golden["index"]], spec.row_format))
        assert ours == {key: golden[key] for key in ours}, f"{name} row {golden['index']}"


@pytest.mark.parametrize(
    "name", [name for name, d in GOLDEN["datasets"].items() if d["dataset_dir"] is None]
)
def test_inline_datasets_equal_llamafactory(name: str, tmp_path: Path) -> None:
    data = GOLDEN["datasets"][name]
    (tmp_path / data["entry"]["file_name"]).write_text(json.dumps(data["source_rows"]))
    spec = parse_entry(name, data["entry"], tmp_path)
    for golden in _golden_rows(name):
        ours = lf_view(convert_row(data["source_rows"][golden["index"]], spec.row_format))
        if spec.row_format.formatting == "openai":
            ours["_system"] = lf_openai_system(ours["_system"], ours["_tools"])
        assert ours == {key: golden[key] for key in ours}, f"{name} row {golden['index']}"


@pytest.mark.parametrize("name", DEMO_DATASETS)
def test_every_demo_row_converts(name: str) -> None:
    spec = resolve_dataset(name, ROOT / "data")
    rows = _file_rows(spec.files[0])
    conversations = [convert_row(row, spec.row_format) for row in rows]
    assert len(conversations) == len(rows) >= 91


def test_kinds_of_rows() -> None:
    dpo = resolve_dataset("dpo_en_demo", ROOT / "data")
    row = _file_rows(dpo.files[0])[0]
    pair = convert_row(row, dpo.row_format)
    assert pair.chosen == {"role": "assistant", "content": row["chosen"]["value"]}
    assert pair.messages[-1]["role"] == "user" and pair.kto_tag is None
    kto = resolve_dataset("kto_en_demo", ROOT / "data")
    labels = {convert_row(r, kto.row_format).kto_tag for r in _file_rows(kto.files[0])}
    assert labels == {True, False}
    c4 = resolve_dataset("c4_demo", ROOT / "data")
    text = convert_row(_file_rows(c4.files[0])[0], c4.row_format)
    assert [m["role"] for m in text.messages] == ["user"] and text.chosen is None
    tools = resolve_dataset("glaive_toolcall_en_demo", ROOT / "data")
    roles = {
        m["role"]
        for r in _file_rows(tools.files[0])
        for m in convert_row(r, tools.row_format).messages
    }
    assert roles == {"user", "assistant", "function", "observation"}


SHAREGPT = RowFormat(formatting="sharegpt", columns=Columns(system="system", tools="tools"))
SHAREGPT_RANKING = RowFormat(
    formatting="sharegpt", ranking=True, columns=Columns(chosen="chosen", rejected="rejected")
)
SHAREGPT_KTO = RowFormat(formatting="sharegpt", columns=Columns(kto_tag="label"))
OPENAI = RowFormat(
    formatting="openai",
    columns=Columns(messages="messages", tools="tools"),
    tags=Tags(
        role_tag="role",
        content_tag="content",
        user_tag="user",
        assistant_tag="assistant",
        observation_tag="tool",
        function_tag=None,
        system_tag="system",
    ),
)
ALPACA = RowFormat(columns=Columns(history="history", system="system"))
ALPACA_RANKING = RowFormat(ranking=True, columns=Columns(chosen="chosen", rejected="rejected"))
ALPACA_KTO = RowFormat(columns=Columns(kto_tag="label"))


def h(value: str) -> dict[str, str]:
    return {"from": "human", "value": value}


def g(value: str) -> dict[str, str]:
    return {"from": "gpt", "value": value}


# (row format, row, reason): one line per distinct malformation.
BAD_ROWS: list[tuple[RowFormat, dict[str, Any], str]] = [
    (ALPACA, {"input": "x", "output": "y"}, "missing field `instruction`"),
    (ALPACA, {"instruction": 3, "output": "y"}, "non-string `instruction`"),
    (ALPACA, {"instruction": "x", "input": 1, "output": "y"}, "non-string `input`"),
    (ALPACA, {"instruction": "x"}, "missing field `output`"),
    (ALPACA, {"instruction": "x", "output": ["y"]}, "non-string `output`"),
    (ALPACA, {"instruction": "x", "output": ""}, "empty response"),
    (
        ALPACA,
        {"instruction": "x", "output": "y", "history": "h"},
        "`history` is not a list of [prompt, response] pairs",
    ),
    (ALPACA, {"instruction": "x", "output": "y", "system": 5}, "non-string `system`"),
    (ALPACA_RANKING, {"instruction": "x", "rejected": "r"}, "missing field `chosen`"),
    (ALPACA_RANKING, {"instruction": "x", "chosen": "c", "rejected": ""}, "empty `rejected`"),
    (ALPACA_KTO, {"instruction": "x", "output": "y"}, "missing field `label`"),
    (ALPACA_KTO, {"instruction": "x", "output": "y", "label": "true"}, "non-boolean `label`"),
    (SHAREGPT, {}, "missing field `conversations`"),
    (SHAREGPT, {"conversations": "hi"}, "`conversations` is not a list of messages"),
    (SHAREGPT, {"conversations": []}, "empty `conversations`"),
    (SHAREGPT, {"conversations": ["hi", g("a")]}, "message is not an object"),
    (SHAREGPT, {"conversations": [{"value": "hi"}, g("a")]}, "message without `from`"),
    (
        SHAREGPT,
        {"conversations": [{"from": "bot", "value": "x"}, g("a")]},
        'message has unknown role "bot"',
    ),
    (SHAREGPT, {"conversations": [{"from": "human"}, g("a")]}, "message without `value`"),
    (
        SHAREGPT,
        {"conversations": [{"from": "human", "value": ["x"]}, g("a")]},
        "message has non-string `value`",
    ),
    (
        SHAREGPT,
        {"conversations": [h("a"), h("b")]},
        "wrong role order: user turn where an assistant turn belongs",
    ),
    (
        SHAREGPT,
        {"conversations": [g("a"), h("b")]},
        "wrong role order: assistant turn where a user turn belongs",
    ),
    (
        SHAREGPT,
        {"conversations": [h("a"), g("b"), h("c")]},
        "conversation does not end with an assistant turn",
    ),
    (SHAREGPT, {"conversations": [h("a"), g("")]}, "empty response"),
    (
        SHAREGPT,
        {"conversations": [h("a"), {"from": "system", "value": "s"}]},
        "system message after the first turn",
    ),
    (
        SHAREGPT,
        {"conversations": [{"from": "system", "value": "s"}]},
        "`conversations` holds only a system message",
    ),
    (
        SHAREGPT,
        {"conversations": [{"from": "system", "value": 1}, h("a"), g("b")]},
        "system message has non-string `value`",
    ),
    (SHAREGPT, {"conversations": [h("a"), g("b")], "tools": 7}, "non-string `tools`"),
    (
        SHAREGPT_RANKING,
        {"conversations": [h("a"), g("b")], "chosen": g("c"), "rejected": g("d")},
        "ranking prompt does not end with a user turn",
    ),
    (SHAREGPT_RANKING, {"conversations": [h("a")], "rejected": g("d")}, "missing field `chosen`"),
    (
        SHAREGPT_RANKING,
        {"conversations": [h("a")], "chosen": "c", "rejected": g("d")},
        "`chosen` is not an object",
    ),
    (
        SHAREGPT_RANKING,
        {"conversations": [h("a")], "chosen": g("c"), "rejected": h("d")},
        "`rejected` is not an assistant turn",
    ),
    (
        SHAREGPT_RANKING,
        {"conversations": [h("a")], "chosen": {"from": "gpt"}, "rejected": g("d")},
        "`chosen` without `value`",
    ),
    (
        SHAREGPT_RANKING,
        {"conversations": [h("a")], "chosen": g(""), "rejected": g("d")},
        "empty `chosen`",
    ),
    (SHAREGPT_KTO, {"conversations": [h("a"), g("b")], "label": 1}, "non-boolean `label`"),
    (
        OPENAI,
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [{"name": "f"}]},
            ]
        },
        "malformed `tool_calls` (each needs a `function` object)",
    ),
    (
        OPENAI,
        {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}]},
        "wrong role order: observation turn where an assistant turn belongs",
    ),
    (
        OPENAI,
        {"messages": [{"role": "user", "content": "a"}, {"role": "function", "content": "f"}]},
        'message has unknown role "function"',
    ),
]


def test_at_least_twenty_kinds_of_bad_rows() -> None:
    # A few reasons repeat on purpose: the same malformation in two formats.
    assert len({reason for _, _, reason in BAD_ROWS}) >= 30


@pytest.mark.parametrize(
    ("row_format", "row", "reason"),
    BAD_ROWS,
    ids=[f"{i}-{r}" for i, (_, _, r) in enumerate(BAD_ROWS)],
)
def test_bad_rows_get_their_reason(row_format: RowFormat, row: dict, reason: str) -> None:
    with pytest.raises(BadRow) as caught:
        convert_row(row, row_format)
    assert str(caught.value) == reason


def test_sharegpt_system_turn_beats_the_system_column_and_tags_are_honoured() -> None:
    row = {
        "conversations": [{"from": "system", "value": "S"}, h("q"), g("a")],
        "system": "column",
        "tools": [{"name": "f", "description": "d"}],
    }
    conversation = convert_row(row, SHAREGPT)
    assert conversation.system == "S"
    assert conversation.tools == '[{"name": "f", "description": "d"}]'
    assert convert_row({**row, "conversations": [h("q"), g("a")]}, SHAREGPT).system == "column"
    custom = RowFormat(
        formatting="sharegpt",
        columns=Columns(messages="turns"),
        tags=Tags(
            role_tag="who",
            content_tag="text",
            user_tag="me",
            assistant_tag="bot",
            observation_tag=None,
            function_tag=None,
            system_tag=None,
        ),
    )
    turns = [{"who": "me", "text": "q"}, {"who": "bot", "text": "a"}]
    assert convert_row({"turns": turns}, custom).messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    with pytest.raises(BadRow, match='unknown role "system"'):  # system_tag None: not accepted
        convert_row({"turns": [{"who": "system", "text": "s"}, *turns]}, custom)


def test_openai_tool_calls_and_merged_results() -> None:
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    row = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [call, call]},
            {"role": "tool", "content": "r1"},
            {"role": "tool", "content": "r2"},
            {"role": "assistant", "content": "done"},
        ],
        "tools": None,
    }
    conversation = convert_row(row, OPENAI)
    assert [m["role"] for m in conversation.messages] == [
        "user",
        "function",
        "observation",
        "assistant",
    ]
    assert json.loads(conversation.messages[1]["content"]) == [call["function"]] * 2
    assert conversation.messages[2]["content"] == "r1\n</tool_response>\n<tool_response>\nr2"
    assert conversation.system is None and conversation.tools is None


def test_openai_ranking_prompt_may_end_with_tool_results() -> None:
    call = {"function": {"name": "f", "arguments": "{}"}}
    fmt = OPENAI.model_copy(
        update={
            "ranking": True,
            "columns": OPENAI.columns.model_copy(
                update={"chosen": "chosen", "rejected": "rejected"}
            ),
        }
    )
    row = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "content": "r"},
        ],
        "chosen": {"role": "assistant", "content": "good"},
        "rejected": {"role": "assistant", "content": "bad"},
    }
    conversation = convert_row(row, fmt)
    assert conversation.messages[-1] == {"role": "observation", "content": "r"}
    assert (conversation.chosen, conversation.rejected) == (
        {"role": "assistant", "content": "good"},
        {"role": "assistant", "content": "bad"},
    )


def test_alpaca_kinds() -> None:
    pair = convert_row(
        {"instruction": "q", "input": "i", "chosen": "c", "rejected": "r"}, ALPACA_RANKING
    )
    assert pair.messages == [{"role": "user", "content": "q\ni"}]
    assert pair.chosen == {"role": "assistant", "content": "c"}
    kto = convert_row({"instruction": "q", "output": "a", "label": False}, ALPACA_KTO)
    assert kto.kto_tag is False and kto.messages[-1]["content"] == "a"
    text = RowFormat(columns=Columns(prompt="text", query=None, response=None))
    assert convert_row({"text": "doc"}, text).messages == [{"role": "user", "content": "doc"}]
    assert (
        convert_alpaca({"instruction": "q", "output": "a", "history": None}, ALPACA).system is None
    )
