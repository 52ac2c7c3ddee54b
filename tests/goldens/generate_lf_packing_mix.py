"""Generate LLaMA-Factory 0.9.5 goldens for SFT packing and multi-dataset mixing.

Why: rayft re-implements two parts of LF's SFT data path that the per-row goldens in
``lf095_supervised.json`` do not cover: ``PackedSupervisedDatasetProcessor`` (``packing`` /
``neat_packing``: the greedy knapsack over one map batch, the pad tail, ``position_ids`` and the
segment-numbered attention mask) and ``merge_dataset`` (``mix_strategy`` concat / interleave with
``interleave_probs`` and the training seed). The only trustworthy reference is LF itself, so this
script runs what ``run_sft`` does -- ``get_train_args`` -> ``load_tokenizer`` ->
``get_template_and_fix_tokenizer`` -> ``get_dataset(stage="sft")`` -- on the tiny tokenizer from
``tests/fixtures/tiny.py`` and writes the train dataset, in LF's order, to
``lf095_packing_mix.json``.

Run under the LLaMA-Factory venv, from the repo root (see ``tests/goldens/README.md``)::

    /work/lfvenv/bin/python tests/goldens/generate_lf_packing_mix.py

The tokenizer build and the torchaudio stand-in come from ``generate_lf_goldens.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__:
    from . import generate_lf_goldens as sft
else:  # run as a script: this file's folder is sys.path[0]
    import generate_lf_goldens as sft

DEFAULT_OUTPUT = sft.GOLDENS_DIR / "lf095_packing_mix.json"
GOLDENS_DATA_DIR = sft.GOLDENS_DIR / "data"
IGNORE_INDEX = -100

# LF reads every dataset of one run from a single `dataset_dir`, so each case names one folder.
DATASET_DIRS: dict[str, Path] = {
    "alpaca_en_demo": sft.MAIN_DATA_DIR,
    "identity": sft.MAIN_DATA_DIR,
    "multiturn_demo": GOLDENS_DATA_DIR,
}
PACKED_COLUMNS: tuple[str, ...] = ("input_ids", "labels", "attention_mask", "position_ids")
PACK_TEMPLATES: tuple[str, ...] = ("qwen", "llama3", "default", "gemma")
PACK_CUTOFFS: tuple[int, ...] = (1024, 128)
MIX_DATASETS: tuple[str, ...] = ("alpaca_en_demo", "identity")
MIX_MAX_SAMPLES = 30
MIX_STRATEGIES: tuple[str, ...] = (
    "concat",
    "interleave_under",
    "interleave_over",
    "interleave_once",
)
MIX_PROBS = "0.7,0.3"
MIX_CUTOFF = 1024
MIX_PACK_PROBS = "0.5,0.5"
MIX_PACK_CUTOFF = 256
SEED = 42
# A second seed for one interleave case shows that the sampled order follows `seed`.
ALT_SEED = 1234
# Size budget (~1.5 MB): the full alpaca_en_demo (999 rows) packs into ~330 rows of 1024 ids
# per template, far too much to store. Every packed row is described by its segments (source row
# and length) and all columns are covered by digests; the ids themselves are stored for the
# first and last packed rows (the last ones hold the shortest rows and the longest pad tail).
# Cases with at most FULL_ROWS_LIMIT packed rows are stored whole.
VERBATIM_HEAD_TAIL: dict[int, tuple[int, int]] = {1024: (2, 2), 128: (5, 3)}
FULL_ROWS_LIMIT = 40


@dataclass(frozen=True)
class PackSpec:
    """One packing run: template, dataset(s) and the SFT switches."""

    template: str
    datasets: tuple[str, ...]
    cutoff_len: int
    neat_packing: bool = False
    train_on_prompt: bool = False
    mask_history: bool = False
    max_samples: int | None = None
    mix_strategy: str = "concat"
    interleave_probs: str | None = None

    def key(self) -> str:
        flags = ["neat_packing" if self.neat_packing else "packing"]
        if self.train_on_prompt:
            flags.append("train_on_prompt")
        if self.mask_history:
            flags.append("mask_history")
        if len(self.datasets) > 1:
            flags.append(f"mix={self.mix_strategy}")
            if self.interleave_probs is not None:
                flags.append(f"probs={self.interleave_probs}")
        rows = "" if self.max_samples is None else f"[:{self.max_samples}]"
        return (
            f"{self.template}/{'+'.join(self.datasets)}{rows}/cutoff={self.cutoff_len}/"
            + ",".join(flags)
        )


@dataclass(frozen=True)
class MixSpec:
    """One mixing run without packing (qwen, cutoff 1024, MIX_MAX_SAMPLES rows per dataset)."""

    mix_strategy: str
    interleave_probs: str | None = None
    seed: int = SEED

    def key(self) -> str:
        probs = "none" if self.interleave_probs is None else self.interleave_probs
        return f"{self.mix_strategy}/probs={probs}/seed={self.seed}"


def _digest(rows: list[list[int]]) -> str:
    """sha256 of the column as compact JSON (a list of lists of ints, no spaces)."""
    text = json.dumps(rows, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _split_segments(position_ids: list[int], total: int) -> tuple[list[int], int]:
    """Segment lengths of one packed row, read from its position_ids, and the pad length.

    Each packed sequence restarts its positions at 0; the pad tail is all zeros. A real segment
    is never a single id (every template emits more), so trailing runs of length 1 are padding.
    """
    lengths: list[int] = []
    for pos in position_ids:
        if pos == 0:
            lengths.append(1)
        else:
            lengths[-1] += 1
    pad = 0
    while lengths and lengths[-1] == 1:
        pad += lengths.pop()
    if sum(lengths) + pad != total:
        raise RuntimeError("packed row does not split into segments and pad")
    return lengths, pad


class PackMixGenerator:
    """Runs LF's SFT data path once per case, with a fresh tokenizer every time."""

    def __init__(self, tokenizer_dir: Path, workdir: Path, verbose: bool) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.workdir = workdir
        self.verbose = verbose
        self._case_no = 0
        self.templates: dict[str, dict[str, Any]] = {}

    def _args(
        self, template: str, datasets: tuple[str, ...], cutoff_len: int, **extra: Any
    ) -> dict[str, Any]:
        dirs = {DATASET_DIRS[name] for name in datasets}
        if len(dirs) != 1:
            raise ValueError(f"{datasets} live in different folders; LF reads one dataset_dir")
        self._case_no += 1
        args: dict[str, Any] = {
            "stage": "sft",
            "do_train": True,
            "model_name_or_path": str(self.tokenizer_dir),
            "finetuning_type": "lora",
            "template": template,
            "dataset": ",".join(datasets),
            "dataset_dir": str(dirs.pop()),
            "cutoff_len": cutoff_len,
            "overwrite_cache": True,
            "cache_dir": str(self.workdir / "hf_cache"),
            "output_dir": str(self.workdir / f"out{self._case_no}"),
            "report_to": "none",
            "seed": SEED,
        }
        args.update({key: value for key, value in extra.items() if value is not None})
        return args

    def _quiet(self) -> contextlib.AbstractContextManager[Any]:
        """LF prints a training example; keep stdout clean unless --verbose."""
        if self.verbose:
            return contextlib.nullcontext()
        return contextlib.redirect_stdout(io.StringIO())

    def _run(self, args: dict[str, Any]) -> dict[str, Any]:
        """LF's data path for one YAML; also returns LF's merged rows before tokenization."""
        from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
        from llamafactory.data.loader import _get_merged_dataset
        from llamafactory.hparams import get_train_args
        from llamafactory.model import load_tokenizer

        with self._quiet():
            model_args, data_args, training_args, _ft, _gen = get_train_args(dict(args))
            tokenizer_module = load_tokenizer(model_args)
            tokenizer = tokenizer_module["tokenizer"]
            template = get_template_and_fix_tokenizer(tokenizer, data_args)
            # The same call get_dataset makes first: the merged, aligned rows in LF's order.
            merged = _get_merged_dataset(
                data_args.dataset, model_args, data_args, training_args, "sft"
            )
            module = get_dataset(
                template, model_args, data_args, training_args, stage="sft", **tokenizer_module
            )
        self._record_template(args["template"], tokenizer, template)
        return {
            "data_args": data_args,
            "training_args": training_args,
            "tokenizer": tokenizer,
            "template": template,
            "merged": merged,
            "train": module["train_dataset"],
        }

    def _record_template(self, name: str, tokenizer: Any, template: Any) -> None:
        if name in self.templates:
            return
        self.templates[name] = {
            "eos_token": tokenizer.eos_token,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token": tokenizer.pad_token,
            "pad_token_id": tokenizer.pad_token_id,
            "efficient_eos": template.efficient_eos,
        }

    @staticmethod
    def _merged_sources(merged: Any, datasets: tuple[str, ...], sizes: list[int]) -> list[Any]:
        """(dataset, row) of every merged row, from the index mapping `datasets` keeps.

        concatenate_datasets stacks the sources; interleave_datasets is a `select` over that
        stack, so its indices point into it.
        """
        if merged._indices is not None:
            stacked = merged._indices.column(0).to_pylist()
        else:
            stacked = list(range(len(merged)))
        sources = []
        for pos in stacked:
            for name, size in zip(datasets, sizes, strict=True):
                if pos < size:
                    sources.append([name, pos])
                    break
                pos -= size
            else:
                raise RuntimeError("merged index outside the stacked datasets")
        return sources

    def _source_sizes(self, args: dict[str, Any], datasets: tuple[str, ...]) -> list[int]:
        from llamafactory.data.loader import _get_merged_dataset
        from llamafactory.hparams import get_train_args

        with self._quiet():
            model_args, data_args, training_args, _ft, _gen = get_train_args(dict(args))
            parts = _get_merged_dataset(
                data_args.dataset, model_args, data_args, training_args, "sft", return_dict=True
            )
        return [len(parts[name]) for name in datasets]

    def run_pack(self, spec: PackSpec) -> dict[str, Any]:
        """Pack one dataset (or mix) and describe every packed row by its segments."""
        from llamafactory.data.processor import SupervisedDatasetProcessor

        extra = {
            "packing": True,
            "neat_packing": spec.neat_packing or None,
            "train_on_prompt": spec.train_on_prompt,
            "mask_history": spec.mask_history,
            "max_samples": spec.max_samples,
        }
        if len(spec.datasets) > 1:
            extra["mix_strategy"] = spec.mix_strategy
            extra["interleave_probs"] = spec.interleave_probs
        args = self._args(spec.template, spec.datasets, spec.cutoff_len, **extra)
        run = self._run(args)
        data_args, train, merged = run["data_args"], run["train"], run["merged"]
        if len(merged) > data_args.preprocessing_batch_size:
            raise RuntimeError(f"{spec.key()}: rows span several map batches")

        # Unpacked encoding of every merged row with the same (decremented) cutoff, by LF's own
        # processor: the packed segments are matched against it to name their source rows.
        plain = SupervisedDatasetProcessor(
            template=run["template"],
            tokenizer=run["tokenizer"],
            processor=None,
            data_args=data_args,
        )
        batch = merged[:]
        valid = [
            i
            for i in range(len(merged))
            if len(batch["_prompt"][i]) % 2 == 1 and len(batch["_response"][i]) == 1
        ]
        with self._quiet():
            encoded = plain.preprocess_dataset(batch)
        candidates: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
        for i, ids, labels in zip(valid, encoded["input_ids"], encoded["labels"], strict=True):
            candidates.setdefault((tuple(ids), tuple(labels)), []).append(i)

        columns = {col: [list(row[col]) for row in train] for col in PACKED_COLUMNS}
        width = data_args.cutoff_len + 1
        packs = []
        for n in range(len(train)):
            ids, labels = columns["input_ids"][n], columns["labels"][n]
            if len(ids) != width:
                raise RuntimeError(f"{spec.key()}: packed row {n} has {len(ids)} ids")
            lengths, pad = _split_segments(columns["position_ids"][n], width)
            segments, start = [], 0
            for length in lengths:
                key = (tuple(ids[start : start + length]), tuple(labels[start : start + length]))
                matches = candidates.get(key)
                if not matches:
                    raise RuntimeError(f"{spec.key()}: segment of row {n} matches no source row")
                # Identical encodings sit in one length bucket, which LF empties from the
                # highest row index down, so taking the highest remaining match is LF's choice.
                segments.append([matches.pop(), length])
                start += length
            packs.append({"segments": segments, "pad": pad})
        unpacked = sorted(i for rows in candidates.values() for i in rows)

        n_rows = len(train)
        if n_rows <= FULL_ROWS_LIMIT:
            stored = list(range(n_rows))
        else:
            head, tail = VERBATIM_HEAD_TAIL[spec.cutoff_len]
            stored = sorted(
                set(range(min(head, n_rows))) | set(range(max(n_rows - tail, 0), n_rows))
            )
        rows = []
        for n in stored:
            row: dict[str, Any] = {"pack": n}
            row.update({col: columns[col][n] for col in PACKED_COLUMNS})
            if spec.neat_packing:
                params = train[n]["packing_params"]
                row["sequence_boundaries"] = params["sequence_boundaries"]
                row["right_padding_length"] = params["right_padding_length"]
            rows.append(row)

        case: dict[str, Any] = {
            "key": spec.key(),
            "template": spec.template,
            "datasets": list(spec.datasets),
            "dataset_dir": str(DATASET_DIRS[spec.datasets[0]].relative_to(sft.REPO_ROOT)),
            "max_samples": spec.max_samples,
            "cutoff_len": spec.cutoff_len,
            "effective_cutoff_len": data_args.cutoff_len,
            "packed_row_length": width,
            "packing": bool(data_args.packing),
            "neat_packing": bool(data_args.neat_packing),
            "train_on_prompt": spec.train_on_prompt,
            "mask_history": spec.mask_history,
            "mix_strategy": data_args.mix_strategy if len(spec.datasets) > 1 else None,
            "interleave_probs": data_args.interleave_probs if len(spec.datasets) > 1 else None,
            "seed": run["training_args"].seed,
            "preprocessing_batch_size": data_args.preprocessing_batch_size,
            "pad_token_id": run["tokenizer"].pad_token_id,
            "source_rows": len(merged),
            "dropped_invalid": [i for i in range(len(merged)) if i not in set(valid)],
            "not_packed": unpacked,
            "num_packed_rows": n_rows,
            "packs": packs,
            "digests": {col: _digest(columns[col]) for col in PACKED_COLUMNS},
            "stored_packs": stored,
            "rows": rows,
        }
        if len(spec.datasets) > 1:
            sizes = self._source_sizes(args, spec.datasets)
            case["source_sizes"] = dict(zip(spec.datasets, sizes, strict=True))
            case["merged_sources"] = self._merged_sources(merged, spec.datasets, sizes)
        return case

    def run_mix(
        self, spec: MixSpec, reference: dict[str, list[list[int]]] | None
    ) -> dict[str, Any]:
        """Mix alpaca_en_demo and identity (no packing) and record the rows in LF's order.

        ``reference`` holds each dataset's tokenized rows (from the concat case); every mixed
        row is checked against the row its recorded source names.
        """
        case: dict[str, Any] = {
            "key": spec.key(),
            "template": "qwen",
            "datasets": list(MIX_DATASETS),
            "dataset_dir": str(sft.MAIN_DATA_DIR.relative_to(sft.REPO_ROOT)),
            "max_samples": MIX_MAX_SAMPLES,
            "cutoff_len": MIX_CUTOFF,
            "mix_strategy": spec.mix_strategy,
            "interleave_probs": spec.interleave_probs,
            "seed": spec.seed,
        }
        args = self._args(
            "qwen",
            MIX_DATASETS,
            MIX_CUTOFF,
            max_samples=MIX_MAX_SAMPLES,
            mix_strategy=spec.mix_strategy,
            interleave_probs=spec.interleave_probs,
            seed=spec.seed,
        )
        try:
            run = self._run(args)
        except Exception as exc:  # noqa: BLE001 - LF's refusal is recorded as data
            case["error"] = f"{type(exc).__name__}: {exc}"
            return case
        sizes = self._source_sizes(args, MIX_DATASETS)
        sources = self._merged_sources(run["merged"], MIX_DATASETS, sizes)
        train = run["train"]
        if len(train) != len(sources):
            raise RuntimeError(f"{spec.key()}: {len(train)} rows vs {len(sources)} merged rows")
        rows = []
        for (name, index), example in zip(sources, train, strict=True):
            ids = list(example["input_ids"])
            if reference is not None and reference[name][index] != ids:
                raise RuntimeError(f"{spec.key()}: row from {name}[{index}] differs from concat")
            rows.append({"source": [name, index], "input_ids": ids})
        case.update(
            {
                "seed": run["training_args"].seed,
                "interleave_probs": run["data_args"].interleave_probs,
                "source_sizes": dict(zip(MIX_DATASETS, sizes, strict=True)),
                "num_rows": len(rows),
                "source_counts": {
                    name: sum(1 for r in rows if r["source"][0] == name) for name in MIX_DATASETS
                },
                "error": None,
                "rows": rows,
            }
        )
        return case


