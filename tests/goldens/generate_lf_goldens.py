"""Generate supervised-tokenization goldens with LLaMA-Factory 0.9.5's own code path.

Why: rayft re-implements LLaMA-Factory's chat templates and SFT masking so that a YAML that
trains in LLaMA-Factory trains identically on Ray. The only trustworthy reference is LF
itself, so this script drives exactly what ``llamafactory-cli train`` does for ``stage: sft``
(``get_train_args`` -> ``load_tokenizer`` -> ``get_template_and_fix_tokenizer`` ->
``get_dataset(stage="sft")``) on the tiny tokenizer from ``tests/fixtures/tiny.py`` and
writes the resulting ``input_ids``/``labels`` to ``lf095_supervised.json``.

It must run under the LLaMA-Factory venv (``/work/lfvenv/bin/python``), never under rayft's
venv; the tokenizer itself is built by rayft's venv (``--main-python``) because the two venvs
ship different ``tokenizers`` versions and the goldens must use byte-identical files.
See ``tests/goldens/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

GOLDENS_DIR = Path(__file__).resolve().parent
REPO_ROOT = GOLDENS_DIR.parents[1]
MAIN_DATA_DIR = REPO_ROOT / "data"
MULTITURN_DATA_DIR = GOLDENS_DIR / "data"
DEFAULT_OUTPUT = GOLDENS_DIR / "lf095_supervised.json"
DEFAULT_MAIN_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
EXPECTED_LF_VERSION = "0.9.5"

TEMPLATES: tuple[str, ...] = (
    "qwen",
    "gemma",
    "qwen3",
    "llama3",
    "llama2",
    "mistral",
    "gemma3",
    "chatml",
    "phi4",
    "deepseek3",
    "glm4",
    "default",
    "empty",
    "alpaca",
    "vicuna",
    "qwen3_nothink",
    # Not in the original brief: LF 0.9.5 maps the text-only Gemma-3 270M/1B checkpoints to
    # "gemma2" (efficient_eos, no eos swap), and "gemma3" needs a multimodal processor.
    "gemma2",
    "yi",
    "baichuan2",
    "intern2",
    "cohere",
    "falcon",
    "zephyr",
    "olmo",
    "phi",
    "deepseek",
)
# With `template` unset, LF parses the tokenizer's own chat_template (`parse_template`). Each
# entry is a Jinja template written next to a copy of the tiny tokenizer; its golden cases have
# `"template": null` and `"chat_template": <key>`.
TOKENIZER_CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
        " + '<|im_end|>' + '\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # A built-in default system (Qwen-2.5 style) exercises LF's default-system detection.
    "chatml_default_system": (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{% for message in messages %}{% if message['role'] != 'system' %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
# dataset name -> (dataset_dir, number of leading rows to keep)
DATASETS: dict[str, tuple[Path, int]] = {
    "alpaca_en_demo": (MAIN_DATA_DIR, 40),
    "identity": (MAIN_DATA_DIR, 20),
    "multiturn_demo": (MULTITURN_DATA_DIR, 5),
    # Function calling (sharegpt with function_call/observation turns and a `tools` column):
    # the first 20 rows of LF's glaive demo, and hand-written rows (system prompt, multi-turn
    # tool use, a thought in an answer, an empty tool list; parallel calls, a tag-wrapped call
    # and a thought before a call in the edge set).
    "glaive_toolcall_en_demo": (MULTITURN_DATA_DIR, 20),
    "tool_demo": (MULTITURN_DATA_DIR, 4),
    "tool_edge_demo": (MULTITURN_DATA_DIR, 3),
}
TEXT_DATASETS: tuple[str, ...] = ("alpaca_en_demo", "identity", "multiturn_demo")
TOOL_DATASETS: tuple[str, ...] = ("glaive_toolcall_en_demo", "tool_demo", "tool_edge_demo")
# The four tool formats' templates get the glaive rows; the others of TOOL_TEMPLATES (and the
# tokenizer chat templates, which use the default format) only the small hand-written set.
GLAIVE_TEMPLATES: tuple[str, ...] = ("qwen", "llama3", "glm4", "default")
TOOL_TEMPLATES: tuple[str, ...] = (*GLAIVE_TEMPLATES, "qwen3", "mistral")
# tool_edge_demo: glm4 has no parallel calls, and LF's Llama-2-style templates (mistral) read
# neither <tool_call> tags nor a thought before a call, so both would fail the whole case.
EDGE_TOOL_TEMPLATES: tuple[str, ...] = ("qwen", "qwen3", "llama3", "default")
# Templates added after the first goldens: alpaca_en_demo is cut to its first rows for them,
# which covers every slot while keeping the golden file small.
SHORT_ALPACA_TEMPLATES: tuple[str, ...] = (
    "yi",
    "intern2",
    "cohere",
    "falcon",
    "zephyr",
    "olmo",
    "phi",
    "deepseek",
)
SHORT_ALPACA_ROWS = 10
# Context appended to LF's error message when a template is skipped, for whoever reads the golden.
SKIP_NOTES: dict[str, str] = {
    "baichuan2": " (LF 0.9.5 no longer ships a baichuan2 template; rayft does not register one.)",
    "gemma3": (
        " (gemma3 uses mm_plugin Gemma3Plugin, whose process_messages requires a multimodal"
        " processor even for text-only rows; a tokenizer-only model dir has none. Its text slots"
        " are identical to 'gemma', and LF maps text-only Gemma-3 270M/1B to 'gemma2'.)"
    ),
}
LONG_CUTOFF = 1024
SHORT_CUTOFF = 24
TOOL_SHORT_CUTOFF = 96
# LF's llama3 tool prompt writes today's date (`datetime.now()`); the cases record it.
LLAMA3_DATE_FORMAT = "%d %b %Y"
SAMPLE_SYSTEM = "You are a helpful assistant."
SAMPLE_QUERY = "Who are you?"
SAMPLE_RESPONSE = "I am a tiny test model."

TORCHAUDIO_STUB = '''"""Stand-in for torchaudio, written by tests/goldens/generate_lf_goldens.py.

