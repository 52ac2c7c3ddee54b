"""A worker killed mid-run costs only the steps since the last checkpoint, and nothing else.

Rank 1 calls `os._exit(1)` right after optimizer step 3 (once); with `ray.max_failures: 1`
Ray Train restarts the worker group from checkpoint-2, the loop skips the micro-batches it had
already trained, and the run finishes. The resumed `trainer_log.jsonl` (from step 3 on) and
the final loss must equal the uninterrupted run's (`strategy_runs`, shared with
`test_strategies`) within 1e-4, for DDP and for FSDP2 (sharded optimizer state restored from
per-rank shards).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.loop import FaultInjection
from tests.integration.runs import STEPS

KILL_AFTER = 3


def _by_step(output_dir: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run logs the re-trained step again)."""
    records = [
        json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()
    ]
    return {record["current_steps"]: record for record in records}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_killed_worker_resumes_to_the_same_curve(strategy_runs, strategy: str) -> None:
    plain = strategy_runs(strategy)
    marker = plain.parent / f"killed-{strategy}.txt"
    faulted = strategy_runs.train(
        f"{strategy}_faulted", strategy, FaultInjection(step=KILL_AFTER, marker=str(marker))
    )
    assert marker.exists(), "the injected failure never happened"
    raw = (faulted / "trainer_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["current_steps"] for line in raw] == [1, 2, 3, 3, 4, 5]
    expected, resumed = _by_step(plain), _by_step(faulted)
    for step in range(KILL_AFTER, STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-4), step
        assert resumed[step]["lr"] == pytest.approx(expected[step]["lr"], rel=1e-6), step
    plain_result = json.loads((plain / "all_results.json").read_text())
    faulted_result = json.loads((faulted / "all_results.json").read_text())
    assert faulted_result["final_loss"] == pytest.approx(plain_result["final_loss"], abs=1e-4)
