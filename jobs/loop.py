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
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from configs import RayftConfig
from jobs.checkpoints import STATE_FILE, checkpoint_step, latest_complete, write_manifest

CHECKPOINT_STATE = STATE_FILE


@dataclass(frozen=True)
class LoopPlan:
    """Numbers the driver computes once and hands to every worker."""

    config: dict[str, Any]
    micro_per_epoch: int | None  # None for a stream
    total_steps: int
    torch_threads: int
    resume_from: str | None = None
    deepspeed_config: dict[str, Any] | None = None
    eval_rows: int = 0
    fault: dict[str, Any] | None = None
    run_dir: str | None = None


@dataclass(frozen=True)
class FaultInjection:
    """Kill rank `rank` with `os._exit` right after optimizer step `step`, once per `marker`
    file (the restarted attempt finds the marker and trains on). For fault-tolerance tests."""

    step: int
    marker: str
    rank: int = 1


def plan_steps(
    config: RayftConfig, *, rows: int | None, world_size: int
) -> tuple[int | None, int | None, int | None, int]:
    """Rows per rank, micro-batches and optimizer steps per epoch, and steps in total.

    Ray Data gives every rank the same number of rows (`equal=True` split), so each rank
    sees `rows // world_size` rows; a trailing partial accumulation window still steps.
    A stream (`rows` None) has no epoch size; the config makes sure `max_steps` is set.
    """
    if rows is None:
        return None, None, None, config.max_steps
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

    from jobs.model import build_trainable_model, load_tokenizer, training_dtype
    from jobs.optimizers import make_optimizer_factory
    from jobs.reference import make_reference
    from jobs.registry import StepContext, get_stage
    from jobs.stages.rm import reward_pad_id
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
    model = build_trainable_model(config, on_gpu=on_gpu, head=stage.head)
    pad_id = tokenizer.pad_token_id
    if stage.head == "reward":
        pad_id = reward_pad_id(tokenizer)
        model.config.pad_token_id = pad_id  # where transformers reads the score
    strategy = get_strategy(
        config, world_size=world, on_gpu=on_gpu, deepspeed_config=plan.deepspeed_config
    )
    model, optimizer = strategy.wrap(model, make_optimizer_factory(config, model))
    reference = (
        make_reference(config, strategy.unwrap(), dtype=training_dtype(config, on_gpu=on_gpu))
        if stage.uses_reference(config)
        else None
    )
    step_context = StepContext(model=model, reference=reference, config=config, world=world)
    write_strategy_stats(Path(config.output_dir), strategy, rank=rank)
    warmup = config.warmup_steps or math.ceil(plan.total_steps * config.warmup_ratio)
    scheduler = get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=plan.total_steps,
    )
    # A restarted worker group gets the run's latest checkpoint from Ray Train; a new run into
    # an output_dir with checkpoints starts from the one the driver found.
    checkpoint = pick_checkpoint(ray.train.get_checkpoint(), plan)
    state = _resume(checkpoint, strategy, scheduler)
    step, skip_micro = state["step"], state["micro_in_epoch"]
    start_epoch = state["epoch"]
    tracker = make_tracker(config) if rank == 0 else None
    log_path = Path(config.output_dir) / "trainer_log.jsonl"
    started = time.time()
    shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if plan.eval_rows else None
    last_eval: dict[str, float] = {}
    accum = config.gradient_accumulation_steps
    losses_since_log: list[float] = []
    metrics_since_log: list[dict[str, float]] = []
    all_losses: list[float] = []
    epoch = start_epoch

    def after_step(result: StepResult, micro_index: int) -> bool:
        """Log, report and checkpoint after optimizer step `step`; True when training is done."""
        losses_since_log.append(result.loss)
        all_losses.append(result.loss)
        metrics_since_log.append(result.metrics)
        done = step >= plan.total_steps
        logging = step % config.logging_steps == 0 or done
        reporting = logging or step % config.save_steps == 0
        evaluated: dict[str, float] = {}
        # Evaluate when due, and before the first report, so that every report a Tune
        # scheduler sees carries the eval metrics (the latest ones).
        if eval_shard is not None and (
            _eval_due(config, step, micro_index, plan, done) or (reporting and not last_eval)
        ):
            evaluated = _evaluate(step_context, stage, eval_shard, pad_id, config)
            last_eval.update(evaluated)
        if logging or evaluated:
            record = {
                "current_steps": step,
                "total_steps": plan.total_steps,
                "loss": round(sum(losses_since_log) / len(losses_since_log), 4),
                **mean_metrics(metrics_since_log),
                **{name: round(value, 4) for name, value in evaluated.items()},
                "lr": scheduler.get_last_lr()[0],
                "epoch": epoch_progress(epoch, micro_index, plan.micro_per_epoch),
                "elapsed_time": round(time.time() - started, 1),
            }
            losses_since_log.clear()
            metrics_since_log.clear()
            if rank == 0:
                write_log(log_path, record, tracker)
        reported = {"loss": result.loss, "step": step, **result.metrics, **last_eval}
        if step % config.save_steps == 0 or done:
            _report_checkpoint(
                strategy,
                scheduler,
                rank=rank,
                world=world,
                state={"step": step, "epoch": epoch, "micro_in_epoch": micro_index},
                metrics=reported,
            )
        elif step % config.logging_steps == 0:
            ray.train.report(reported)
        return done

    done = step >= plan.total_steps
    while not done:
        window: list[dict[str, torch.Tensor]] = []
        micro_index = 0
        batches = shard.iter_torch_batches(
            batch_size=config.per_device_train_batch_size,
            collate_fn=_stage_collate(stage, pad_id),
            local_shuffle_buffer_size=shuffle_buffer(config),
            local_shuffle_seed=config.seed + epoch,
        )
        for batch in batches:
            micro_index += 1
            if epoch == start_epoch and micro_index <= skip_micro:
                continue  # trained before the checkpoint this run resumed from
            window.append(batch)
            if len(window) < accum:
                continue
            result = _optimizer_step(
                step_context, stage, window, strategy=strategy, scheduler=scheduler
            )
            window = []
            step += 1
            done = after_step(result, micro_index)
            _maybe_fail(plan.fault, step=step, rank=rank)
            if done:
                break
        if window and not done:  # a partial accumulation window closes the epoch
            result = _optimizer_step(
                step_context, stage, window, strategy=strategy, scheduler=scheduler
            )
            step += 1
            done = after_step(result, micro_index)
        epoch += 1
        skip_micro = 0
    save_final(strategy, tokenizer, config, rank=rank, losses=all_losses, started=started)
    if rank == 0:
        if tracker is not None:
            tracker.close()
    if dist.is_initialized():
        dist.barrier()


