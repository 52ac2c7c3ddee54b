"""Token-for-token parity with LLaMA-Factory 0.9.5 for the non-SFT data families.

Goldens: tests/goldens/lf095_families.json (made by tests/goldens/generate_lf_families.py with
LF's own processors: pretrain, pairwise, feedback/KTO, unsupervised/PPO). Each case's raw rows
go through rayft's whole row path (dataset_info.json entry → converter → template → family
encoder) and must give LF's ids, labels, KL pairs and tags; rows LF dropped must be skipped
with a reason, never silently.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from data_pipelines.converters import convert_row
from data_pipelines.dataset_info import resolve_dataset
from data_pipelines.families import ROWS_COLUMN, SKIP_COLUMN, EncodeOptions, get_family
from data_pipelines.pipeline import (
    TemplateSpec,
    TokenizeSpec,
    load_prepared_tokenizer,
    tokenize_rows,
)
from data_pipelines.supervised import SupervisedOptions
from tests.fixtures.tiny import tokenizer_fingerprint

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests/goldens/lf095_families.json").read_text(encoding="utf-8"))
FAMILY_OF_STAGE = {
    "pt": "pretrain",
    "rm": "pairwise",
    "dpo": "pairwise",
    "kto": "feedback",
    "ppo": "prompt",
}
COLUMNS = {
    "pretrain": ("input_ids",),
    "pairwise": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"),
    "feedback": ("input_ids", "labels", "kl_input_ids", "kl_labels", "kto_tags"),
    "prompt": ("input_ids", "labels"),
}


def _case_id(case: dict) -> str:
    flags = f"-pack{case['packing']}" if case["stage"] == "pt" else ""
    flags += "-nothink" * (not case["enable_thinking"])
    return f"{case['stage']}-{case['template']}-{case['dataset']}-{case['cutoff_len']}{flags}"


def _raw_rows(case: dict) -> tuple[list[dict], object]:
    spec = resolve_dataset(case["dataset"], str(ROOT / GOLDEN["datasets"][case["dataset"]]))
    path = spec.content_files()[0]
    text = Path(path).read_text(encoding="utf-8")
    rows = (
        [json.loads(line) for line in text.splitlines() if line.strip()]
        if str(path).endswith(".jsonl")
        else json.loads(text)
    )
    return rows[: case["max_samples"]], spec.row_format


def _encode_with_bos(rows: list[dict], spec: TokenizeSpec) -> dict:
    """The pretrain family with a tokenizer that adds bos (a Llama-style tokenizer), as the
    generator did: transformers 5 does not read `add_bos_token` from tokenizer_config.json, so
    the attribute is set on a copy of the prepared tokenizer."""
    tokenizer, template = load_prepared_tokenizer(spec.template)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_bos_token = True
    items = [convert_row(row, spec.row_format) for row in rows]
    return get_family(spec.family).encode(items, tokenizer, template, spec.encode_options)


def test_tokenizer_matches_the_goldens(tiny_tokenizer_dir: Path) -> None:
    assert tokenizer_fingerprint(tiny_tokenizer_dir) == GOLDEN["tokenizer_fingerprint"]


def test_goldens_cover_every_family_and_the_required_templates() -> None:
    stages = {case["stage"] for case in GOLDEN["cases"]}
    assert stages >= {"pt", "rm", "dpo", "kto", "ppo"}
    templates = {case["template"] for case in GOLDEN["cases"] if case["stage"] == "dpo"}
    assert templates >= {
        "qwen",
        "qwen3",
        "llama3",
        "llama2",
        "mistral",
        "gemma",
        "chatml",
        "phi4",
        "deepseek3",
        "glm4",
        "default",
    }


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=_case_id)
def test_family_tokens_equal_llamafactory(case: dict, tiny_tokenizer_dir: Path) -> None:
    family = FAMILY_OF_STAGE[case["stage"]]
    rows, row_format = _raw_rows(case)
    spec = TokenizeSpec(
        template=TemplateSpec(
            tokenizer_path=str(tiny_tokenizer_dir),
            trust_remote_code=False,
            template=case["template"],
            default_system=None,
            tool_format=None,
            enable_thinking=case["enable_thinking"],
        ),
        row_format=row_format,
        options=EncodeOptions(
            SupervisedOptions(case["effective_cutoff_len"]),
            packing=case["effective_packing"],
            template_name=case["template"],
        ),
        family=family,
    )
    out = _encode_with_bos(rows, spec) if case.get("add_bos_token") else tokenize_rows(rows, spec)
    kept = [i for i, reason in enumerate(out[SKIP_COLUMN]) if reason == ""]
    if family == "pretrain":
        assert [out["input_ids"][i] for i in kept] == [r["input_ids"] for r in case["rows"]]
        assert sum(out[ROWS_COLUMN]) == len(rows)
        return
    assert len(out[SKIP_COLUMN]) == len(rows)
    dropped = {i: reason for i, reason in enumerate(out[SKIP_COLUMN]) if reason}
    assert set(case["dropped"]) <= set(dropped)
    # On purpose rayft also skips empty answers (LF trains on an answer of just eos).
    assert all(dropped[i].startswith("empty") for i in set(dropped) - set(case["dropped"]))
    for golden in case["rows"]:
        if golden["index"] in dropped:
            continue
        for column in COLUMNS[family]:
            assert out[column][golden["index"]] == golden[column], (
                f"row {golden['index']}: {column} differs"
            )