def _pack_plan() -> list[PackSpec]:
    alpaca = ("alpaca_en_demo",)
    plan = [
        PackSpec(template, alpaca, cutoff) for template in PACK_TEMPLATES for cutoff in PACK_CUTOFFS
    ]
    plan.append(PackSpec("qwen", alpaca, 128, train_on_prompt=True))
    plan.append(PackSpec("qwen", ("multiturn_demo",), 128, mask_history=True))
    # Beyond the brief: at 128 every multiturn row fills a pack alone; at 1024 they share one.
    plan.append(PackSpec("qwen", ("multiturn_demo",), 1024, mask_history=True))
    plan.append(
        PackSpec(
            "qwen",
            MIX_DATASETS,
            MIX_PACK_CUTOFF,
            max_samples=MIX_MAX_SAMPLES,
            mix_strategy="interleave_under",
            interleave_probs=MIX_PACK_PROBS,
        )
    )
    # Last: LF's neat_packing branch patches datasets' OptimizedTypedSequence for the rest of the
    # process (int32 attention masks); values do not change, but the other cases run first.
    plan.extend(PackSpec("qwen", alpaca, cutoff, neat_packing=True) for cutoff in PACK_CUTOFFS)
    return plan


def _mix_plan() -> list[MixSpec]:
    plan = [MixSpec("concat"), MixSpec("concat", MIX_PROBS)]  # the second: LF refuses probs
    for strategy in MIX_STRATEGIES[1:]:
        plan.append(MixSpec(strategy))
        plan.append(MixSpec(strategy, MIX_PROBS))
    plan.append(MixSpec("interleave_under", MIX_PROBS, seed=ALT_SEED))
    return plan


