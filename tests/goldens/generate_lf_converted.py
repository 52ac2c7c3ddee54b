"""Generate converter goldens: LLaMA-Factory 0.9.5's aligned rows for the demo datasets.

Why: rayft's converters re-implement LF's `dataset_info.json` parser and its alpaca / sharegpt
/ openai converters. The reference is LF itself, so this script runs LF's own loading path
(`get_dataset_list` -> `_load_single_dataset`: `datasets.load_dataset` on the file, then
`align_dataset` with LF's converter) and records, for the first 20 rows of each dataset, the
`_prompt`, `_response`, `_system` and `_tools` LF produces. `tests/unit/test_converters.py`
checks rayft's converters give the same rows.

Datasets: every demo file in `data/` (alpaca, identity, dpo, kto, c4 pretraining text, glaive
tool calls), the hand-written multi-turn alpaca set in `tests/goldens/data/`, and a few small
inline sets written here (openai messages with tool calls, sharegpt with a system turn, alpaca
pairwise and KTO rows); their rows and dataset_info entries are stored in the golden so the
test can rebuild them.

Run under the LLaMA-Factory venv (see tests/goldens/README.md), from the repo root:

    /work/lfvenv/bin/python tests/goldens/generate_lf_converted.py

Output is deterministic; HF caches go to a temporary directory and `HF_HUB_OFFLINE=1` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOLDENS_DIR = Path(__file__).resolve().parent
REPO_ROOT = GOLDENS_DIR.parents[1]
DEFAULT_OUTPUT = GOLDENS_DIR / "lf095_converted.json"
EXPECTED_LF_VERSION = "0.9.5"
ROWS_PER_DATASET = 20
ALIGNED_KEYS = ("_prompt", "_response", "_system", "_tools")

# dataset name -> dataset_dir relative to the repo root (entries come from its dataset_info.json)
FILE_DATASETS: dict[str, str] = {
    "alpaca_en_demo": "data",
    "identity": "data",
    "dpo_en_demo": "data",
    "kto_en_demo": "data",
    "c4_demo": "data",
    "glaive_toolcall_en_demo": "data",
    "multiturn_demo": "tests/goldens/data",
}

_TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


def _call(name: str, arguments: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


# Small hand-written datasets for what the demo files do not show. Every row is valid for LF.
INLINE_DATASETS: dict[str, dict[str, Any]] = {
    "openai_tools_inline": {
        "entry": {
            "file_name": "openai_tools_inline.json",
            "formatting": "openai",
            "columns": {"messages": "messages", "tools": "tools"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "observation_tag": "tool",
                "system_tag": "system",
            },
        },
        "rows": [
            {
                "messages": [
                    {"role": "system", "content": "You can call tools."},
                    {"role": "user", "content": "Weather in Paris and Rome?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            _call("get_weather", {"city": "Paris"}, "c1"),
                            _call("get_weather", {"city": "Rome"}, "c2"),
                        ],
                    },
                    {"role": "tool", "content": '{"temp": 18}'},
                    {"role": "tool", "content": '{"temp": 24}'},
                    {"role": "assistant", "content": "Paris 18°C, Rome 24°C."},
                ],
                "tools": _TOOLS,
            },
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                ],
                "tools": None,
            },
            {
                "messages": [
                    {"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"},
                ],
                "tools": None,
            },
            {
                "messages": [
                    {"role": "user", "content": "Weather in Oslo?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [_call("get_weather", {"city": "Oslo"}, "c3")],
                    },
                    {"role": "tool", "content": '{"temp": 3}'},
                    {"role": "assistant", "content": "3°C in Oslo."},
                ],
                "tools": _TOOLS,
            },
        ],
    },
    "sharegpt_system_inline": {
        "entry": {
            "file_name": "sharegpt_system_inline.json",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system", "tools": "tools"},
        },
        "rows": [
            {
                "conversations": [
                    {"from": "system", "value": "First-turn system wins."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                ],
                "system": "column system",
                "tools": "",
            },
            {
                "conversations": [
                    {"from": "human", "value": "Add 2 and 3"},
                    {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2}}'},
                    {"from": "observation", "value": "5"},
                    {"from": "gpt", "value": "It is 5."},
                ],
                "system": "column system",
                "tools": '[{"name": "add"}]',
            },
        ],
    },
    "alpaca_ranking_inline": {
        "entry": {
            "file_name": "alpaca_ranking_inline.json",
            "ranking": True,
            "columns": {
                "prompt": "question",
                "chosen": "chosen",
                "rejected": "rejected",
                "system": "system",
            },
        },
        "rows": [
            {
                "question": "Capital of France?",
                "chosen": "Paris.",
                "rejected": "Rome.",
                "system": "Answer briefly.",
            },
            {"question": "2+2?", "chosen": "4", "rejected": "5", "system": ""},
        ],
    },
    "alpaca_kto_inline": {
        "entry": {
            "file_name": "alpaca_kto_inline.json",
            "columns": {"prompt": "instruction", "response": "output", "kto_tag": "label"},
        },
        "rows": [
            {"instruction": "Say hi", "output": "Hi!", "label": True},
            {"instruction": "Say hi", "output": "Go away.", "label": False},
        ],
    },
}


def _lf_args(workdir: Path, dataset_dir: Path) -> tuple[Any, Any, Any]:
    """The three argument objects `_load_single_dataset` reads (no model is loaded)."""
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import Seq2SeqTrainingArguments

    model_args = ModelArguments(model_name_or_path="unused", cache_dir=str(workdir / "cache"))
    data_args = DataArguments(
        dataset_dir=str(dataset_dir), max_samples=ROWS_PER_DATASET, overwrite_cache=True
    )
    training_args = Seq2SeqTrainingArguments(output_dir=str(workdir / "out"), report_to="none")
    return model_args, data_args, training_args


def _aligned(name: str, dataset_dir: Path, workdir: Path) -> list[dict[str, Any]]:
    """LF's aligned rows for one dataset, keyed by their source index."""
    from llamafactory.data.loader import _load_single_dataset
    from llamafactory.data.parser import get_dataset_list

    (attr,) = get_dataset_list([name], str(dataset_dir))
    dataset = _load_single_dataset(attr, *_lf_args(workdir, dataset_dir))
    return [
        {"index": index, **{key: row[key] for key in ALIGNED_KEYS}}
        for index, row in enumerate(dataset)
    ]


