"""Preference and RL losses equal TRL 1.16's own computations, and keep their invariances.

Where TRL's code runs without a real model, the test calls it: trainer methods on a bare
`object.__new__(Trainer)` that holds only the attributes the method reads (test-only), fed by a
two-layer toy causal LM (embedding + LM head) carrying TRL's own fused LM head, so TRL computes
the log-probabilities itself. PPO is no longer part of TRL 1.16; its lines are reproduced from
TRL's last PPOTrainer, and GRPO's advantage lines (inline in a generation method) from TRL 1.16.

    .venv/bin/python -m pytest tests/unit/test_preference_losses.py -q
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn as nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.kto_trainer import KTOTrainer
from trl.trainer.reward_trainer import RewardTrainer
from trl.trainer.utils import add_fused_lm_head, nanstd

from jobs.losses import (
    IGNORE_INDEX,
    dpo_loss,
    gae,
    grpo_advantages,
    grpo_policy_loss,
    kto_kl_estimate,
    kto_loss,
    masked_whiten,
    orpo_loss,
    pairwise_rm_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logps,
    simpo_loss,
    token_logps,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL's notice that trl.experimental APIs may change
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

VOCAB, HIDDEN, PAD = 13, 8, 0
TOL = {"rtol": 0.0, "atol": 1e-5}


# --------------------------------------------------------------------------------------------
# A toy causal LM for TRL's fused head, a stand-in accelerator, bare trainers, batches
# --------------------------------------------------------------------------------------------


class _Backbone(nn.Module):
    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator))

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.embed(input_ids))


class _TinyCausalLM(nn.Module):
    """Embedding + LM head: the logits at a position depend on its token only."""

    is_gradient_checkpointing = False

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.config = PretrainedConfig()
        self.base_model = _Backbone(generator)  # the attribute TRL's fused head runs
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator) / 2)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> CausalLMOutput:
        return CausalLMOutput(logits=self.lm_head(self.base_model(input_ids).last_hidden_state))


def _tiny_lm(seed: int) -> _TinyCausalLM:
    """A toy LM whose `model(..., labels=, fused_lm_head=True)` runs TRL 1.16's fused LM head."""
    model = _TinyCausalLM(seed)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


