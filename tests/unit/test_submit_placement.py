"""Placement checks without Ray: missing resources, strict strategies, node-local storage, the
rank-0 node and the runtime_env given to `ray.init`."""

from __future__ import annotations

import re

import pytest

from configs import load_config
from jobs.placement import (
    HEAD_RESOURCE,
    PlacementError,
    find_rank0_node,
    node_local_storage,
    placement_problem,
    storage_problem,
    worker_label_selectors,
    worker_resources,
)
from jobs.runtime import IDLE_WORKERS_MIN, idle_workers_kept, ray_init_kwargs

ONE_GPU_NODES = [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}]


def test_enough_resources_pass() -> None:
    assert (
        placement_problem({"GPU": 1}, num_workers=2, strategy="PACK", nodes=ONE_GPU_NODES) is None
    )
    assert (
        placement_problem(
            {"CPU": 0.5}, num_workers=3, strategy="SPREAD", nodes=[{"CPU": 1}, {"CPU": 1}]
        )
        is None
    )


def test_missing_resources_are_named() -> None:
    problem = placement_problem(
        {"CPU": 1, "GPU": 1}, num_workers=4, strategy="PACK", nodes=ONE_GPU_NODES
    )
    assert problem is not None
    assert "ray.num_workers=4" in problem and "missing GPU 2" in problem
    assert "CPU" not in problem.split("missing")[1]


def test_one_worker_must_fit_on_one_node() -> None:
    problem = placement_problem({"GPU": 2}, num_workers=1, strategy="PACK", nodes=ONE_GPU_NODES)
    assert problem is not None and "workers per node: [0, 0]" in problem


@pytest.mark.parametrize(
    ("strategy", "text"), [("STRICT_PACK", "one node"), ("STRICT_SPREAD", "different nodes")]
)
def test_strict_strategies(strategy: str, text: str) -> None:
    nodes = [{"CPU": 2}, {"CPU": 2}]
    problem = placement_problem({"CPU": 1}, num_workers=3, strategy=strategy, nodes=nodes)
    assert problem is not None and text in problem
    assert placement_problem({"CPU": 1}, num_workers=3, strategy="PACK", nodes=nodes) is None


def test_worker_resources_follow_the_scaling_config() -> None:
    config = load_config(None, ["model_name_or_path=m", "ray.use_gpu=true"])
    assert worker_resources(config, cpus_per_worker=0.5) == {"CPU": 0.5, "GPU": 1.0}
    config = load_config(None, ["model_name_or_path=m", "ray.resources_per_worker={GPU: 1}"])
    assert worker_resources(config, cpus_per_worker=0.5) == {"GPU": 1.0}


@pytest.mark.parametrize(
    ("overrides", "local"),
    [
        (["ray.storage_path=/tmp/ckpt"], "/tmp/ckpt"),
        (["ray.storage_path=saves/ckpt"], "saves/ckpt"),
        (["output_dir=/tmp/out"], "/tmp/out/ray"),
        (["ray.storage_path=s3://bucket/ckpt", "output_dir=/tmp/out"], None),
        (["ray.storage_path=/mnt/nfs/ckpt"], None),
    ],
)
def test_node_local_storage(overrides: list[str], local: str | None) -> None:
    config = load_config(None, ["model_name_or_path=m", *overrides])
    assert node_local_storage(config) == local


def test_storage_problem_only_for_a_joined_multi_node_cluster() -> None:
    local = load_config(None, ["model_name_or_path=m", "ray.storage_path=/tmp/ckpt"])
    assert storage_problem(local, alive_nodes=3) is None  # private cluster: one disk
    joined = load_config(
        None, ["model_name_or_path=m", "ray.storage_path=/tmp/ckpt", "ray.address=auto"]
    )
    assert storage_problem(joined, alive_nodes=1) is None
    problem = storage_problem(joined, alive_nodes=2)
    assert problem is not None and "ray.storage_path" in problem
    assert "NFS" in problem and "s3://" in problem


NODES = [
    {
        "NodeID": "aaa",
        "NodeManagerAddress": "10.0.0.1",
        "Alive": True,
        "Resources": {"CPU": 4, HEAD_RESOURCE: 1},
    },
    {
        "NodeID": "bbb",
        "NodeManagerAddress": "10.0.0.2",
        "Alive": True,
        "Resources": {"CPU": 8, "GPU": 2},
    },
    {"NodeID": "ccc", "NodeManagerAddress": "10.0.0.2", "Alive": True, "Resources": {"CPU": 8}},
    {"NodeID": "ddd", "NodeManagerAddress": "10.0.0.3", "Alive": False, "Resources": {"CPU": 8}},
]


@pytest.mark.parametrize(
    ("wanted", "per_worker", "node_id"),
    [("head", {"CPU": 1}, "aaa"), ("10.0.0.1", {"CPU": 1}, "aaa"), ("ccc", {"CPU": 2}, "ccc")],
)
def test_rank0_node_by_head_ip_or_id(wanted: str, per_worker: dict, node_id: str) -> None:
    assert find_rank0_node(wanted, per_worker, NODES) == node_id


@pytest.mark.parametrize(
    ("wanted", "per_worker", "text"),
    [
        ("10.0.0.9", {"CPU": 1}, "names no alive node; use `head`, an IP or a node id of: aaa"),
        ("ddd", {"CPU": 1}, "names no alive node"),
        ("10.0.0.2", {"CPU": 1}, "2 nodes share this IP; give the node id"),
        ("head", {"CPU": 1, "GPU": 1}, "(node aaa) cannot hold rank 0"),
    ],
)
def test_rank0_node_errors(wanted: str, per_worker: dict, text: str) -> None:
    with pytest.raises(PlacementError, match=re.escape(text)):
        find_rank0_node(wanted, per_worker, NODES)


def test_rank0_goes_to_the_first_worker() -> None:
    assert worker_label_selectors("bbb", 3) == [{"ray.io/node-id": "bbb"}, {}, {}]


def test_private_cluster_keeps_idle_workers_beyond_its_cpu_count() -> None:
    config = ray_init_kwargs(None, num_cpus=2)["_system_config"]
    assert config == {"num_workers_soft_limit": IDLE_WORKERS_MIN}
    assert idle_workers_kept(16) == 32
    assert "_system_config" not in ray_init_kwargs("10.0.0.1:6379")


def test_runtime_env_reaches_ray_init_except_inside_a_submitted_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"env_vars": {"HF_HOME": "/mnt/hf"}}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_init_kwargs(None, num_cpus=2, runtime_env=env)["runtime_env"] == env
    assert ray_init_kwargs("10.0.0.1:6379", runtime_env=env)["runtime_env"] == env
    assert "runtime_env" not in ray_init_kwargs(None, num_cpus=2)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert "runtime_env" not in ray_init_kwargs("auto", runtime_env=env)