LLaMA-Factory imports torchaudio unconditionally for its audio plugin; text-only goldens never
call it, so any use fails loudly instead of silently producing wrong data.
"""

__version__ = "0.0.0+goldenstub"


def _unavailable(*args, **kwargs):
    raise RuntimeError("torchaudio stub: audio is not supported while generating goldens")


load = _unavailable


class _Functional:
    resample = staticmethod(_unavailable)


functional = _Functional()
'''


def _install_torchaudio_stub(workdir: Path) -> bool:
    """Make ``import torchaudio`` succeed for this process only.

    The LF venv has torchaudio removed (its wheels would drag in another torch); a stub on a
    private sys.path entry avoids touching any environment. Returns True if the stub is used.
    """
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        pkg = workdir / "stubs" / "torchaudio"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(TORCHAUDIO_STUB, encoding="utf-8")
        sys.path.insert(0, str(pkg.parent))
        return True
    return False


def _build_tokenizer(main_python: Path, out_dir: Path) -> dict[str, Any]:
    """Build the tiny tokenizer with rayft's venv so the files match what rayft's tests build."""
    if not main_python.exists():
        raise FileNotFoundError(f"rayft venv python not found: {main_python} (see --main-python)")
    proc = subprocess.run(
        [str(main_python), "-m", "tests.fixtures.tiny", str(out_dir)],
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building the tiny tokenizer failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _slots_as_data(slots: list[Any]) -> list[Any]:
    """Render formatter slots as JSON (sets become {"set": [...]}, dicts stay dicts)."""
    out: list[Any] = []
    for slot in slots:
        if isinstance(slot, set):
            out.append({"set": sorted(slot)})
        else:
            out.append(slot)
    return out


class GoldenGenerator:
    """Runs LF's SFT data pipeline once per case, with a fresh tokenizer every time.

    A fresh tokenizer matters: ``get_template_and_fix_tokenizer`` mutates it (eos swap,
    added stop words, chat template), exactly as it does once per ``llamafactory-cli train``.
    """

    def __init__(self, tokenizer_dir: Path, workdir: Path, verbose: bool) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.workdir = workdir
        self.verbose = verbose
        self._case_no = 0
        self.conversations: dict[str, list[dict[str, Any]]] = {}
        self.chat_template_dirs = {
            name: self._tokenizer_with_chat_template(name, jinja)
            for name, jinja in TOKENIZER_CHAT_TEMPLATES.items()
        }

    def _tokenizer_with_chat_template(self, name: str, jinja: str) -> Path:
        """A copy of the tiny tokenizer whose own chat_template is ``jinja``.

        The files are copied, not re-saved, so the vocabulary stays byte-identical; transformers
        reads ``chat_template.jinja`` next to them.
        """
        out = self.workdir / f"tokenizer_{name}"
        shutil.copytree(self.tokenizer_dir, out)
        (out / "chat_template.jinja").write_text(jinja, encoding="utf-8")
        return out

    def _args(
        self,
        template: str | None,
        chat_template: str | None,
        dataset: str,
        cutoff_len: int,
        **extra: Any,
    ) -> dict[str, Any]:
        dataset_dir, max_samples = DATASETS[dataset]
        self._case_no += 1
        model_dir = self.chat_template_dirs[chat_template] if chat_template else self.tokenizer_dir
        args = {
            "stage": "sft",
            "do_train": True,
            "model_name_or_path": str(model_dir),
            "finetuning_type": "lora",
            "dataset": dataset,
            "dataset_dir": str(dataset_dir),
            "cutoff_len": cutoff_len,
            "max_samples": max_samples,
            "overwrite_cache": True,
            "cache_dir": str(self.workdir / "hf_cache"),
            "output_dir": str(self.workdir / f"out{self._case_no}"),
            "report_to": "none",
            "seed": 42,
            **extra,
        }
        if template is not None:  # unset: LF parses the tokenizer's chat_template
            args["template"] = template
        return args

    def _quiet(self) -> contextlib.AbstractContextManager[Any]:
        """LF prints a training example per dataset; keep stdout clean unless --verbose."""
        if self.verbose:
            return contextlib.nullcontext()
        return contextlib.redirect_stdout(io.StringIO())

    def load(self, args: dict[str, Any]) -> tuple[Any, Any, Any, Any, Any]:
        """Parse args and load tokenizer+template the way ``run_sft`` does."""
        from llamafactory.data import get_template_and_fix_tokenizer
        from llamafactory.hparams import get_train_args
        from llamafactory.model import load_tokenizer

        model_args, data_args, training_args, _finetuning_args, _gen_args = get_train_args(
            dict(args)
        )
        tokenizer_module = load_tokenizer(model_args)
        tokenizer = tokenizer_module["tokenizer"]
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
        return model_args, data_args, training_args, tokenizer_module, template

    def run_case(
        self,
        template_name: str | None,
        dataset: str,
        cutoff_len: int,
        train_on_prompt: bool = False,
        mask_history: bool = False,
        chat_template: str | None = None,
        enable_thinking: bool = True,
        preserve_thinking: bool = False,
        max_samples: int | None = None,
    ) -> dict[str, Any]:
        """Tokenize one dataset with one template/flag combination via ``get_dataset``.

        If the day changes while LF runs, the llama3 tool prompt's date is ambiguous and the
        case is run again.
        """
        for _attempt in range(2):
            day = datetime.now().strftime(LLAMA3_DATE_FORMAT)
            case = self._run_case_once(
                template_name,
                dataset,
                cutoff_len,
                train_on_prompt=train_on_prompt,
                mask_history=mask_history,
                chat_template=chat_template,
                enable_thinking=enable_thinking,
                preserve_thinking=preserve_thinking,
                max_samples=max_samples,
            )
            if datetime.now().strftime(LLAMA3_DATE_FORMAT) == day:
                case["tool_date"] = day if dataset in TOOL_DATASETS else None
                return case
        raise RuntimeError("the date changed twice while generating one case")

    def _run_case_once(
        self,
        template_name: str | None,
        dataset: str,
        cutoff_len: int,
        *,
        train_on_prompt: bool,
        mask_history: bool,
        chat_template: str | None,
        enable_thinking: bool,
        preserve_thinking: bool,
        max_samples: int | None,
    ) -> dict[str, Any]:
        from llamafactory.data import get_dataset
        from llamafactory.data.loader import _get_merged_dataset

        args = self._args(
            template_name,
            chat_template,
            dataset,
            cutoff_len,
            train_on_prompt=train_on_prompt,
            mask_history=mask_history,
            enable_thinking=enable_thinking,
            preserve_thinking=preserve_thinking,
        )
        if max_samples is not None:
            args["max_samples"] = max_samples
        with self._quiet():
            model_args, data_args, training_args, tokenizer_module, template = self.load(args)
            # The aligned (pre-tokenization) rows tell which source rows LF keeps, so each
            # golden row can carry its original index even if LF drops some.
            aligned = _get_merged_dataset(
                data_args.dataset, model_args, data_args, training_args, "sft"
            )
            kept = [
                i
                for i, ex in enumerate(aligned)
                if len(ex["_prompt"]) % 2 == 1 and len(ex["_response"]) == 1
            ]
            module = get_dataset(
                template, model_args, data_args, training_args, stage="sft", **tokenizer_module
            )
        train = module["train_dataset"]
        if len(train) != len(kept):
            raise RuntimeError(
                f"row bookkeeping mismatch: {len(train)} encoded vs {len(kept)} kept"
            )
        self._record_conversations(dataset, aligned, kept)
        rows = [
            {"index": idx, "input_ids": list(ex["input_ids"]), "labels": list(ex["labels"])}
            for idx, ex in zip(kept, train, strict=True)
        ]
        return {
            "template": template_name,
            "chat_template": chat_template,
            "dataset": dataset,
            "cutoff_len": cutoff_len,
            "train_on_prompt": train_on_prompt,
            "mask_history": mask_history,
            "enable_thinking": enable_thinking,
            "preserve_thinking": preserve_thinking,
            "rows": rows,
            "dropped": len(aligned) - len(kept),
        }

    def _record_conversations(self, dataset: str, aligned: Any, kept: list[int]) -> None:
        """Keep LF's canonical rows (messages, system, tools) once per dataset and row.

        They do not depend on the template, so rayft's parity test can feed them straight to
        the template and masking code, and converter tests can compare against them.
        """
        known = {row["index"] for row in self.conversations.setdefault(dataset, [])}
        for i in kept:
            if i in known:
                continue
            self.conversations[dataset].append(
                {
                    "index": i,
                    "messages": [
                        {"role": m["role"], "content": m["content"]}
                        for m in aligned[i]["_prompt"] + aligned[i]["_response"]
                    ],
                    "system": aligned[i]["_system"],
                    "tools": aligned[i]["_tools"],
                }
            )
        self.conversations[dataset].sort(key=lambda row: row["index"])

    def template_info(
        self, template_name: str | None, chat_template: str | None = None
    ) -> dict[str, Any]:
        """Record what LF does to the tokenizer and how it renders a sample prompt."""
        base_len = len(self._base_tokenizer())
        with self._quiet():
            _, _, _, tokenizer_module, template = self.load(
                self._args(template_name, chat_template, "multiturn_demo", LONG_CUTOFF)
            )
        tok = tokenizer_module["tokenizer"]
        messages = [
            {"role": "user", "content": SAMPLE_QUERY},
            {"role": "assistant", "content": SAMPLE_RESPONSE},
        ]
        prompt_ids, response_ids = template.encode_oneturn(tok, messages, SAMPLE_SYSTEM, None)
        default_prompt_ids, _ = template.encode_oneturn(tok, messages, None, None)
        added = {tok.convert_ids_to_tokens(i): i for i in range(base_len, len(tok))}
        return {
            "template_class": type(template).__name__,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "bos_token": tok.bos_token,
            "bos_token_id": tok.bos_token_id,
            "pad_token": tok.pad_token,
            "pad_token_id": tok.pad_token_id,
            "vocab_len_after_fix": len(tok),
            "tokens_added_by_fix": added,
            "efficient_eos": template.efficient_eos,
            "replace_eos": template.replace_eos,
            "stop_words": list(template.stop_words),
            "stop_token_ids": sorted(template.get_stop_token_ids(tok)),
            "default_system": template.default_system,
            "thought_words": list(template.thought_words),
            "enable_thinking": template.enable_thinking,
            "tool_format": template.format_tools.tool_format,
            "slots": {
                "prefix": _slots_as_data(template.format_prefix.apply()),
                "system": _slots_as_data(template.format_system.slots),
                "user": _slots_as_data(template.format_user.slots),
                "assistant": _slots_as_data(template.format_assistant.slots),
                "function": _slots_as_data(template.format_function.slots),
                "observation": _slots_as_data(template.format_observation.slots),
            },
            "sample_system": SAMPLE_SYSTEM,
            "sample_query": SAMPLE_QUERY,
            "sample_response": SAMPLE_RESPONSE,
            "sample_prompt_ids": prompt_ids,
            "sample_prompt_text": tok.decode(prompt_ids, skip_special_tokens=False),
            "sample_response_ids": response_ids,
            "sample_response_text": tok.decode(response_ids, skip_special_tokens=False),
            "sample_prompt_text_default_system": tok.decode(
                default_prompt_ids, skip_special_tokens=False
            ),
            "jinja": tok.chat_template,
        }

    def _base_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))


def _tokenizer_key(chat_template: str) -> str:
    """Name under which a tokenizer-chat-template variant appears in `templates`/`skipped`."""
    return f"tokenizer:{chat_template}"


def _case_plan() -> list[dict[str, Any]]:
    """All (template, dataset, cutoff, flags) combinations the goldens cover."""
    plan: list[dict[str, Any]] = []

    def add(template: str | None, dataset: str, cutoff: int = LONG_CUTOFF, **flags: Any) -> None:
        plan.append({"template_name": template, "dataset": dataset, "cutoff_len": cutoff, **flags})

    for template in TEMPLATES:
        for dataset in TEXT_DATASETS:
            if template in SHORT_ALPACA_TEMPLATES and dataset == "alpaca_en_demo":
                add(template, dataset, max_samples=SHORT_ALPACA_ROWS)
            else:
                add(template, dataset)
    for chat_template in TOKENIZER_CHAT_TEMPLATES:
        for dataset in TEXT_DATASETS:
            rows = {"max_samples": SHORT_ALPACA_ROWS} if dataset == "alpaca_en_demo" else {}
            add(None, dataset, chat_template=chat_template, **rows)
        add(None, "tool_demo", chat_template=chat_template)
    for template in GLAIVE_TEMPLATES:
        add(template, "glaive_toolcall_en_demo")
    for template in TOOL_TEMPLATES:
        add(template, "tool_demo")
    for template in EDGE_TOOL_TEMPLATES:
        add(template, "tool_edge_demo")
    # truncation
    for template in ("qwen", "gemma"):
        for dataset in TEXT_DATASETS:
            add(template, dataset, SHORT_CUTOFF)
    add("llama2", "multiturn_demo", SHORT_CUTOFF)
    add("glm4", "multiturn_demo", SHORT_CUTOFF)
    add("qwen", "glaive_toolcall_en_demo", TOOL_SHORT_CUTOFF)
    add("glm4", "tool_demo", TOOL_SHORT_CUTOFF)
    # masking switches
    add("qwen", "multiturn_demo", train_on_prompt=True)
    add("qwen", "alpaca_en_demo", train_on_prompt=True)
    add("qwen", "tool_demo", train_on_prompt=True)
    add("qwen", "multiturn_demo", mask_history=True)
    add("qwen", "multiturn_demo", SHORT_CUTOFF, mask_history=True)
    add("gemma", "multiturn_demo", mask_history=True)
    add("glm4", "multiturn_demo", mask_history=True)
    add("glm4", "tool_demo", mask_history=True)
    add("qwen", "tool_demo", mask_history=True)
    # reasoning: history thoughts, enable_thinking, preserve_thinking
    add("qwen3", "tool_edge_demo", enable_thinking=False)
    for dataset in ("multiturn_demo", "tool_demo"):
        add("qwen3", dataset, mask_history=True)
        add("qwen3", dataset, enable_thinking=False)
        add("qwen3", dataset, enable_thinking=False, mask_history=True)
        add("qwen3", dataset, preserve_thinking=True, mask_history=True)
    return plan


def _case_key(case: dict[str, Any]) -> str:
    flags = ",".join(
        f"{key}={value}"
        for key, value in sorted(case.items())
        if key not in ("template_name", "chat_template", "dataset", "cutoff_len")
    )
    name = case["template_name"] or _tokenizer_key(case["chat_template"])
    return f"{name}/{case['dataset']}/cutoff={case['cutoff_len']}/{flags}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer-dir", type=Path, default=None, help="reuse a built tiny tokenizer"
    )
    parser.add_argument("--main-python", type=Path, default=DEFAULT_MAIN_PYTHON)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--verbose", action="store_true", help="show LF's own output")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lf_goldens_") as tmp:
        workdir = Path(tmp)
        # Keep HF/datasets caches out of the user's home and never touch the network.
        os.environ["HF_HOME"] = str(workdir / "hf_home")
        os.environ["HF_DATASETS_CACHE"] = str(workdir / "hf_datasets")
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["DISABLE_VERSION_CHECK"] = "1"
        stubbed = _install_torchaudio_stub(workdir)

        sys.path.insert(0, str(REPO_ROOT))
        from tests.fixtures.tiny import tokenizer_fingerprint

        if args.tokenizer_dir is None:
            tokenizer_dir = workdir / "tiny_tokenizer"
            _build_tokenizer(args.main_python, tokenizer_dir)
        else:
            tokenizer_dir = args.tokenizer_dir
        fingerprint = tokenizer_fingerprint(tokenizer_dir)

        import llamafactory

        if llamafactory.__version__ != EXPECTED_LF_VERSION:
            print(
                f"error: need llamafactory=={EXPECTED_LF_VERSION}, found {llamafactory.__version__}",
                file=sys.stderr,
            )
            return 2

        gen = GoldenGenerator(tokenizer_dir, workdir, args.verbose)
        cases: list[dict[str, Any]] = []
        templates: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        infos = [(name, name, None) for name in TEMPLATES] + [
            (_tokenizer_key(name), None, name) for name in TOKENIZER_CHAT_TEMPLATES
        ]
        for key, template, chat_template in infos:
            try:
                templates[key] = gen.template_info(template, chat_template)
            except Exception as exc:  # noqa: BLE001 - record any LF failure as data
                skipped[key] = f"{type(exc).__name__}: {exc}{SKIP_NOTES.get(key, '')}"
        failures: dict[str, list[tuple[str, str]]] = {}
        planned: dict[str, int] = {}
        for case in _case_plan():
            name = case["template_name"] or _tokenizer_key(case["chat_template"])
            planned[name] = planned.get(name, 0) + 1
            if name in skipped:
                continue
            try:
                cases.append(gen.run_case(**case))
                status = "ok"
            except Exception as exc:  # noqa: BLE001 - record any LF failure as data
                status = f"{type(exc).__name__}: {exc}"
                failures.setdefault(name, []).append((_case_key(case), status))
            print(f"{_case_key(case)}: {status}", file=sys.stderr)
        for name, failed in failures.items():
            reasons = {reason for _, reason in failed}
            if len(failed) == planned[name] and len(reasons) == 1:
                note = SKIP_NOTES.get(name, "")
                skipped[name] = f"every case failed in LF: {reasons.pop()}{note}"
            else:
                skipped.update(dict(failed))

    golden = {
        "llamafactory_version": llamafactory.__version__,
        "tokenizer_fingerprint": fingerprint,
        "generator": "tests/goldens/generate_lf_goldens.py",
        "torchaudio_stubbed": stubbed,
        "cases": cases,
        "conversations": dict(sorted(gen.conversations.items())),
        "chat_templates": TOKENIZER_CHAT_TEMPLATES,
        "templates": templates,
        "skipped": skipped,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(golden, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8"
    )
    size_kb = args.output.stat().st_size / 1024
    print(
        f"wrote {args.output} ({size_kb:.0f} KiB, {len(cases)} cases, {len(skipped)} skipped) "
        f"in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