class _OneProcessAccelerator:
    """What the trainers' loss code reads from `accelerate.Accelerator`, for one CPU process."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    is_main_process = True
    sync_gradients = True

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def _bare(cls: type, **attributes: Any) -> Any:
    """A trainer without `__init__` holding only what the tested method reads (test-only)."""
    trainer = object.__new__(cls)
    trainer.accelerator = _OneProcessAccelerator()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer.aux_loss_enabled = False
    for name, value in attributes.items():
        setattr(trainer, name, value)
    return trainer


def _prompt_completion_batch(
    seed: int, rows: int, width: int = 12
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [prompt | completion | pad] rows of varied lengths.

    Returns (input_ids, attention_mask, completion_mask), as TRL's DPO/KTO collators build them.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.full((rows, width), PAD)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    completion_mask = torch.zeros(rows, width, dtype=torch.long)
    for row in range(rows):
        prompt = int(torch.randint(1, 5, (1,), generator=generator))
        completion = int(torch.randint(1, width - prompt + 1, (1,), generator=generator))
        end = prompt + completion
        input_ids[row, :end] = torch.randint(1, VOCAB, (end,), generator=generator)
        attention_mask[row, :end] = 1
        completion_mask[row, prompt:end] = 1
    return input_ids, attention_mask, completion_mask


def _completion_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    return input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)


def _our_logps(
    model: nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor, *, average: bool
) -> torch.Tensor:
    logits = model(input_ids=input_ids).logits
    return sequence_logps(logits, _completion_labels(input_ids, completion_mask), average=average)[
        0
    ]


def _last(trainer: Any, key: str) -> float:
    return trainer._metrics["train"][key][-1]


# --------------------------------------------------------------------------------------------
# sequence_logps
# --------------------------------------------------------------------------------------------


def _random_logits_and_labels(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(4, 10, VOCAB, generator=generator)
    labels = torch.randint(0, VOCAB, (4, 10), generator=generator)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 7:] = IGNORE_INDEX  # right padding
    labels[2, :6] = IGNORE_INDEX  # a longer prompt
    return logits, labels


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("trainer_cls", [ORPOTrainer, CPOTrainer])
def test_sequence_logps_equals_trl_get_batch_logps(trainer_cls: type, average: bool) -> None:
    logits, labels = _random_logits_and_labels(0)
    logps, counts = sequence_logps(logits, labels, average=average)
    # `get_batch_logps` is a staticmethod of TRL's CPO and ORPO trainers.
    reference = trainer_cls.get_batch_logps(logits, labels, average_log_prob=average)
    torch.testing.assert_close(logps, reference, **TOL)
    assert counts.tolist() == (labels[:, 1:] != IGNORE_INDEX).sum(-1).tolist()


def test_token_logps_equal_trl_fused_lm_head() -> None:
    """The per-token log-probs DPO, KTO and GRPO read from TRL 1.16's fused LM head."""
    model = _tiny_lm(3)
    input_ids, _, completion_mask = _prompt_completion_batch(1, rows=5)
    labels = _completion_labels(input_ids, completion_mask)
    trl_per_token = model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs
    ours, mask = token_logps(model(input_ids=input_ids).logits, labels)
    torch.testing.assert_close(ours, trl_per_token, **TOL)
    assert torch.equal(mask, labels[:, 1:] != IGNORE_INDEX)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_is_padding_invariant(average: bool) -> None:
    """A sample's value is the same alone, right-padded or left-padded in a batch."""
    generator = torch.Generator().manual_seed(7)
    lengths, width = [5, 9, 3], 11
    singles = []
    right_logits = 50 * torch.randn(len(lengths), width, VOCAB, generator=generator)  # junk pads
    left_logits = right_logits.flip(1).clone()
    right_labels = torch.full((len(lengths), width), IGNORE_INDEX)
    left_labels = right_labels.clone()
    for row, length in enumerate(lengths):
        logits = torch.randn(1, length, VOCAB, generator=generator)
        labels = torch.randint(0, VOCAB, (1, length), generator=generator)
        labels[0, :2] = IGNORE_INDEX
        singles.append(sequence_logps(logits, labels, average=average))
        right_logits[row, :length], right_labels[row, :length] = logits[0], labels[0]
        left_logits[row, width - length :], left_labels[row, width - length :] = (
            logits[0],
            labels[0],
        )
    expected_logps = torch.cat([logps for logps, _ in singles])
    expected_counts = torch.cat([counts for _, counts in singles])
    for logits, labels in ((right_logits, right_labels), (left_logits, left_labels)):
        logps, counts = sequence_logps(logits, labels, average=average)
        assert torch.equal(logps, expected_logps)
        assert torch.equal(counts, expected_counts)


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------


def _dpo_trainer(policy: nn.Module, ref: nn.Module, *, beta: float, loss_type: str) -> Any:
    # The attributes `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py) reads.
    return _bare(
        DPOTrainer,
        model=policy,
        ref_model=ref,
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=0.0,
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        precompute_ref_logps=False,
        use_weighting=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )


