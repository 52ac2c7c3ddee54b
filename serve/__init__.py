"""rayft's model server: an OpenAI-compatible API on Ray Serve over a transformers or vLLM engine.

Exports are loaded lazily, so that importing `serve.protocol` or `serve.args` (validation,
the CLI's argument parsing) does not pull in torch, transformers and Ray.

Example:
    >>> from serve import ServeArgs, run_server
    >>> url = run_server(ServeArgs(model_path="saves/tiny"), blocking=False)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve.app import build_app, run_server
    from serve.args import ServeArgs
    from serve.engine import TransformersEngine
    from serve.engines import load_engine

__all__ = ["ServeArgs", "TransformersEngine", "build_app", "load_engine", "run_server"]

_HOMES = {
    "ServeArgs": "serve.args",
    "TransformersEngine": "serve.engine",
    "build_app": "serve.app",
    "load_engine": "serve.engines",
    "run_server": "serve.app",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
