"""One module per training stage; importing this package registers them all."""

from jobs.stages import dpo, grpo, kto, ppo, pt, rm, sft  # noqa: F401