def _dpo_inputs(seed: int, pairs: int = 4) -> dict[str, torch.Tensor]:
    input_ids, attention_mask, completion_mask = _prompt_completion_batch(seed, rows=2 * pairs)
    # TRL's DPO batch is [chosen rows, rejected rows]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
    }


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_equals_trl_dpo_trainer(loss_type: str) -> None:
    policy, ref, beta = _tiny_lm(1), _tiny_lm(2), 0.3
    inputs = _dpo_inputs(0)
    trainer = _dpo_trainer(policy, ref, beta=beta, loss_type=loss_type)
    trl_loss = trainer._compute_loss(policy, dict(inputs), return_outputs=False)

    # IPO takes per-token averages here; TRL divides its summed log-ratios by the lengths.
    average = loss_type == "ipo"
    ids, mask = inputs["input_ids"], inputs["completion_mask"]
    policy_chosen, policy_rejected = _our_logps(policy, ids, mask, average=average).chunk(2)
    ref_chosen, ref_rejected = _our_logps(ref, ids, mask, average=average).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type
    )
    torch.testing.assert_close(losses.mean(), trl_loss, **TOL)
    if not average:  # TRL logs rewards of the summed log-probs
        assert chosen_rewards.mean().item() == pytest.approx(
            _last(trainer, "rewards/chosen"), abs=1e-5
        )
        assert rejected_rewards.mean().item() == pytest.approx(
            _last(trainer, "rewards/rejected"), abs=1e-5
        )
        assert policy_chosen.mean().item() == pytest.approx(
            _last(trainer, "logps/chosen"), abs=1e-5
        )
        assert not chosen_rewards.requires_grad


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_label_smoothing_is_cdpo_as_trl_cpo_sigmoid(label_smoothing: float) -> None:
    """cDPO: TRL 1.16's DPO no longer smooths "sigmoid"; its CPO "sigmoid" is the same formula."""
    generator = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (-20 + 5 * torch.randn(6, generator=generator) for _ in range(4))
    beta = 0.5
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        pc, pr, rc, rr, beta=beta, loss_type="sigmoid", label_smoothing=label_smoothing
    )
    # `CPOTrainer.cpo_loss` (trl/experimental/cpo/cpo_trainer.py) on log-ratios instead of log-probs
    cpo = _bare(
        CPOTrainer, alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=label_smoothing
    )
    ref_losses, ref_chosen, ref_rejected = cpo.cpo_loss(pc - rc, pr - rr)
    torch.testing.assert_close(losses, ref_losses, **TOL)
    torch.testing.assert_close(chosen_rewards, ref_chosen, **TOL)
    torch.testing.assert_close(rejected_rewards, ref_rejected, **TOL)


def test_dpo_with_policy_equal_to_reference() -> None:
    """No preference yet: sigmoid gives log 2 (also in TRL), hinge 1, IPO (1 / 2 beta)^2."""
    policy = _tiny_lm(5)
    trainer = _dpo_trainer(policy, policy, beta=0.1, loss_type="sigmoid")
    trl_loss = trainer._compute_loss(policy, _dpo_inputs(2), return_outputs=False)
    assert trl_loss.item() == pytest.approx(math.log(2), abs=1e-6)

    logps = torch.randn(5, generator=torch.Generator().manual_seed(5)) - 30
    other = logps.flip(0)
    for beta in (0.01, 0.1, 2.0):
        for loss_type, expected in (
            ("sigmoid", math.log(2)),
            ("hinge", 1.0),
            ("ipo", 0.25 / beta**2),
        ):
            losses, chosen, rejected = dpo_loss(
                logps, other, logps, other, beta=beta, loss_type=loss_type
            )
            torch.testing.assert_close(losses, torch.full_like(losses, expected))
            assert not chosen.any() and not rejected.any()
        smoothed, _, _ = dpo_loss(
            logps, other, logps, other, beta=beta, loss_type="sigmoid", label_smoothing=0.3
        )
        torch.testing.assert_close(smoothed, torch.full_like(smoothed, math.log(2)))


