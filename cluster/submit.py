"""`rayft submit`: run a training config as a Ray job on a cluster, with this project as its code.

    rayft submit configs/examples/qwen_lora_sft.yaml --address http://head:8265 ray.num_workers=4
    rayft submit CONFIG.yaml --no-wait        # print the job id and return at once
    rayft submit CONFIG.yaml --dry-run        # show what would be uploaded, submit nothing
    rayft jobs list | logs ID [--follow] | stop ID      (see `cluster.jobs_cmd`)

What happens, in order:
1. The config is loaded with the overrides and checked here (every problem before any upload).
2. The project (the folder holding `jobs/`, `configs/`, …) is staged into a temporary folder
   without version control, virtualenvs, caches, tests, outputs (`saves/` and the config's
   output paths) and files over `MAX_FILE_BYTES`; what goes and what stays is printed, and an
   upload over `MAX_UPLOAD_BYTES` is refused (Ray's dashboard takes at most 100 MiB).
3. The resolved config is written at the root of that folder as `SHIPPED_CONFIG`, and
   `python -m jobs.train rayft_submitted.yaml` is submitted through Ray's Jobs SDK with
   `runtime_env = {working_dir: <staged folder>, **ray.runtime_env}`.
4. The job's logs are streamed until it ends (`--no-wait` prints the job id instead).

Paths: a relative path in the config means what it means to `rayft train` run here (relative to
the current directory). A path inside the project is rewritten relative to the upload's root,
which is both the shipped config's folder and the job driver's working directory; the driver
makes it absolute before Ray Train workers (whose working directory is not the job's) see it.
Any other local path is kept absolute and must exist on the cluster's nodes (shared storage);
a warning names it. Outputs inside the project would land in the job's temporary working
directory on the cluster, so a warning names those too.

Token authentication: when the cluster's dashboard reports `authentication_mode: token` (Ray
started with `RAY_AUTH_MODE=token`), the token is read where Ray reads it — `RAY_AUTH_TOKEN`, the
file named by `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token` — and sent as
`Authorization: Bearer …`. It is never sent to a cluster that does not ask for it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from configs import ConfigError, RayftConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = "rayft_submitted.yaml"
MAX_FILE_BYTES = 10 * 1024**2
MAX_UPLOAD_BYTES = 50 * 1024**2
# Left out wherever they appear: version control, environments, caches.
EXCLUDED_DIR_NAMES = frozenset(
    """.git .hg .svn .venv venv .tox .cache __pycache__ .pytest_cache .ruff_cache .mypy_cache
    .ipynb_checkpoints node_modules""".split()
)
# The file every virtual environment has at its top: such a folder is left out whatever its name.
VENV_MARKER = "pyvenv.cfg"
# Left out at the project's top level: outputs, build products and the test suite.
EXCLUDED_TOP_LEVEL = frozenset("saves build dist tests wandb mlruns".split())
EXCLUDED_SUFFIXES = (".egg-info", ".pyc")  # build metadata, bytecode
# Ray applies these inside a working_dir on its own; leaving them out keeps the printed list exact.
EXCLUDED_FILE_NAMES = frozenset({".gitignore", ".rayignore"})
# How long to retry when the head's job agent is not up yet (e.g. right after `ray start`).
AGENT_WAIT_S = 90.0
# Config keys holding local paths: inputs must exist, outputs are written by the job.
INPUT_PATH_KEYS = (
    ("model_name_or_path",),
    ("adapter_name_or_path",),
    ("dataset_dir",),
    ("ray", "deepspeed_config"),
)
OUTPUT_PATH_KEYS = (("output_dir",), ("export_dir",), ("tokenized_path",), ("ray", "storage_path"))


class SubmitError(RuntimeError):
    """A submission that cannot go ahead (too big, no token, no cluster); says what to do."""


@dataclass(frozen=True)
class UploadPlan:
    """The files `rayft submit` uploads as the job's working directory.

    Attributes:
        root: the project folder the relative paths start from.
        files: (relative path, bytes) of every uploaded file.
        skipped: (relative path, reason) of what was left out.
    """

    root: Path
    files: tuple[tuple[str, int], ...]
    skipped: tuple[tuple[str, str], ...]

    @property
    def total_bytes(self) -> int:
        """Size of the uploaded files together (before Ray zips them)."""
        return sum(size for _, size in self.files)

    def summary(self, *, largest: int = 5) -> str:
        """What goes and what stays, for the terminal."""
        top = sorted(self.files, key=lambda item: -item[1])[:largest]
        lines = [
            f"[rayft] uploading {len(self.files)} files, {_mib(self.total_bytes)} from "
            f"{self.root} (limit {_mib(MAX_UPLOAD_BYTES)})",
            "  largest: " + ", ".join(f"{path} ({_mib(size)})" for path, size in top),
        ]
        if self.skipped:
            lines.append(
                "  left out: " + ", ".join(f"{path} ({reason})" for path, reason in self.skipped)
            )
        return "\n".join(lines)


def plan_upload(
    root: Path, *, exclude: Iterable[Path] = (), max_file_bytes: int = MAX_FILE_BYTES
) -> UploadPlan:
    """Walk `root` and decide what is uploaded.

    Args:
        root: the project folder.
        exclude: further files or folders to leave out (the config's outputs).
        max_file_bytes: files larger than this (large datasets, weights) stay behind.

    Returns:
        The files to upload and what was left out, with reasons.
    """
    root = root.resolve()
    excluded = {path.resolve() for path in exclude}
    files: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    for current, dirs, names in os.walk(root):
        here = Path(current)
        for name in sorted(dirs):
            path = here / name
            reason = _excluded_reason(path, root, excluded)
            if reason:
                dirs.remove(name)
                if reason != "cache":
                    skipped.append((path.relative_to(root).as_posix() + "/", reason))
        dirs.sort()
        for name in sorted(names):
            path = here / name
            relative = path.relative_to(root).as_posix()
            reason = _excluded_reason(path, root, excluded)
            if reason is None and path.is_symlink() and not path.exists():
                reason = "broken link"
            if reason is None:
                size = path.stat().st_size
                if size > max_file_bytes:
                    reason = f"{_mib(size)} > {_mib(max_file_bytes)}"
                else:
                    files.append((relative, size))
                    continue
            if reason != "cache":
                skipped.append((relative, reason))
    return UploadPlan(root=root, files=tuple(files), skipped=tuple(skipped))


def _excluded_reason(path: Path, root: Path, excluded: set[Path]) -> str | None:
    if path.name in EXCLUDED_DIR_NAMES and path.is_dir():
        return "cache" if path.name == "__pycache__" else "not code"
    if (path / VENV_MARKER).is_file():  # a virtual environment under any name (.venv-vllm)
        return "not code"
    if path.name in EXCLUDED_FILE_NAMES:
        return "ignore rules"
    if path.name.endswith(EXCLUDED_SUFFIXES):
        return "cache" if path.suffix == ".pyc" else "build metadata"
    if path.parent == root and path.name in EXCLUDED_TOP_LEVEL:
        return "outputs, tests or builds"
    if path.resolve() in excluded:
        return "an output of this config"
    return None


def stage_upload(plan: UploadPlan, destination: Path) -> Path:
    """Copy the planned files into `destination` (the folder Ray zips and uploads)."""
    for relative, _ in plan.files:
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(plan.root / relative, target)
    return destination


def ship_config(
    config: RayftConfig, *, root: Path, cwd: Path, uploaded: Iterable[str] = ()
) -> tuple[dict[str, Any], list[str]]:
    """The config as the job reads it, and warnings about paths the cluster may not see.

    Args:
        config: the validated config (overrides applied).
        root: the uploaded project folder.
        cwd: the folder relative paths of the config are read from.
        uploaded: relative paths of the uploaded files (to warn about inputs left behind).

    Returns:
        The resolved config as a mapping (paths rewritten, `ray.address: auto` so that the job
        joins the cluster it runs on) and the warnings.
    """
    data = config.model_dump(mode="json")
    data["ray"]["address"] = "auto"
    uploaded_paths = set(uploaded)
    warnings: list[str] = []
    for keys, is_output in [(k, False) for k in INPUT_PATH_KEYS] + [
        (k, True) for k in OUTPUT_PATH_KEYS
    ]:
        section = data if len(keys) == 1 else data[keys[0]]
        value = section.get(keys[-1])
        if not value:
            continue
        parts = [
            _ship_path(
                part.strip(),
                dotted=".".join(keys),
                is_output=is_output,
                root=root,
                cwd=cwd,
                uploaded=uploaded_paths,
                warnings=warnings,
            )
            for part in str(value).split(",")
        ]
        section[keys[-1]] = ",".join(parts)
    return data, warnings


def _ship_path(
    value: str,
    *,
    dotted: str,
    is_output: bool,
    root: Path,
    cwd: Path,
    uploaded: set[str],
    warnings: list[str],
) -> str:
    if "://" in value:
        return value
    local = Path(value).expanduser()
    local = (local if local.is_absolute() else cwd / local).resolve()
    if not is_output and not local.exists():
        return value  # a hub id, or a path that exists only on the cluster
    root = root.resolve()
    if not local.is_relative_to(root):
        warnings.append(
            f"`{dotted}` = {local} is outside the project and not uploaded: it must exist "
            "at that path on every node (shared storage)"
            if not is_output
            else f"`{dotted}` = {local} must be writable on the cluster's nodes"
        )
        return str(local)
    relative = local.relative_to(root).as_posix() or "."
    if is_output:
        warnings.append(
            f"`{dotted}` = {relative} is inside the project: on the cluster it is written into "
            "the job's temporary working directory; give a shared path (NFS) or s3:// instead"
        )
    elif local.is_file() and relative not in uploaded:
        warnings.append(f"`{dotted}` = {relative} is not uploaded (see `left out`)")
    elif local.is_dir() and not any(path.startswith(relative + "/") for path in uploaded):
        warnings.append(f"`{dotted}` = {relative}/ is not uploaded (see `left out`)")
    return relative


def read_auth_token(
    environ: Mapping[str, str] = os.environ, *, home: Path | None = None
) -> str | None:
    """The Ray auth token, looked up as Ray does: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file() or not path.read_text().strip():
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} is not a file holding a token")
        return path.read_text().strip()
    default = (home or Path.home()) / ".ray" / "auth_token"
    if not default.is_file():
        return None
    return default.read_text().strip() or None


