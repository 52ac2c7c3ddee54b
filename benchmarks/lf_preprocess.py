"""LLaMA-Factory 0.9.5's SFT preprocessing, timed — the baseline side of
`benchmarks/preprocess_vs_llamafactory.py`. Runs under the LLaMA-Factory venv:

    /work/lfvenv/bin/python benchmarks/lf_preprocess.py --tokenizer DIR --dataset-dir DIR \
        --template qwen --cutoff-len 1024 --workers 2

Prints one JSON line: rows, tokens, seconds (process start to dataset ready).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc

STARTED = time.time()
REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--dataset-dir", required=True)
    parser.add_argument("--dataset", default="bench")
    parser.add_argument("--template", default="qwen")
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(REPO_ROOT))
        from tests.goldens.generate_lf_goldens import _install_torchaudio_stub

        _install_torchaudio_stub(Path(tmp))
        from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
        from llamafactory.hparams import get_train_args
        from llamafactory.model import load_tokenizer

        lf_args = {
            "stage": "sft",
            "do_train": True,
            "model_name_or_path": args.tokenizer,
            "finetuning_type": "lora",
            "template": args.template,
            "dataset": args.dataset,
            "dataset_dir": args.dataset_dir,
            "cutoff_len": args.cutoff_len,
            "overwrite_cache": True,
            "preprocessing_num_workers": args.workers,
            "cache_dir": str(Path(tmp) / "hf_cache"),
            "output_dir": str(Path(tmp) / "out"),
            "report_to": "none",
        }
        with contextlib.redirect_stdout(io.StringIO()):
            model_args, data_args, training_args, _, _ = get_train_args(lf_args)
            module = load_tokenizer(model_args)
            template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
            train = get_dataset(
                template, model_args, data_args, training_args, stage="sft", **module
            )["train_dataset"]
        seconds = time.time() - STARTED
        # Counted in Arrow after the clock stops: as Python lists, a million rows' ids took
        # ~7 s that used to be charged to LLaMA-Factory.
        if train._indices is not None:  # a selection over the table: make it the table
            train = train.flatten_indices()
        tokens = pc.sum(pc.list_value_length(train.data.column("input_ids"))).as_py()
        print(json.dumps({"rows": len(train), "tokens": tokens, "seconds": seconds}))


if __name__ == "__main__":
    main()
