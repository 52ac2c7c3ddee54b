"""Token-for-token parity with LLaMA-Factory 0.9.5 (goldens made by tests/goldens/generate_lf_goldens.py).

Every golden case whose template rayft implements is re-tokenized through rayft's converter,
template and supervised encoder and must give the same `input_ids` and `labels`.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data_pipelines.converters import convert_alpaca
from data_pipelines.dataset_info import resolve_dataset
from data_pipelines.supervised import SupervisedOptions, encode_supervised
from data_pipelines.templates import TEMPLATES, get_template, prepare_tokenizer
from tests.fixtures.tiny import tokenizer_fingerprint

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests/goldens/lf095_supervised.json").read_text())
DATASET_DIRS = {
    "alpaca_en_demo": ROOT / "data",
    "identity": ROOT / "data",
    "multiturn_demo": ROOT / "tests/goldens/data",
}
CASES = [case for case in GOLDEN["cases"] if case["template"] in TEMPLATES]


def _case_id(case: dict) -> str:
    flags = "-prompt" * case["train_on_prompt"] + "-history" * case["mask_history"]
    return f"{case['template']}-{case['dataset']}-{case['cutoff_len']}{flags}"


@cache
def _rows(dataset: str) -> list[dict]:
    spec = resolve_dataset(dataset, DATASET_DIRS[dataset])
    return json.loads(Path(spec.files[0]).read_text())


def test_goldens_cover_the_foundation_templates() -> None:
    covered = {case["template"] for case in CASES}
    assert {"qwen", "gemma"} <= covered


def test_tokenizer_matches_the_goldens(tiny_tokenizer_dir: Path) -> None:
    assert tokenizer_fingerprint(tiny_tokenizer_dir) == GOLDEN["tokenizer_fingerprint"]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_ids_and_labels_equal_llamafactory(case: dict, tiny_tokenizer_dir: Path) -> None:
    template = get_template(case["template"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prepare_tokenizer(tokenizer, template)
    expected = GOLDEN["templates"][case["template"]]
    assert tokenizer.eos_token_id == expected["eos_token_id"]
    assert tokenizer.pad_token_id == expected["pad_token_id"]
    spec = resolve_dataset(case["dataset"], DATASET_DIRS[case["dataset"]])
    options = SupervisedOptions(
        cutoff_len=case["cutoff_len"],
        train_on_prompt=case["train_on_prompt"],
        mask_history=case["mask_history"],
    )
    rows = _rows(case["dataset"])
    for golden in case["rows"]:
        conversation = convert_alpaca(rows[golden["index"]], spec.columns)
        ids, labels = encode_supervised(
            tokenizer, template, conversation.messages, conversation.system, options
        )
        assert ids == golden["input_ids"], f"row {golden['index']}: input_ids differ"
        assert labels == golden["labels"], f"row {golden['index']}: labels differ"
