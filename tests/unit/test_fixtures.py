"""Checks that the tiny fixtures are reproducible and usable.

The LLaMA-Factory goldens are only meaningful if the tokenizer rebuilt here is the one they
were generated with, so the fingerprint comparison guards every golden-based test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.tiny import (
    BOS_TOKEN,
    EOS_TOKEN,
    MODEL_HIDDEN_SIZE,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    build_tiny_model,
    build_tiny_tokenizer,
    tokenizer_fingerprint,
)

GOLDEN = Path(__file__).resolve().parents[1] / "goldens" / "lf095_supervised.json"


def test_tokenizer_matches_golden_fingerprint(tiny_tokenizer_dir: Path) -> None:
    if not GOLDEN.is_file():
        pytest.skip("LLaMA-Factory goldens not generated; see tests/goldens/README.md")
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert tokenizer_fingerprint(tiny_tokenizer_dir) == golden["tokenizer_fingerprint"]


def test_tokenizer_rebuild_is_deterministic(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_tokenizer(tmp_path / "again")
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tiny_tokenizer_dir)


def test_tokenizer_special_tokens(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert tok.chat_template is None
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.encode(token, add_special_tokens=False) == [i], token
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    text = "Hello, world!\n  Ünïcode 🙂 <|im_start|>user"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert 1400 <= len(tok) <= 1600


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_model_logits(
    arch: str, tiny_tokenizer_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = (
        tiny_model_dir
        if arch == "qwen2"
        else build_tiny_model(tmp_path / "m", tiny_tokenizer_dir, arch=arch)
    )
    assert (model_dir / "model.safetensors").is_file()
    assert tokenizer_fingerprint(model_dir) == tokenizer_fingerprint(tiny_tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert model.config.model_type == arch
    assert model.config.hidden_size == MODEL_HIDDEN_SIZE
    assert model.dtype == torch.float32
    ids = torch.tensor([tok.encode("Who are you?", add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_tiny_model_is_seeded(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a = load_file(str(build_tiny_model(tmp_path / "a", tiny_tokenizer_dir) / "model.safetensors"))
    b = load_file(str(build_tiny_model(tmp_path / "b", tiny_tokenizer_dir) / "model.safetensors"))
    c = load_file(
        str(build_tiny_model(tmp_path / "c", tiny_tokenizer_dir, seed=1) / "model.safetensors")
    )
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)
    assert any(not a[k].equal(c[k]) for k in a)
