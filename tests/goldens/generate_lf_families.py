"""Generate LLaMA-Factory 0.9.5 goldens for the non-SFT data families (pt, rm/dpo, kto, ppo).

Why: rayft re-implements the dataset processors LF uses outside SFT -- pretraining text
(``PretrainDatasetProcessor``, with and without packing), preference pairs for ``rm``/``dpo``
(``PairwiseDatasetProcessor``), KTO feedback rows with their shifted KL pairs
(``FeedbackDatasetProcessor``) and PPO prompts (``UnsupervisedDatasetProcessor``). The only
trustworthy reference is LF itself, so this script runs what each ``run_<stage>`` workflow
does -- ``get_train_args`` -> ``load_tokenizer`` -> ``get_template_and_fix_tokenizer`` ->
``get_dataset(stage=...)`` -- on the tiny tokenizer from ``tests/fixtures/tiny.py`` and writes
the tokenized columns to ``lf095_families.json``.

Run under the LLaMA-Factory venv, from the repo root (see ``tests/goldens/README.md``)::

    /work/lfvenv/bin/python tests/goldens/generate_lf_families.py

It shares the tokenizer build and the torchaudio stand-in with ``generate_lf_goldens.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__:
    from . import generate_lf_goldens as sft
else:  # run as a script: this file's folder is sys.path[0]
    import generate_lf_goldens as sft

DEFAULT_OUTPUT = sft.GOLDENS_DIR / "lf095_families.json"
GOLDENS_DATA_DIR = sft.GOLDENS_DIR / "data"

# dataset name -> (dataset_dir, default number of leading rows)
DATASETS: dict[str, tuple[Path, int]] = {
    "c4_demo": (sft.MAIN_DATA_DIR, 30),
    "dpo_en_demo": (sft.MAIN_DATA_DIR, 20),
    "ranking_demo": (GOLDENS_DATA_DIR, 8),
    "kto_en_demo": (sft.MAIN_DATA_DIR, 20),
    "alpaca_en_demo": (sft.MAIN_DATA_DIR, 20),
    "identity": (sft.MAIN_DATA_DIR, 10),
}
CHAT_TEMPLATES: tuple[str, ...] = (
    "qwen",
    "qwen3",
    "qwen3_nothink",
    "llama3",
    "llama2",
    "mistral",
    "gemma",
    "gemma2",
    "chatml",
    "phi4",
    "deepseek3",
    "glm4",
    "default",
)
PT_TEMPLATES: tuple[str, ...] = ("default", "llama3", "qwen", "gemma")
PT_CUTOFFS: tuple[int, ...] = (64, 1024)
LONG_CUTOFF = 1024
SHORT_CUTOFF = 48
# Size budget (the file stays under ~4 MB): the demo answers run to hundreds of tokens, so
# the full slices are kept for a few templates and the rest get their first rows only.
# pt templates differ only in the eos text appended, so only `default` gets all 30 rows.
PT_FULL_TEMPLATES: tuple[str, ...] = ("default",)
PT_SHORT_ROWS = 8
# dpo_en_demo at cutoff 1024 (at 48 every template gets all 20 rows).
DPO_LONG_FULL_TEMPLATES: tuple[str, ...] = ("qwen",)
DPO_LONG_SHORT_ROWS = 3
# kto_en_demo: rows 0-4 hold both tags (True x4, False), enough for the KL shift to wrap.
KTO_FULL_TEMPLATES: tuple[str, ...] = ("qwen", "gemma2")
KTO_SHORT_ROWS = 5
# PPO edge rows: c4_demo has no response column (LF's `_response` is empty) and kto_en_demo
# has two responses (the answer and an empty one); both take the "empty assistant turn" path.
PPO_EDGE_ROWS = 5

# LF workflow stage -> the `stage` its workflow passes to `get_dataset` (dpo reuses rm's data).
DATA_STAGE: dict[str, str] = {"pt": "pt", "rm": "rm", "dpo": "rm", "kto": "kto", "ppo": "ppo"}
# Columns recorded per data stage (LF also emits attention masks and media columns).
COLUMNS: dict[str, tuple[str, ...]] = {
    "pt": ("input_ids",),
    "rm": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"),
    "kto": ("input_ids", "labels", "kl_input_ids", "kl_labels", "kto_tags"),
    "ppo": ("input_ids", "labels"),
}


def _is_pairwise_valid(row: dict[str, Any]) -> bool:
    return len(row["_prompt"]) % 2 == 1 and len(row["_response"]) >= 2


# The validity test each LF processor applies before encoding a row (it drops the others).
KEEPS_ROW: dict[str, Callable[[dict[str, Any]], bool]] = {
    "pt": lambda row: True,
    "rm": _is_pairwise_valid,
    "kto": _is_pairwise_valid,
    "ppo": lambda row: len(row["_prompt"]) % 2 == 1,
}


@dataclass(frozen=True)
class CaseSpec:
    """One LF run: a workflow stage, template, dataset slice and the data switches."""

    stage: str
    template: str
    dataset: str
    cutoff_len: int
    max_samples: int
    packing: bool | None = False
    enable_thinking: bool = True
    add_bos_token: bool = False

    def key(self) -> str:
        flags = f"packing={self.packing},thinking={self.enable_thinking},bos={self.add_bos_token}"
        return (
            f"{self.stage}/{self.template}/{self.dataset}[:{self.max_samples}]"
            f"/cutoff={self.cutoff_len}/{flags}"
        )


class FamilyGenerator:
    """Runs one LF workflow's data path per case, with a fresh tokenizer every time.

    ``get_template_and_fix_tokenizer`` mutates the tokenizer (eos swap, stop words), exactly as
    once per ``llamafactory-cli train``, so nothing is reused between cases.
    """

    def __init__(self, tokenizer_dir: Path, workdir: Path, verbose: bool) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.workdir = workdir
        self.verbose = verbose
        self._case_no = 0
        self.templates: dict[str, dict[str, Any]] = {}

    def _args(self, spec: CaseSpec) -> dict[str, Any]:
        dataset_dir, _ = DATASETS[spec.dataset]
        self._case_no += 1
        args: dict[str, Any] = {
            "stage": spec.stage,
            "do_train": True,
            "model_name_or_path": str(self.tokenizer_dir),
            "finetuning_type": "lora",
            "template": spec.template,
            "dataset": spec.dataset,
            "dataset_dir": str(dataset_dir),
            "cutoff_len": spec.cutoff_len,
            "max_samples": spec.max_samples,
            "enable_thinking": spec.enable_thinking,
            "overwrite_cache": True,
            "cache_dir": str(self.workdir / "hf_cache"),
            "output_dir": str(self.workdir / f"out{self._case_no}"),
            "report_to": "none",
            "seed": 42,
        }
        if spec.packing is not None:  # unset: LF turns packing on for pt (without the -1)
            args["packing"] = spec.packing
        if spec.stage == "ppo":
            # FinetuningArguments insists on a reward model for ppo; the data path never loads
            # it, so the tokenizer folder stands in.
            args["reward_model"] = str(self.tokenizer_dir)
        return args

    def _quiet(self) -> contextlib.AbstractContextManager[Any]:
        """LF prints a training example per dataset; keep stdout clean unless --verbose."""
        if self.verbose:
            return contextlib.nullcontext()
        return contextlib.redirect_stdout(io.StringIO())

    def run_case(self, spec: CaseSpec) -> dict[str, Any]:
        """Tokenize one dataset slice the way the stage's workflow does, via ``get_dataset``."""
        from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
        from llamafactory.data.loader import _get_merged_dataset
        from llamafactory.hparams import get_train_args
        from llamafactory.model import load_tokenizer

        data_stage = DATA_STAGE[spec.stage]
        with self._quiet():
            model_args, data_args, training_args, _ft_args, _gen_args = get_train_args(
                self._args(spec)
            )
            tokenizer_module = load_tokenizer(model_args)
            tokenizer = tokenizer_module["tokenizer"]
            if spec.add_bos_token:
                # transformers 5.6 ignores `add_bos_token` in tokenizer_config.json when a
                # tokenizer.json exists and LF passes no such argument, so the variant uses the
                # tokenizer's public setter -- the state a Llama-2-style tokenizer loads in.
                tokenizer.add_bos_token = True
            template = get_template_and_fix_tokenizer(tokenizer, data_args)
            # The aligned rows tell which source rows LF keeps, so every golden row carries
            # its source index even when LF drops some.
            aligned = _get_merged_dataset(
                data_args.dataset, model_args, data_args, training_args, data_stage
            )
            module = get_dataset(
                template, model_args, data_args, training_args, stage=data_stage, **tokenizer_module
            )
        train = module["train_dataset"]
        n_rows = len(aligned)
        batch_size = data_args.preprocessing_batch_size
        if n_rows > batch_size:
            raise RuntimeError(f"{spec.key()}: {n_rows} rows span several map batches")
        kept = [i for i, row in enumerate(aligned) if KEEPS_ROW[data_stage](row)]
        packed = data_stage == "pt" and data_args.packing
        if not packed and len(train) != len(kept):
            raise RuntimeError(f"{spec.key()}: {len(train)} encoded vs {len(kept)} kept rows")
        indices = list(range(len(train))) if packed else kept
        rows = []
        for idx, example in zip(indices, train, strict=True):
            row: dict[str, Any] = {"index": idx}
            row.update({col: example[col] for col in COLUMNS[data_stage]})
            if data_stage == "kto":
                # LF pairs each row with the previous row's response (the first with the last)
                # inside one map batch, dropped rows included.
                row["kl_index"] = (idx - 1) % n_rows
            rows.append(row)
        self._record_template(spec.template, tokenizer, template)
        case: dict[str, Any] = {
            "stage": spec.stage,
            "data_stage": data_stage,
            "processor": type(_processor_of(data_stage, data_args)).__name__,
            "template": spec.template,
            "dataset": spec.dataset,
            "max_samples": spec.max_samples,
            "cutoff_len": spec.cutoff_len,
            "effective_cutoff_len": data_args.cutoff_len,
            "packing": spec.packing,
            "effective_packing": bool(data_args.packing),
            "enable_thinking": spec.enable_thinking,
            "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
            "map_batch_size": batch_size,
            "rows": rows,
            "dropped": [i for i in range(n_rows) if i not in set(kept)],
        }
        if data_stage == "pt":
            eos_text = "<|end_of_text|>" if spec.template == "llama3" else tokenizer.eos_token
            case["pt_eos_text"] = eos_text
            case["pt_eos_ids"] = tokenizer(eos_text, add_special_tokens=False)["input_ids"]
            case["source_rows"] = n_rows
        return case

    def _record_template(self, name: str, tokenizer: Any, template: Any) -> None:
        """What LF's fix left on the tokenizer, once per template (same for every stage)."""
        if name in self.templates:
            return
        self.templates[name] = {
            "eos_token": tokenizer.eos_token,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token": tokenizer.bos_token,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token": tokenizer.pad_token,
            "pad_token_id": tokenizer.pad_token_id,
            "efficient_eos": template.efficient_eos,
            "template_class": type(template).__name__,
        }


