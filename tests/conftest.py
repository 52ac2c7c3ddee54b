"""Shared pytest fixtures.

The tiny tokenizer/model are built once per session (about a second) instead of being
checked in, so they always match ``tests/fixtures/tiny.py`` and the goldens' fingerprint.
"""

from __future__ import annotations

import os

# Ray reads this when first imported: private test clusters then listen on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray Train's controller polls its workers every 2 s by default; a worker's report with a
# checkpoint and the end of a run both wait for that poll. Steps of the tiny test model take
# milliseconds, so a 0.5 s poll saves about 5 s per training run (Ray processes inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.fixtures.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the deterministic byte-level BPE test tokenizer."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Directory holding a random-init tiny Qwen2 model plus the tiny tokenizer files."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), tiny_tokenizer_dir, arch="qwen2")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[float]:
    """One private, loopback-only Ray cluster for the whole session; yields its CPU count."""
    from jobs.runtime import local_ray

    with local_ray(num_cpus=2) as cpus:
        yield cpus
