"""ASHA that keeps its rungs across an interrupted sweep (`rayft tune --resume`).

`Tuner.restore` brings back the trials and the searcher, but the scheduler comes back in the
state it had when the sweep began (Tune pickles it once, at the start). Plain ASHA therefore
forgets the rung values of the trials that already ran, and every trial resumed after a crash
trains to the end. Tune re-adds each restored trial to the scheduler; `ResumableASHA` replays
the trial's recorded results into the rungs at that moment (a new trial has none) and discards
the decisions of the replay.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.result import EXPR_RESULT_FILE
from ray.tune.schedulers import ASHAScheduler


def recorded_results(trial_path: str | None) -> list[dict[str, Any]]:
    """What a trial reported before the sweep stopped, read from Tune's `result.json`."""
    if not trial_path or not (Path(trial_path) / EXPR_RESULT_FILE).is_file():
        return []
    lines = (Path(trial_path) / EXPR_RESULT_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


class ResumableASHA(ASHAScheduler):
    """`ASHAScheduler` whose rung values are rebuilt from disk when a trial is restored."""

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not trial.has_reported_at_least_once:  # a new trial: no folder, nothing to replay
            return
        for result in recorded_results(trial.path):
            self.on_trial_result(tune_controller, trial, result)
