"""Merge a LoRA adapter into its base model and write a self-contained model directory.

The directory holds safetensors shards (at most `export_size` GB each) and the tokenizer whose
`chat_template` is the training template rendered as Jinja, so vLLM, transformers or any other
engine formats prompts exactly as training did.

Run: `python -m jobs.export CONFIG.yaml [key=value ...]`
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from configs import RayftConfig, write_resolved
from data_pipelines.pipeline import configured_template, template_spec
from jobs.model import load_base_model, load_tokenizer


def export_merged(config: RayftConfig) -> Path:
    """Merge `adapter_name_or_path` (default: `output_dir`) into the base; write `export_dir`.

    A full or freeze run's `output_dir` already holds a whole model; it is re-written with the
    template's chat_template and stop tokens (nothing to merge).

    Raises:
        ValueError: when `export_dir` is unset, or no adapter or model is found.
    """
    if not config.export_dir:
        raise ValueError("`export_dir` is required for export; e.g. `export_dir: saves/merged`")
    source = config.adapter_name_or_path or config.output_dir
    if not source:
        raise ValueError("export needs `adapter_name_or_path` or the training `output_dir`")
    base_config = config.model_copy(update={"adapter_name_or_path": None})
    merged = _trained_model(base_config, Path(source).expanduser())
    tokenizer = load_tokenizer(base_config)
    if config.template is not None:  # else the tokenizer keeps its own chat_template
        tokenizer.chat_template = configured_template(template_spec(config), tokenizer).to_jinja()
    target = Path(config.export_dir).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    merged.generation_config.eos_token_id = _stop_ids(tokenizer, config)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(target, max_shard_size=f"{config.export_size}GB")
    tokenizer.save_pretrained(target)
    write_resolved(config, target)
    return target


def _trained_model(base_config: RayftConfig, source: Path) -> object:
    """The base with the adapter at `source` merged in, or the whole model saved there."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_config = source / "adapter_config.json"
    if adapter_config.is_file():
        if json.loads(adapter_config.read_text()).get("task_type") == "SEQ_CLS":
            raise ValueError(
                f"{source} is a reward-model adapter (stage rm); load it with "
                "AutoModelForSequenceClassification + PeftModel instead of exporting a chat model"
            )
        model = load_base_model(base_config, dtype=torch.float32)
        return PeftModel.from_pretrained(model, str(source)).merge_and_unload()
    if (source / "config.json").is_file() and any(source.glob("model*.safetensors")):
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, trust_remote_code=base_config.trust_remote_code
        )
    raise ValueError(
        f"no PEFT adapter or model at {source.resolve()} (adapter_config.json or config.json "
        "missing); train first or set `adapter_name_or_path`"
    )


def _stop_ids(tokenizer: object, config: RayftConfig) -> list[int]:
    """eos plus every template stop word that is a single token, for generation to stop at."""
    ids = [tokenizer.eos_token_id]
    for word in configured_template(template_spec(config), tokenizer).stop_words:
        token_id = tokenizer.convert_tokens_to_ids(word)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def main(argv: list[str] | None = None) -> None:
    """`python -m jobs.export CONFIG [key=value ...]`."""
    from jobs.preflight import load_infer_config

    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m jobs.export CONFIG.yaml [key=value ...]")
    config = load_infer_config(args[0], args[1:])
    print(f"[rayft] merged model written to {export_merged(config)}")


if __name__ == "__main__":
    main()
