"""`rayft submit` and `rayft jobs` against a real `ray start --head` cluster with token auth.

The test starts its own head on 127.0.0.1 with non-default ports and its own `--temp-dir`, and
stops it by terminating exactly the processes whose command line or working directory lies in
that temp dir (never Ray's CLI stop command, which would stop every Ray on the host).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from tests.fixtures.servers import free_loopback_port

ROOT = Path(__file__).resolve().parents[2]
RAYFT = [sys.executable, "-m", "cluster.cli"]


def _own_pids(temp_dir: str) -> set[int]:
    """Processes of this test's cluster: the temp dir is in their command line or cwd."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if temp_dir in cmdline or cwd.startswith(temp_dir):
            pids.add(int(entry.name))
    return pids


def _terminate(temp_dir: str) -> None:
    for sig, rounds in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        for pid in _own_pids(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for _ in range(rounds):
            if not _own_pids(temp_dir):
                return
            time.sleep(0.25)


@pytest.fixture(scope="module")
def head() -> Iterator[dict]:
    """A two-CPU Ray head with token auth, on loopback and free ports; stopped afterwards."""
    # A short path: Ray's unix sockets live under it and must stay below 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rftsub")
    token = uuid.uuid4().hex
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        # On a busy machine the dashboard agent can take longer than the 30 s default.
        RAY_agent_register_timeout_ms="180000",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"),
    )
    # The job's `python` must be this interpreter (the venv may not be on PATH).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    dashboard = free_loopback_port()
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={free_loopback_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={free_loopback_port()}",
        "--num-cpus=2",
        # The job agent's HTTP port (default 52365) may belong to another Ray on this host.
        f"--dashboard-agent-listen-port={free_loopback_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, started.stderr[-3000:]
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 60
        while True:
            try:
                headers = {"Authorization": f"Bearer {token}"}
                if requests.get(f"{url}/api/version", headers=headers, timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the test head's dashboard never came up"
            time.sleep(0.5)
        yield {"url": url, "env": env, "temp_dir": temp_dir}
    finally:
        _terminate(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _rayft(head: dict, *args: str, env: dict | None = None, timeout: float = 120):
    return subprocess.run(
        [*RAYFT, *args],
        cwd=ROOT,
        env=env or head["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _config(path: Path, model_dir: Path, work: Path) -> Path:
    raw = {
        "model_name_or_path": str(model_dir),
        "template": "qwen",
        "dataset": "alpaca_en_demo",
        "dataset_dir": "data",  # relative: shipped inside the upload, rewritten for the job
        "max_samples": 4,
        "cutoff_len": 64,
        "output_dir": str(work / "out"),
        "per_device_train_batch_size": 2,
        "max_steps": 100,  # overridden on the command line, shipped with the config
        "logging_steps": 1,
        "lora_rank": 4,
        "disable_gradient_checkpointing": True,
        "tokenized_cache_dir": str(work / "cache"),
        "ray": {"runtime_env": {"env_vars": {"RAYFT_SUBMIT_TEST": "shipped"}}},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def test_submit_logs_list_stop(head: dict, tiny_model_dir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path / "tiny.yaml", tiny_model_dir, tmp_path)
    address = ["--address", head["url"]]

    # No token on this side: a clear error, nothing uploaded.
    no_token = {k: v for k, v in head["env"].items() if not k.startswith("RAY_AUTH")}
    no_token["HOME"] = str(tmp_path)  # so ~/.ray/auth_token is not found either
    denied = _rayft(head, "jobs", "list", *address, env=no_token)
    assert denied.returncode == 1 and "token authentication" in denied.stderr

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(
        head["url"], headers={"Authorization": f"Bearer {head['env']['RAY_AUTH_TOKEN']}"}
    )
    submitted = _rayft(head, "submit", str(config), *address, "--no-wait", "max_steps=1")
    assert submitted.returncode == 0, submitted.stderr + submitted.stdout
    assert "uploading" in submitted.stdout and ".git/" in submitted.stdout
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"rayft-sft-[0-9a-f]{10}", job_id)

    logs = _rayft(head, "jobs", "logs", job_id, "--follow", *address, timeout=240)
    assert logs.returncode == 0, logs.stdout[-3000:] + logs.stderr[-2000:]
    assert "1 step(s) in total" in logs.stdout  # the override travelled with the config
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "rayft_config.yaml").is_file()

    info = client.get_job_info(job_id)
    assert info.runtime_env["env_vars"] == {"RAYFT_SUBMIT_TEST": "shipped"}
    assert info.entrypoint == "python -m jobs.train rayft_submitted.yaml"

    listing = _rayft(head, "jobs", "list", *address)
    assert listing.returncode == 0 and job_id in listing.stdout and "SUCCEEDED" in listing.stdout

    # A job that would run for long is stopped.
    second = _rayft(
        head,
        "submit",
        str(config),
        *address,
        "--no-wait",
        "max_steps=100000",
        f"output_dir={tmp_path / 'long'}",
    )
    assert second.returncode == 0, second.stderr
    long_id = second.stdout.strip().splitlines()[-1]
    stop = _rayft(head, "jobs", "stop", long_id, *address)
    assert stop.returncode == 0 and long_id in stop.stdout
    deadline = time.monotonic() + 60
    while str(client.get_job_status(long_id)) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline
        time.sleep(1)
    assert str(client.get_job_status(long_id)) == "STOPPED"
