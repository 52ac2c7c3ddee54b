"""SFT packing and dataset mixing, token for token against LLaMA-Factory 0.9.5.

Goldens: tests/goldens/lf095_packing_mix.json (made by tests/goldens/generate_lf_packing_mix.py
with LF's own `get_dataset`). Packing cases hold LF's packed rows as sha256 digests of whole
columns (every row of all 999 alpaca rows) plus a few rows in full; mixing cases hold the
source (dataset, row) of every mixed row in order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from configs import ConfigError, load_config
from data_pipelines.dataset_info import resolve_dataset
from data_pipelines.families import ROWS_COLUMN, SKIP_COLUMN, EncodeOptions
from data_pipelines.mixing import interleave_sources
from data_pipelines.pipeline import TemplateSpec, TokenizeSpec, tokenize_rows
from data_pipelines.supervised import SupervisedOptions
from tests.fixtures.tiny import tokenizer_fingerprint

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests/goldens/lf095_packing_mix.json").read_text(encoding="utf-8"))
COLUMNS = ("input_ids", "labels", "attention_mask", "position_ids")


def _rows(name: str, dataset_dir: str, limit: int | None) -> tuple[list[dict], object]:
    spec = resolve_dataset(name, str(ROOT / dataset_dir))
    rows = json.loads(Path(spec.content_files()[0]).read_text(encoding="utf-8"))
    return rows[:limit], spec.row_format


def _mixed_rows(case: dict) -> tuple[list[dict], list[int] | None, tuple]:
    """The case's raw rows in LF's merged order, with each row's source dataset."""
    loaded = [_rows(name, case["dataset_dir"], case["max_samples"]) for name in case["datasets"]]
    if len(loaded) == 1:
        return loaded[0][0], None, (loaded[0][1],)
    sources = interleave_sources(
        [len(rows) for rows, _ in loaded],
        case["mix_strategy"],
        case["interleave_probs"],
        case["seed"],
    ).tolist()
    taken = [0] * len(loaded)
    rows = []
    for source in sources:
        part = loaded[source][0]
        rows.append(part[taken[source] % len(part)])
        taken[source] += 1
    return rows, sources, tuple(fmt for _, fmt in loaded)


def _digest(column: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(column, separators=(",", ":")).encode()).hexdigest()


def test_tokenizer_matches_the_goldens(tiny_tokenizer_dir: Path) -> None:
    assert tokenizer_fingerprint(tiny_tokenizer_dir) == GOLDEN["tokenizer_fingerprint"]


@pytest.mark.parametrize("key", sorted(GOLDEN["packing"]))
def test_packed_rows_equal_llamafactory(key: str, tiny_tokenizer_dir: Path) -> None:
    case = GOLDEN["packing"][key]
    rows, sources, formats = _mixed_rows(case)
    spec = TokenizeSpec(
        template=TemplateSpec(
            tokenizer_path=str(tiny_tokenizer_dir),
            trust_remote_code=False,
            template=case["template"],
            default_system=None,
            tool_format=None,
            enable_thinking=True,
        ),
        row_format=formats[0],
        options=EncodeOptions(
            SupervisedOptions(
                case["effective_cutoff_len"],
                train_on_prompt=case["train_on_prompt"],
                mask_history=case["mask_history"],
            ),
            packing=True,
            neat_packing=case["neat_packing"],
            template_name=case["template"],
        ),
        source_formats=formats if sources is not None else (),
    )
    out = tokenize_rows(rows, spec, sources=sources)
    assert set(out[SKIP_COLUMN]) == {""} and sum(out[ROWS_COLUMN]) == case["source_rows"]
    assert len(out["input_ids"]) == case["num_packed_rows"]
    assert {len(ids) for ids in out["input_ids"]} == {case["packed_row_length"]}
    assert out[ROWS_COLUMN] == [len(pack["segments"]) for pack in case["packs"]]
    for stored in case["rows"]:
        for column in COLUMNS:
            assert out[column][stored["pack"]] == stored[column], f"row {stored['pack']}: {column}"
    for column in COLUMNS:
        assert _digest(out[column]) == case["digests"][column], f"{column} differs"


@pytest.mark.parametrize("key", sorted(GOLDEN["mixing"]))
def test_mixed_order_equals_llamafactory(key: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    case = GOLDEN["mixing"][key]
    names, sizes = case["datasets"], case.get("source_sizes")
    probs = case["interleave_probs"]
    probs = [float(p) for p in probs.split(",")] if isinstance(probs, str) else probs
    if case["mix_strategy"] == "concat":
        if case["error"]:  # LF refuses probabilities without interleaving; so does rayft
            with pytest.raises(ConfigError, match="mix_strategy is concat"):
                load_config(
                    None,
                    [
                        f"model_name_or_path={tiny_model_dir}",
                        f"dataset={','.join(names)}",
                        f"dataset_dir={ROOT / 'data'}",
                        "interleave_probs=0.7,0.3",
                        f"output_dir={tmp_path}",
                    ],
                )
            return
        expected = [[name, i] for name in names for i in range(sizes[name])]
        assert [row["source"] for row in case["rows"]] == expected
        return
    if case["error"]:
        # LF 0.9.5's pinned `datasets` 4.0 lacks interleave_once; rayft's newer one has it.
        assert "all_exhausted_without_replacement" in case["error"]
        sources = interleave_sources([30, 30], case["mix_strategy"], probs, 42)
        assert sorted(sources.tolist()) == [0] * 30 + [1] * 30
        return
    sources = interleave_sources(
        [sizes[name] for name in names], case["mix_strategy"], probs, case["seed"]
    ).tolist()
    taken = [0] * len(names)
    order = []
    for source in sources:
        order.append([names[source], taken[source] % sizes[names[source]]])
        taken[source] += 1
    assert order == [row["source"] for row in case["rows"]]
