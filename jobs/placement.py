"""Can the cluster hold this run? Checked once Ray is up and before `TorchTrainer.fit()`.

Without these checks a run that asks for more than the cluster has waits for its placement
group forever, and a multi-node run that checkpoints to a node-local folder scatters its
checkpoints over the nodes' disks. Both are errors here, naming the key to change.

Example:
    >>> check_cluster_fits(config, cpus_per_worker=0.5)   # raises PlacementError or returns
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from configs import RayftConfig

# Folders that are private to each machine even when they look like ordinary paths.
NODE_LOCAL_ROOTS = ("/tmp", "/var/tmp", "/dev/shm")
_POLL_S = 5.0
# Ray gives the head node this resource and every node this label (its node id).
HEAD_RESOURCE = "node:__internal_head__"
NODE_ID_LABEL = "ray.io/node-id"


class PlacementError(RuntimeError):
    """The run cannot be placed on this cluster as configured; the message says what to change."""


def worker_resources(config: RayftConfig, *, cpus_per_worker: float) -> dict[str, float]:
    """What one Ray Train worker asks for (as `run_training` builds its `ScalingConfig`)."""
    wanted = dict(config.ray.resources_per_worker or {"CPU": cpus_per_worker})
    if config.ray.use_gpu and "GPU" not in wanted:
        wanted["GPU"] = 1.0  # ScalingConfig(use_gpu=True) adds one GPU per worker
    return {key: value for key, value in wanted.items() if value > 0}


def node_local_storage(config: RayftConfig) -> str | None:
    """The checkpoint location when it is private to one node (relative, or under /tmp…)."""
    storage = config.ray.storage_path or (
        str(PurePosixPath(config.output_dir) / "ray") if config.output_dir else None
    )
    if storage is None or "://" in storage:
        return None
    path = PurePosixPath(storage)
    if not path.is_absolute() or any(
        path == PurePosixPath(root) or PurePosixPath(root) in path.parents
        for root in NODE_LOCAL_ROOTS
    ):
        return storage
    return None


def storage_problem(config: RayftConfig, *, alive_nodes: int) -> str | None:
    """Why checkpoints would be lost across nodes, or None.

    Only a cluster joined through `ray.address` with more than one node is checked: a private
    local cluster (and a simulated one on one machine) shares its disk.
    """
    if not config.ray.address or alive_nodes <= 1:
        return None
    storage = node_local_storage(config)
    if storage is None:
        return None
    given = (
        f"ray.storage_path={storage!r}"
        if config.ray.storage_path
        else f"ray.storage_path is unset, so checkpoints go to {storage!r} (output_dir/ray)"
    )
    return (
        f"{given} is local to each node, but the cluster has {alive_nodes} nodes: workers on "
        "other nodes could not write or restore checkpoints there. Set `ray.storage_path` to a "
        "folder every node mounts (NFS, e.g. /mnt/shared/ckpt) or to an s3:// / gs:// URI."
    )


def placement_problem(
    per_worker: Mapping[str, float],
    *,
    num_workers: int,
    strategy: str,
    nodes: Sequence[Mapping[str, float]],
) -> str | None:
    """Why `num_workers` bundles of `per_worker` cannot be placed on `nodes`, or None.

    Args:
        per_worker: resources of one worker, e.g. {"CPU": 1, "GPU": 1}.
        num_workers: workers (bundles) to place.
        strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD.
        nodes: total resources of each alive node.
    """
    total = {key: sum(node.get(key, 0.0) for node in nodes) for key in per_worker}
    missing = {
        key: need * num_workers - total[key]
        for key, need in per_worker.items()
        if need * num_workers > total[key] + 1e-9
    }
    request = f"ray.num_workers={num_workers} × {dict(per_worker)} per worker needs " + ", ".join(
        f"{key} {need * num_workers:g}" for key, need in per_worker.items()
    )
    if missing:
        have = ", ".join(f"{key} {total[key]:g}" for key in per_worker)
        short = ", ".join(f"{key} {value:g}" for key, value in missing.items())
        return f"{request}, but the cluster has {have} in all (missing {short})"
    fits = [
        min(math.floor(node.get(key, 0.0) / need + 1e-9) for key, need in per_worker.items())
        for node in nodes
    ]
    if strategy == "STRICT_PACK" and max(fits, default=0) < num_workers:
        return (
            f"{request} on one node (STRICT_PACK), but the largest node holds {max(fits)} worker(s)"
        )
    if strategy == "STRICT_SPREAD" and sum(1 for fit in fits if fit) < num_workers:
        return (
            f"{request} on {num_workers} different nodes (STRICT_SPREAD), but only "
            f"{sum(1 for fit in fits if fit)} node(s) can hold a worker"
        )
    if sum(fits) < num_workers:
        return (
            f"{request}; the totals suffice but no node holds a whole worker often enough "
            f"(workers per node: {fits}); lower the per-worker request"
        )
    return None


def find_rank0_node(
    wanted: str, per_worker: Mapping[str, float], nodes: Sequence[Mapping[str, Any]]
) -> str:
    """The node id `ray.rank0_node` names (`head`, a node IP or a node id) among `nodes`
    (`ray.nodes()` entries), checked to be alive and able to hold one worker.

    Raises:
        PlacementError: no such alive node, an IP several nodes share, or a node too small.
    """
    alive = [node for node in nodes if node.get("Alive")]
    matches = {
        "head": [node for node in alive if HEAD_RESOURCE in node.get("Resources", {})],
        "ip": [node for node in alive if node.get("NodeManagerAddress") == wanted],
        "id": [node for node in alive if node.get("NodeID") == wanted],
    }
    found = matches["head"] if wanted == "head" else matches["id"] or matches["ip"]
    listing = "; ".join(
        f"{node.get('NodeID')} at {node.get('NodeManagerAddress')}"
        + (" (head)" if HEAD_RESOURCE in node.get("Resources", {}) else "")
        for node in alive
    )
    if not found:
        raise PlacementError(
            f"ray.rank0_node={wanted!r} names no alive node; use `head`, an IP or a node id "
            f"of: {listing}"
        )
    if len(found) > 1:
        raise PlacementError(
            f"ray.rank0_node={wanted!r}: {len(found)} nodes share this IP; give the node id "
            f"instead, one of: {listing}"
        )
    node = found[0]
    problem = placement_problem(
        per_worker, num_workers=1, strategy="PACK", nodes=[node.get("Resources", {})]
    )
    if problem:
        raise PlacementError(
            f"ray.rank0_node={wanted!r} (node {node['NodeID']}) cannot hold rank 0: {problem}"
        )
    return str(node["NodeID"])


def worker_label_selectors(rank0_node_id: str, num_workers: int) -> list[dict[str, str]]:
    """Ray Train's per-worker `label_selector`: the first worker on the chosen node, the others
    wherever the placement strategy puts them. Ray Train numbers the workers node by node,
    starting with the first worker's node, so rank 0 runs there."""
    return [{NODE_ID_LABEL: rank0_node_id}] + [{} for _ in range(num_workers - 1)]


