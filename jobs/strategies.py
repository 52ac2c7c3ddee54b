"""DDP | DeepSpeed | FSDP2 behind one small interface, chosen by `ray.strategy`.

The loop never touches a wrapper directly: it asks the strategy to wrap the model, run backward,
step, and save or load a checkpoint. Loss normalisation is the loop's (summed token loss divided
by the global labelled-token count of the window, times the world size); every strategy averages
gradients over ranks, which divides the world size out again, so all three train the same
trajectory.

Example:
    >>> strategy = get_strategy(config, world_size=2)
    >>> model, optimizer = strategy.wrap(model, make_optimizer)
    >>> strategy.backward(loss, is_last_micro=True); strategy.step(); strategy.zero_grad()
"""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from configs import RayftConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
MakeOptimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class StrategyError(ValueError):
    """A strategy setting that cannot work; the message names the key and the fix."""


class Strategy(ABC):
    """How one rank wraps, steps and checkpoints the model.

    Checkpoint layout (one Ray checkpoint dir; every rank reports its own temp dir and Ray merges
    them): rank 0 writes the consolidated model for export (`save_adapter`: the PEFT adapter for
    lora; for full and freeze the whole model as safetensors, as LLaMA-Factory saves them);
    `save_state` adds whatever the strategy needs to resume (rank-0 files or per-rank shards).
    """

    name: str
    sharded_checkpoint: bool = False  # True: every rank writes files into the checkpoint

    def __init__(self, config: RayftConfig, *, world_size: int, on_gpu: bool) -> None:
        self.config = config
        self.world_size = world_size
        self.on_gpu = on_gpu
        self.model: Any = None
        self.optimizer: Any = None

    @abstractmethod
    def wrap(self, model: Any, make_optimizer: MakeOptimizer) -> tuple[Any, torch.optim.Optimizer]:
        """Wrap `model` and build its optimizer over the trainable parameters.

        Returns:
            The model to call in forward, and the torch optimizer a LR scheduler attaches to
            (for DeepSpeed, the one inside the engine, whose param groups ZeRO shares).
        """

    def backward(self, loss: torch.Tensor, *, is_last_micro: bool) -> None:
        """Accumulate gradients of one micro-batch (already normalised by the loop)."""
        loss.backward()

    def step(self) -> None:
        """Clip to `max_grad_norm` (if > 0) and apply the optimizer."""
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.max_grad_norm)
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def unwrap(self) -> Any:
        """The PEFT (lora) or transformers (full, freeze) model inside any wrapper."""
        return self.model.module if hasattr(self.model, "module") else self.model

    @property
    def trains_adapter(self) -> bool:
        """True for lora (the export is an adapter), False for full/freeze (a whole model)."""
        return self.config.finetuning_type == "lora"

    def save_adapter(self, directory: Path, *, rank: int) -> None:
        """The consolidated adapter (lora) or whole model (full, freeze) on rank 0.

        Collective: every rank calls it. The result loads with peft's / transformers'
        `from_pretrained(directory)`.
        """
        if rank == 0:
            self.unwrap().save_pretrained(directory)

    def save_state(self, directory: Path, *, rank: int) -> None:
        """Optimizer state for a resume; DDP keeps one copy on rank 0."""
        if rank == 0:
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load_state(self, directory: Path) -> None:
        """Restore trained weights and optimizer state saved by `save_adapter`/`save_state`."""
        if self.trains_adapter:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(
                self.unwrap(), load_file(directory / "adapter_model.safetensors")
            )
        else:
            load_saved_weights(self.unwrap(), directory)
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))

    def describe(self) -> dict[str, Any]:
        """What this rank holds, for tests and logs."""
        params = list(self.model.parameters())
        return {
            "strategy": self.name,
            "param_numel": sum(p.numel() for p in params),
            "local_numel": sum(p.numel() for p in params),
        }


