"""Training across two (simulated) nodes: `ray.cluster_utils.Cluster` starts a head and a second
node on this machine, both on 127.0.0.1 with two CPUs each; two workers with
`placement_strategy: SPREAD` must land one per node and finish. The same cluster checks the
placement errors: more workers than it can hold, node-local checkpoints on several nodes, a
rank-0 node that is ambiguous or absent; the run itself puts rank 0 on the non-head node
(`ray.rank0_node`) and starts Ray with `ray.runtime_env`.

The cluster lives in a child process because this pytest session may already hold a private
`ray.init` (the `ray_cluster` fixture); `Cluster.shutdown()` stops exactly what it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, socket, sys
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from jobs.launch import run_training
    from jobs.placement import HEAD_RESOURCE, PlacementError
    from jobs.preflight import load_run_config
    from jobs.runtime import ray_init_kwargs

    config_path, result_path = sys.argv[1], Path(sys.argv[2])
    def free_port():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    # Every node gets its own agent port: the default 52365 allows one node per host.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port(),
    })
    result = {}
    try:
        cluster.add_node(num_cpus=2, dashboard_agent_listen_port=free_port())
        cluster.wait_for_nodes()
        ray.init(**ray_init_kwargs(
            cluster.address, runtime_env={"env_vars": {"RAYFT_PROBE": "from-runtime-env"}}))
        result["probe"] = ray.get(
            ray.remote(num_cpus=0.1)(lambda: __import__("os").environ.get("RAYFT_PROBE")).remote())
        result["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        other = next(n["NodeID"] for n in ray.nodes()
                     if n["Alive"] and HEAD_RESOURCE not in n["Resources"])
        result["other_node"] = other

        for overrides, key in (
            (["ray.num_workers=5", "ray.resources_per_worker={CPU: 1}"], "too_many"),
            ([f"ray.address={cluster.address}", "ray.storage_path=/tmp/rayft-ckpt"], "storage"),
            (["ray.rank0_node=127.0.0.1"], "shared_ip"),
            (["ray.rank0_node=10.9.9.9"], "no_node"),
        ):
            try:
                run_training(load_run_config(config_path, overrides), total_cpus=4.0)
                result[key] = None
            except PlacementError as err:
                result[key] = str(err)

        total = float(ray.cluster_resources()["CPU"])
        outcome = run_training(
            load_run_config(config_path, [f"ray.rank0_node={other}"]), total_cpus=total)
        result["total_steps"] = outcome.total_steps
        result["final_loss"] = outcome.final_loss
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                              limit=100)
        result["worker_nodes"] = sorted({actor.node_id for actor in workers})
    finally:
        result_path.write_text(json.dumps(result))
        ray.shutdown()
        cluster.shutdown()
    """
)


def _kill_session_of(pid: int) -> None:
    """Kill the Ray processes of the session the child started: Ray names a session directory
    after the process that starts its head (`.../session_<date>_<time>_<pid>/`)."""
    marker = re.compile(rf"/session_[0-9_-]+_{pid}/")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker.search(cmdline):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def test_two_workers_spread_over_two_nodes(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "multinode.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_model_dir),
                "template": "qwen",
                "dataset": "alpaca_en_demo",
                "dataset_dir": str(ROOT / "data"),
                "max_samples": 8,
                "cutoff_len": 64,
                "output_dir": str(tmp_path / "out"),
                "per_device_train_batch_size": 2,
                "max_steps": 2,
                "logging_steps": 1,
                "save_steps": 2,
                "lora_rank": 4,
                "disable_gradient_checkpointing": True,
                "tokenized_cache_dir": str(tmp_path / "cache"),
                "ray": {"num_workers": 2, "placement_strategy": "SPREAD"},
            }
        )
    )
    result_path = tmp_path / "result.json"
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_agent_register_timeout_ms="180000",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"),
    )
    script = tmp_path / "run_multinode.py"
    script.write_text(SCRIPT)
    child = subprocess.Popen(
        [sys.executable, str(script), str(config), str(result_path)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = child.communicate(timeout=600)
    finally:
        child.kill()
        _kill_session_of(child.pid)  # whatever Cluster.shutdown() did not reach
    assert result_path.is_file(), stdout[-3000:] + stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert child.returncode == 0, stderr[-3000:]

    assert len(result["nodes"]) == 2
    assert "missing CPU 1" in result["too_many"] and "ray.num_workers=5" in result["too_many"]
    assert "ray.storage_path='/tmp/rayft-ckpt'" in result["storage"]
    assert "2 nodes" in result["storage"]

    assert result["probe"] == "from-runtime-env"  # ray.runtime_env reaches the cluster's tasks
    assert "2 nodes share this IP" in result["shared_ip"]
    assert "names no alive node" in result["no_node"]

    assert result["total_steps"] == 2 and result["final_loss"] is not None
    assert result["worker_nodes"] == result["nodes"]  # one worker on each node
    log = [
        json.loads(line)
        for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()
    ]
    assert [record["current_steps"] for record in log] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "out").glob("strategy_rank*.json")) == [
        "strategy_rank0.json",
        "strategy_rank1.json",
    ]
    # ray.rank0_node put rank 0 on the node that is not the head (Ray alone would pick either)
    rank0 = json.loads((tmp_path / "out" / "strategy_rank0.json").read_text())
    assert rank0["node_id"] == result["other_node"]
