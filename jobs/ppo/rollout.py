"""Rollouts of `ppo` and `grpo`: generation, masks, per-token log-probs and values, KL control.

A rollout is a batch of left-padded prompts and the responses the policy sampled for them.
Everything after a response's first eos is padding (`response_mask` is false there); the eos
itself is part of the response, as in TRL. Log-probabilities and values are read in the
response frame [batch, response_len]: entry j belongs to response token j and comes from the
position that predicts it. Position ids follow the attention mask, as generation computes them,
so a forward over a rollout reproduces the log-probs the sampler used.

Example:
    >>> rollout = generate_rollout(policy, prompts, settings=settings)
    >>> logps = response_logps(policy, rollout, temperature=settings.temperature)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from jobs.losses import IGNORE_INDEX, token_logps

# TRL 0.9 PPOConfig defaults, which LLaMA-Factory's PPO stage runs with (not config keys there).
INIT_KL_COEF = 0.2
KL_HORIZON = 10000
CLIP_RANGE = 0.2
CLIP_RANGE_VALUE = 0.2
VF_COEF = 0.1
GAMMA = 1.0
LAM = 0.95


@dataclass(frozen=True)
class Rollout:
    """Prompts (left-padded) and sampled responses (right-padded after their first eos)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat((self.prompt_ids, self.response_ids), dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat((self.prompt_mask, self.response_mask.long()), dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted over real tokens (what generation used with left padding)."""
        return (self.attention_mask.cumsum(1) - 1).clamp(min=0)

    def rows(self, index: torch.Tensor) -> Rollout:
        """The rollout of some rows (widths unchanged)."""
        return Rollout(
            self.prompt_ids[index],
            self.prompt_mask[index],
            self.response_ids[index],
            self.response_mask[index],
        )

    def prompts(self) -> list[list[int]]:
        """Each row's prompt ids without padding."""
        return [
            row[mask.bool()].tolist()
            for row, mask in zip(self.prompt_ids, self.prompt_mask, strict=True)
        ]

    def completions(self) -> list[list[int]]:
        """Each row's response ids up to and including the first eos."""
        return [
            row[mask].tolist()
            for row, mask in zip(self.response_ids, self.response_mask, strict=True)
        ]


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts to one width (the longest unless given): (ids, attention mask)."""
    width = width or max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def mask_after_eos(
    response_ids: torch.Tensor, eos_ids: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids with everything after the first eos set to `pad_id`, mask of the kept tokens)."""
    is_eos = torch.isin(response_ids, torch.as_tensor(list(eos_ids), dtype=response_ids.dtype))
    after_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return response_ids.masked_fill(after_first_eos, pad_id), ~after_first_eos


def concat_rollouts(rollouts: Sequence[Rollout], pad_id: int) -> Rollout:
    """One rollout of all rows: prompts left-padded and responses right-padded to one width."""
    prompt_width = max(r.prompt_ids.size(1) for r in rollouts)
    response_width = max(r.response_ids.size(1) for r in rollouts)

    def widen(tensor: torch.Tensor, width: int, fill: int | bool, *, left: bool) -> torch.Tensor:
        extra = tensor.new_full((tensor.size(0), width - tensor.size(1)), fill)
        return torch.cat((extra, tensor) if left else (tensor, extra), dim=1)

    return Rollout(
        torch.cat([widen(r.prompt_ids, prompt_width, pad_id, left=True) for r in rollouts]),
        torch.cat([widen(r.prompt_mask, prompt_width, 0, left=True) for r in rollouts]),
        torch.cat([widen(r.response_ids, response_width, pad_id, left=False) for r in rollouts]),
        torch.cat([widen(r.response_mask, response_width, False, left=False) for r in rollouts]),
    )


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled (the config's generation keys and the tokenizer's ids)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    eos_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any) -> SamplingSettings:
        eos = tokenizer.eos_token_id
        return cls(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            eos_ids=tuple(eos) if isinstance(eos, list) else (eos,),
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        )


def generate_rollout(
    model: Any, prompts: Sequence[Sequence[int]], *, settings: SamplingSettings, repeats: int = 1
) -> Rollout:
    """Sample one response per prompt (`repeats` per prompt, contiguous, for GRPO's groups).

    Args:
        model: the policy (unwrapped; a PEFT model generates with its adapter on).
        prompts: prompt token ids, each ending with the assistant header.
        settings: sampling settings; temperature 0 decodes greedily.
        repeats: completions per prompt.
    """
    ids, mask = left_pad(prompts, settings.pad_id)
    if repeats > 1:
        ids, mask = ids.repeat_interleave(repeats, 0), mask.repeat_interleave(repeats, 0)
    sampling: dict[str, Any] = {"do_sample": False}
    if settings.temperature > 0:
        sampling = {
            "do_sample": True,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
        }
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=list(settings.eos_ids),
            pad_token_id=settings.pad_id,
            use_cache=True,
            **sampling,
        )
    model.train(was_training)
    response, response_mask = mask_after_eos(
        output[:, ids.size(1) :], settings.eos_ids, settings.pad_id
    )
    return Rollout(ids, mask, response, response_mask)