def dashboard_url(address: str | None) -> str:
    """The Jobs API URL for `address` (http://host:8265, ray://host:10001, host:port, or None:
    RAY_API_SERVER_ADDRESS / RAY_ADDRESS / the local cluster), as Ray's job CLI resolves it."""
    from ray.dashboard.utils import get_address_for_submission_client

    return get_address_for_submission_client(address)


def auth_headers(url: str, *, timeout_s: float = 10.0) -> dict[str, str]:
    """`Authorization` header for a cluster that uses token auth; empty otherwise.

    Raises:
        SubmitError: the cluster wants a token and none is found.
    """
    import requests

    try:
        reply = requests.get(f"{url}/api/authentication_mode", timeout=timeout_s)
        mode = reply.json().get("authentication_mode") if reply.ok else None
    except (requests.RequestException, ValueError) as err:
        raise SubmitError(f"no Ray dashboard answers at {url} ({err}); check --address") from err
    if mode != "token":
        return {}
    token = read_auth_token()
    if token is None:
        raise SubmitError(
            f"the cluster at {url} uses token authentication (RAY_AUTH_MODE=token) and no "
            "token was found: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, "
            "or put it in ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
        )
    return {"Authorization": f"Bearer {token}"}


def connect(address: str | None):  # noqa: ANN201 - ray.job_submission.JobSubmissionClient
    """A Jobs SDK client for `address`, with the auth token when the cluster asks for one."""
    from ray.job_submission import JobSubmissionClient

    try:
        url = dashboard_url(address)
    except ConnectionError as err:  # no address given and no local cluster found
        raise SubmitError(f"{err}; pass --address http://HEAD:8265 or set RAY_ADDRESS") from err
    try:
        return JobSubmissionClient(url, headers=auth_headers(url))
    except ConnectionError as err:
        raise SubmitError(f"cannot reach the Ray Jobs API at {url}: {err}") from err