def _processor_of(data_stage: str, data_args: Any) -> Any:
    """The processor object LF picks for ``data_stage`` (recorded by class name)."""
    from llamafactory.data.loader import _get_dataset_processor

    return _get_dataset_processor(data_args, data_stage, None, None, None)


def _case_plan() -> list[CaseSpec]:
    """Every (stage, template, dataset, cutoff, switches) combination the goldens cover."""
    plan: list[CaseSpec] = []
    rows = {name: n for name, (_, n) in DATASETS.items()}

    # pt: eos choice per template, truncation vs packing, LF's implicit packing default, bos.
    for template in PT_TEMPLATES:
        n = rows["c4_demo"] if template in PT_FULL_TEMPLATES else PT_SHORT_ROWS
        for packing in (False, True):
            for cutoff in PT_CUTOFFS:
                plan.append(CaseSpec("pt", template, "c4_demo", cutoff, n, packing))
    plan.append(CaseSpec("pt", "default", "c4_demo", 64, PT_SHORT_ROWS, packing=None))
    for template in ("default", "llama3"):
        for packing in (False, True):
            plan.append(
                CaseSpec("pt", template, "c4_demo", 64, 10, packing=packing, add_bos_token=True)
            )

    thinking_variants = [(t, True) for t in CHAT_TEMPLATES] + [("qwen3", False)]
    # rm/dpo: both run PairwiseDatasetProcessor; dpo for every template, rm for qwen only.
    for template, thinking in thinking_variants:
        for dataset in ("ranking_demo", "dpo_en_demo"):
            for cutoff in (LONG_CUTOFF, SHORT_CUTOFF):
                n = rows[dataset]
                if (
                    dataset == "dpo_en_demo"
                    and cutoff == LONG_CUTOFF
                    and template not in DPO_LONG_FULL_TEMPLATES
                ):
                    n = DPO_LONG_SHORT_ROWS
                plan.append(CaseSpec("dpo", template, dataset, cutoff, n, enable_thinking=thinking))
    for dataset in ("ranking_demo", "dpo_en_demo"):
        plan.append(CaseSpec("rm", "qwen", dataset, SHORT_CUTOFF, rows[dataset]))

    # kto: every template at 1024, truncation of both the row and its KL pair for two.
    for template, thinking in thinking_variants:
        n = rows["kto_en_demo"] if template in KTO_FULL_TEMPLATES else KTO_SHORT_ROWS
        plan.append(
            CaseSpec("kto", template, "kto_en_demo", LONG_CUTOFF, n, enable_thinking=thinking)
        )
    for template in ("qwen", "gemma2"):
        plan.append(CaseSpec("kto", template, "kto_en_demo", SHORT_CUTOFF, rows["kto_en_demo"]))

    # ppo: prompts with their reference answer as labels; empty/two-response edge rows.
    for template, thinking in thinking_variants:
        for dataset in ("alpaca_en_demo", "identity"):
            plan.append(
                CaseSpec(
                    "ppo", template, dataset, LONG_CUTOFF, rows[dataset], enable_thinking=thinking
                )
            )
    plan.append(CaseSpec("ppo", "qwen", "alpaca_en_demo", SHORT_CUTOFF, rows["alpaca_en_demo"]))
    for template in ("qwen", "gemma2"):
        for dataset in ("c4_demo", "kto_en_demo"):
            plan.append(CaseSpec("ppo", template, dataset, LONG_CUTOFF, PPO_EDGE_ROWS))
    plan.append(CaseSpec("ppo", "qwen", "c4_demo", SHORT_CUTOFF, PPO_EDGE_ROWS))
    return plan


