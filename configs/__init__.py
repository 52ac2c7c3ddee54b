"""The rayft configuration schema and its loader (the bottom layer: imports nothing of ours)."""

from configs.loader import ConfigError, ConfigProblem, load_config, write_resolved
from configs.schema import RayftConfig, RaySection, ServeSection

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "RayftConfig",
    "RaySection",
    "ServeSection",
    "load_config",
    "write_resolved",
]
