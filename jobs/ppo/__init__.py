"""Online RL stages (`ppo`, `grpo`): rollouts, rewards, and the per-worker update loop.

Roles and where they run:
- policy (actor) and value model (critic): trained inside the Ray Train `TorchTrainer` workers
  (SPMD, DDP), as every other stage; the policy also generates the rollouts (the rollout engine)
  and, for LoRA, is the reference with its adapter switched off.
- reward: one Ray actor per run (`rewards.RewardActor`), created by rank 0 and shared by all
  ranks, scoring (prompt, completion) pairs with a reward model or reward functions. It holds
  the only copy of the reward model and keeps user reward code out of the training processes.

Modules: `rewards` (reward model / functions and the actor), `rollout` (generation, masks,
per-token log-probs and values, KL control), `worker` (the per-worker loops of both stages).
"""
