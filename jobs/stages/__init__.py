"""One module per training stage; importing this package registers them all."""

from jobs.stages import sft  # noqa: F401
