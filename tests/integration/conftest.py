"""Fixtures shared by the integration modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.runs import StrategyRuns


@pytest.fixture(scope="session")
def strategy_runs(
    ray_cluster: float, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> StrategyRuns:
    """Each strategy's uninterrupted reference run, trained at most once per session."""
    return StrategyRuns(tmp_path_factory.mktemp("strategies"), tiny_model_dir, ray_cluster)