def follow_logs(client: Any, job_id: str) -> str:
    """Print a job's logs as they come until it ends; returns its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    return str(client.get_job_status(job_id))


def submit(
    config_path: str,
    overrides: list[str],
    *,
    address: str | None,
    wait: bool = True,
    dry_run: bool = False,
    local_checks: bool = True,
    project_root: Path = PROJECT_ROOT,
    sweep: bool = False,
) -> int:
    """Validate, stage, submit and (by default) follow a training job.

    Args:
        config_path: the YAML.
        overrides: `key=value` overrides, applied before shipping.
        address: dashboard (http://host:8265), Ray Client (ray://host:10001) or GCS address;
            None uses RAY_ADDRESS or the local cluster, as `ray job submit` does.
        wait: stream logs until the job ends; False prints the job id and returns.
        dry_run: show what would be uploaded and the shipped config, submit nothing.
        local_checks: also run the dataset/model checks here (turn off when those paths exist
            only on the cluster); the schema is always checked.
        project_root: the folder uploaded as the job's working directory.
        sweep: run `jobs.tune` (the config's `tune:` sweep) instead of `jobs.train`.

    Returns:
        0 when the job succeeded (or was submitted with wait=False), 1 otherwise.

    Raises:
        ConfigError: the config is invalid.
        SubmitError: the upload is too large, the cluster is unreachable or wants a token.
    """
    from configs import load_config
    from jobs.tune import check_tune

    extra = (check_tune,) if sweep else ()
    if local_checks:
        from jobs.preflight import TRAIN_CHECKS

        config = load_config(config_path, overrides, checks=(*TRAIN_CHECKS, *extra))
    else:
        config = load_config(config_path, overrides, checks=extra)
    cwd = Path.cwd()
    outputs = [
        _local(value, cwd)
        for value in (
            config.output_dir,
            config.export_dir,
            config.tokenized_path,
            config.ray.storage_path,
        )
        if value and "://" not in value
    ]
    plan = plan_upload(project_root, exclude=outputs)
    print(plan.summary(), flush=True)
    if plan.total_bytes > MAX_UPLOAD_BYTES:
        raise SubmitError(
            f"the upload would be {_mib(plan.total_bytes)} (limit {_mib(MAX_UPLOAD_BYTES)}): "
            "move large files out of the project or onto shared storage"
        )
    shipped, warnings = ship_config(
        config, root=project_root, cwd=cwd, uploaded=[path for path, _ in plan.files]
    )
    for warning in warnings:
        print(f"[rayft] warning: {warning}", file=sys.stderr, flush=True)
    entrypoint = f"python -m {'jobs.tune' if sweep else 'jobs.train'} {SHIPPED_CONFIG}"
    if dry_run:
        print(f"[rayft] would run `{entrypoint}` with:\n{yaml.safe_dump(shipped, sort_keys=False)}")
        return 0
    client = connect(address)
    with tempfile.TemporaryDirectory(prefix="rayft-submit-") as staging:
        stage_upload(plan, Path(staging))
        (Path(staging) / SHIPPED_CONFIG).write_text(yaml.safe_dump(shipped, sort_keys=False))
        runtime_env = {**(config.ray.runtime_env or {}), "working_dir": staging}
        job_id = _submit_when_agent_ready(
            client,
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=f"rayft-{config.stage}-{uuid.uuid4().hex[:10]}",
            metadata={"rayft_config": Path(config_path).name},
        )
    print(f"[rayft] submitted {job_id} to {client.get_address()}", flush=True)
    if not wait:
        print(job_id)
        return 0
    try:
        status = follow_logs(client, job_id)
    except KeyboardInterrupt:
        print(f"\n[rayft] stopped following; the job keeps running (`rayft jobs stop {job_id}`)")
        return 1
    print(f"[rayft] job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _submit_when_agent_ready(client: Any, **job: Any) -> str:
    """`client.submit_job`, retried while the head's job agent is still starting."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise SubmitError(f"the cluster did not take the job: {err}") from err
            print("[rayft] the head's job agent is not up yet; retrying", flush=True)
            time.sleep(3)


def _local(value: str, cwd: Path) -> Path:
    path = Path(value).expanduser()
    return (path if path.is_absolute() else cwd / path).resolve()


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB"


def cmd_submit(args: argparse.Namespace) -> int:
    """`rayft submit`: problems with the config or the submission exit with status 1."""
    # Options may come before or after the overrides (`CONFIG --no-wait key=value`), which a
    # sub-command's `nargs="*"` positional cannot take; a parser of its own parses them mixed.
    options = _options_parser().parse_intermixed_args([args.config, *args.rest])
    try:
        return submit(
            options.config,
            options.overrides,
            address=options.address,
            wait=not options.no_wait,
            dry_run=options.dry_run,
            local_checks=not options.skip_local_checks,
            sweep=options.tune,
        )
    except (ConfigError, SubmitError) as err:
        print(f"rayft: {err}", file=sys.stderr)
        return 1


def _options_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayft submit",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (shipped with the job)")
    parser.add_argument(
        "--address",
        help="http://head:8265, ray://head:10001 or head:6379 "
        "(default: RAY_ADDRESS, else the local cluster)",
    )
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    parser.add_argument("--dry-run", action="store_true", help="show the upload, submit nothing")
    parser.add_argument(
        "--tune", action="store_true", help="run the config's `tune:` sweep (jobs.tune)"
    )
    parser.add_argument(
        "--skip-local-checks",
        action="store_true",
        help="check only the schema here (model/data paths exist only on the cluster)",
    )
    return parser


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `rayft submit` on the CLI."""
    options = _options_parser()
    parser = sub.add_parser(
        "submit",
        help="run a training config as a Ray job on a cluster",
        usage=options.format_usage().removeprefix("usage: "),
        description=options.format_help().split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML config")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="overrides and options")
    parser.set_defaults(handler=cmd_submit)
