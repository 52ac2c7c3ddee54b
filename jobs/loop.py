"""The per-worker training loop shared by all stages (runs inside Ray Train workers).

Contract with Ray Train (the same on every rank, so the barrier in `ray.train.report` never
waits forever): each rank resumes from `ray.train.get_checkpoint()`, takes the same number of
micro-batches from its own dataset shard, and calls `report` at the same steps. Rank 0 alone
writes the shared files (`trainer_log.jsonl`, the final adapter, the consolidated adapter in
each checkpoint); with a sharding strategy (ZeRO, FSDP2) every rank also writes its own shard
into its checkpoint dir and passes it to `report`, and Ray merges the ranks' dirs into one.
Each rank also writes `strategy_rank<N>.json` (what it holds) for tests and capacity planning.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from configs import RayftConfig

CHECKPOINT_STATE = "trainer_state.json"


@dataclass(frozen=True)
class LoopPlan:
    """Numbers the driver computes once and hands to every worker."""

    config: dict[str, Any]
    micro_per_epoch: int
    total_steps: int
    torch_threads: int
    resume_from: str | None = None
    deepspeed_config: dict[str, Any] | None = None


def plan_steps(config: RayftConfig, *, rows: int, world_size: int) -> tuple[int, int, int, int]:
    """Rows per rank, micro-batches and optimizer steps per epoch, and steps in total.

    Ray Data gives every rank the same number of rows (`equal=True` split), so each rank
    sees `rows // world_size` rows; a trailing partial accumulation window still steps.
    """
    rows_per_rank = rows // world_size
    if rows_per_rank == 0:
        raise ValueError(
            f"{rows} training rows cannot feed {world_size} workers; lower ray.num_workers"
        )
    micro = math.ceil(rows_per_rank / config.per_device_train_batch_size)
    steps_per_epoch = math.ceil(micro / config.gradient_accumulation_steps)
    if config.max_steps > 0:
        total = config.max_steps
    else:
        total = math.ceil(steps_per_epoch * config.num_train_epochs)
    return rows_per_rank, micro, steps_per_epoch, total


def train_loop_per_worker(plan_dict: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    import ray.train
    import torch.distributed as dist
    from transformers import get_scheduler

    from jobs.model import attach_lora, load_base_model, load_tokenizer, training_dtype
    from jobs.registry import get_stage
    from jobs.strategies import get_strategy
    from jobs.trackers import make_tracker

    plan = LoopPlan(**plan_dict)
    config = RayftConfig.model_validate(plan.config)
    stage = get_stage(config.stage)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(plan.torch_threads)
    torch.manual_seed(config.seed)
    on_gpu = torch.cuda.is_available() and config.ray.use_gpu

    tokenizer = load_tokenizer(config)
    model = attach_lora(load_base_model(config, dtype=training_dtype(config, on_gpu=on_gpu)), config)
    strategy = get_strategy(
        config, world_size=world, on_gpu=on_gpu, deepspeed_config=plan.deepspeed_config
    )
    model, optimizer = strategy.wrap(
        model,
        lambda params: torch.optim.AdamW(
            params, lr=config.learning_rate, weight_decay=config.weight_decay
        ),
    )
    _write_strategy_stats(Path(config.output_dir), strategy, rank=rank)
    warmup = config.warmup_steps or math.ceil(plan.total_steps * config.warmup_ratio)
    scheduler = get_scheduler(
        config.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
        num_training_steps=plan.total_steps,
    )
    # A restarted worker group gets the run's latest checkpoint from Ray Train; a new run into
    # an output_dir with checkpoints starts from the one the driver found.
    checkpoint = ray.train.get_checkpoint() or (
        ray.train.Checkpoint(plan.resume_from) if plan.resume_from else None
    )
    state = _resume(checkpoint, strategy, scheduler)
    step, skip_micro = state["step"], state["micro_in_epoch"]
    start_epoch = state["epoch"]
    tracker = make_tracker(config) if rank == 0 else None
    log_path = Path(config.output_dir) / "trainer_log.jsonl"
    started = time.time()
    shard = ray.train.get_dataset_shard("train")
    pad_id = tokenizer.pad_token_id
    accum = config.gradient_accumulation_steps
    losses_since_log: list[float] = []
    all_losses: list[float] = []
    epoch = start_epoch

    def after_step(loss: float, micro_index: int) -> bool:
        """Log, report and checkpoint after optimizer step `step`; True when training is done."""
        losses_since_log.append(loss)
        all_losses.append(loss)
        done = step >= plan.total_steps
        if step % config.logging_steps == 0 or done:
            record = {
                "current_steps": step,
                "total_steps": plan.total_steps,
                "loss": round(sum(losses_since_log) / len(losses_since_log), 4),
                "lr": scheduler.get_last_lr()[0],
                "epoch": round(epoch + micro_index / plan.micro_per_epoch, 2),
                "elapsed_time": round(time.time() - started, 1),
            }
            losses_since_log.clear()
            if rank == 0:
                _write_log(log_path, record, tracker)
        if step % config.save_steps == 0 or done:
            _report_checkpoint(
                strategy, scheduler, rank=rank,
                state={"step": step, "epoch": epoch, "micro_in_epoch": micro_index},
                metrics={"loss": loss, "step": step},
            )
        elif step % config.logging_steps == 0:
            ray.train.report({"loss": loss, "step": step})
        return done

    done = step >= plan.total_steps
    while not done:
        window: list[dict[str, torch.Tensor]] = []
        micro_index = 0
        batches = shard.iter_torch_batches(
            batch_size=config.per_device_train_batch_size,
            collate_fn=_stage_collate(stage, pad_id),
            local_shuffle_buffer_size=4 * config.per_device_train_batch_size,
            local_shuffle_seed=config.seed + epoch,
        )
        for batch in batches:
            micro_index += 1
            if epoch == start_epoch and micro_index <= skip_micro:
                continue  # trained before the checkpoint this run resumed from
            window.append(batch)
            if len(window) < accum:
                continue
            loss = _optimizer_step(
                model, stage, window, strategy=strategy, scheduler=scheduler, world=world
            )
            window = []
            step += 1
            done = after_step(loss, micro_index)
            if done:
                break
        if window and not done:  # a partial accumulation window closes the epoch
            loss = _optimizer_step(
                model, stage, window, strategy=strategy, scheduler=scheduler, world=world
            )
            step += 1
            done = after_step(loss, micro_index)
        epoch += 1
        skip_micro = 0
    _save_final(strategy, tokenizer, config, rank=rank, losses=all_losses, started=started)
    if rank == 0:
        if tracker is not None:
            tracker.close()
    if dist.is_initialized():
        dist.barrier()


def _stage_collate(stage: Any, pad_id: int) -> Any:
    """Ray Data collate callable: numpy batch → the stage's padded tensors.

    Built here rather than at module level because importing Ray must wait until the driver has
    chosen loopback-only networking (see `jobs.runtime.keep_loopback`).
    """
    from ray.data.collate_fn import NumpyBatchCollateFn

    class StageCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            return stage.collate(batch, pad_id)

    return StageCollate()


def _optimizer_step(
    model: Any, stage: Any, window: list[dict[str, torch.Tensor]], *, strategy: Any,
    scheduler: Any, world: int,
) -> float:
    """One optimizer step over a window of micro-batches; returns the global mean token loss.

    Each micro-batch's summed loss is divided by the labelled-token count of the whole window
    on all ranks (times the world size, which every strategy's gradient averaging divides out
    again). The strategy accumulates, clips and steps; DeepSpeed learns the window's end from
    `is_last_micro` instead of counting micro-batches, so a short last window still steps.
    """
    import torch.distributed as dist

    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in window]
    global_count = torch.tensor([float(sum(counts))])
    if dist.is_initialized():
        dist.all_reduce(global_count)
    denominator = max(global_count.item(), 1.0)
    step_loss = torch.zeros(1)
    for index, batch in enumerate(window):
        loss_sum, _ = stage.loss_sum(model, batch)
        strategy.backward(loss_sum * world / denominator, is_last_micro=index == len(window) - 1)
        step_loss += loss_sum.detach().float()
    strategy.step()
    scheduler.step()
    strategy.zero_grad()
    if dist.is_initialized():
        dist.all_reduce(step_loss)
    return float(step_loss.item() / denominator)


def _report_checkpoint(
    strategy: Any, scheduler: Any, *, rank: int, state: dict, metrics: dict
) -> None:
    """Save what a resume needs and report it; every rank reports.

    Rank 0 writes the consolidated adapter, scheduler, RNG and step; a sharding strategy adds
    one shard per rank, so then every rank hands Ray its dir (Ray merges them).
    """
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        strategy.save_adapter(path, rank=rank)
        strategy.save_state(path, rank=rank)
        if rank == 0:
            torch.save(scheduler.state_dict(), path / "scheduler.pt")
            torch.save(torch.get_rng_state(), path / "rng_state.pt")
            (path / CHECKPOINT_STATE).write_text(json.dumps(state))
        keep = rank == 0 or strategy.sharded_checkpoint
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if keep else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{state['step']}")


def _resume(checkpoint: Any, strategy: Any, scheduler: Any) -> dict[str, int]:
    """Load adapter, optimizer, scheduler and RNG from a checkpoint, if there is one."""
    if checkpoint is None:
        return {"step": 0, "epoch": 0, "micro_in_epoch": 0}
    with checkpoint.as_directory() as directory:
        path = Path(directory)
        strategy.load_state(path)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(path / "rng_state.pt", weights_only=True))
        state = json.loads((path / CHECKPOINT_STATE).read_text())
    print(f"[rayft] resumed from step {state['step']}", flush=True)
    return state


def _write_strategy_stats(output_dir: Path, strategy: Any, *, rank: int) -> None:
    """`strategy_rank<N>.json`: the strategy and how many parameter elements this rank holds."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"strategy_rank{rank}.json").write_text(json.dumps(strategy.describe()))