def load_saved_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load the safetensors files `save_pretrained` wrote (one file or shards) into `model`.

    Raises:
        RuntimeError: no weights in `directory`, or names that do not match the model
            (weights tied to another one, e.g. a tied lm_head, are not saved and may be absent).
    """
    from safetensors.torch import load_file

    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise RuntimeError(f"no model*.safetensors in {directory} to resume from")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    unique = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"weights in {directory} do not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(
    config: RayftConfig, *, world_size: int, on_gpu: bool, deepspeed_config: dict | None = None
) -> Strategy:
    """The strategy `config.ray.effective_strategy` names."""
    cls = STRATEGIES[config.ray.effective_strategy]
    strategy = cls(config, world_size=world_size, on_gpu=on_gpu)
    if isinstance(strategy, DeepSpeedStrategy):
        assert deepspeed_config is not None, "the driver resolves the DeepSpeed config"
        strategy.ds_config = deepspeed_config
    return strategy


@register_strategy
class DDPStrategy(Strategy):
    """Ray Train's `prepare_model` (DistributedDataParallel when there are several ranks)."""

    name = "ddp"

    def wrap(self, model: Any, make_optimizer: MakeOptimizer) -> tuple[Any, torch.optim.Optimizer]:
        from ray.train.torch import prepare_model

        self.model = prepare_model(model)
        self.optimizer = make_optimizer(self.trainable_parameters())
        return self.model, self.optimizer


# ---------------------------------------------------------------------------------- DeepSpeed