def epoch_progress(epoch: int, micro_index: int, micro_per_epoch: int | None) -> float:
    """Epochs done, with the current one's fraction; a stream's epochs count whole passes."""
    if not micro_per_epoch:
        return float(epoch)
    return round(epoch + micro_index / micro_per_epoch, 2)


def shuffle_buffer(config: RayftConfig) -> int:
    """Rows in a rank's local shuffle buffer: `buffer_size` for a stream (LLaMA-Factory's
    streaming shuffle), else four micro-batches (the cache's order is already fixed)."""
    return config.buffer_size if config.streaming else 4 * config.per_device_train_batch_size


def _maybe_fail(fault: dict[str, Any] | None, *, step: int, rank: int) -> None:
    """The injected failure of `FaultInjection`, if this is its step and rank."""
    if not fault:
        return
    injection = FaultInjection(**fault)
    marker = Path(injection.marker)
    if step == injection.step and rank == injection.rank and not marker.exists():
        marker.write_text(f"killed rank {rank} after step {step}\n")
        print(f"[rayft] fault injection: rank {rank} exits after step {step}", flush=True)
        os._exit(1)


def _eval_due(config: RayftConfig, step: int, micro_index: int, plan: LoopPlan, done: bool) -> bool:
    """`eval_strategy` steps: every `eval_steps` (default `logging_steps`); epoch: at each
    epoch's last step; both: at the end."""
    if done:
        return True
    if config.eval_strategy == "steps":
        return step % (config.eval_steps or config.logging_steps) == 0
    return micro_index >= plan.micro_per_epoch


def _evaluate(
    context: Any, stage: Any, shard: Any, pad_id: int, config: RayftConfig
) -> dict[str, float]:
    """`eval_loss` and `eval_<metric>` over this rank's evaluation shard, averaged over ranks.

    Every rank holds the same number of evaluation rows (an equal split), so all ranks run the
    same forwards, which ZeRO-3 and FSDP2 gather parameters for collectively.
    """
    import torch.distributed as dist

    context.model.eval()
    totals: dict[str, list[float]] = {"loss": [0.0, 0.0]}
    with torch.no_grad():
        for batch in shard.iter_torch_batches(
            batch_size=config.per_device_eval_batch_size, collate_fn=_stage_collate(stage, pad_id)
        ):
            output = stage.loss(context, batch)
            totals["loss"][0] += float(output.loss_sum)
            totals["loss"][1] += stage.count(batch)
            for name, (total, how_many) in output.metric_sums.items():
                sums = totals.setdefault(name, [0.0, 0.0])
                sums[0] += total
                sums[1] += how_many
    context.model.train()
    names = sorted(totals)
    packed = torch.tensor([value for name in names for value in totals[name]])
    if dist.is_initialized():
        dist.all_reduce(packed)
    values = packed.tolist()
    return {
        f"eval_{name}": values[2 * i] / values[2 * i + 1]
        for i, name in enumerate(names)
        if values[2 * i + 1] > 0
    }


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


@dataclass(frozen=True)
class StepResult:
    """An optimizer step's global mean loss and metrics (the same on every rank)."""

    loss: float
    metrics: dict[str, float]


