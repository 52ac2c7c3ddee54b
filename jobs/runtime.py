"""Starting and sizing Ray for a rayft run.

With no address configured, rayft starts a *private* local cluster bound to 127.0.0.1: it never
joins a cluster somebody else started on the host, and it only ever stops what it started.

Example:
    >>> from jobs.runtime import local_ray
    >>> with local_ray() as total_cpus:
    ...     print(total_cpus)
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

LOOPBACK = "127.0.0.1"
# Ray's own switch (read once, when ray is imported) for "this host is not part of a cluster".
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Set by Ray's job supervisor in a submitted job's driver (ray._private.runtime_env.constants).
_JOB_CONFIG_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# The fewest idle worker processes a private cluster keeps (see `idle_workers_kept`).
IDLE_WORKERS_MIN = 8


@contextlib.contextmanager
def local_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> Iterator[float]:
    """Connect to `address`, or start a private loopback-only Ray cluster, and shut it down after.

    Args:
        address: a Ray address (``ray://…`` or ``host:port``); ``None`` starts a private cluster.
        num_cpus: CPUs for a private cluster (default: all of this machine's).
        runtime_env: the `ray.runtime_env` section, for every task and actor of this driver.

    Yields:
        The number of CPUs in the cluster.
    """
    if not address:
        keep_loopback()
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(**ray_init_kwargs(address, num_cpus=num_cpus, runtime_env=runtime_env))
    try:
        yield float(ray.cluster_resources().get("CPU", 1.0))
    finally:
        if started_here:
            ray.shutdown()


def keep_loopback() -> None:
    """Make a local-only Ray use 127.0.0.1 as its node address instead of the host's interface.

    Ray reads this setting when it is first imported, so it must run before `import ray`;
    a warning says so when it comes too late.
    """
    os.environ.setdefault(_LOOPBACK_SWITCH, "0")
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            warnings.warn(
                f"ray was imported before {_LOOPBACK_SWITCH}=0 was set: the private cluster "
                "will listen on the host's address, not only on 127.0.0.1",
                stacklevel=3,
            )


def ray_init_kwargs(
    address: str | None,
    *,
    num_cpus: int | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Arguments for `ray.init`: a private 127.0.0.1 cluster when no address is given.

    `runtime_env` is left out inside a `ray job submit` job: the job already carries it (rayft
    submit puts `ray.runtime_env` there) and Ray would ignore a second one with a warning.
    """
    env = {"runtime_env": runtime_env} if runtime_env and not in_submitted_job() else {}
    if address:
        return {"address": address, "log_to_driver": True, **env}
    cpus = num_cpus or os.cpu_count() or 1
    return {
        "address": "local",
        "num_cpus": cpus,
        # Ray Train V2 watches its controller through the state API, which the dashboard
        # serves; it listens on loopback only.
        "include_dashboard": True,
        "dashboard_host": LOOPBACK,
        "_node_ip_address": LOOPBACK,
        "log_to_driver": True,
        "_system_config": {"num_workers_soft_limit": idle_workers_kept(cpus)},
        **env,
    }


def idle_workers_kept(cpus: int) -> int:
    """How many idle worker processes a private cluster keeps instead of killing them.

    Ray's default keeps one per CPU. A Ray Data pipeline on a small machine holds that many
    workers in its tokenizing actors alone, so every read and write task then found no idle
    worker and Ray started (and soon killed) a new Python process for it, seconds of imports
    each time (2 CPUs, 100k rows: execution 79 s → 60 s once kept). An idle worker costs
    ~100–250 MB of memory and no CPU.
    """
    return max(2 * cpus, IDLE_WORKERS_MIN)


def in_submitted_job() -> bool:
    """True in the driver of a `ray job submit` job (the job supervisor sets this variable)."""
    return bool(os.environ.get(_JOB_CONFIG_VARIABLE))
