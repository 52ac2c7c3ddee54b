"""`report_to` trackers write where users look for them."""

from __future__ import annotations

from pathlib import Path

from configs import load_config
from jobs.trackers import make_tracker


def _config(tmp_path: Path, report_to: str):
    return load_config(
        None,
        [
            "model_name_or_path=m",
            f"output_dir={tmp_path / 'run'}",
            f"report_to={report_to}",
        ],
    )


def test_tensorboard_writes_event_files(tmp_path: Path) -> None:
    tracker = make_tracker(_config(tmp_path, "tensorboard"))
    tracker.log({"loss": 1.5, "lr": 1e-3}, 1)
    tracker.close()
    assert list((tmp_path / "run" / "runs").glob("events.out.tfevents.*"))


def test_mlflow_logs_to_a_local_store(tmp_path: Path) -> None:
    import mlflow

    (tmp_path / "run").mkdir()
    tracker = make_tracker(_config(tmp_path, "mlflow"))
    tracker.log({"loss": 2.0}, 1)
    tracker.log({"loss": 1.0}, 2)
    tracker.close()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    history = client.get_metric_history(tracker.run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