def rank0_label_selectors(
    config: RayftConfig, *, cpus_per_worker: float
) -> list[dict[str, str]] | None:
    """The `ScalingConfig.label_selector` that honours `ray.rank0_node`, or None when unset."""
    if not config.ray.rank0_node:
        return None
    import ray

    per_worker = worker_resources(config, cpus_per_worker=cpus_per_worker)
    node_id = find_rank0_node(config.ray.rank0_node, per_worker, ray.nodes())
    print(f"[rayft] rank 0 on node {node_id} (ray.rank0_node={config.ray.rank0_node})", flush=True)
    return worker_label_selectors(node_id, config.ray.num_workers)


def check_cluster_fits(config: RayftConfig, *, cpus_per_worker: float) -> None:
    """Raise before training when the connected cluster cannot hold the run.

    Waits up to `ray.placement_timeout_s` for the resources to appear (an autoscaling cluster
    adds nodes when asked), then fails naming what is missing instead of hanging.

    Raises:
        PlacementError: node-local checkpoint storage on a multi-node cluster, or resources
            the cluster does not have.
    """
    import ray

    per_worker = worker_resources(config, cpus_per_worker=cpus_per_worker)
    deadline = time.monotonic() + config.ray.placement_timeout_s
    while True:
        alive = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        problem = storage_problem(config, alive_nodes=len(alive))
        if problem:
            raise PlacementError(problem)
        problem = placement_problem(
            per_worker,
            num_workers=config.ray.num_workers,
            strategy=config.ray.placement_strategy,
            nodes=alive,
        )
        if problem is None:
            return
        if time.monotonic() >= deadline:
            break
        print(f"[rayft] waiting for the cluster to grow: {problem}", flush=True)
        time.sleep(_POLL_S)
    waited = config.ray.placement_timeout_s
    raise PlacementError(
        f"{problem}. Lower `ray.num_workers` or `ray.resources_per_worker`, or add nodes. "
        + (
            f"Waited {waited:g} s for an autoscaler to add them."
            if waited
            else "If this cluster autoscales, set `ray.placement_timeout_s` to wait for new "
            "nodes instead of failing at once."
        )
    )
