"""Example reward functions for `reward_funcs` (TRL's GRPOTrainer convention).

A reward function is called with keyword arguments and returns one float (or None: not scored)
per completion:

    reward_funcs:
      - jobs.ppo.example_rewards:length_reward
"""

from __future__ import annotations


def length_reward(
    prompts: list[str], completions: list[str], completion_ids: list[list[int]], **kwargs: object
) -> list[float]:
    """Longer answers score higher (characters / 100): a smoke-test reward, not a goal."""
    return [len(text) / 100.0 for text in completions]


def no_repeat_reward(
    prompts: list[str], completions: list[str], completion_ids: list[list[int]], **kwargs: object
) -> list[float]:
    """Share of distinct tokens in each completion (penalises degenerate repetition)."""
    return [len(set(ids)) / len(ids) if ids else 0.0 for ids in completion_ids]
