"""Train one stage from a YAML, on a private local Ray or the cluster in `ray.address`.

Run: `python -m jobs.train CONFIG.yaml [key=value ...]` (this is what `rayft train` and
`ray job submit -- python -m jobs.train ...` run).
"""

from __future__ import annotations

import sys

from jobs.launch import TrainingOutcome, run_training
from jobs.preflight import load_run_config
from jobs.runtime import local_ray


def main(argv: list[str] | None = None) -> TrainingOutcome:
    """Validate everything first (no Ray yet), then start or join Ray and train."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m jobs.train CONFIG.yaml [key=value ...]")
    config = load_run_config(args[0], args[1:])
    with local_ray(config.ray.address, runtime_env=config.ray.runtime_env) as total_cpus:
        outcome = run_training(config, total_cpus=total_cpus)
    print(f"[rayft] adapter written to {outcome.output_dir}; final loss {outcome.final_loss}")
    return outcome


if __name__ == "__main__":
    main()