def _write_inline(workdir: Path) -> Path:
    """The inline datasets as files plus their dataset_info.json, in a scratch folder."""
    folder = workdir / "inline"
    folder.mkdir()
    info = {}
    for name, spec in INLINE_DATASETS.items():
        info[name] = spec["entry"]
        (folder / spec["entry"]["file_name"]).write_text(
            json.dumps(spec["rows"], ensure_ascii=False), encoding="utf-8"
        )
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lf_converted_") as tmp:
        workdir = Path(tmp)
        os.environ["HF_HOME"] = str(workdir / "hf_home")
        os.environ["HF_DATASETS_CACHE"] = str(workdir / "hf_datasets")
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["DISABLE_VERSION_CHECK"] = "1"
        sys.path.insert(0, str(GOLDENS_DIR))
        from generate_lf_goldens import _install_torchaudio_stub

        stubbed = _install_torchaudio_stub(workdir)
        import llamafactory

        if llamafactory.__version__ != EXPECTED_LF_VERSION:
            print(
                f"error: need llamafactory=={EXPECTED_LF_VERSION}, found {llamafactory.__version__}",
                file=sys.stderr,
            )
            return 2
        datasets: dict[str, Any] = {}
        for name, dataset_dir in FILE_DATASETS.items():
            datasets[name] = {
                "dataset_dir": dataset_dir,
                "rows": _aligned(name, REPO_ROOT / dataset_dir, workdir),
            }
        inline_dir = _write_inline(workdir)
        for name, spec in INLINE_DATASETS.items():
            datasets[name] = {
                "dataset_dir": None,
                "entry": spec["entry"],
                "source_rows": spec["rows"],
                "rows": _aligned(name, inline_dir, workdir),
            }
    golden = {
        "llamafactory_version": llamafactory.__version__,
        "generator": "tests/goldens/generate_lf_converted.py",
        "torchaudio_stubbed": stubbed,
        "rows_per_dataset": ROWS_PER_DATASET,
        "datasets": datasets,
    }
    args.output.write_text(
        json.dumps(golden, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    print(
        f"wrote {args.output} ({len(datasets)} datasets) in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
