"""Optimizers by name: LLaMA-Factory's optimizer keys → a factory that `Strategy.wrap` calls.

`make_optimizer_factory(config, model)` picks the optimizer from the config (AdamW unless one of
`use_galore`, `use_apollo`, `loraplus_lr_ratio`, `use_badam`, `use_adam_mini`, `use_muon` is set;
the schema allows at most one) and checks its package is installed before any worker time is
spent. The factory receives the trainable parameters the strategy hands it and reads their
names from `model` at call time, so it also sees FSDP2's sharded parameters.

Every algorithm comes from its maintained package (galore-torch, apollo-torch, badam,
adam-mini), from peft (LoRA+) or from torch (AdamW, Muon); this module only groups parameters
the way LLaMA-Factory 0.9.5 does.

Example:
    >>> make_optimizer = make_optimizer_factory(config, model)
    >>> model, optimizer = strategy.wrap(model, make_optimizer)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from configs import RayftConfig

MakeOptimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
# builder(config, model, named trainable parameters) -> optimizer
OptimizerBuilder = Callable[[RayftConfig, Any, list[tuple[str, torch.nn.Parameter]]], Any]

OPTIMIZERS: dict[str, OptimizerBuilder] = {}
# optimizer → (import name, pip name) of the package it needs
REQUIRES: dict[str, tuple[str, str]] = {}
# config switch → optimizer name; none set means adamw
SWITCHES: dict[str, str] = {
    "use_galore": "galore",
    "use_apollo": "apollo",
    "loraplus_lr_ratio": "loraplus",
    "use_badam": "badam",
    "use_adam_mini": "adam_mini",
    "use_muon": "muon",
}


class OptimizerError(ValueError):
    """An optimizer that cannot be built here; the message names the key and the fix."""


def register_optimizer(
    name: str, *, requires: tuple[str, str] | None = None
) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Add an optimizer builder under `name`, optionally needing package (import, pip) names."""

    def register(builder: OptimizerBuilder) -> OptimizerBuilder:
        OPTIMIZERS[name] = builder
        if requires is not None:
            REQUIRES[name] = requires
        return builder

    return register


def optimizer_name(config: RayftConfig) -> str:
    """The registry name the config selects."""
    for key, name in SWITCHES.items():
        value = getattr(config, key)
        if value is not None and value is not False:
            return name
    return "adamw"


def make_optimizer_factory(config: RayftConfig, model: Any) -> MakeOptimizer:
    """The `make_optimizer` callable for `Strategy.wrap`.

    Args:
        config: the run config (learning_rate, weight_decay, adam_*, optimizer switches).
        model: the model being trained (before or inside the strategy's wrapper; FSDP2 shards
            it in place, so names are read when the factory is called).

    Returns:
        params → torch optimizer over exactly those (trainable) parameters.

    Raises:
        OptimizerError: the selected optimizer's package is not installed.
    """
    name = optimizer_name(config)
    if name in REQUIRES:
        module, package = REQUIRES[name]
        if importlib.util.find_spec(module) is None:
            key = next(k for k, v in SWITCHES.items() if v == name)
            raise OptimizerError(f"`{key}` needs the {package} package: pip install {package}")
    builder = OPTIMIZERS[name]

    def make(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert {id(p) for _, p in named} == {id(p) for p in params}, (
            "the strategy's trainable parameters differ from the model's"
        )
        return builder(config, model, named)

    return make


def _decay_names(model: Any) -> set[str]:
    """Parameter names that get weight decay: transformers Trainer's rule (no bias, no norms)."""
    from transformers.trainer_pt_utils import get_parameter_names

    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return set(get_parameter_names(model, [torch.nn.LayerNorm], patterns))


def _adam_kwargs(config: RayftConfig) -> dict[str, Any]:
    return {
        "lr": config.learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "eps": config.adam_epsilon,
    }


def _decay_groups(
    config: RayftConfig, model: Any, named: list[tuple[str, torch.nn.Parameter]]
) -> list[dict[str, Any]]:
    decay = _decay_names(model)
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": config.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


@register_optimizer("adamw")
def _adamw(config: RayftConfig, model: Any, named: list) -> torch.optim.Optimizer:
    """torch AdamW; weight decay skips biases and norms (transformers Trainer's grouping)."""
    return torch.optim.AdamW(_decay_groups(config, model, named), **_adam_kwargs(config))


@register_optimizer("loraplus")
def _loraplus(config: RayftConfig, model: Any, named: list) -> torch.optim.Optimizer:
    """LoRA+ (peft's `create_loraplus_optimizer`): lora_B at learning_rate * loraplus_lr_ratio."""
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=config.learning_rate,
        loraplus_lr_ratio=config.loraplus_lr_ratio,
        loraplus_lr_embedding=config.loraplus_lr_embedding,
        loraplus_weight_decay=config.weight_decay,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
    )


def _low_rank_groups(
    config: RayftConfig, model: Any, named: list, *, target: str, extra: dict[str, Any]
) -> list[dict[str, Any]]:
    """LLaMA-Factory's GaLore/APOLLO grouping: 2-D weights of targeted Linear layers get the
    projection settings `extra` (and weight decay); the rest are plain AdamW groups."""
    targets = [t.strip() for t in target.split(",") if t.strip()]
    projected: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module_name.endswith("lm_head"):
            continue
        if targets != ["all"] and not any(t in module_name for t in targets):
            continue
        projected |= {id(p) for p in module.parameters() if p.requires_grad and p.ndim > 1}
    if not projected:
        raise OptimizerError(f"no Linear weight matches `{target}`; check galore/apollo_target")
    rest = [(n, p) for n, p in named if id(p) not in projected]
    return [
        *_decay_groups(config, model, rest),
        {
            "params": [p for _, p in named if id(p) in projected],
            "weight_decay": config.weight_decay,
            **extra,
        },
    ]