def test_dpo_rejects_bad_arguments() -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="valid"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo", label_smoothing=0.1)


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seeds", [(1, 2), (2, 1)])  # the two signs of the KL estimate
def test_kto_loss_equals_trl_kto_trainer(seeds: tuple[int, int]) -> None:
    policy, ref = _tiny_lm(seeds[0]), _tiny_lm(seeds[1])
    beta, desirable_weight, undesirable_weight = 0.2, 1.0, 1.5
    input_ids, attention_mask, completion_mask = _prompt_completion_batch(3, rows=6)
    kl_ids, kl_attention, kl_completion = _prompt_completion_batch(4, rows=6)
    label = torch.tensor([True, False, True, True, False, False])
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_attention,
        "KL_completion_mask": kl_completion,
        "label": label,
    }
    # The attributes `KTOTrainer._compute_loss` (trl/trainer/kto_trainer.py) reads.
    trainer = _bare(
        KTOTrainer,
        model=policy,
        ref_model=ref,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        calculate_KL=True,
        precompute_ref_logps=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    trl_loss = trainer._compute_loss(policy, inputs, return_outputs=False)

    policy_logps = _our_logps(policy, input_ids, completion_mask, average=False)
    ref_logps = _our_logps(ref, input_ids, completion_mask, average=False)
    kl = kto_kl_estimate(
        _our_logps(policy, kl_ids, kl_completion, average=False),
        _our_logps(ref, kl_ids, kl_completion, average=False),
    )  # one process: the caller's all-reduce (mean over ranks) is the identity
    losses, chosen_rewards, rejected_rewards = kto_loss(
        policy_logps[label],
        policy_logps[~label],
        ref_logps[label],
        ref_logps[~label],
        kl=kl,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    torch.testing.assert_close(losses.mean(), trl_loss, **TOL)
    assert max(kl.item(), 0.0) == pytest.approx(_last(trainer, "kl"), abs=1e-5)
    assert chosen_rewards.mean().item() == pytest.approx(_last(trainer, "rewards/chosen"), abs=1e-5)
    assert rejected_rewards.mean().item() == pytest.approx(
        _last(trainer, "rewards/rejected"), abs=1e-5
    )


def test_kto_reference_point_is_clamped_and_detached() -> None:
    generator = torch.Generator().manual_seed(6)
    chosen = torch.randn(3, generator=generator).requires_grad_()
    rejected = torch.randn(2, generator=generator)
    policy_kl = torch.randn(4, generator=generator).requires_grad_()
    kl = kto_kl_estimate(policy_kl, policy_kl.detach() + 1.0)  # negative estimate
    assert kl.item() == pytest.approx(-1.0) and not kl.requires_grad
    kwargs = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    negative, _, _ = kto_loss(chosen, rejected, chosen * 0, rejected * 0, kl=kl, **kwargs)
    zero, _, _ = kto_loss(chosen, rejected, chosen * 0, rejected * 0, kl=0.0, **kwargs)
    torch.testing.assert_close(negative, zero)


# --------------------------------------------------------------------------------------------
# ORPO, SimPO, reward model
# --------------------------------------------------------------------------------------------


def _average_logps_pairs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    chosen = -torch.rand(8, generator=generator) * 4
    rejected = -torch.rand(8, generator=generator) * 4
    # near 0 and far below -ln 2: both branches of the stable log(1 - p)
    chosen[:2] = torch.tensor([-1e-4, -30.0])
    rejected[:2] = torch.tensor([-0.6931, -1e-3])
    return chosen, rejected


def test_orpo_loss_equals_trl_odds_ratio_loss() -> None:
    chosen, rejected = _average_logps_pairs(8)
    beta = 0.25
    losses, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, beta=beta)
    # `ORPOTrainer.odds_ratio_loss` (trl/experimental/orpo/orpo_trainer.py) returns
    # beta * log sigma(log odds), which its full loss subtracts: nll - losses.mean().
    trainer = _bare(ORPOTrainer, beta=beta)
    trl_losses, trl_chosen, trl_rejected, _, _ = trainer.odds_ratio_loss(chosen, rejected)
    torch.testing.assert_close(losses, -trl_losses, **TOL)
    torch.testing.assert_close(chosen_rewards, trl_chosen, **TOL)
    torch.testing.assert_close(rejected_rewards, trl_rejected, **TOL)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_loss_equals_trl_cpo_simpo(label_smoothing: float) -> None:
    chosen, rejected = _average_logps_pairs(9)
    beta, gamma = 2.5, 1.375  # the SimPO paper's beta with gamma_beta_ratio = 0.55
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        chosen, rejected, beta=beta, gamma=gamma, label_smoothing=label_smoothing
    )
    # `CPOTrainer.cpo_loss` (trl/experimental/cpo/cpo_trainer.py) with loss_type="simpo"
    trainer = _bare(
        CPOTrainer,
        alpha=0.0,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
    )
    trl_losses, trl_chosen, trl_rejected = trainer.cpo_loss(chosen, rejected)
    torch.testing.assert_close(losses, trl_losses, **TOL)
    torch.testing.assert_close(chosen_rewards, trl_chosen, **TOL)
    torch.testing.assert_close(rejected_rewards, trl_rejected, **TOL)


