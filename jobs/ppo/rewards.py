"""Rewards of `ppo` and `grpo`: a reward model or reward functions, served by one Ray actor.

A reward model (`reward_model`) is transformers' `AutoModelForSequenceClassification` with one
label, as `stage: rm` trains it: a LoRA adapter over `model_name_or_path`
(`reward_model_type: lora`, LLaMA-Factory's default) or a whole model (`full`). It reads the
policy's token ids (so it must share the policy's tokenizer, as in LLaMA-Factory) and scores
each sequence at its last real token.

Reward functions (`reward_funcs`) follow TRL's GRPOTrainer convention:

    def length_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [float(len(ids)) for ids in completion_ids]

They get the decoded prompts and completions and the completion token ids, and return one float
(or None: not scored, as in TRL) per completion; several functions are summed.

Example (inside a training worker, after `ray.init`):
    >>> actor = start_reward_actor(spec, name="rayft-reward-1234")
    >>> scores = ray.get(actor.score.remote(prompts, completions, completion_ids, sequences))
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from configs import RayftConfig

RewardFunc = Callable[..., Sequence[float | None]]


class RewardError(ValueError):
    """A reward model or function that cannot be used; the message names the key and the fix."""


def load_reward_funcs(paths: Sequence[str]) -> list[RewardFunc]:
    """Import `module:function` paths.

    Raises:
        RewardError: a module that does not import, or a name that is missing or not callable.
    """
    funcs = []
    for path in paths:
        module_name, _, name = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise RewardError(
                f"reward_funcs: cannot import module `{module_name}` of {path!r} ({err}); make it "
                "importable on every node (installed, or on PYTHONPATH)"
            ) from err
        func = getattr(module, name, None)
        if func is None or not callable(func):
            raise RewardError(
                f"reward_funcs: {path!r}: module `{module_name}` has no function `{name}`"
            )
        funcs.append(func)
    return funcs


def call_reward_funcs(
    funcs: Sequence[RewardFunc],
    paths: Sequence[str],
    *,
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]],
) -> list[float]:
    """The summed rewards of all functions per completion (NaNs, i.e. None, are skipped).

    Raises:
        RewardError: a function that does not return one number or None per completion.
    """
    total = torch.zeros(len(completions), dtype=torch.float64)
    for func, path in zip(funcs, paths, strict=True):
        values = func(prompts=prompts, completions=completions, completion_ids=completion_ids)
        if not isinstance(values, Sequence) or len(values) != len(completions):
            raise RewardError(
                f"reward function {path!r} returned {type(values).__name__} "
                f"{_length(values)}; it must return a list of one float per completion "
                f"({len(completions)})"
            )
        try:
            column = torch.tensor(
                [math.nan if value is None else float(value) for value in values],
                dtype=torch.float64,
            )
        except (TypeError, ValueError) as err:
            raise RewardError(f"reward function {path!r} returned a non-number: {err}") from err
        total += torch.nan_to_num(column, nan=0.0)  # TRL's nansum over functions
    return total.tolist()


def _length(values: Any) -> str:
    return f"of length {len(values)}" if hasattr(values, "__len__") else ""


@dataclass(frozen=True)
class RewardSpec:
    """What the reward actor loads (picklable; built from the config by `reward_spec`)."""

    reward_model: str | None
    reward_model_type: str
    base_model: str
    reward_funcs: tuple[str, ...]
    pad_id: int
    trust_remote_code: bool
    threads: int


def reward_spec(config: RayftConfig, *, pad_id: int, threads: int) -> RewardSpec:
    """The reward actor's settings for a run (`pad_id`: see `jobs.stages.rm.reward_pad_id`)."""
    return RewardSpec(
        reward_model=config.reward_model,
        reward_model_type=config.reward_model_type,
        base_model=config.model_name_or_path,
        reward_funcs=tuple(config.reward_funcs or ()),
        pad_id=pad_id,
        trust_remote_code=config.trust_remote_code,
        threads=threads,
    )


def check_reward_source(spec: RewardSpec) -> None:
    """Fail before training when the reward model dir or a reward function is unusable.

    Raises:
        RewardError: naming `reward_model` / `reward_model_type` / `reward_funcs`.
    """
    if spec.reward_funcs:
        load_reward_funcs(spec.reward_funcs)
        return
    assert spec.reward_model is not None, "the schema requires a reward model or functions"
    path = Path(spec.reward_model).expanduser()
    needed = "adapter_config.json" if spec.reward_model_type == "lora" else "config.json"
    if path.is_dir() and not (path / needed).is_file():
        other = "full" if spec.reward_model_type == "lora" else "lora"
        hint = (
            f"; it looks like a {other} model, set reward_model_type: {other}"
            if (path / ("config.json" if other == "full" else "adapter_config.json")).is_file()
            else ""
        )
        raise RewardError(
            f"reward_model {spec.reward_model}: no {needed} for reward_model_type "
            f"{spec.reward_model_type}{hint}"
        )


def load_reward_model(spec: RewardSpec) -> Any:
    """The reward model in eval mode: base + LoRA adapter (`lora`) or a whole model (`full`)."""
    from transformers import AutoModelForSequenceClassification

    assert spec.reward_model is not None
    source = spec.base_model if spec.reward_model_type == "lora" else spec.reward_model
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, dtype=torch.float32, trust_remote_code=spec.trust_remote_code
    )
    if spec.reward_model_type == "lora":
        from peft import PeftModel

        # The adapter of `stage: rm` saves the trained `score` head with it (modules_to_save).
        model = PeftModel.from_pretrained(model, spec.reward_model)
    model.config.pad_token_id = spec.pad_id  # transformers scores at the last non-pad token
    model.requires_grad_(False)
    return model.eval()


class RewardService:
    """Scores completions with the reward model or the reward functions of a `RewardSpec`.

    A plain class (testable without Ray); `start_reward_actor` runs it as a Ray actor.
    """

    def __init__(self, spec: RewardSpec) -> None:
        torch.set_num_threads(spec.threads)
        self._spec = spec
        self._funcs = load_reward_funcs(spec.reward_funcs) if spec.reward_funcs else []
        self._model = None if spec.reward_funcs else load_reward_model(spec)

    def ready(self) -> bool:
        """True once loaded (lets the creator wait for, and see, a failed load)."""
        return True

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]],
        sequences: list[list[int]],
    ) -> list[float]:
        """One reward per completion.

        Args:
            prompts, completions: decoded text (for reward functions).
            completion_ids: completion token ids up to and including the first eos.
            sequences: prompt + completion ids without padding (for a reward model).
        """
        if self._model is None:
            return call_reward_funcs(
                self._funcs,
                self._spec.reward_funcs,
                prompts=prompts,
                completions=completions,
                completion_ids=completion_ids,
            )
        from jobs.batching import pad_rows

        ids = pad_rows(sequences, self._spec.pad_id)
        mask = pad_rows([[1] * len(row) for row in sequences], 0)
        with torch.no_grad():
            logits = self._model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return logits.squeeze(-1).float().tolist()


def start_reward_actor(spec: RewardSpec, *, name: str) -> Any:
    """Start the run's reward actor under `name` (other ranks find it with `ray.get_actor`).

    It asks for no CPU of its own, so it can always be placed beside the training workers on a
    small cluster, and uses `spec.threads` torch threads. Its lifetime is the creating worker's.
    """
    import ray

    actor_class = ray.remote(RewardService)
    return actor_class.options(name=name, num_cpus=0).remote(spec)