@register_optimizer("galore", requires=("galore_torch", "galore-torch"))
def _galore(config: RayftConfig, model: Any, named: list) -> torch.optim.Optimizer:
    """GaLoreAdamW (galore-torch) with LLaMA-Factory's keys."""
    from galore_torch import GaLoreAdamW

    extra = {
        "rank": config.galore_rank,
        "update_proj_gap": config.galore_update_interval,
        "scale": config.galore_scale,
        "proj_type": config.galore_proj_type,
    }
    groups = _low_rank_groups(config, model, named, target=config.galore_target, extra=extra)
    return GaLoreAdamW(groups, **_adam_kwargs(config))


@register_optimizer("apollo", requires=("apollo_torch", "apollo-torch"))
def _apollo(config: RayftConfig, model: Any, named: list) -> torch.optim.Optimizer:
    """APOLLOAdamW (apollo-torch) with LLaMA-Factory's keys."""
    from apollo_torch import APOLLOAdamW

    extra = {
        "rank": config.apollo_rank,
        "proj": config.apollo_proj,
        "proj_type": config.apollo_proj_type,
        "update_proj_gap": config.apollo_update_interval,
        "scale": config.apollo_scale,
        "scale_type": config.apollo_scale_type,
        "scale_front": config.apollo_scale_front,
    }
    groups = _low_rank_groups(config, model, named, target=config.apollo_target, extra=extra)
    return APOLLOAdamW(groups, **_adam_kwargs(config))


@register_optimizer("badam", requires=("badam", "badam"))
def _badam(config: RayftConfig, model: Any, named: list) -> torch.optim.Optimizer:
    """BAdam (badam): layer mode trains one block at a time, ratio mode a share of each weight.

    BAdam switches `requires_grad` itself; it is given every named parameter, as in
    LLaMA-Factory.
    """
    from badam import BlockOptimizer, BlockOptimizerRatio

    groups = _decay_groups(config, model, named)
    everything = list(model.named_parameters())
    if config.badam_mode == "layer":
        return BlockOptimizer(
            base_optimizer=torch.optim.AdamW(groups, **_adam_kwargs(config)),
            named_parameters_list=everything,
            block_prefix_list=None,
            switch_block_every=config.badam_switch_interval,
            start_block=config.badam_start_block,
            switch_mode=config.badam_switch_mode,
            verbose=config.badam_verbose,
        )
    return BlockOptimizerRatio(
        param_groups=groups,
        named_parameters_list=everything,
        update_ratio=config.badam_update_ratio,
        mask_mode=config.badam_mask_mode,
        verbose=config.badam_verbose,
        include_embedding=False,
        **_adam_kwargs(config),
    )


@register_optimizer("adam_mini", requires=("adam_mini", "adam-mini"))
def _adam_mini(config: RayftConfig, model: Any, named: list) -> torch.optim.Optimizer:
    """Adam-mini (adam-mini), told the model's hidden size and (KV) head counts."""
    from adam_mini import Adam_mini

    model_config = model.config
    return Adam_mini(
        named_parameters=named,
        weight_decay=config.weight_decay,
        model_sharding=config.ray.effective_strategy != "ddp",
        dim=model_config.hidden_size,
        n_heads=model_config.num_attention_heads,
        n_kv_heads=getattr(model_config, "num_key_value_heads", None),
        verbose=False,
        **_adam_kwargs(config),
    )


class ChainedOptimizer(torch.optim.Optimizer):
    """Several torch optimizers stepped as one, so the scheduler, clipping and checkpoints
    see a single optimizer. The param group dicts are the members' own (shared, not copied),
    so a scheduler's learning rate reaches them."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        super().__init__([g for opt in optimizers for g in opt.param_groups], defaults={})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        assert closure is None, "closures are not used by rayft"
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(state)


@register_optimizer("muon")
def _muon(config: RayftConfig, model: Any, named: list) -> torch.optim.Optimizer:
    """torch.optim.Muon on 2-D weights other than embeddings and the head, AdamW on the rest
    (LLaMA-Factory's split); the Muon learning rate is scaled to match AdamW's update RMS."""
    is_muon = [p.ndim == 2 and "embed" not in n and "lm_head" not in n for n, p in named]
    muon = [p for (_, p), m in zip(named, is_muon, strict=True) if m]
    rest = [(n, p) for (n, p), m in zip(named, is_muon, strict=True) if not m]
    optimizers: list[torch.optim.Optimizer] = []
    if muon:
        optimizers.append(
            torch.optim.Muon(
                muon,
                lr=config.learning_rate,
                weight_decay=config.weight_decay,
                adjust_lr_fn="match_rms_adamw",  # Moonlight's scaling, as LLaMA-Factory's Muon
            )
        )
    if rest:
        optimizers.append(
            torch.optim.AdamW(_decay_groups(config, model, rest), **_adam_kwargs(config))
        )
    return optimizers[0] if len(optimizers) == 1 else ChainedOptimizer(optimizers)