class _ScalarRewardModel:
    """Returns fixed rewards as `RewardTrainer.compute_loss` reads them: `outputs.logits`."""

    training = True

    def __init__(self, rewards: torch.Tensor) -> None:
        self.rewards = rewards

    def __call__(self, **inputs: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=self.rewards.unsqueeze(-1))


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center_rewards_coefficient", [None, 0.01])
def test_pairwise_rm_loss_equals_trl_reward_trainer(
    with_margin: bool, center_rewards_coefficient: float | None
) -> None:
    generator = torch.Generator().manual_seed(10)
    chosen, rejected = (
        2 * torch.randn(5, generator=generator),
        2 * torch.randn(5, generator=generator),
    )
    margin = torch.rand(5, generator=generator) if with_margin else None
    model = _ScalarRewardModel(torch.cat([chosen, rejected]))
    inputs: dict[str, Any] = {"attention_mask": torch.ones(10, 4, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    trainer = _bare(
        RewardTrainer,
        model=model,
        args=SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient),
    )
    trl_loss = trainer.compute_loss(model, inputs)  # trl/trainer/reward_trainer.py
    losses = pairwise_rm_loss(
        chosen, rejected, margin=margin, center_rewards_coefficient=center_rewards_coefficient
    )
    torch.testing.assert_close(losses.mean(), trl_loss, **TOL)


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------


def _trl_grpo_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str
) -> torch.Tensor:
    """trl/trainer/grpo_trainer.py (1.16), `GRPOTrainer._generate_and_score_completions`,
    multi_objective_aggregation="sum_then_normalize" with one reward function of weight 1:
    its lines, copied (they run inline and cannot be called alone)."""
    rewards_per_func = rewards.unsqueeze(1)
    reward_weights = torch.ones(1)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        if rewards.numel() > 1:
            std_rewards = nanstd(rewards).expand_as(rewards)
        else:
            std_rewards = torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize(
    ("scale_rewards", "trl_name"),
    [("group", "group"), (True, "group"), ("batch", "batch"), ("none", "none"), (False, "none")],
)
def test_grpo_advantages_equal_trl(scale_rewards: Any, trl_name: str) -> None:
    generator = torch.Generator().manual_seed(11)
    rewards = torch.randn(12, generator=generator)
    rewards[4:8] = 1.0  # a group whose rewards are all equal
    rewards[9] = torch.nan  # an unscorable completion
    ours = grpo_advantages(rewards, group_size=4, scale_rewards=scale_rewards)
    torch.testing.assert_close(ours, _trl_grpo_advantages(rewards.clone(), 4, trl_name), **TOL)
    assert ours[9] == 0 and torch.equal(ours[4:8], torch.zeros(4))


