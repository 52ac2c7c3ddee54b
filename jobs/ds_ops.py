"""Build DeepSpeed's CPU communication op at setup time (`make setup` runs this module).

On CPU workers DeepSpeed compiles `deepspeed_shm_comm` the first time a ZeRO run starts, which
takes about a minute on two cores and would otherwise land inside the first training run (and
inside CI's test budget). torch caches the build under `~/.cache/torch_extensions`, so doing
it once here makes every later run load it in a second. With a GPU the op is not used and
nothing is built.
"""

from __future__ import annotations

import os
import time


def build_cpu_comm_op() -> str:
    """Compile (or load the cached) `deepspeed_shm_comm`; returns what happened, for the log."""
    import torch

    if torch.cuda.is_available():
        return "deepspeed CPU op: skipped (a GPU is present)"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    start = time.monotonic()
    ShareMemCommBuilder().load(verbose=False)
    return f"deepspeed CPU op: ready in {time.monotonic() - start:.0f} s"


if __name__ == "__main__":
    print(build_cpu_comm_op())