def _write_log(path: Path, record: dict[str, Any], tracker: Any) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    elapsed = record["elapsed_time"]
    done = record["current_steps"]
    eta = elapsed / max(done, 1) * (record["total_steps"] - done)
    print(
        f"[rayft] step {done}/{record['total_steps']}  loss {record['loss']:.4f}  "
        f"lr {record['lr']:.2e}  epoch {record['epoch']:.2f}  "
        f"elapsed {elapsed:.0f}s  eta {eta:.0f}s",
        flush=True,
    )
    tracker.log({"loss": record["loss"], "lr": record["lr"]}, done)


def _save_final(
    strategy: Any, tokenizer: Any, config: RayftConfig, *, rank: int, losses: list[float],
    started: float,
) -> None:
    """The adapter and tokenizer in `output_dir`, as LLaMA-Factory leaves them.

    Collective (a sharded adapter is gathered on every rank); rank 0 writes.
    """
    out = Path(config.output_dir)
    strategy.save_adapter(out, rank=rank)
    if rank != 0:
        return
    tokenizer.save_pretrained(out)
    runtime = time.time() - started
    results = {
        "train_loss": sum(losses) / max(len(losses), 1),
        "final_loss": losses[-1] if losses else None,
        "train_runtime": round(runtime, 2),
        "global_steps": len(losses),
    }
    (out / "all_results.json").write_text(json.dumps(results, indent=2))
