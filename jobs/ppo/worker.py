"""The per-worker loops of `ppo` and `grpo` (Ray Train workers; `Stage.train_loop`).

Each rollout step on every rank: take gradient_accumulation_steps (x ppo_buffer_size for ppo)
micro-batches of prompts from the rank's shard, sample responses with the policy, ask the
reward actor for scores, then update:
- ppo (TRL's PPOTrainer as LLaMA-Factory runs it): per-token rewards = -kl_coef * KL to the
  reference + the score on the last token; GAE over the value model's per-token values;
  `ppo_epochs` shuffled passes, each one optimizer step per gradient_accumulation_steps
  micro-batches, of the clipped policy loss + VF_COEF * clipped value loss; the KL coefficient
  then adapts toward `ppo_target`.
- grpo (TRL's GRPOTrainer): num_generations responses per prompt, group-relative advantages,
  `grpo_num_iterations` optimizer steps of the clipped per-token loss (+ grpo_beta * KL).

The contract is the shared loop's (`jobs.loop`): every rank resumes from
`ray.train.get_checkpoint()`, takes the same number of micro-batches (an equal data split) and
reports at the same steps; rank 0 writes `trainer_log.jsonl`, checkpoints and the final adapter.
A checkpoint holds the policy (adapter + optimizer), the value model in `value/`, the schedulers
and the KL/score statistics; sampling is seeded per step and rank, so a resumed run draws the
same rollouts.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from configs import RayftConfig
from jobs.losses import (
    gae,
    grpo_advantages,
    grpo_policy_loss,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from jobs.ppo.rollout import (
    CLIP_RANGE,
    CLIP_RANGE_VALUE,
    GAMMA,
    INIT_KL_COEF,
    LAM,
    VF_COEF,
    AdaptiveKLController,
    Rollout,
    RunningMoments,
    SamplingSettings,
    concat_rollouts,
    generate_rollout,
    kl_penalised_rewards,
    response_logps,
    response_values,
)

VALUE_DIR = "value"
PPO_METRICS = (
    "ppo/policy_loss",
    "ppo/value_loss",
    "ppo/kl",
    "ppo/reward",
    "ppo/clipfrac",
    "ppo/kl_coef",
)
GRPO_METRICS = (
    "grpo/reward",
    "grpo/reward_std",
    "grpo/kl",
    "grpo/clipfrac",
    "grpo/completion_length",
)


def ppo_train_loop(plan_dict: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker of `stage: ppo`."""
    _run(plan_dict, algorithm="ppo")