def test_grpo_advantages_rejects_partial_groups() -> None:
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(5), group_size=2)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_grpo_policy_loss_equals_trl_grpo_trainer(loss_type: str, beta: float) -> None:
    generator = torch.Generator().manual_seed(12)
    rows, prompt_width, completion_width, max_completion_length = 6, 4, 7, 9
    policy = _tiny_lm(13)
    prompt_ids = torch.randint(1, VOCAB, (rows, prompt_width), generator=generator)
    prompt_mask = torch.ones(rows, prompt_width, dtype=torch.long)
    prompt_mask[1, :2] = prompt_mask[4, :1] = 0  # left padding
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, PAD)
    completion_ids = torch.randint(1, VOCAB, (rows, completion_width), generator=generator)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    completion_mask = (torch.arange(completion_width) < lengths.unsqueeze(1)).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, PAD)

    # Our per-token log-probs of the completion tokens, as the stage computes them.
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :-completion_width] = IGNORE_INDEX
    logprobs = token_logps(policy(input_ids=input_ids).logits, labels)[0][:, -completion_width:]
    old_logprobs = logprobs.detach() + 0.3 * torch.randn(logprobs.shape, generator=generator)
    ref_logprobs = logprobs.detach() + 0.2 * torch.randn(logprobs.shape, generator=generator)
    advantages = grpo_advantages(torch.randn(rows, generator=generator), group_size=3)
    num_items_in_batch = completion_mask.sum() * 3.0  # as if the generation batch were larger

    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old_logprobs,
        "ref_per_token_logps": ref_logprobs,
        "num_items_in_batch": num_items_in_batch,
    }
    # The attributes `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py) reads.
    trainer = _bare(
        GRPOTrainer,
        model=policy,
        loss_type=loss_type,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.28,
        importance_sampling_level="token",
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1),
    )
    trl_loss = trainer._compute_loss(policy, inputs)

    loss, clip_fraction = grpo_policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        completion_mask,
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
        beta=beta,
        ref_logprobs=ref_logprobs,
        num_items_in_batch=num_items_in_batch,
        max_completion_length=max_completion_length,
    )
    torch.testing.assert_close(loss, trl_loss, **TOL)
    assert clip_fraction.item() == pytest.approx(_last(trainer, "clip_ratio/region_mean"), abs=1e-6)
    assert 0 < clip_fraction < 1


def test_grpo_policy_loss_names_missing_normalisers() -> None:
    x = torch.zeros(2, 3)
    kwargs: dict[str, Any] = {"epsilon_low": 0.2, "epsilon_high": 0.2}
    with pytest.raises(ValueError, match="num_items_in_batch"):
        grpo_policy_loss(x, x, torch.zeros(2), x, loss_type="dapo", **kwargs)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_policy_loss(x, x, torch.zeros(2), x, loss_type="dr_grpo", **kwargs)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_policy_loss(x, x, torch.zeros(2), x, loss_type="grpo", beta=0.1, **kwargs)


# --------------------------------------------------------------------------------------------
# PPO: TRL 1.16 ships no PPOTrainer. The reference lines below are copied from TRL's last one,
# trl/experimental/ppo/ppo_trainer.py (`masked_mean`, `masked_var`, `masked_whiten` and
# `PPOTrainer.train`: reward shaping, steps 5-6 "whiten rewards" / "compute advantages and
# returns", and the policy/value losses of the PPO epochs).
# --------------------------------------------------------------------------------------------

INVALID_LOGPROB = 1.0
PPO_GAMMA, PPO_LAM = 1.0, 0.95


def _trl_masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def _trl_masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = _trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = _trl_masked_mean(centered_values**2, mask)
    mask_sum = mask.sum()
    bessel_correction = mask_sum / (mask_sum - 1)
    return variance * bessel_correction


