"""Training losses as pure, typed functions (CPU-testable, no Ray, no model)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions, and how many there were.

    Returning the sum (not the mean) lets the caller divide by the token count of the whole
    optimizer step across micro-batches and ranks, so the gradient of gradient accumulation
    1x8 equals that of 8x1 and does not depend on how tokens fall into micro-batches.

    Args:
        logits: [batch, seq, vocab] model outputs.
        labels: [batch, seq] target ids, `IGNORE_INDEX` where no loss is taken.

    Returns:
        (sum of token losses, number of labelled tokens).
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((shift_labels != IGNORE_INDEX).sum().item())


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is labelled in at least one row of the batch.

    Only these positions need logits: passing them as `logits_to_keep` skips the vocabulary
    projection for prompt and padding positions (the costliest matmul of small models with
    large vocabularies, e.g. Gemma's 262k entries).
    """
    return torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(dim=0), as_tuple=False).flatten()


def causal_lm_loss_sum_kept(
    kept_logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """`causal_lm_loss_sum` for logits computed only at `positions` (see `predicting_positions`).

    Args:
        kept_logits: [batch, len(positions), vocab] logits at `positions`.
        labels: [batch, seq] full labels.
        positions: the sequence positions the logits belong to.

    Returns:
        (sum of token losses, number of labelled tokens), equal to the full computation.
    """
    targets = labels[:, positions + 1].reshape(-1)
    flat = kept_logits.reshape(-1, kept_logits.size(-1)).float()
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum().item())


# --------------------------------------------------------------------------------------------
# Sequence log-probabilities
# --------------------------------------------------------------------------------------------