def grpo_train_loop(plan_dict: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker of `stage: grpo`."""
    _run(plan_dict, algorithm="grpo")


@dataclass
class Trained:
    """A model this rank trains: its strategy (wrapper, optimizer) and LR scheduler."""

    strategy: Any
    scheduler: Any

    @property
    def model(self) -> Any:
        return self.strategy.model

    def step(self) -> None:
        self.strategy.step()
        self.strategy.zero_grad()


def _trained(
    config: RayftConfig, model: Any, *, world: int, on_gpu: bool, total_steps: int
) -> Trained:
    from transformers import get_scheduler

    from jobs.optimizers import make_optimizer_factory
    from jobs.strategies import get_strategy

    strategy = get_strategy(config, world_size=world, on_gpu=on_gpu)
    _, optimizer = strategy.wrap(model, make_optimizer_factory(config, model))
    warmup = config.warmup_steps or math.ceil(total_steps * config.warmup_ratio)
    scheduler = get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
    )
    return Trained(strategy, scheduler)


def rollout_steps(config: RayftConfig, *, micro_per_epoch: int | None, planned: int) -> int:
    """Rollout steps of a run: `max_steps`, else the epochs' prompts over each step's share."""
    if config.max_steps > 0 or micro_per_epoch is None:  # a stream always has max_steps
        return planned
    per_step = config.gradient_accumulation_steps * (
        config.ppo_buffer_size if config.stage == "ppo" else 1
    )
    return math.ceil(math.ceil(micro_per_epoch / per_step) * config.num_train_epochs)


def _reference(
    config: RayftConfig, policy: Any, *, dtype: torch.dtype
) -> tuple[Any, Callable[[], Any]]:
    """(model, context) giving reference log-probs: the policy with its adapter off for LoRA
    without `ref_model` (as `jobs.reference`), else a frozen copy of ref_model or the base."""
    if config.finetuning_type == "lora" and config.ref_model is None:
        return policy, policy.disable_adapter
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        config.ref_model or config.model_name_or_path,
        dtype=dtype,
        trust_remote_code=config.trust_remote_code,
    )
    if config.ref_model_adapters:
        from peft import PeftModel

        for adapter in config.ref_model_adapters.split(","):
            model = PeftModel.from_pretrained(model, adapter.strip()).merge_and_unload()
    model.requires_grad_(False)
    return model.eval(), contextlib.nullcontext


def _prompt_stream(
    shard: Any, config: RayftConfig, *, start_epoch: int, skip: int
) -> Iterator[tuple[int, int, list[list[int]]]]:
    """(epoch, micro-batch index in the epoch, prompts) forever, skipping what a resumed run
    already consumed."""
    from jobs.loop import shuffle_buffer

    epoch = start_epoch
    while True:
        index = 0
        for batch in shard.iter_batches(
            batch_size=config.per_device_train_batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=shuffle_buffer(config),
            local_shuffle_seed=config.seed + epoch,
        ):
            index += 1
            if epoch == start_epoch and index <= skip:
                continue
            yield epoch, index, [[int(token) for token in row] for row in batch["input_ids"]]
        epoch += 1


def _reward_actor(config: RayftConfig, *, rank: int, pad_id: int, threads: int) -> Any:
    """The run's reward actor: rank 0 starts it, the other ranks look it up by name."""
    import ray
    import torch.distributed as dist

    from jobs.ppo.rewards import reward_spec, start_reward_actor

    names = [f"rayft-reward-{uuid.uuid4().hex[:12]}" if rank == 0 else None]
    actor = None
    if rank == 0:
        actor = start_reward_actor(
            reward_spec(config, pad_id=pad_id, threads=threads), name=names[0]
        )
        ray.get(actor.ready.remote())  # a reward model that fails to load fails here
    if dist.is_initialized():
        dist.broadcast_object_list(names, src=0)
    return actor if actor is not None else ray.get_actor(names[0])


def _score(actor: Any, tokenizer: Any, rollout: Rollout) -> Any:
    """Ask the reward actor for one score per row (an ObjectRef; `ray.get` it later)."""
    prompts, completions = rollout.prompts(), rollout.completions()
    return actor.score.remote(
        tokenizer.batch_decode(prompts, skip_special_tokens=True),
        tokenizer.batch_decode(completions, skip_special_tokens=True),
        completions,
        [p + c for p, c in zip(prompts, completions, strict=True)],
    )


def _chunks(rows: int, size: int) -> list[torch.Tensor]:
    return list(torch.arange(rows).split(size))


def _global_means(sums: dict[str, list[float]]) -> dict[str, float]:
    """Per-metric (sum, count) pairs summed over ranks, divided."""
    import torch.distributed as dist

    names = sorted(sums)
    packed = torch.tensor([value for name in names for value in sums[name]], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(packed)
    values = packed.tolist()
    return {
        name: values[2 * i] / values[2 * i + 1]
        for i, name in enumerate(names)
        if values[2 * i + 1] > 0
    }


def _add(sums: dict[str, list[float]], name: str, total: float, count: float = 1.0) -> None:
    entry = sums.setdefault(name, [0.0, 0.0])
    entry[0] += total
    entry[1] += count


@dataclass
class Session:
    """Everything one rank's rollout/update cycle uses."""

    config: RayftConfig
    rank: int
    world: int
    tokenizer: Any
    settings: SamplingSettings
    policy: Trained
    value: Trained | None
    reference: tuple[Any, Callable[[], Any]] | None
    actor: Any
    kl_control: AdaptiveKLController
    score_moments: RunningMoments

    @property
    def unwrapped_policy(self) -> Any:
        return self.policy.strategy.unwrap()

    def reference_logps(self, rollout: Rollout) -> torch.Tensor:
        assert self.reference is not None
        model, context = self.reference
        with torch.no_grad(), context():
            return response_logps(model, rollout, temperature=self.settings.temperature)


def _run(plan_dict: dict[str, Any], *, algorithm: str) -> None:
    import ray.train
    import torch.distributed as dist

    from jobs.loop import (
        LoopPlan,
        epoch_progress,
        mean_metrics,
        pick_checkpoint,
        save_final,
        write_log,
        write_strategy_stats,
    )
    from jobs.model import build_trainable_model, load_tokenizer, training_dtype
    from jobs.stages.rm import reward_pad_id
    from jobs.trackers import make_tracker

    plan = LoopPlan(**plan_dict)
    config = RayftConfig.model_validate(plan.config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(plan.torch_threads)
    torch.manual_seed(config.seed)
    on_gpu = torch.cuda.is_available() and config.ray.use_gpu
    total_steps = rollout_steps(
        config, micro_per_epoch=plan.micro_per_epoch, planned=plan.total_steps
    )

    tokenizer = load_tokenizer(config)
    policy = _trained(
        config,
        build_trainable_model(config, on_gpu=on_gpu),
        world=world,
        on_gpu=on_gpu,
        total_steps=total_steps,
    )
    value = None
    if algorithm == "ppo":
        value = _trained(
            config,
            build_trainable_model(config, on_gpu=on_gpu, head="reward"),
            world=world,
            on_gpu=on_gpu,
            total_steps=total_steps,
        )
    dtype = training_dtype(config, on_gpu=on_gpu)
    uses_reference = algorithm == "ppo" or config.grpo_beta > 0
    session = Session(
        config=config,
        rank=rank,
        world=world,
        tokenizer=tokenizer,
        settings=SamplingSettings.from_config(config, tokenizer),
        policy=policy,
        value=value,
        reference=_reference(config, policy.strategy.unwrap(), dtype=dtype)
        if uses_reference
        else None,
        actor=_reward_actor(
            config, rank=rank, pad_id=reward_pad_id(tokenizer), threads=plan.torch_threads
        ),
        kl_control=AdaptiveKLController(value=INIT_KL_COEF, target=config.ppo_target),
        score_moments=RunningMoments(),
    )
    write_strategy_stats(Path(config.output_dir), policy.strategy, rank=rank)
    state = _resume(pick_checkpoint(ray.train.get_checkpoint(), plan), session)
    step = state["step"]
    stream = _prompt_stream(
        ray.train.get_dataset_shard("train"),
        config,
        start_epoch=state["epoch"],
        skip=state["micro_in_epoch"],
    )
    tracker = make_tracker(config) if rank == 0 else None
    log_path = Path(config.output_dir) / "trainer_log.jsonl"
    started = time.time()
    update = _ppo_step if algorithm == "ppo" else _grpo_step
    micro_per_step = config.gradient_accumulation_steps * (
        config.ppo_buffer_size if algorithm == "ppo" else 1
    )
    losses: list[float] = []
    since_log: list[dict[str, float]] = []
    epoch, micro_index = state["epoch"], state["micro_in_epoch"]
    while step < total_steps:
        prompts: list[list[list[int]]] = []
        for _ in range(micro_per_step):
            epoch, micro_index, batch = next(stream)
            prompts.append(batch)
        torch.manual_seed(config.seed + 1000 * step + rank)  # rollouts reproducible on resume
        metrics = update(session, prompts)
        for trained in (policy, value):
            if trained is not None:
                trained.scheduler.step()
        step += 1
        losses.append(metrics["loss"])
        since_log.append(metrics)
        done = step >= total_steps
        if step % config.logging_steps == 0 or done:
            record = {
                "current_steps": step,
                "total_steps": total_steps,
                **mean_metrics(since_log),
                "lr": policy.scheduler.get_last_lr()[0],
                "epoch": epoch_progress(epoch, micro_index, plan.micro_per_epoch),
                "elapsed_time": round(time.time() - started, 1),
            }
            since_log.clear()
            if rank == 0:
                write_log(log_path, record, tracker)
        reported = {**metrics, "step": step}
        if step % config.save_steps == 0 or done:
            _report_checkpoint(
                session,
                rank=rank,
                metrics=reported,
                state={"step": step, "epoch": epoch, "micro_in_epoch": micro_index},
            )
        elif step % config.logging_steps == 0:
            ray.train.report(reported)
    save_final(policy.strategy, tokenizer, config, rank=rank, losses=losses, started=started)
    if value is not None:
        value.strategy.save_adapter(Path(config.output_dir) / "value_model", rank=rank)
    if tracker is not None:
        tracker.close()
    if dist.is_initialized():
        dist.barrier()


def _rollout_batches(session: Session, prompts: list[list[list[int]]], *, repeats: int) -> Rollout:
    """Generate for every micro-batch of prompts and merge them into one rollout."""
    settings = session.settings
    parts = [
        generate_rollout(session.unwrapped_policy, batch, settings=settings, repeats=repeats)
        for batch in prompts
    ]
    return concat_rollouts(parts, settings.pad_id)


def _ppo_step(session: Session, prompts: list[list[list[int]]]) -> dict[str, float]:
    """One PPO step: rollout, score, advantages, `ppo_epochs` passes of updates."""
    import ray

    config, settings = session.config, session.settings
    assert session.value is not None
    value_head = session.value.strategy.unwrap().score
    rollout = _rollout_batches(session, prompts, repeats=1)
    scored = _score(session.actor, session.tokenizer, rollout)
    micro = config.per_device_train_batch_size
    rows = rollout.prompt_ids.size(0)
    mask = rollout.response_mask
    with torch.no_grad():
        old_logps = torch.cat(
            [
                response_logps(
                    session.unwrapped_policy, rollout.rows(i), temperature=settings.temperature
                )
                for i in _chunks(rows, micro)
            ]
        )
        ref_logps = torch.cat(
            [session.reference_logps(rollout.rows(i)) for i in _chunks(rows, micro)]
        )
        old_values = torch.cat(
            [
                response_values(session.value.strategy.unwrap(), value_head, rollout.rows(i))
                for i in _chunks(rows, micro)
            ]
        )
    raw_scores = torch.tensor(ray.get(scored), dtype=torch.float32)
    scores = raw_scores
    if config.ppo_score_norm:
        session.score_moments.update(raw_scores)
        scores = session.score_moments.normalise(raw_scores)
    rewards, kl = kl_penalised_rewards(
        scores, old_logps, ref_logps, mask, kl_coef=session.kl_control.value
    )
    if config.ppo_whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    advantages, returns = gae(
        rewards, old_values * mask, mask, gamma=GAMMA, lam=LAM, whiten_advantages=True
    )
    sums: dict[str, list[float]] = {}
    _add(sums, "ppo/reward", float(raw_scores.sum()), rows)
    _add(sums, "ppo/kl", float(kl.sum()), rows)
    kl_coef = session.kl_control.value
    accum = config.gradient_accumulation_steps
    for _ in range(config.ppo_epochs):
        order = torch.randperm(rows)
        for window in order.split(micro * accum):
            for index in window.split(micro):
                part = rollout.rows(index)
                logps = response_logps(session.policy.model, part, temperature=settings.temperature)
                values = response_values(session.value.model, value_head, part)
                policy_loss, clipfrac = ppo_policy_loss(
                    logps, old_logps[index], advantages[index], mask[index], clip_range=CLIP_RANGE
                )
                value_loss, _ = ppo_value_loss(
                    values,
                    old_values[index],
                    returns[index],
                    mask[index],
                    clip_range_value=CLIP_RANGE_VALUE,
                )
                loss = policy_loss + VF_COEF * value_loss
                session.policy.strategy.backward(loss / accum, is_last_micro=True)
                _add(sums, "loss", float(loss.detach()))
                _add(sums, "ppo/policy_loss", float(policy_loss.detach()))
                _add(sums, "ppo/value_loss", float(value_loss.detach()))
                _add(sums, "ppo/clipfrac", float(clipfrac))
            session.policy.step()
            session.value.step()
    metrics = _global_means(sums)
    session.kl_control.update(metrics["ppo/kl"], n_steps=rows * session.world)
    return {**metrics, "ppo/kl_coef": kl_coef}


def _grpo_step(session: Session, prompts: list[list[list[int]]]) -> dict[str, float]:
    """One GRPO step: num_generations completions per prompt, group advantages, updates."""
    import ray
    import torch.distributed as dist

    config, settings = session.config, session.settings
    group = config.num_generations
    rollout = _rollout_batches(session, prompts, repeats=group)
    scored = _score(session.actor, session.tokenizer, rollout)
    micro = config.per_device_train_batch_size * group
    rows = rollout.prompt_ids.size(0)
    mask = rollout.response_mask
    chunks = _chunks(rows, micro)
    with torch.no_grad():
        old_logps = None
        if config.grpo_num_iterations > 1:
            old_logps = torch.cat(
                [
                    response_logps(
                        session.unwrapped_policy, rollout.rows(i), temperature=settings.temperature
                    )
                    for i in chunks
                ]
            )
        ref_logps = None
        if config.grpo_beta > 0:
            ref_logps = torch.cat([session.reference_logps(rollout.rows(i)) for i in chunks])
    rewards = torch.tensor(ray.get(scored), dtype=torch.float32)
    # Groups are whole on each rank, so "group" scaling is exact; "batch" uses this rank's rows.
    advantages = grpo_advantages(rewards, group_size=group, scale_rewards=config.grpo_scale_rewards)
    tokens = torch.tensor([float(mask.sum())])
    if dist.is_initialized():
        dist.all_reduce(tokens)
    num_items = tokens.item() / session.world  # TRL's dapo normaliser (DDP averages ranks)
    sums: dict[str, list[float]] = {}
    _add(sums, "grpo/reward", float(rewards.sum()), rows)
    _add(sums, "grpo/reward_std", float(rewards.view(-1, group).std(dim=1).sum()), rows / group)
    _add(sums, "grpo/completion_length", float(mask.sum()), rows)
    accum = len(chunks)
    for _ in range(config.grpo_num_iterations):
        step_loss = 0.0
        for index in chunks:
            part = rollout.rows(index)
            logps = response_logps(session.policy.model, part, temperature=settings.temperature)
            old = old_logps[index] if old_logps is not None else logps.detach()
            loss, clipfrac = grpo_policy_loss(
                logps,
                old,
                advantages[index],
                mask[index],
                epsilon_low=config.grpo_epsilon,
                epsilon_high=config.grpo_epsilon_high or config.grpo_epsilon,
                loss_type=config.grpo_loss_type,
                beta=config.grpo_beta,
                ref_logprobs=ref_logps[index] if ref_logps is not None else None,
                num_items_in_batch=num_items,
                max_completion_length=settings.max_new_tokens,
            )
            scaled = loss if config.grpo_loss_type == "dapo" else loss / accum
            session.policy.strategy.backward(scaled, is_last_micro=True)
            step_loss += float(scaled.detach())
            _add(sums, "grpo/clipfrac", float(clipfrac))
            if ref_logps is not None:
                log_ratio = ref_logps[index] - logps.detach()
                k3 = (torch.exp(log_ratio) - log_ratio - 1) * mask[index]
                _add(sums, "grpo/kl", float(k3.sum()), float(mask[index].sum()))
        session.policy.step()
        _add(sums, "loss", step_loss)
    return _global_means(sums)


def _report_checkpoint(session: Session, *, rank: int, metrics: dict, state: dict) -> None:
    """Save what a resume needs and report it on every rank (rank 0 hands Ray the dir, with
    the manifest `jobs.checkpoints` checks before a resume uses it)."""
    import ray.train

    from jobs.checkpoints import write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        trained = {path: session.policy}
        if session.value is not None:
            (path / VALUE_DIR).mkdir()
            trained[path / VALUE_DIR] = session.value
        for directory, model in trained.items():
            model.strategy.save_adapter(directory, rank=rank)
            model.strategy.save_state(directory, rank=rank)
            if rank == 0:
                torch.save(model.scheduler.state_dict(), directory / "scheduler.pt")
        if rank == 0:
            from jobs.loop import CHECKPOINT_STATE

            full_state = {
                **state,
                "writers": 1,
                "kl_coef": session.kl_control.value,
                "score_moments": session.score_moments.state(),
            }
            (path / CHECKPOINT_STATE).write_text(json.dumps(full_state))
            write_manifest(path, rank=0)
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{state['step']}"
        )


def _resume(checkpoint: Any, session: Session) -> dict[str, int]:
    """Load both models, optimizers, schedulers and the KL/score statistics, if resuming."""
    if checkpoint is None:
        return {"step": 0, "epoch": 0, "micro_in_epoch": 0}
    from jobs.loop import CHECKPOINT_STATE

    with checkpoint.as_directory() as directory:
        path = Path(directory)
        trained = {path: session.policy}
        if session.value is not None:
            trained[path / VALUE_DIR] = session.value
        for folder, model in trained.items():
            model.strategy.load_state(folder)
            model.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        state = json.loads((path / CHECKPOINT_STATE).read_text())
    state.pop("writers", None)
    session.kl_control.value = state.pop("kl_coef")
    session.score_moments = RunningMoments(**state.pop("score_moments"))
    print(f"[rayft] resumed from step {state['step']}", flush=True)
    return state
