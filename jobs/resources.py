"""Fractional resource requests sized from the cluster.

On a small machine Ray deadlocks when training workers, Ray Data tasks and Serve replicas each
ask for a whole CPU, so requests are derived from the cluster's CPU count, never constants.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResourcePlan:
    """CPU requests sized from the cluster so that every part of a run can be placed at once.

    Attributes:
        cpus_per_worker: CPUs each Ray Train worker asks for.
        cpus_per_data_task: CPUs each Ray Data task asks for.
        cpus_per_replica: CPUs each Ray Serve replica asks for.
        torch_threads: intra-op threads a training worker should use (workers ask for a
            fraction of a core but may use whole cores, as Ray does not pin them).
    """

    cpus_per_worker: float
    cpus_per_data_task: float
    cpus_per_replica: float
    torch_threads: int


def plan_resources(total_cpus: float, *, num_workers: int) -> ResourcePlan:
    """Split a cluster's CPUs between training workers, data tasks and serving.

    Half the CPUs go to the training workers, an eighth to each data task (so several run
    beside the workers), and a quarter to a serve replica; every request is capped at one CPU
    and rounded down to a quarter so that the sums stay placeable.

    Args:
        total_cpus: CPUs the cluster has (``ray.cluster_resources()["CPU"]``).
        num_workers: training workers the run asks for.

    Returns:
        The per-part CPU requests.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")

    def quarter(value: float) -> float:
        return max(0.25, min(1.0, int(value * 4) / 4))

    return ResourcePlan(
        cpus_per_worker=quarter(total_cpus * 0.5 / num_workers),
        cpus_per_data_task=quarter(total_cpus / 8),
        cpus_per_replica=quarter(total_cpus / 4),
        torch_threads=max(1, int(total_cpus // num_workers)),
    )
