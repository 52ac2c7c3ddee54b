"""Generate the freeze-tuning goldens with LLaMA-Factory 0.9.5's own `_setup_freeze_tuning`.

Writes `lf095_freeze.json`: for each case (tiny arch + freeze_* keys), the names of the
parameters LF leaves trainable. `tests/unit/test_finetuning.py` checks rayft picks the same.

Run under the LLaMA-Factory venv with tiny models built by rayft's fixtures:
    .venv/bin/python -m tests.fixtures.tiny /tmp/tok --model-dir /tmp/qwen   # then llama:
    .venv/bin/python -c "from tests.fixtures.tiny import *; build_tiny_model(Path('/tmp/llama'), Path('/tmp/tok'), arch='llama')"
    /work/lfvenv/bin/python tests/goldens/generate_lf_freeze.py --qwen2 /tmp/qwen --llama /tmp/llama
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CASES: tuple[dict, ...] = (
    {"freeze_trainable_layers": 1},
    {"freeze_trainable_layers": 2},
    {
        "freeze_trainable_layers": -1,
        "freeze_trainable_modules": "mlp",
        "freeze_extra_modules": "embed_tokens,norm",
    },
    {
        "freeze_trainable_layers": 1,
        "freeze_trainable_modules": "self_attn,post_attention_layernorm",
        "freeze_extra_modules": "lm_head",
    },
)


def main() -> None:
    from llamafactory.hparams import FinetuningArguments
    from llamafactory.model.adapter import _setup_freeze_tuning
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--qwen2", type=Path, required=True)
    parser.add_argument("--llama", type=Path, required=True)
    args = parser.parse_args()
    cases = []
    for arch, model_dir in (("qwen2", args.qwen2), ("llama", args.llama)):
        for keys in CASES:
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            finetuning = FinetuningArguments(finetuning_type="freeze", **keys)
            _setup_freeze_tuning(model, finetuning, True, False)
            trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
            cases.append({"arch": arch, "keys": keys, "trainable": trainable})
    out = Path(__file__).resolve().parent / "lf095_freeze.json"
    out.write_text(json.dumps({"llamafactory": "0.9.5", "cases": cases}, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
