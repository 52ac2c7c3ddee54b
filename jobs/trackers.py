"""Experiment trackers written from rank 0 (`report_to`): none, tensorboard, mlflow."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from configs import ConfigProblem, RayftConfig


class Tracker(Protocol):
    """Receives scalar metrics per optimizer step."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class _NoTracker:
    def log(self, metrics: dict[str, float], step: int) -> None:
        return None

    def close(self) -> None:
        return None


class _TensorBoard:
    def __init__(self, output_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(Path(output_dir) / "runs"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        self._writer.close()


class _MLflow:
    """A local SQLite store `output_dir/mlflow.db` unless MLFLOW_TRACKING_URI names a server.

    (MLflow 3 refuses new file stores, so the local default is SQLite.)
    """

    def __init__(self, output_dir: str) -> None:
        import os

        import mlflow

        if "MLFLOW_TRACKING_URI" not in os.environ:
            database = (Path(output_dir) / "mlflow.db").resolve()
            mlflow.set_tracking_uri(f"sqlite:///{database}")
        mlflow.set_experiment(Path(output_dir).name)
        self._mlflow = mlflow
        self.run = mlflow.start_run()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


TRACKERS: dict[str, Callable[[str], Tracker]] = {
    "none": lambda output_dir: _NoTracker(),
    "tensorboard": _TensorBoard,
    "mlflow": _MLflow,
}
_REQUIRES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def make_tracker(config: RayftConfig) -> Tracker:
    """The tracker named by `report_to`."""
    return TRACKERS[config.report_to](config.output_dir)


def check_tracker(config: RayftConfig) -> list[ConfigProblem]:
    """Config check: the tracker's package is installed."""
    module = _REQUIRES.get(config.report_to)
    if module and importlib.util.find_spec(module) is None:
        return [
            ConfigProblem(
                "report_to",
                f"`{config.report_to}` needs the `{module}` package: pip install 'rayft[{module}]'",
            )
        ]
    return []
