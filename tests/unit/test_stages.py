"""Stages without Ray: data checks before training, collation, and loss composition.

Invariants used: when the policy *is* the reference, every DPO log-ratio is 0, so the sigmoid
loss is exactly ln 2 per pair and KTO's is 1 - sigma(0) = 0.5 per row (weighted); ORPO's loss
is LLaMA-Factory's formula, the chosen answer's mean NLL plus beta times the odds-ratio term.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from configs import ConfigError, RayftConfig
from jobs.losses import IGNORE_INDEX, kept_sequence_logps, predicting_positions, sequence_logps
from jobs.preflight import load_run_config
from jobs.reference import Reference
from jobs.registry import StepContext, get_stage
from jobs.stages.dpo import preference_losses
from jobs.stages.rm import reward_pad_id

ROOT = Path(__file__).resolve().parents[2]


def _config(model_dir: Path, tmp_path: Path, **keys: object) -> RayftConfig:
    return RayftConfig(
        model_name_or_path=str(model_dir),
        template="qwen",
        dataset_dir=str(ROOT / "data"),
        output_dir=str(tmp_path / "out"),
        **keys,
    )


@pytest.mark.parametrize(
    ("stage", "dataset", "needs"),
    [
        ("dpo", "alpaca_en_demo", "`ranking: true`"),
        ("rm", "identity", "`chosen`"),
        ("kto", "alpaca_en_demo", "`kto_tag`"),
        ("sft", "dpo_en_demo", "end with an answer"),
        ("pt", "kto_en_demo", "plain text"),
    ],
)
def test_wrong_data_family_fails_before_training(
    stage: str, dataset: str, needs: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    overrides = [
        f"model_name_or_path={tiny_model_dir}",
        "template=qwen",
        f"stage={stage}",
        f"dataset={dataset}",
        f"dataset_dir={ROOT / 'data'}",
        f"output_dir={tmp_path}",
    ]
    with pytest.raises(ConfigError) as err:
        load_run_config(None, overrides)
    assert "`dataset`" in str(err.value) and needs in str(err.value)
    assert f"stage `{stage}`" in str(err.value)


def test_stage_spellings_and_stage_only_options(tiny_model_dir: Path, tmp_path: Path) -> None:
    orpo = _config(tiny_model_dir, tmp_path, stage="orpo")
    assert (orpo.stage, orpo.pref_loss) == ("dpo", "orpo")
    with pytest.raises(ValueError, match="drop pref_loss"):
        _config(tiny_model_dir, tmp_path, stage="simpo", pref_loss="hinge")
    with pytest.raises(ValueError, match="stage sft only"):
        _config(tiny_model_dir, tmp_path, stage="dpo", train_on_prompt=True)
    with pytest.raises(ValueError, match="stages pt and sft"):
        _config(tiny_model_dir, tmp_path, stage="dpo", packing=True)
    with pytest.raises(ValueError, match="pref_loss sigmoid only"):
        _config(tiny_model_dir, tmp_path, stage="dpo", pref_loss="ipo", dpo_label_smoothing=0.1)


def test_kept_logps_equal_full_logps_and_ignore_padding() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.full((2, 7), IGNORE_INDEX)
    labels[0, 3:6] = torch.tensor([1, 2, 3])
    labels[1, 2:4] = torch.tensor([4, 5])
    positions = predicting_positions(labels)
    kept, counts = kept_sequence_logps(logits[:, positions], labels, positions)
    full, full_counts = sequence_logps(logits, labels)
    assert torch.allclose(kept, full) and counts.tolist() == full_counts.tolist() == [3, 2]
    # Row 1 alone, without the padding its batch gave it: the same value.
    alone_labels = labels[1:, :4]
    alone_positions = predicting_positions(alone_labels)
    alone, _ = kept_sequence_logps(logits[1:, alone_positions], alone_labels, alone_positions)
    assert torch.allclose(alone, full[1:])


def test_orpo_is_llamafactory_formula(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = _config(tiny_model_dir, tmp_path, stage="dpo", pref_loss="orpo", pref_beta=0.25)
    chosen, rejected = torch.tensor([-0.7, -1.2]), torch.tensor([-1.5, -0.9])
    losses, _, _ = preference_losses(config, chosen, rejected, chosen, None)
    log_odds = (chosen - rejected) - (
        torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected))
    )
    expected = -chosen + 0.25 * -F.logsigmoid(log_odds)
    assert torch.allclose(losses, expected, atol=1e-6)


def _batch(tokenizer: AutoTokenizer, stage: str) -> dict[str, torch.Tensor]:
    prompt = tokenizer.encode("Who are you?")
    good, bad = tokenizer.encode(" I am Rayft."), tokenizer.encode(" No idea, really.")

    def row(answer: list[int]) -> tuple[list[int], list[int]]:
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer

    if stage == "dpo":
        (c_ids, c_lab), (r_ids, r_lab) = row(good), row(bad)
        raw = {
            "chosen_input_ids": [c_ids, r_ids],
            "chosen_labels": [c_lab, r_lab],
            "rejected_input_ids": [r_ids, c_ids],
            "rejected_labels": [r_lab, c_lab],
        }
    else:
        (a_ids, a_lab), (b_ids, b_lab) = row(good), row(bad)
        raw = {
            "input_ids": [a_ids, b_ids],
            "labels": [a_lab, b_lab],
            "kl_input_ids": [b_ids, a_ids],
            "kl_labels": [b_lab, a_lab],
            "kto_tags": np.array([True, False]),
        }
    return get_stage(stage).collate(raw, tokenizer.pad_token_id)


@pytest.mark.parametrize(("stage", "per_unit"), [("dpo", math.log(2)), ("kto", 0.5)])
def test_policy_equal_to_reference_gives_the_neutral_loss(
    stage: str, per_unit: float, tiny_model_dir: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    config = _config(tiny_model_dir, tmp_path, stage=stage)
    batch = _batch(tokenizer, stage)
    context = StepContext(
        model=model, reference=Reference(model, contextlib.nullcontext), config=config
    )
    output = get_stage(stage).loss(context, batch)
    units = get_stage(stage).count(batch)
    assert units == 2
    assert output.loss_sum.item() / units == pytest.approx(per_unit, abs=1e-5)
    total, how_many = output.metric_sums["rewards/chosen"]
    assert total == pytest.approx(0.0, abs=1e-6) and how_many >= 1
    output.loss_sum.backward()  # the loss reaches the policy's weights
    assert any(p.grad is not None for p in model.parameters())


def test_dpo_collate_puts_chosen_first_at_one_width(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = _batch(tokenizer, "dpo")
    assert batch["input_ids"].shape[0] == 4
    assert batch["labels"][batch["attention_mask"] == 0].eq(IGNORE_INDEX).all()


def test_reward_pad_is_never_the_eos() -> None:
    class Tok:
        eos_token_id, pad_token_id, bos_token_id, unk_token_id = 2, 2, 3, None

    assert reward_pad_id(Tok()) == 3
    Tok.pad_token_id = 5
    assert reward_pad_id(Tok()) == 5


def test_pretrain_collate_masks_the_pad_id_like_llamafactory() -> None:
    batch = get_stage("pt").collate(
        {"input_ids": [[7, 8, 0], [9, 0]], "labels": [[7, 8, 0], [9, 0]]}, 0
    )
    assert batch["labels"].tolist() == [[7, 8, IGNORE_INDEX], [9, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
