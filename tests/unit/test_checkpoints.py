"""A checkpoint is resumed from only when every writing rank's files arrived whole."""

from __future__ import annotations

import json
from pathlib import Path

from jobs.checkpoints import is_complete, latest_complete, write_manifest


def _checkpoint(run: Path, step: int, *, writers: int) -> Path:
    path = run / f"checkpoint-{step}"
    for rank in range(writers):
        part = run / f"part{step}-{rank}"
        (part / "shards").mkdir(parents=True)
        (part / "shards" / f"rank{rank}.bin").write_bytes(b"x" * (10 + rank))
        if rank == 0:
            (part / "trainer_state.json").write_text(json.dumps({"step": step, "writers": writers}))
        write_manifest(part, rank=rank)
        for file in part.rglob("*"):  # Ray merges every rank's dir into one folder
            if file.is_file():
                target = path / file.relative_to(part)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(file.read_bytes())
    return path


def test_whole_checkpoints_are_complete_and_the_newest_wins(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 2, writers=2)
    newest = _checkpoint(tmp_path, 4, writers=2)
    assert is_complete(newest) and latest_complete(tmp_path) == newest


def test_a_missing_rank_or_a_short_file_is_never_used(tmp_path: Path) -> None:
    older = _checkpoint(tmp_path, 2, writers=2)
    missing = _checkpoint(tmp_path, 4, writers=2)
    (missing / "manifest_rank1.json").unlink()
    truncated = _checkpoint(tmp_path, 6, writers=1)
    (truncated / "shards" / "rank0.bin").write_bytes(b"x")
    assert not is_complete(missing) and not is_complete(truncated)
    assert latest_complete(tmp_path) == older
