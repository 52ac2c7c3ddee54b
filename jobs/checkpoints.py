"""Which checkpoints are whole: per-rank manifests, checked before any resume uses one.

A checkpoint folder is the union of the dirs the writing ranks hand to `ray.train.report`
(rank 0 alone for DDP, every rank for ZeRO/FSDP shards). Each writer adds a manifest of its
files and their sizes; a checkpoint counts as complete only when every writer's manifest is
there and every listed file has its size. A crash mid-copy therefore never yields a half-used
checkpoint, and a checkpoint Ray Train stored but did not register (a rank died before the
controller collected its report) can still be resumed from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

STATE_FILE = "trainer_state.json"
_MANIFEST = "manifest_rank{rank}.json"
_STEP = re.compile(r"checkpoint-(\d+)")


def write_manifest(directory: Path, *, rank: int) -> None:
    """List this rank's files (relative path → bytes) in its manifest; call it last."""
    files = {
        str(path.relative_to(directory)): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }
    (directory / _MANIFEST.format(rank=rank)).write_text(json.dumps(files))


def is_complete(checkpoint: Path) -> bool:
    """Every writer's manifest is present and every file it lists has its recorded size."""
    state = checkpoint / STATE_FILE
    if not state.is_file():
        return False
    try:
        writers = json.loads(state.read_text()).get("writers", 1)
        for rank in range(writers):
            manifest = json.loads((checkpoint / _MANIFEST.format(rank=rank)).read_text())
            for name, size in manifest.items():
                path = checkpoint / name
                if not path.is_file() or path.stat().st_size != size:
                    return False
    except (OSError, ValueError):
        return False
    return True


def latest_complete(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in `run_dir`, if any."""
    steps = {
        int(match.group(1)): path
        for path in run_dir.glob("checkpoint-*")
        if (match := _STEP.fullmatch(path.name)) and is_complete(path)
    }
    return steps[max(steps)] if steps else None


def checkpoint_step(path: Path) -> int:
    """The step in a `checkpoint-N` folder name (-1 for other names)."""
    match = _STEP.fullmatch(path.name)
    return int(match.group(1)) if match else -1
