"""Load a YAML config, report every problem at once, write the resolved config next to the run.

Example:
    >>> from configs import load_config
    >>> cfg = load_config("configs/examples/demo_gemma_lora_sft.yaml", ["max_steps=10"])
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from configs.schema import RayftConfig

# LLaMA-Factory keys that rayft knows but does not implement yet. Naming them keeps a user's
# YAML from being half-applied without notice.
UNSUPPORTED_KEYS: frozenset[str] = frozenset(
    """
    fsdp
    do_eval
    do_predict
    shift_attn use_unsloth enable_liger_kernel resume_from_checkpoint
    image_max_pixels
    video_max_pixels media_dir ray_run_name ray_storage_filesystem
    ray_init_kwargs optim
    """.split()
)

# LLaMA-Factory spellings of keys that live in rayft's `ray:` section.
ALIASES: dict[str, tuple[str, str]] = {
    "ray_num_workers": ("ray", "num_workers"),
    "ray_storage_path": ("ray", "storage_path"),
    "resources_per_worker": ("ray", "resources_per_worker"),
    "deepspeed": ("ray", "deepspeed_config"),
    "placement_strategy": ("ray", "placement_strategy"),
}


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config: where, what was given, and how to fix it."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"`{self.key}`: {self.message}"


class ConfigError(ValueError):
    """All problems of a config, raised together before any cluster time is spent."""

    def __init__(self, source: str, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s)\n{lines}")


# A check sees the validated config and returns problems; layers above `configs` (datasets,
# templates, stages) register theirs through `load_config(checks=...)`.
Check = Callable[[RayftConfig], list[ConfigProblem]]


def load_config(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    base: Mapping[str, Any] | None = None,
    checks: Sequence[Check] = (),
) -> RayftConfig:
    """Read, validate and freeze a config.

    Args:
        path: a YAML file, or None to use only `base` and `overrides`.
        overrides: `key=value` strings (dotted keys for sections, e.g. `ray.num_workers=2`),
            values parsed as YAML scalars; they win over the file.
        base: values under the file's (used by tests and by `rayft tune`).
        checks: extra checks run when the schema itself is valid.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: listing every problem found, each with the key and the fix.
    """
    source = str(path) if path is not None else "config"
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(source, [ConfigProblem("<file>", f"no config file at {file}")])
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(source, [ConfigProblem("<file>", f"not valid YAML: {err}")]) from err
        if not isinstance(loaded, dict):
            raise ConfigError(source, [ConfigProblem("<file>", "must be a mapping of keys")])
        raw.update(loaded)
    problems: list[ConfigProblem] = []
    for override in overrides:
        problems += _apply_override(raw, override)
    raw, alias_problems = _resolve_aliases(raw)
    problems += alias_problems
    problems += _unknown_keys(raw, RayftConfig, prefix="")
    cleaned = _without_known_bad_keys(raw, problems)
    config: RayftConfig | None = None
    try:
        config = RayftConfig.model_validate(cleaned)
    except ValidationError as err:
        problems += [_problem_from_pydantic(error) for error in err.errors()]
    if config is not None and not problems:
        for check in checks:
            problems += check(config)
    if problems:
        raise ConfigError(source, problems)
    assert config is not None
    return config


def write_resolved(config: RayftConfig, output_dir: str | Path) -> Path:
    """Write the fully resolved config (defaults included) into `output_dir`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "rayft_config.yaml"
    target.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return target


def _apply_override(raw: dict[str, Any], override: str) -> list[ConfigProblem]:
    key, sep, value = override.partition("=")
    if not sep or not key:
        return [ConfigProblem(override, "an override must look like key=value")]
    node = raw
    *parents, leaf = key.strip().split(".")
    for parent in parents:
        node = node.setdefault(parent, {})
        if not isinstance(node, dict):
            return [ConfigProblem(key, f"`{parent}` is not a section")]
    node[leaf] = yaml.safe_load(value)
    return []


def _resolve_aliases(raw: dict[str, Any]) -> tuple[dict[str, Any], list[ConfigProblem]]:
    problems: list[ConfigProblem] = []
    out = dict(raw)
    init_kwargs = out.get("ray_init_kwargs")
    if isinstance(init_kwargs, dict) and set(init_kwargs) == {"runtime_env"}:
        # LLaMA-Factory's `ray_init_kwargs: {runtime_env: …}` is `ray.runtime_env`; any other
        # ray.init argument stays an unsupported key (reported by `_unknown_keys`).
        ray_section = dict(out.get("ray") or {})
        if "runtime_env" in ray_section:
            problems.append(ConfigProblem("ray_init_kwargs", "conflicts with `ray.runtime_env`"))
        ray_section["runtime_env"] = out.pop("ray_init_kwargs")["runtime_env"]
        out["ray"] = ray_section
    for alias, (section, field) in ALIASES.items():
        if alias not in out:
            continue
        value = out.pop(alias)
        target = dict(out.get(section) or {})
        if field in target and target[field] != value:
            problems.append(
                ConfigProblem(alias, f"conflicts with `{section}.{field}`; give only one of them")
            )
        target[field] = value
        out[section] = target
    return out, problems


def _unknown_keys(raw: Mapping[str, Any], model: type[BaseModel], *, prefix: str) -> list:
    problems: list[ConfigProblem] = []
    known = list(model.model_fields)
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key in model.model_fields:
            annotation = model.model_fields[key].annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                if isinstance(value, Mapping):
                    problems += _unknown_keys(value, annotation, prefix=f"{dotted}.")
            continue
        if not prefix and key in UNSUPPORTED_KEYS:
            problems.append(
                ConfigProblem(
                    dotted,
                    "is a LLaMA-Factory key that rayft does not support yet; "
                    "remove it (see the README's list of supported keys)",
                )
            )
            continue
        candidates = known + ([*ALIASES] if not prefix else [])
        close = difflib.get_close_matches(str(key), candidates, n=1, cutoff=0.6)
        hint = f"; did you mean `{prefix}{close[0]}`?" if close else ""
        problems.append(ConfigProblem(dotted, f"unknown key{hint}"))
    return problems


def _without_known_bad_keys(raw: dict[str, Any], problems: list[ConfigProblem]) -> dict:
    """Drop keys already reported, so pydantic reports only the remaining problems."""
    bad_top = {p.key for p in problems if "." not in p.key}
    out = {k: v for k, v in raw.items() if k not in bad_top}
    for key, value in list(out.items()):
        if isinstance(value, dict):
            bad_nested = {p.key.split(".", 1)[1] for p in problems if p.key.startswith(f"{key}.")}
            out[key] = {k: v for k, v in value.items() if k not in bad_nested}
    return out


def _problem_from_pydantic(error: Mapping[str, Any]) -> ConfigProblem:
    key = ".".join(str(part) for part in error.get("loc", ())) or "<config>"
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "missing":
        return ConfigProblem(key, "is required; add it to the YAML")
    given = error.get("input")
    return ConfigProblem(key, f"{message} (got {given!r})")