def load_deepspeed_config(path: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON (relative to the cwd, else to the repo, as `configs/deepspeed/…`).

    Raises:
        StrategyError: no such file, not a JSON object, or a section rayft owns.
    """
    file = Path(path).expanduser()
    if not file.is_file() and (REPO_ROOT / path).is_file():
        file = REPO_ROOT / path
    if not file.is_file():
        raise StrategyError(
            f"`deepspeed` / `ray.deepspeed_config`: no file at {path!r}; use a preset such as "
            "configs/deepspeed/ds_z2_config.json"
        )
    try:
        loaded = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise StrategyError(f"`deepspeed`: {file} is not valid JSON: {err}") from err
    if not isinstance(loaded, dict):
        raise StrategyError(f"`deepspeed`: {file} must hold a JSON object")
    if "scheduler" in loaded:
        raise StrategyError(
            f"`deepspeed`: {file} has a `scheduler` section; rayft's `lr_scheduler_type` owns "
            "the schedule, remove it"
        )
    problems = zero_problems(loaded)
    if problems:
        raise StrategyError(f"`deepspeed`: {file}: " + "; ".join(problems))
    return loaded


def zero_problems(ds_config: dict[str, Any]) -> list[str]:
    """What in the `zero_optimization` section DeepSpeed would refuse or silently ignore.

    DeepSpeed's own config model checks the types and names (an "auto" value is filled later
    and skipped here); the stage rules it does not enforce are added: it ignores
    `offload_param` below stage 3 and `offload_optimizer` at stage 0, so a run the user meant
    to offload would quietly keep everything on the accelerator.
    """
    from pydantic import ValidationError

    section = ds_config.get("zero_optimization") or {}
    if not isinstance(section, dict):
        return ["`zero_optimization` must be a JSON object"]
    problems = []
    concrete = {key: value for key, value in section.items() if value != "auto"}
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        DeepSpeedZeroConfig(**concrete)
    except ValidationError as err:
        problems += [
            f"zero_optimization.{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in err.errors()
        ]
    stage = section.get("stage", 0)

    def offloads(key: str) -> bool:
        target = section.get(key)
        return isinstance(target, dict) and target.get("device", "none") != "none"

    if offloads("offload_param") and stage != 3:
        problems.append(
            f"zero_optimization.offload_param needs ZeRO stage 3 (stage is {stage}); set "
            '"stage": 3 (configs/deepspeed/ds_z3_offload_config.json) or remove offload_param'
        )
    if offloads("offload_optimizer") and stage == 0:
        problems.append(
            "zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0); "
            "raise the stage or remove offload_optimizer"
        )
    for key in ("offload_param", "offload_optimizer"):
        target = section.get(key)
        if offloads(key) and target.get("device") == "nvme" and not target.get("nvme_path"):
            problems.append(f'zero_optimization.{key}: device "nvme" needs "nvme_path"')
    if all((ds_config.get(kind) or {}).get("enabled") is True for kind in ("fp16", "bf16")):
        problems.append("fp16.enabled and bf16.enabled are both true; enable at most one")
    return problems


def fill_deepspeed_auto(
    ds_config: dict[str, Any],
    config: RayftConfig,
    *,
    world_size: int,
    on_gpu: bool,
    hidden_size: int | None,
) -> dict[str, Any]:
    """A copy of `ds_config` with every "auto" value taken from our config (as HF Trainer does).

    Batch sizes and clipping come from the rayft config; precision flags are on only on GPUs
    (rayft trains in fp32 on CPU); ZeRO-3 bucket sizes follow the model's hidden size.
    `zero_force_ds_cpu_optimizer` defaults to false so ZeRO keeps rayft's torch AdamW instead
    of demanding the compiled DeepSpeedCPUAdam.

    Raises:
        StrategyError: an "auto" left that rayft cannot fill, or numbers that disagree.
    """
    out = copy.deepcopy(ds_config)
    micro = config.per_device_train_batch_size
    accum = config.gradient_accumulation_steps
    top = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": config.max_grad_norm,
    }
    for key, value in top.items():
        given = out.get(key, "auto")
        if given != "auto" and given != value:
            raise StrategyError(
                f"`deepspeed`: {key}={given!r} disagrees with rayft's value {value!r}; set it to "
                '"auto" (rayft fills it from per_device_train_batch_size, '
                "gradient_accumulation_steps, max_grad_norm and ray.num_workers)"
            )
        out[key] = value
    precision = {"bf16": config.bf16 and on_gpu, "fp16": config.fp16 and on_gpu}
    for key, enabled in precision.items():
        section = out.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = enabled
    optimizer = out.get("optimizer")
    if isinstance(optimizer, dict):
        params = optimizer.setdefault("params", {})
        for key, value in (("lr", config.learning_rate), ("weight_decay", config.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
    zero = out.setdefault("zero_optimization", {})
    if hidden_size is not None:
        sizes = {
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        }
        for key, value in sizes.items():
            if zero.get(key) == "auto":
                zero[key] = value
    out.setdefault("zero_force_ds_cpu_optimizer", False)
    out.setdefault("zero_allow_untested_optimizer", True)
    left = _auto_keys(out)
    if left:
        raise StrategyError(f'`deepspeed`: rayft cannot fill "auto" for {", ".join(left)}')
    return out


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


@register_strategy
class DeepSpeedStrategy(Strategy):
    """A DeepSpeed engine (ZeRO 0-3, optional CPU offload) around rayft's torch AdamW.

    Gradient accumulation: DeepSpeed's own boundary mechanism is driven by the loop's window
    (`set_gradient_accumulation_boundary(False)` for all micro-batches but the last), and
    `backward(..., scale_wrt_gas=False)` because the loop already divides each micro-batch's
    summed loss by the window's global token count; DeepSpeed's reduction then averages over
    ranks exactly like DDP. `engine.step()` runs once per window and clips with
    `gradient_clipping` (= max_grad_norm).
    """

    name = "deepspeed"
    sharded_checkpoint = True
    ds_config: dict[str, Any]

    def wrap(self, model: Any, make_optimizer: MakeOptimizer) -> tuple[Any, torch.optim.Optimizer]:
        import deepspeed

        hidden = getattr(model.config, "hidden_size", None)
        config = fill_deepspeed_auto(
            self.ds_config,
            self.config,
            world_size=self.world_size,
            on_gpu=self.on_gpu,
            hidden_size=hidden,
        )
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = None if "optimizer" in config else make_optimizer(trainable)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=trainable,
            config=config,
            dist_init_required=False,
        )
        self.model = engine
        self.optimizer = ds_optimizer
        # The scheduler attaches to the torch optimizer; ZeRO's wrapper shares its param groups.
        inner = getattr(ds_optimizer, "optimizer", ds_optimizer)
        return engine, inner if isinstance(inner, torch.optim.Optimizer) else optimizer

    def backward(self, loss: torch.Tensor, *, is_last_micro: bool) -> None:
        self.model.set_gradient_accumulation_boundary(is_last_micro)
        self.model.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self.model.step()  # clips with `gradient_clipping`, steps at the boundary

    def zero_grad(self) -> None:
        self.model.zero_grad()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.module.parameters() if p.requires_grad]

    def save_adapter(self, directory: Path, *, rank: int) -> None:
        import deepspeed

        if not self.trains_adapter:
            # The whole model: ZeRO-3 gathers it layer by layer onto rank 0; below ZeRO-3 every
            # rank holds full parameters already.
            if self.zero_stage == 3:
                state = self.model._zero3_consolidated_16bit_state_dict()
            else:
                state = self.unwrap().state_dict() if rank == 0 else None
            if rank == 0:
                self.unwrap().save_pretrained(directory, state_dict=state)
            return
        trainable = self.trainable_parameters()
        # Under ZeRO-3 parameters are partitioned; gather the (small) adapter on every rank.
        with deepspeed.zero.GatheredParameters(trainable, enabled=self.zero_stage == 3):
            if rank == 0:
                peft_model = self.unwrap()
                state = {
                    name: p.detach().clone()
                    for name, p in peft_model.named_parameters()
                    if p.requires_grad
                }
                peft_model.save_pretrained(directory, state_dict=state)

    def save_state(self, directory: Path, *, rank: int) -> None:
        # Every rank writes its ZeRO partition (and rank 0 the module file) under deepspeed/.
        self.model.save_checkpoint(
            str(directory / "deepspeed"), tag="state", exclude_frozen_parameters=True
        )

    def load_state(self, directory: Path) -> None:
        path, _ = self.model.load_checkpoint(
            str(directory / "deepspeed"),
            tag="state",
            load_module_strict=False,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory / 'deepspeed'}")

    def describe(self) -> dict[str, Any]:
        params = list(self.model.module.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        return {
            "strategy": self.name,
            "zero_stage": self.zero_stage,
            "param_numel": total,
            "local_numel": local,
        }


# ---------------------------------------------------------------------------------- FSDP2


@register_strategy
class FSDPStrategy(Strategy):
    """FSDP2: `fully_shard` every transformer block, then the root module.

    Parameters become DTensors sharded on dim 0 over all ranks; gradients are reduce-scattered
    (averaged) after each backward. gloo implements the collectives FSDP2 needs
    (all_gather_into_tensor, reduce_scatter_tensor) in torch >= 2.6, so this also runs on CPU.
    Checkpoints are torch.distributed.checkpoint shards (one file per rank, `.metadata` from
    rank 0) of the trainable parameters and the optimizer.
    """

    name = "fsdp"
    sharded_checkpoint = True

    def wrap(self, model: Any, make_optimizer: MakeOptimizer) -> tuple[Any, torch.optim.Optimizer]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        options = self.config.ray
        kwargs: dict[str, Any] = {
            "mesh": init_device_mesh("cuda" if self.on_gpu else "cpu", (self.world_size,))
        }
        precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            options.fsdp_mixed_precision
        )
        if precision is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=precision, reduce_dtype=torch.float32
            )
        if options.fsdp_cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        if self.on_gpu:
            model = model.to(torch.device("cuda", torch.cuda.current_device()))
        for block in transformer_blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        self.model = model
        self.optimizer = make_optimizer(self.trainable_parameters())
        return model, self.optimizer

    def unwrap(self) -> Any:
        return self.model

    def save_adapter(self, directory: Path, *, rank: int) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # lora: the adapter's (trainable) tensors; full/freeze: every tensor, as export needs
        # the whole model. Gathered from all ranks, kept on rank 0's CPU.
        state = get_model_state_dict(
            self.model,
            options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.trains_adapter
            ),
        )
        if rank == 0:
            self.model.save_pretrained(directory, state_dict=state)

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(
            self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True)
        )
        return {"model": model, "optim": optim}

    def save_state(self, directory: Path, *, rank: int) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(directory / "fsdp"))

    def load_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(directory / "fsdp"))
        # Frozen weights are not in the checkpoint (they come from the base model), so the
        # load is not strict; every trained key is, because `state` was built from them.
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )

    def describe(self) -> dict[str, Any]:
        from torch.distributed.tensor import DTensor

        params = list(self.model.parameters())
        return {
            "strategy": self.name,
            "param_numel": sum(p.numel() for p in params),
            "local_numel": sum(
                p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params
            ),
        }


def transformer_blocks(model: Any) -> list[torch.nn.Module]:
    """The decoder layers of a (PEFT-wrapped) transformers causal LM.

    Raises:
        StrategyError: the model has no `layers`/`h`/`blocks` ModuleList to shard.
    """
    for module in model.modules():
        for attr in ("layers", "h", "blocks"):
            child = getattr(module, attr, None)
            if isinstance(child, torch.nn.ModuleList) and len(child) > 0:
                return list(child)
    raise StrategyError(
        f"ray.strategy=fsdp: found no transformer block list in {type(model).__name__}"
    )