def _label_log_probs(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] computed one row at a time in float32.

    Equal to `log_softmax -> gather` (TRL's `selective_log_softmax`) without materialising a
    [batch, seq, vocab] float32 copy: only one row is upcast at a time.
    """
    if logits.size(0) == 0:
        return logits.new_zeros(index.shape, dtype=torch.float32)
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):
        row = row_logits.float()
        picked = row.gather(-1, row_index.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every next-token label, and which of them are labelled.

    Position t of the result scores `labels[:, t + 1]` under `logits[:, t]` (the causal-LM shift),
    and is exactly 0 where the label is `IGNORE_INDEX`, like the per-token `log_probs` of TRL's
    fused LM head (`trl.trainer.utils.add_fused_lm_head`). PPO and GRPO use these per token;
    `sequence_logps` sums them per sample.

    Args:
        logits: [batch, seq, vocab] model outputs.
        labels: [batch, seq] target ids, `IGNORE_INDEX` where no log-probability is taken.

    Returns:
        (per-token log-probs [batch, seq - 1] in float32, boolean mask [batch, seq - 1]).
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    # Ignored labels are replaced by a valid dummy id and their result zeroed afterwards; `where`
    # (not a product) keeps a non-finite logit at a padded position out of the result.
    index = shift_labels.masked_fill(~mask, 0)
    per_token = _label_log_probs(logits[:, :-1, :], index)
    return torch.where(mask, per_token, torch.zeros_like(per_token)), mask


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sum (or mean) of the log-probabilities of the labelled tokens.

    This is log pi(y | x) of the preference losses: the response tokens carry labels, the prompt
    and the padding carry `IGNORE_INDEX`. Every position contributes only its own label's
    log-probability, so given the same logits at its real positions a sample's value does not
    depend on how much padding (left or right) its batch adds, as in TRL (`get_batch_logps` of its CPO/ORPO trainers; the summed fused-head
    `log_probs` of its DPO/KTO trainers).

    `average=True` gives the per-token mean, which ORPO, SimPO and TRL's length-normalised IPO
    use (LLaMA-Factory divides by the valid length for `pref_loss` in ipo/orpo/simpo).

    Args:
        logits: [batch, seq, vocab] model outputs.
        labels: [batch, seq] target ids, `IGNORE_INDEX` where no log-probability is taken.
        average: return the mean over labelled tokens instead of the sum.

    Returns:
        (log-probs [batch] in float32, labelled-token counts [batch]). A sample without labelled
        tokens gets 0 (TRL would divide 0 by 0 for the mean).
    """
    per_token, mask = token_logps(logits, labels)
    logps = per_token.sum(-1)
    counts = mask.sum(-1)
    if average:
        logps = logps / counts.clamp(min=1)
    return logps, counts


def kept_sequence_logps(
    kept_logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` (sums) for logits computed only at `positions` (`predicting_positions`).

    Every position whose next token carries a label in some row is kept, so the per-sample
    sums equal the full computation while the vocabulary projection skips prompts and padding.

    Returns:
        (summed log-probs [batch] in float32, labelled-token counts [batch]).
    """
    targets = labels[:, positions + 1]
    mask = targets != IGNORE_INDEX
    per_token = _label_log_probs(kept_logits, targets.masked_fill(~mask, 0))
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    return per_token.sum(-1), mask.sum(-1)


# --------------------------------------------------------------------------------------------
# Preference losses: DPO, KTO, ORPO, SimPO, reward model
# --------------------------------------------------------------------------------------------

DPOLossType = Literal["sigmoid", "hinge", "ipo"]


def _dpo_sigmoid(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # DPO eq. 7; with label_smoothing > 0 the conservative DPO (cDPO) mixture of both labels.
    return (
        -F.logsigmoid(beta * delta) * (1 - label_smoothing)
        - F.logsigmoid(-beta * delta) * label_smoothing
    )


def _dpo_hinge(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # SLiC-HF's hinge on the reward margin (Zhao et al. 2023); label smoothing does not apply.
    return torch.relu(1 - beta * delta)


def _dpo_ipo(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # IPO eq. 17, beta playing tau: regress the margin onto 1 / (2 tau).
    return (delta - 1 / (2 * beta)) ** 2


_DPO_LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "hinge": _dpo_hinge,
    "ipo": _dpo_ipo,
}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: DPOLossType,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization loss per pair (Rafailov et al. 2023, arXiv:2305.18290).

    The implicit reward of a response is beta * log(pi / pi_ref); the loss pushes the chosen
    reward above the rejected one. With delta = (chosen - ref_chosen) - (rejected - ref_rejected):
    - "sigmoid": -log sigma(beta * delta), TRL's default. `label_smoothing` = eps gives cDPO,
      -(1 - eps) log sigma(beta * delta) - eps log sigma(-beta * delta): the formula of the
      `DPOTrainer.dpo_loss` of TRL 0.x, which LLaMA-Factory's `dpo_label_smoothing` feeds (TRL
      1.16's CPO "sigmoid" keeps it). TRL 1.16's DPOTrainer ignores `label_smoothing` for
      "sigmoid" (it reads it only for robust/exo_pair/aot).
    - "hinge": relu(1 - beta * delta) (SLiC-HF).
    - "ipo": (delta - 1 / (2 beta))^2 (Azar et al. 2023, arXiv:2310.12036). Pass per-token
      *average* log-probs (`sequence_logps(average=True)`) for policy and reference: TRL 1.16
      divides each sequence's log-ratio by its completion length for IPO, and LLaMA-Factory
      averages the log-probs for IPO; both equal the mean-based delta.

    Args:
        policy_chosen_logps: [batch] log pi(chosen) of the policy.
        policy_rejected_logps: [batch] log pi(rejected) of the policy.
        ref_chosen_logps: [batch] log pi_ref(chosen), no gradient needed.
        ref_rejected_logps: [batch] log pi_ref(rejected).
        beta: inverse temperature of the implicit reward (tau for IPO).
        loss_type: "sigmoid", "hinge" or "ipo".
        label_smoothing: probability that a preference label is flipped (cDPO); "sigmoid" only.

    Returns:
        (losses [batch], chosen_rewards [batch], rejected_rewards [batch]); the rewards are
        beta * (policy - reference) log-probs, detached, as TRL logs them. The training loss is
        `losses.mean()`.

    Raises:
        ValueError: unknown `loss_type`, `label_smoothing` outside [0, 0.5), or label smoothing
            with a loss type other than "sigmoid".
    """
    if loss_type not in _DPO_LOSSES:
        raise ValueError(f"Unknown DPO loss_type {loss_type!r}; valid: {sorted(_DPO_LOSSES)}.")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}.")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(
            f"label_smoothing={label_smoothing} applies to loss_type='sigmoid' only, "
            f"not {loss_type!r}; set it to 0."
        )
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = _DPO_LOSSES[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """This rank's estimate of KL(pi || pi_ref), KTO's reference point z0, detached.

    KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7) compares each reward with z0, estimated
    on mismatched (prompt, completion) pairs: the batch mean of log pi - log pi_ref. TRL
    (`KTOTrainer._compute_loss`) takes this local mean, detaches it, averages it over processes
    (`gather_for_metrics(kl).mean()`), and only then clamps it at 0. The caller therefore
    all-reduces (averages) this value across ranks and passes the result to `kto_loss`, which
    clamps it.

    Args:
        policy_kl_logps: [batch] log pi of the mismatched completions.
        ref_kl_logps: [batch] log pi_ref of the same completions.

    Returns:
        Scalar local KL estimate, not clamped, without gradient.
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach()


def kto_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky Optimization loss for unpaired desirable/undesirable examples.

    With r = log pi - log pi_ref and z0 = max(kl, 0) (detached):
    desirable: w_d * (1 - sigma(beta * (r - z0))), undesirable: w_u * (1 - sigma(beta * (z0 - r))),
    i.e. TRL's `loss_type="kto"` (KTO eq. 7). The weights rebalance unequal class sizes; the paper
    advises w_d * n_d / (w_u * n_u) in [1, 4/3]. LLaMA-Factory calls them `kto_chosen_weight` and
    `kto_rejected_weight`.

    Args:
        policy_chosen_logps: [n_desirable] log pi of desirable completions (may be empty).
        policy_rejected_logps: [n_undesirable] log pi of undesirable completions (may be empty).
        ref_chosen_logps: [n_desirable] log pi_ref of desirable completions.
        ref_rejected_logps: [n_undesirable] log pi_ref of undesirable completions.
        kl: the KL reference point: `kto_kl_estimate` averaged over all ranks by the caller.
            It is clamped at 0 and detached here, so no gradient flows through it.
        beta: inverse temperature of the implicit reward.
        desirable_weight: weight of desirable losses (lambda_D).
        undesirable_weight: weight of undesirable losses (lambda_U).

    Returns:
        (losses [n_desirable + n_undesirable], desirable first; chosen_rewards [n_desirable];
        rejected_rewards [n_undesirable]), rewards = beta * r, detached. The training loss is
        `losses.mean()` (TRL: `nanmean`).
    """
    z0 = torch.as_tensor(kl, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
    z0 = z0.detach().clamp(min=0)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - z0))
    rejected_losses = 1 - torch.sigmoid(beta * (z0 - rejected_logratios))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def orpo_loss(
    chosen_logps_avg: torch.Tensor, rejected_logps_avg: torch.Tensor, *, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term per pair (Hong et al. 2024, arXiv:2403.07691, eqs. 4-7).

    odds(y) = p / (1 - p) with p = exp(mean token log-prob); the term is
    -beta * log sigma(log odds(chosen) - log odds(rejected)), computed with a stable log(1 - p).
    The full ORPO loss adds an NLL term on the chosen response, which the stage computes:
    TRL's ORPOTrainer uses the token-mean cross-entropy over prompt *and* chosen response
    (`nll - (beta * log sigma).mean()`), LLaMA-Factory uses `-chosen_logps_avg` (response only,
    averaged per sample). `beta` is the paper's lambda (TRL `beta`, LLaMA-Factory `pref_beta`).

    Args:
        chosen_logps_avg: [batch] mean token log-prob of the chosen responses (< 0).
        rejected_logps_avg: [batch] mean token log-prob of the rejected responses (< 0).
        beta: weight of the odds-ratio term.

    Returns:
        (losses [batch], chosen_rewards [batch], rejected_rewards [batch]) in float32; rewards
        are beta * mean log-probs, detached, as TRL logs them.
    """
    chosen = chosen_logps_avg.float()
    rejected = rejected_logps_avg.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(
    chosen_logps_avg: torch.Tensor,
    rejected_logps_avg: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO loss per pair (Meng et al. 2024, arXiv:2405.14734, eq. 6): reference-free DPO.

    The reward is beta * (mean token log-prob), and the chosen reward must beat the rejected one
    by the margin gamma: -log sigma(beta * (chosen - rejected) - gamma), label-smoothed like cDPO.
    Parameter mapping: `gamma` is the absolute reward margin, the same quantity as TRL's
    `CPOConfig.simpo_gamma` (used with `loss_type="simpo"`, which subtracts simpo_gamma / beta
    from the log-ratio) and LLaMA-Factory's `simpo_gamma`. The SimPO reference code's
    `gamma_beta_ratio` is gamma / beta, so gamma = gamma_beta_ratio * beta (the paper's
    beta=2.5, ratio=0.55 is gamma=1.375; TRL's and LLaMA-Factory's defaults beta=0.1, gamma=0.5
    are a ratio of 5).

    Args:
        chosen_logps_avg: [batch] mean token log-prob of the chosen responses.
        rejected_logps_avg: [batch] mean token log-prob of the rejected responses.
        beta: reward scale.
        gamma: target reward margin.
        label_smoothing: probability that a preference label is flipped.

    Returns:
        (losses [batch], chosen_rewards [batch], rejected_rewards [batch]); rewards are
        beta * mean log-probs, detached.
    """
    logits = chosen_logps_avg - rejected_logps_avg - gamma / beta
    losses = _dpo_sigmoid(logits, beta, label_smoothing)
    return losses, beta * chosen_logps_avg.detach(), beta * rejected_logps_avg.detach()


def pairwise_rm_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Bradley-Terry reward-model loss per pair, as TRL's `RewardTrainer.compute_loss`.

    -log sigma(r_chosen - r_rejected - margin) (InstructGPT, arXiv:2203.02155; the per-pair margin
    is Llama 2's, arXiv:2307.09288). `center_rewards_coefficient` adds
    c * (r_chosen + r_rejected)^2, which pulls rewards towards zero mean (Eisenstein et al. 2023,
    arXiv:2312.09244); its batch mean equals TRL's c * mean((r_c + r_r)^2).

    Args:
        chosen_rewards: [batch] scalar rewards of the chosen responses.
        rejected_rewards: [batch] scalar rewards of the rejected responses.
        margin: optional [batch] required reward gap per pair.
        center_rewards_coefficient: optional weight of the centring term.

    Returns:
        losses [batch]; the training loss is `losses.mean()`.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses


# --------------------------------------------------------------------------------------------
# Policy-gradient losses: PPO (TRL's PPOTrainer) and GRPO (TRL's GRPOTrainer)
# --------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is true (over `dim`, or all)."""
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True
) -> torch.Tensor:
    """Normalise `values` to zero mean and unit variance over the masked positions.

    TRL's PPO helper: unbiased (Bessel-corrected) masked variance, (x - mean) / sqrt(var + 1e-8);
    `shift_mean=False` adds the mean back (used for whitening rewards).

    Raises:
        ValueError: the mask selects no position.
    """
    count = mask.sum()
    if count == 0:
        raise ValueError("masked_whiten needs at least one unmasked position; the mask is empty.")
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask) * (count / (count - 1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
    whiten_advantages: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over response tokens (Schulman et al. 2015, 1506.02438).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, run backwards
    over every position with V past the end = 0; returns = A + V (before whitening). This is
    TRL's PPOTrainer: the recursion uses `rewards` and `values` exactly as given, so the caller
    zeroes them where the episode is over. TRL keeps one more position than the action mask for
    both (its `padding_mask_p1`: the sequence-level score sits on the position after the last
    response token, and the value there is kept), while the PPOTrainer of TRL 0.9, which
    LLaMA-Factory's PPO stage builds on, zeroes both with the action mask itself. `mask` (the action mask) is used only to whiten the
    advantages and to zero them outside it, as TRL does.

    Args:
        rewards: [batch, length] per-token rewards (KL penalty plus the score).
        values: [batch, length] value predictions of the rollout.
        mask: [batch, length] positions whose actions are trained on.
        gamma: discount.
        lam: GAE lambda.
        whiten_advantages: whiten advantages over `mask` (TRL always does).

    Returns:
        (advantages [batch, length], zero outside `mask`; returns [batch, length]).
    """
    length = rewards.size(1)
    last = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = advantages + values
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return advantages.masked_fill(~mask.bool(), 0), returns


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss (Schulman et al. 2017, arXiv:1707.06347, eq. 7).

    ratio = exp(logprobs - old_logprobs); per token max(-A * ratio, -A * clip(ratio, 1 +- eps)),
    averaged over all masked tokens of the micro-batch (one token-level mean, not a mean of
    per-sequence means), as TRL's PPOTrainer.

    Args:
        logprobs: [batch, length] log-probs of the taken tokens under the current policy.
        old_logprobs: [batch, length] the same under the rollout policy.
        advantages: [batch, length] advantages (see `gae`).
        mask: [batch, length] response tokens.
        clip_range: eps (TRL `cliprange`).

    Returns:
        (loss scalar, fraction of masked tokens where the clipped branch is taken).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask).detach()
    return loss, clip_fraction


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss of PPO, as TRL's PPOTrainer.

    0.5 * masked mean of max((V - R)^2, (clip(V, V_old +- eps) - R)^2): the value prediction may
    not move further than eps from the rollout's without paying the unclipped error.

    Args:
        values: [batch, length] current value predictions.
        old_values: [batch, length] value predictions of the rollout.
        returns: [batch, length] targets (see `gae`).
        mask: [batch, length] positions the value is trained on.
        clip_range_value: eps (TRL `cliprange_value`).

    Returns:
        (loss scalar, fraction of masked positions where the clipped error is larger).
    """
    clipped_values = torch.clamp(
        values, old_values - clip_range_value, old_values + clip_range_value
    )
    unclipped_error = torch.square(values - returns)
    clipped_error = torch.square(clipped_values - returns)
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask).detach()
    return loss, clip_fraction


def _nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (NaN with fewer than two values)."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    correction = torch.where(
        count > 1, count / (count - 1), torch.full_like(variance, float("nan"))
    )
    std = torch.sqrt(variance * correction)
    return std.squeeze() if dim is None else std.squeeze(dim)


RewardScaling = Literal["group", "batch", "none"]


def _group_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size == 1:
        return torch.zeros_like(rewards)
    return _nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)


def _batch_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.numel() == 1:
        return torch.zeros_like(rewards)
    return _nanstd(rewards).expand_as(rewards)


_REWARD_STD: dict[str, Callable[[torch.Tensor, int], torch.Tensor] | None] = {
    "group": _group_std,
    "batch": _batch_std,
    "none": None,
}


def grpo_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int,
    scale_rewards: bool | RewardScaling = "group",
) -> torch.Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300).

    Each completion's reward minus the mean reward of its prompt's group, divided by a standard
    deviation + 1e-4 unless `scale_rewards` is "none": the group's ("group", TRL's default and the
    paper's), the whole batch's ("batch", PPO-Lite), or none (Dr. GRPO, arXiv:2503.20783, which
    removes the question-difficulty bias). `True`/`False` mean "group"/"none", as in
    `GRPOConfig`. Standard deviations are Bessel-corrected. A NaN reward (no reward function
    could score the completion) is left out of its group's statistics and gets advantage 0, as in
    TRL's GRPOTrainer. Pass the rewards of the whole generation batch (all ranks), grouped
    contiguously, and slice this rank's part afterwards.

    Args:
        rewards: [num_prompts * group_size] rewards, each group's completions contiguous.
        group_size: completions per prompt (TRL `num_generations`).
        scale_rewards: "group", "batch", "none", True or False.

    Returns:
        advantages [num_prompts * group_size].

    Raises:
        ValueError: `rewards` does not split into whole groups, or unknown `scale_rewards`.
    """
    scaling = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scaling not in _REWARD_STD:
        raise ValueError(
            f"Unknown scale_rewards {scale_rewards!r}; valid: {sorted(_REWARD_STD)}, True, False."
        )
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of group_size={group_size}."
        )
    group_mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
    advantages = rewards - group_mean
    std_fn = _REWARD_STD[scaling]
    if std_fn is not None:
        advantages = advantages / (std_fn(rewards, group_size) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


GRPOLossType = Literal["dapo", "grpo", "bnpo", "dr_grpo"]


class _Normaliser(Protocol):
    def __call__(
        self,
        per_token: torch.Tensor,
        mask: torch.Tensor,
        *,
        num_items: torch.Tensor | float | None,
        max_len: int | None,
    ) -> torch.Tensor: ...


def _normalise_dapo(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_items: torch.Tensor | float | None,
    max_len: int | None,
) -> torch.Tensor:
    if num_items is None:
        raise ValueError("loss_type='dapo' needs num_items_in_batch (the step's token normaliser).")
    return (per_token * mask).sum() / torch.clamp(torch.as_tensor(num_items), min=1.0)


def _normalise_grpo(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_items: torch.Tensor | float | None,
    max_len: int | None,
) -> torch.Tensor:
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _normalise_bnpo(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_items: torch.Tensor | float | None,
    max_len: int | None,
) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _normalise_dr_grpo(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_items: torch.Tensor | float | None,
    max_len: int | None,
) -> torch.Tensor:
    if max_len is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length.")
    return (per_token * mask).sum() / (per_token.size(0) * max_len)


_GRPO_NORMALISERS: dict[str, _Normaliser] = {
    "dapo": _normalise_dapo,
    "grpo": _normalise_grpo,
    "bnpo": _normalise_bnpo,
    "dr_grpo": _normalise_dr_grpo,
}


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: GRPOLossType,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    use_bias_correction_kl: bool = True,
    num_items_in_batch: torch.Tensor | float | None = None,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's clipped per-token policy loss, as TRL 1.x's `GRPOTrainer._compute_loss`.

    Per token (token-level importance sampling): ratio = exp(logprobs - old_logprobs),
    -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), plus beta * k3 KL to the
    reference, exp(ref - logp) - (ref - logp) - 1, multiplied by the ratio when
    `use_bias_correction_kl` (TRL 1.x's default; DeepSeek-V3.2's unbiased estimator). The
    per-token losses are then reduced by `loss_type`:
    - "dapo" (TRL 1.x's default; DAPO, arXiv:2503.14476): sum over tokens / `num_items_in_batch`.
      TRL passes the active-token count of the whole generation batch over all ranks, divided by
      the number of processes and scaled by grad_accum / steps_per_generation, so that summing
      micro-batches and averaging ranks gives one global per-token mean. The caller computes it
      (an all-reduce) and backpropagates this loss without further division.
    - "grpo": each sequence's token mean, then the mean over sequences (the paper; length-biased).
    - "bnpo": sum / active tokens of this micro-batch.
    - "dr_grpo" (Dr. GRPO, arXiv:2503.20783): sum / (batch * `max_completion_length`).
    For "grpo", "bnpo" and "dr_grpo" TRL further divides by the gradient-accumulation steps; the
    caller does that too.

    Args:
        logprobs: [batch, length] log-probs of the completion tokens under the current policy.
        old_logprobs: [batch, length] the same under the policy that sampled them (pass
            `logprobs.detach()` when fully on-policy, as TRL does).
        advantages: [batch] or [batch, length] advantages (see `grpo_advantages`).
        mask: [batch, length] completion tokens that count.
        epsilon_low: lower clip eps (TRL `epsilon`, default 0.2).
        epsilon_high: upper clip eps (TRL `epsilon_high`, defaults to `epsilon`; DAPO uses 0.28).
        loss_type: "dapo", "grpo", "bnpo" or "dr_grpo".
        beta: KL coefficient (TRL's default 0.0 needs no reference model).
        ref_logprobs: [batch, length] reference log-probs; required when beta != 0.
        use_bias_correction_kl: multiply the KL term by the importance ratio.
        num_items_in_batch: token normaliser for "dapo".
        max_completion_length: constant normaliser for "dr_grpo".

    Returns:
        (loss scalar, fraction of masked tokens whose ratio is clipped in the direction that
        stops the gradient: TRL's `clip_ratio/region_mean`).

    Raises:
        ValueError: unknown `loss_type`, or a normaliser or `ref_logprobs` that it needs is
            missing.
    """
    if loss_type not in _GRPO_NORMALISERS:
        raise ValueError(
            f"Unknown GRPO loss_type {loss_type!r}; valid: {sorted(_GRPO_NORMALISERS)}."
        )
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("grpo_policy_loss with beta != 0 needs ref_logprobs.")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    if ref_logprobs is not None and beta != 0.0:
        log_ref_ratio = ref_logprobs - logprobs
        per_token_kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token = per_token + beta * per_token_kl
    loss = _GRPO_NORMALISERS[loss_type](
        per_token, mask, num_items=num_items_in_batch, max_len=max_completion_length
    )
    is_clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)) | (
        (ratio > 1 + epsilon_high) & (advantages > 0)
    )
    clip_fraction = ((is_clipped.float() * mask).sum() / mask.sum().clamp(min=1.0)).detach()
    return loss, clip_fraction