def response_logps(model: Any, rollout: Rollout, *, temperature: float) -> torch.Tensor:
    """Log-probs [batch, response_len] of the response tokens (0 where masked).

    Only the last response_len + 1 positions get logits (`logits_to_keep`); logits are divided
    by the sampling temperature, as TRL does, so they describe the distribution sampled from.
    """
    width = rollout.response_ids.size(1)
    logits = model(
        input_ids=rollout.sequences,
        attention_mask=rollout.attention_mask,
        position_ids=rollout.position_ids,
        logits_to_keep=width + 1,
        use_cache=False,
    ).logits
    if temperature > 0:
        logits = logits / temperature
    labels = rollout.response_ids.masked_fill(~rollout.response_mask, IGNORE_INDEX)
    first = rollout.prompt_ids[:, -1:]  # the label of the first kept position is not read
    logps, _ = token_logps(logits, torch.cat((first, labels), dim=1))
    return logps


def response_values(value_model: Any, score_head: Any, rollout: Rollout) -> torch.Tensor:
    """Per-token values [batch, response_len] of a sequence-classification value model.

    The model's own forward scores only the last token; its `score` head applied to the final
    hidden state of every position gives the value of each state (TRL's PPO value model reads
    the backbone's hidden states and the score head the same way). Entry j is the value of the
    state before response token j.

    Args:
        value_model: the model to call (DDP-wrapped when training, so gradients sync).
        score_head: its value head (`<model>.score`, the PEFT-wrapped head for LoRA).
        rollout: the sequences.
    """
    output = value_model(
        input_ids=rollout.sequences,
        attention_mask=rollout.attention_mask,
        position_ids=rollout.position_ids,
        output_hidden_states=True,
        use_cache=False,
    )
    prompt_width, width = rollout.prompt_ids.size(1), rollout.response_ids.size(1)
    hidden = output.hidden_states[-1][:, prompt_width - 1 : prompt_width - 1 + width]
    return score_head(hidden).squeeze(-1).float()


def kl_penalised_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 0.9's per-token rewards: -kl_coef * (logp - ref_logp), plus the score on the last
    response token.

    Returns:
        (rewards [batch, len], per-token KL estimate [batch, len]), both 0 outside `mask`.
    """
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = mask.long().sum(1) - 1
    rewards[torch.arange(rewards.size(0)), last] += scores.to(rewards.dtype)
    return rewards, kl


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, arXiv:1909.08593), as TRL 0.9's.

    After each PPO step the coefficient moves toward keeping the KL at `target`: it is
    multiplied by 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon.
    """

    value: float
    target: float
    horizon: int = KL_HORIZON

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


@dataclass
class RunningMoments:
    """Running mean and std of scores over all ranks (TRL 0.9's `RunningMoments`), for
    `ppo_score_norm`: scores become (score - mean) / (std + eps) after each update."""

    mean: float = 0.0
    std: float = 1.0
    var: float = 1.0
    count: float = 1e-24

    def update(self, scores: torch.Tensor) -> None:
        """Fold in a batch (summed over ranks when torch.distributed is initialised)."""
        import torch.distributed as dist

        stats = torch.tensor(
            [scores.sum().item(), (scores.double() ** 2).sum().item(), float(scores.numel())],
            dtype=torch.float64,
        )
        if dist.is_initialized():
            dist.all_reduce(stats)
        total, squares, count = stats.tolist()
        batch_mean = total / count
        batch_var = max(squares / count - batch_mean**2, 0.0)
        delta = batch_mean - self.mean
        total_count = self.count + count
        summed = self.var * self.count + delta**2 * self.count * count / total_count
        summed += batch_var * count
        self.mean += delta * count / total_count
        new_var = summed / total_count
        self.std = (new_var * total_count / max(total_count - 1, 1e-24)) ** 0.5
        self.var = new_var
        self.count = total_count

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / (self.std + torch.finfo(scores.dtype).eps)

    def state(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}