def _trl_masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True
) -> torch.Tensor:
    mean, var = _trl_masked_mean(values, mask), _trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def _ppo_rollout(whiten_rewards: bool) -> dict[str, torch.Tensor]:
    """A rollout shaped like TRL's PPOTrainer's, with its rewards, advantages and returns."""
    generator = torch.Generator().manual_seed(14)
    rows, gen_length, kl_coef, gamma, lam = 8, 9, 0.05, PPO_GAMMA, PPO_LAM
    sequence_lengths = torch.tensor([8, 2, 5, 0, 7, 3, 6, 4])  # index of the last response token
    logprobs = -torch.rand(rows, gen_length, generator=generator) * 3
    ref_logprobs = logprobs + 0.2 * torch.randn(rows, gen_length, generator=generator)
    values = torch.randn(rows, gen_length, generator=generator)
    scores = torch.randn(rows, generator=generator)

    # -- lines of PPOTrainer.train --
    response_idxs = torch.arange(gen_length).repeat(rows, 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = (logr.exp() - 1) - logr  # k3
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(
        sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths
    )
    rewards[actual_start, actual_end] += scores
    score_rewards = rewards.clone()  # (test bookkeeping: the rewards before whitening)
    if whiten_rewards:
        rewards = _trl_masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    shaped_rewards = rewards.clone()
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = _trl_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    # -- end --
    return {
        "score_rewards": score_rewards,
        "rewards": shaped_rewards,
        "values": values,
        "logprobs": logprobs,
        "padding_mask": padding_mask,
        "padding_mask_p1": padding_mask_p1,
        "advantages": advantages,
        "returns": returns,
    }


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_gae_equals_trl_ppo_trainer(whiten_rewards: bool) -> None:
    rollout = _ppo_rollout(whiten_rewards)
    rewards = rollout["score_rewards"]
    if whiten_rewards:  # what the stage does before GAE when `whiten_rewards` is set
        value_mask = ~rollout["padding_mask_p1"]
        rewards = masked_whiten(rewards, value_mask, shift_mean=False).masked_fill(~value_mask, 0)
    torch.testing.assert_close(rewards, rollout["rewards"], **TOL)
    advantages, returns = gae(
        rewards,
        rollout["values"],
        ~rollout["padding_mask"],
        gamma=PPO_GAMMA,
        lam=PPO_LAM,
    )
    torch.testing.assert_close(advantages, rollout["advantages"], **TOL)
    torch.testing.assert_close(returns, rollout["returns"], **TOL)


def test_ppo_losses_equal_trl_ppo_trainer() -> None:
    rollout = _ppo_rollout(whiten_rewards=False)
    generator = torch.Generator().manual_seed(15)
    padding_mask, padding_mask_p1 = rollout["padding_mask"], rollout["padding_mask_p1"]
    mb_logprobs, mb_values = rollout["logprobs"], rollout["values"]
    mb_advantage, mb_return = rollout["advantages"], rollout["returns"]
    new_logprobs = mb_logprobs + 0.3 * torch.randn(mb_logprobs.shape, generator=generator)
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)
    vpred = mb_values + 0.5 * torch.randn(mb_values.shape, generator=generator)
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    cliprange, cliprange_value = 0.2, 0.2

    # -- lines of PPOTrainer.train (PPO epochs) --
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * _trl_masked_mean(vf_loss_max, ~padding_mask_p1)
    vf_clipfrac = _trl_masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = _trl_masked_mean(pg_loss_max, ~padding_mask)
    pg_clipfrac = _trl_masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    # -- end --

    policy_loss, policy_clip = ppo_policy_loss(
        new_logprobs, mb_logprobs, mb_advantage, ~padding_mask, clip_range=cliprange
    )
    value_loss, value_clip = ppo_value_loss(
        vpred, mb_values, mb_return, ~padding_mask_p1, clip_range_value=cliprange_value
    )
    torch.testing.assert_close(policy_loss, pg_loss, **TOL)
    torch.testing.assert_close(policy_clip, pg_clipfrac, **TOL)
    torch.testing.assert_close(value_loss, vf_loss, **TOL)
    torch.testing.assert_close(value_clip, vf_clipfrac, **TOL)
    assert 0 < policy_clip < 1 and 0 < value_clip < 1