def _optimizer_step(
    context: Any,
    stage: Any,
    window: list[dict[str, torch.Tensor]],
    *,
    strategy: Any,
    scheduler: Any,
) -> StepResult:
    """One optimizer step over a window of micro-batches.

    Each micro-batch's summed loss is divided by the stage's count (labelled tokens, pairs or
    rows) of the whole window on all ranks, times the world size, which every strategy's
    gradient averaging divides out again; so accumulation 1x8 equals 8x1. The strategy
    accumulates, clips and steps; DeepSpeed learns the window's end from `is_last_micro`
    instead of counting micro-batches, so a short last window still steps.
    """
    import torch.distributed as dist

    global_count = torch.tensor([float(sum(stage.count(batch) for batch in window))])
    if dist.is_initialized():
        dist.all_reduce(global_count)
    denominator = max(global_count.item(), 1.0)
    step_loss = torch.zeros(1)
    metric_sums: dict[str, list[float]] = {}
    for index, batch in enumerate(window):
        output = stage.loss(context, batch)
        strategy.backward(
            output.loss_sum * context.world / denominator, is_last_micro=index == len(window) - 1
        )
        step_loss += output.loss_sum.detach().float()
        for name, (total, how_many) in output.metric_sums.items():
            sums = metric_sums.setdefault(name, [0.0, 0.0])
            sums[0] += total
            sums[1] += how_many
    strategy.step()
    scheduler.step()
    strategy.zero_grad()
    names = sorted(metric_sums)
    packed = torch.tensor([step_loss.item(), *(v for n in names for v in metric_sums[n])])
    if dist.is_initialized():
        dist.all_reduce(packed)
    values = packed.tolist()
    metrics = {
        name: values[1 + 2 * i] / values[2 + 2 * i]
        for i, name in enumerate(names)
        if values[2 + 2 * i] > 0
    }
    return StepResult(loss=values[0] / denominator, metrics=metrics)


def mean_metrics(window: list[dict[str, float]]) -> dict[str, float]:
    """Per-metric mean over the steps since the last log line (rounded for the log)."""
    names = sorted({name for metrics in window for name in metrics})
    return {
        name: round(sum(m[name] for m in window if name in m) / sum(name in m for m in window), 4)
        for name in names
    }


def _report_checkpoint(
    strategy: Any, scheduler: Any, *, rank: int, world: int, state: dict, metrics: dict
) -> None:
    """Save what a resume needs and report it; every rank reports.

    Rank 0 writes the consolidated adapter, scheduler, RNG and step; a sharding strategy adds
    one shard per rank, so then every rank hands Ray its dir (Ray merges them). Each writer
    lists its files in a manifest (`jobs.checkpoints`), so a half-copied checkpoint is never
    resumed from.
    """
    import ray.train

    keep = rank == 0 or strategy.sharded_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        strategy.save_adapter(path, rank=rank)
        strategy.save_state(path, rank=rank)
        if rank == 0:
            torch.save(scheduler.state_dict(), path / "scheduler.pt")
            torch.save(torch.get_rng_state(), path / "rng_state.pt")
            writers = world if strategy.sharded_checkpoint else 1
            (path / CHECKPOINT_STATE).write_text(json.dumps({**state, "writers": writers}))
        if keep:
            write_manifest(path, rank=rank)
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if keep else None
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{state['step']}"
        )


def pick_checkpoint(registered: Any, plan: LoopPlan) -> Any:
    """The newest checkpoint to resume from: the one Ray Train registered, or a newer complete
    one in the run's local storage (Ray registers a checkpoint only once it has every rank's
    report; a rank that died right after writing its shard leaves it stored but unregistered),
    or, for a new run into an old `output_dir`, the one the driver found."""
    import ray.train

    candidates = [registered] if registered is not None else []
    stored = latest_complete(Path(plan.run_dir)) if plan.run_dir else None
    if stored is not None:
        candidates.append(ray.train.Checkpoint(str(stored)))
    if plan.resume_from:
        candidates.append(ray.train.Checkpoint(plan.resume_from))
    if not candidates:
        return None
    return max(candidates, key=lambda c: checkpoint_step(Path(c.path)))


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


def write_strategy_stats(output_dir: Path, strategy: Any, *, rank: int) -> None:
    """`strategy_rank<N>.json`: the strategy, how many parameter elements this rank holds, and
    the Ray node it runs on (where `ray.rank0_node` put rank 0)."""
    import ray

    output_dir.mkdir(parents=True, exist_ok=True)
    stats = {**strategy.describe(), "node_id": ray.get_runtime_context().get_node_id()}
    (output_dir / f"strategy_rank{rank}.json").write_text(json.dumps(stats))


def write_log(path: Path, record: dict[str, Any], tracker: Any) -> None:
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
    skip = ("current_steps", "total_steps", "epoch", "elapsed_time")
    tracker.log({k: v for k, v in record.items() if k not in skip}, done)


def save_final(
    strategy: Any,
    tokenizer: Any,
    config: RayftConfig,
    *,
    rank: int,
    losses: list[float],
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