def _notes() -> dict[str, str]:
    return {
        "digests": (
            "sha256 hex of json.dumps(column, separators=(',', ':')) where column is the list of "
            "every packed row's list of ints, in order (input_ids, labels, attention_mask, "
            "position_ids)"
        ),
        "segments": (
            "[source row, length] per packed sequence in pack order; source row indexes the "
            "merged dataset (single dataset: the row of the file; mixed: see merged_sources)"
        ),
        "pad": (
            "pad tail length: input_ids pad_token_id, labels -100, position_ids 0, attention_mask "
            "1 (neat_packing: 0)"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer-dir", type=Path, default=None, help="reuse a built tiny tokenizer"
    )
    parser.add_argument("--main-python", type=Path, default=sft.DEFAULT_MAIN_PYTHON)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--verbose", action="store_true", help="show LF's own output")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lf_packmix_") as tmp:
        workdir = Path(tmp)
        # Keep HF/datasets caches out of the user's home and never touch the network.
        os.environ["HF_HOME"] = str(workdir / "hf_home")
        os.environ["HF_DATASETS_CACHE"] = str(workdir / "hf_datasets")
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["DISABLE_VERSION_CHECK"] = "1"
        stubbed = sft._install_torchaudio_stub(workdir)

        sys.path.insert(0, str(sft.REPO_ROOT))
        from tests.fixtures.tiny import tokenizer_fingerprint

        if args.tokenizer_dir is None:
            tokenizer_dir = workdir / "tiny_tokenizer"
            sft._build_tokenizer(args.main_python, tokenizer_dir)
        else:
            tokenizer_dir = args.tokenizer_dir
        fingerprint = tokenizer_fingerprint(tokenizer_dir)

        import datasets
        import llamafactory

        if llamafactory.__version__ != sft.EXPECTED_LF_VERSION:
            print(
                f"error: need llamafactory=={sft.EXPECTED_LF_VERSION}, "
                f"found {llamafactory.__version__}",
                file=sys.stderr,
            )
            return 2

        gen = PackMixGenerator(tokenizer_dir, workdir, args.verbose)
        mixing: dict[str, dict[str, Any]] = {}
        reference: dict[str, list[list[int]]] | None = None
        for spec in _mix_plan():
            case = gen.run_mix(spec, reference)
            if spec == MixSpec("concat"):
                if case["error"] is not None:
                    raise RuntimeError(f"concat failed: {case['error']}")
                reference = {name: [] for name in MIX_DATASETS}
                for row in case["rows"]:
                    reference[row["source"][0]].append(row["input_ids"])
            mixing[spec.key()] = case
            status = case["error"] or f"{case['num_rows']} rows"
            print(f"mix {spec.key()}: {status}", file=sys.stderr)
        packing: dict[str, dict[str, Any]] = {}
        for spec in _pack_plan():
            case = gen.run_pack(spec)
            packing[spec.key()] = case
            print(
                f"pack {spec.key()}: {case['source_rows']} source rows -> "
                f"{case['num_packed_rows']} packed rows",
                file=sys.stderr,
            )

    golden = {
        "llamafactory_version": llamafactory.__version__,
        "datasets_version": datasets.__version__,
        "tokenizer_fingerprint": fingerprint,
        "generator": "tests/goldens/generate_lf_packing_mix.py",
        "torchaudio_stubbed": stubbed,
        "notes": _notes(),
        "templates": dict(sorted(gen.templates.items())),
        "packing": packing,
        "mixing": mixing,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(golden, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8"
    )
    size_kb = args.output.stat().st_size / 1024
    print(
        f"wrote {args.output} ({size_kb:.0f} KiB, {len(packing)} packing and {len(mixing)} "
        f"mixing cases) in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