def _check_rm_equals_dpo(cases: list[dict[str, Any]]) -> list[str]:
    """rm and dpo share LF's data path; return the rm cases whose rows differ from dpo's."""
    dpo = {
        (c["template"], c["dataset"], c["cutoff_len"], c["enable_thinking"]): c
        for c in cases
        if c["stage"] == "dpo"
    }
    mismatched = []
    for case in cases:
        if case["stage"] != "rm":
            continue
        twin = dpo.get((case["template"], case["dataset"], case["cutoff_len"], True))
        if twin is None or twin["rows"] != case["rows"] or twin["dropped"] != case["dropped"]:
            mismatched.append(f"{case['template']}/{case['dataset']}/{case['cutoff_len']}")
    return mismatched


def _collator_labels_note() -> dict[str, str]:
    """How LF's collators turn the recorded columns into labels (not part of the goldens)."""
    return {
        "pt": (
            "run_pt uses transformers.DataCollatorForLanguageModeling(mlm=False): labels are a "
            "copy of input_ids with every position whose id equals pad_token_id set to -100."
        ),
        "rm/dpo": (
            "PairwiseDataCollatorWithPadding concatenates all chosen rows, then all rejected "
            "rows, into one batch (chosen first)."
        ),
        "kto": "KTODataCollatorWithPadding pads input and KL rows separately; kto_tags as bools.",
        "ppo": (
            "labels here are the reference answer's ids (no -100); PPO generates its own "
            "responses and only uses input_ids as the query (left-padded)."
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
    with tempfile.TemporaryDirectory(prefix="lf_families_") as tmp:
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

        import llamafactory

        if llamafactory.__version__ != sft.EXPECTED_LF_VERSION:
            print(
                f"error: need llamafactory=={sft.EXPECTED_LF_VERSION}, "
                f"found {llamafactory.__version__}",
                file=sys.stderr,
            )
            return 2

        gen = FamilyGenerator(tokenizer_dir, workdir, args.verbose)
        cases: list[dict[str, Any]] = []
        failed: dict[str, str] = {}
        for spec in _case_plan():
            try:
                cases.append(gen.run_case(spec))
                status = "ok"
            except Exception as exc:  # noqa: BLE001 - record any LF failure as data
                status = f"{type(exc).__name__}: {exc}"
                failed[spec.key()] = status
            print(f"{spec.key()}: {status}", file=sys.stderr)

    mismatched = _check_rm_equals_dpo(cases)
    if mismatched:
        print(f"error: rm rows differ from dpo rows: {mismatched}", file=sys.stderr)
        return 1
    golden = {
        "llamafactory_version": llamafactory.__version__,
        "tokenizer_fingerprint": fingerprint,
        "generator": "tests/goldens/generate_lf_families.py",
        "torchaudio_stubbed": stubbed,
        "datasets": {
            name: str(path.relative_to(sft.REPO_ROOT)) for name, (path, _) in DATASETS.items()
        },
        "collator_labels": _collator_labels_note(),
        "add_bos_token_variant": (
            "cases with add_bos_token true set tokenizer.add_bos_token = True right after "
            "load_tokenizer: transformers 5.6 drops add_bos_token from tokenizer_config.json "
            "when tokenizer.json exists, and LF has no argument for it"
        ),
        "templates": dict(sorted(gen.templates.items())),
        "cases": cases,
        "failed": failed,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(golden, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8"
    )
    size_kb = args.output.stat().st_size / 1024
    print(
        f"wrote {args.output} ({size_kb:.0f} KiB, {len(cases)} cases, {len(failed)} failed) "
        f"in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
