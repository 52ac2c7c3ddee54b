"""KubeRay manifests from a rayft YAML: a RayJob to train or sweep, a RayService to serve.

The same YAML that runs on a laptop runs on Kubernetes: it is shipped verbatim in a ConfigMap,
and only the `ray:` section sizes the pods. Run:

    rayft k8s render CONFIG.yaml --kind job --image REGISTRY/rayft:gpu --namespace ml
    rayft k8s render CONFIG.yaml --kind service --output k8s/   # one file per object

Layout shared with `kuberay/` (the kustomize base) and `docker/` (the images), and locked by
tests: the project lives in the image at `WORKDIR`; the shared volume (PVC `PVC_NAME`) is
mounted at `WORKDIR/saves`, so the usual relative `output_dir: saves/...` lands on storage
every pod sees and that outlives the cluster; the YAML is mounted at `CONFIG_DIR/CONFIG_KEY`.

Example:
    >>> from configs import load_config
    >>> text = open("cfg.yaml").read()
    >>> docs = render(load_config("cfg.yaml"), kind="job", image="rayft:cpu", namespace=None,
    ...               config_text=text)  # doctest: +SKIP
    >>> print(dump_manifests(docs))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import math
import posixpath
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from configs import ConfigError, ConfigProblem, RayftConfig, load_config

# The Ray of the images (`docker/`), of `rayVersion` in every cluster and of pyproject's pin.
RAY_VERSION = "2.60.0"
WORKDIR = "/home/ray/rayft"
SHARED_DIR = "saves"
SHARED_MOUNT = f"{WORKDIR}/{SHARED_DIR}"
CONFIG_DIR = "/home/ray/rayft-config"
CONFIG_KEY = "rayft.yaml"
PVC_NAME = "rayft-storage"
SECRET_NAME = "rayft-secrets"
API_KEYS_ENV = "RAYFT_API_KEYS"  # read by serve/auth.py through ServeArgs.api_keys_env
# Top-level folders the images leave out (docker/Dockerfile.*.dockerignore): a path in them
# exists on the laptop only.
IMAGE_EXCLUDED = frozenset({".git", ".venv", ".cache"})
DEFAULT_IMAGES = {False: "rayft:cpu", True: "rayft:gpu"}
KNOWN_RESOURCES = frozenset({"CPU", "GPU", "memory"})

HEAD_CPUS = 2
HEAD_MEMORY_GIB = 8
# Sizing rule for a worker pod when the config names no memory: host RAM for the data
# pipeline per core, plus room to stage a GPU's weights.
GIB_PER_CPU = 4
GIB_PER_GPU = 16
# Ray keeps 30% of a node's memory for the object store (in /dev/shm), so a worker asking for
# `memory` needs a pod that much larger.
OBJECT_STORE_SHARE = 0.3
IDLE_TIMEOUT_S = 300
TTL_AFTER_FINISHED_S = 600
BACKOFF_LIMIT = 2
ACTIVE_DEADLINE_S = {"job": 24 * 3600, "tune": 3 * 24 * 3600}
# A sweep runs this many trials of `ray.num_workers` workers at once at most.
TUNE_PARALLEL_TRIALS = 4
SERVE_PORT = 8000
SERVE_DEPLOYMENT = "ChatServer"  # the @serve.deployment class in serve/app.py
DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
MAX_NAME = 47  # KubeRay: RayJob and RayService names leave 6 characters for the cluster's


@dataclass(frozen=True)
class WorkerShape:
    """One worker pod: room for one Ray Train worker (or Serve replica) and its data tasks.

    Attributes:
        train_cpus: CPUs the Ray Train worker (or Serve replica) reserves.
        gpus: GPUs per pod (``nvidia.com/gpu``).
        cpus: CPUs of the pod: the worker's plus one for Ray Data tasks and Serve's proxy.
        memory_gib: memory of the pod.
    """

    train_cpus: float
    gpus: int
    cpus: int
    memory_gib: int


def shm_gib(memory_gib: int) -> int:
    """Size of a pod's memory-backed /dev/shm, where Ray keeps its object store."""
    return max(1, math.ceil(memory_gib * OBJECT_STORE_SHARE))


def worker_shape(config: RayftConfig) -> WorkerShape:
    """Size a worker pod from `ray:` (call `check_config` first for the errors).

    Args:
        config: a validated config; `ray.resources_per_worker` may name CPU, GPU and memory
            (bytes, as Ray counts it); unset CPU is one core, unset GPU is one when
            `ray.use_gpu`.

    Returns:
        The pod's shape.
    """
    wanted = config.ray.resources_per_worker or {}
    train_cpus = wanted.get("CPU", 1.0)
    gpus = math.ceil(wanted.get("GPU", 1.0 if config.ray.use_gpu else 0.0))
    cpus = math.ceil(train_cpus) + 1
    memory = GIB_PER_CPU * cpus + GIB_PER_GPU * gpus
    if "memory" in wanted:
        memory = max(memory, math.ceil(wanted["memory"] / 2**30 / (1 - OBJECT_STORE_SHARE)) + 1)
    return WorkerShape(train_cpus=train_cpus, gpus=gpus, cpus=cpus, memory_gib=memory)


# --- checks ---------------------------------------------------------------------------------


def check_config(config: RayftConfig, kind: str) -> list[ConfigProblem]:
    """Everything that would make the manifests fail on a cluster, reported together.

    Pods see only the image (the project at `WORKDIR`) and the shared volume: a path that
    exists only on this machine, or an output outside the volume (lost when the cluster is
    deleted after the job), is an error here rather than hours later.

    Args:
        config: a config that passed the schema.
        kind: `job`, `tune` or `service`; outputs matter for the first two, the serving
            settings (template, sampling ranges) for the last.

    Returns:
        Every problem, each with the key and the fix; empty when the config can run.
    """
    problems = _resource_problems(config)
    for key in ("model_name_or_path", "adapter_name_or_path"):
        value = getattr(config, key)
        if value is not None and _is_local(value):
            problems += _input_path_problems(key, value)
    problems += _input_path_problems("dataset_dir", config.dataset_dir)
    if kind in ("job", "tune"):
        if not config.output_dir:
            problems.append(
                ConfigProblem(
                    "output_dir", f"is required for training; e.g. `output_dir: {SHARED_DIR}/run`"
                )
            )
        else:
            problems += _output_path_problems("output_dir", config.output_dir)
        if config.export_dir:
            problems += _output_path_problems("export_dir", config.export_dir)
        problems += _storage_problems(config)
    if kind == "tune":
        from jobs.tune import check_tune  # what `python -m jobs.tune` checks first

        problems += check_tune(config)
    if kind == "service":
        problems += _serve_problems(config)
    return problems


# Checkpoint storage every pod of a cluster reaches; any other URI scheme (file://, local://,
# memory://) is node-local. NFS or another shared filesystem is mounted: give its absolute path
# under SHARED_MOUNT (the PVC can be NFS-backed).
SHARED_SCHEMES = frozenset({"s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs"})


def storage_fix(config: RayftConfig) -> str:
    """How to set `ray.storage_path` for a run on KubeRay, for error messages."""
    run = posixpath.basename(str(config.output_dir or "run").rstrip("/")) or "run"
    return (
        f"set `ray.storage_path: {SHARED_MOUNT}/{run}/ray` (the shared volume, PVC {PVC_NAME}; "
        "NFS-backed or not) or an object store URI such as s3://bucket/rayft or gs://bucket/rayft"
    )


def _storage_problems(config: RayftConfig) -> list[ConfigProblem]:
    # On KubeRay a run always spans pods: the head (no CPUs, runs the driver) and one pod per
    # Ray Train worker. Checkpoints must go where all of them read and write; a relative or
    # pod-local path (the unset default `<output_dir>/ray` is relative) splits them per pod.
    storage = config.ray.storage_path
    workers = config.ray.num_workers
    spread = (
        f"ray.num_workers={workers} runs in {workers} worker pod(s) plus the head, "
        "so checkpoints must be on storage every pod sees"
    )
    if storage is None:
        return [ConfigProblem("ray.storage_path", f"is unset; {spread}: {storage_fix(config)}")]
    scheme = storage.split("://", 1)[0].lower() if "://" in storage else None
    if scheme in SHARED_SCHEMES:
        return []
    path = storage.split("://", 1)[1] if scheme == "file" else storage
    if scheme in (None, "file") and path.startswith("/") and _under(path, SHARED_MOUNT):
        return []
    return [
        ConfigProblem(
            "ray.storage_path",
            f"`{storage}` is node-local (not under the shared volume {SHARED_MOUNT}, nor "
            f"s3:// or gs://); {spread}: {storage_fix(config)}",
        )
    ]


def gpu_image_problems(config: RayftConfig, image: str) -> list[ConfigProblem]:
    """A config that asks for GPUs must not run on a CPU image (no CUDA, no vLLM)."""
    wanted = (config.ray.resources_per_worker or {}).get("GPU", 0)
    if not (config.ray.use_gpu or wanted > 0):
        return []
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    if "cpu" not in tag.lower() and image != DEFAULT_IMAGES[False]:
        return []
    asks = "`ray.use_gpu: true`" if config.ray.use_gpu else f"resources_per_worker GPU={wanted}"
    return [
        ConfigProblem(
            "--image",
            f"`{image}` is a CPU image but the config asks for GPUs ({asks}); pass a GPU image, "
            f"e.g. `--image {DEFAULT_IMAGES[True]}` (docker/Dockerfile.gpu), or set "
            "`ray.use_gpu: false` and drop GPU from resources_per_worker",
        )
    ]


# ServeArgs fields named differently in the config.
_SERVE_KEYS = {
    "model_path": "model_name_or_path",
    "adapter_path": "adapter_name_or_path",
    "model_name": "serve.model_name",
    **{
        key: f"serve.{key}"
        for key in (
            "engine",
            "num_replicas",
            "autoscaling",
            "max_ongoing_requests",
            "max_batch_size",
            "batch_wait_timeout_s",
            "api_keys_file",
            "api_keys_env",
            "max_request_bytes",
            "max_tokens_limit",
        )
    },
}


def _serve_problems(config: RayftConfig) -> list[ConfigProblem]:
    # The serving settings are checked as `rayft serve` would build them (template included).
    from pydantic import ValidationError

    from cluster.cli import serve_args_from_config

    try:
        serve_args_from_config(config)
    except ValidationError as err:
        return [
            ConfigProblem(
                _SERVE_KEYS.get(str(error["loc"][0]), str(error["loc"][0])),
                f"{error['msg']} (got {error.get('input')!r}) for serving",
            )
            for error in err.errors()
        ]
    except ValueError as err:  # unknown template
        return [ConfigProblem("template", str(err))]
    return []


def _resource_problems(config: RayftConfig) -> list[ConfigProblem]:
    wanted = config.ray.resources_per_worker or {}
    problems = []
    unknown = sorted(set(wanted) - KNOWN_RESOURCES)
    if unknown:
        problems.append(
            ConfigProblem(
                "ray.resources_per_worker",
                f"names {', '.join(unknown)}; pods are sized from CPU, GPU and memory only "
                "(add custom resources to the worker group by hand)",
            )
        )
    for key in sorted(set(wanted) & KNOWN_RESOURCES):
        if wanted[key] <= 0:
            problems.append(
                ConfigProblem(
                    f"ray.resources_per_worker.{key}", f"is {wanted[key]}; give a positive amount"
                )
            )
    if wanted.get("GPU", 0) > 0 and not config.ray.use_gpu:
        problems.append(
            ConfigProblem(
                "ray.use_gpu",
                "is false but resources_per_worker asks for GPUs; set `use_gpu: true`",
            )
        )
    return problems


def _is_local(value: str) -> bool:
    # As jobs.preflight, plus `saves/...`: one slash is otherwise read as a hub id (org/name).
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or _first(value) == SHARED_DIR


def _first(path: str) -> str:
    return posixpath.normpath(path).split("/")[0]


def _under(path: str, root: str) -> bool:
    normal = posixpath.normpath(path)
    return normal == root or normal.startswith(root + "/")


def _input_path_problems(key: str, value: str) -> list[ConfigProblem]:
    where = f"pods see the image's project at {WORKDIR} and the shared volume at {SHARED_MOUNT}"
    if value.startswith("~") or (value.startswith("/") and not _under(value, WORKDIR)):
        return [ConfigProblem(key, f"`{value}` is a path on this machine; {where}")]
    if not value.startswith("/"):
        first = _first(value)
        if first == "..":
            return [ConfigProblem(key, f"`{value}` leaves the project; {where}")]
        if first in IMAGE_EXCLUDED:
            return [
                ConfigProblem(
                    key,
                    f"`{value}` is not in the image (docker/ leaves `{first}` out); copy it under "
                    f"{SHARED_DIR}/ (the shared volume) or use a hub id",
                )
            ]
    return []


def _output_path_problems(key: str, value: str) -> list[ConfigProblem]:
    on_volume = (
        _under(value, SHARED_MOUNT)
        if value.startswith("/")
        else (not value.startswith("~") and _first(value) == SHARED_DIR)
    )
    if on_volume:
        return []
    return [
        ConfigProblem(
            key,
            f"`{value}` is not on the shared volume, so workers would not share it and it would be "
            f"lost with the cluster; use `{SHARED_DIR}/...` (mounted at {SHARED_MOUNT})",
        )
    ]


# --- building blocks ------------------------------------------------------------------------


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "rayft", "app.kubernetes.io/component": component}


def _secret_env(name: str, key: str, *, optional: bool) -> dict[str, Any]:
    # Secrets only by reference: the manifests and the runtime env never hold a value.
    ref = {"name": SECRET_NAME, "key": key, "optional": optional}
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _env(component: str) -> list[dict[str, Any]]:
    env = [
        # Public models need no token.
        _secret_env("HF_TOKEN", "hf-token", optional=True),
        # Hub downloads land on the shared volume once, not in every pod.
        {"name": "HF_HOME", "value": f"{SHARED_MOUNT}/.cache/huggingface"},
    ]
    if component == "serve":
        # A served model is never open: without the Secret the pods do not start.
        env.append(_secret_env(API_KEYS_ENV, "api-keys", optional=False))
    return env


def _resources(cpus: float | int, memory_gib: int, gpus: int) -> dict[str, dict[str, str]]:
    # requests == limits: Guaranteed QoS, and Ray's view of the pod equals the scheduler's.
    amounts = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod(
    role: str,
    image: str,
    *,
    component: str,
    config_map: str,
    cpus: int,
    memory_gib: int,
    gpus: int,
    ports: list[dict[str, Any]],
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": f"ray-{role}",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": WORKDIR,
        "env": _env(component),
        "resources": _resources(cpus, memory_gib, gpus),
        "volumeMounts": [
            {"name": "shared", "mountPath": SHARED_MOUNT},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        ],
    }
    if ports:
        container["ports"] = ports
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {"name": "shared", "persistentVolumeClaim": {"claimName": PVC_NAME}},
            {
                "name": "dshm",
                "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib(memory_gib)}Gi"},
            },
            {"name": "config", "configMap": {"name": config_map}},
        ],
    }
    if gpus:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {"metadata": {"labels": _labels(component)}, "spec": spec}


def cluster_spec(
    config: RayftConfig,
    *,
    image: str,
    component: str,
    config_map: str,
    replicas: int,
    min_replicas: int,
    max_replicas: int,
) -> dict[str, Any]:
    """A RayCluster spec: a head that runs no work and one autoscaling worker group.

    The head reserves no CPUs (``num-cpus: "0"``) so that training and replicas land on
    workers; the in-tree autoscaler (v2) adds workers up to `max_replicas` and removes those
    idle for `IDLE_TIMEOUT_S`.

    Args:
        config: sizes the worker pods (`worker_shape`).
        image: the rayft image of every container.
        component: `train`, `tune`, `serve` (adds the head's serve port) or `cluster`.
        config_map: the ConfigMap mounted at `CONFIG_DIR` in every pod.
        replicas: worker pods at start.
        min_replicas: fewest worker pods the autoscaler keeps.
        max_replicas: most worker pods the autoscaler adds.

    Returns:
        The `spec` of a RayCluster (a RayJob's `rayClusterSpec`, a RayService's
        `rayClusterConfig`).
    """
    shape = worker_shape(config)
    head_ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
    ]
    if component == "serve":
        head_ports.append({"name": "serve", "containerPort": SERVE_PORT})
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": IDLE_TIMEOUT_S,
            "imagePullPolicy": "IfNotPresent",
            "resources": {
                "requests": {"cpu": "500m", "memory": "512Mi"},
                "limits": {"cpu": "500m", "memory": "512Mi"},
            },
        },
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(
                "head",
                image,
                component=component,
                config_map=config_map,
                cpus=HEAD_CPUS,
                memory_gib=HEAD_MEMORY_GIB,
                gpus=0,
                ports=head_ports,
            ),
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu-workers" if shape.gpus else "cpu-workers",
                "replicas": replicas,
                "minReplicas": min_replicas,
                "maxReplicas": max_replicas,
                "idleTimeoutSeconds": IDLE_TIMEOUT_S,
                "template": _pod(
                    "worker",
                    image,
                    component=component,
                    config_map=config_map,
                    cpus=shape.cpus,
                    memory_gib=shape.memory_gib,
                    gpus=shape.gpus,
                    ports=[],
                ),
            }
        ],
    }


def _metadata(name: str, namespace: str | None, component: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": _labels(component)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _config_map(name: str, namespace: str | None, component: str, text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(name, namespace, component),
        "data": {CONFIG_KEY: text},
    }


def dns_name(*parts: str, limit: int = MAX_NAME) -> str:
    """A DNS-1035 label (lowercase, digits, '-', starting with a letter) of at most `limit`.

    Raises:
        ValueError: the parts hold no letter to start the name with.
    """
    name = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    name = name[:limit].rstrip("-")
    if not name or not name[0].isalpha():
        raise ValueError(f"cannot make a Kubernetes name from {parts!r}")
    return name


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the config, serveConfigV2) as `|` blocks, readable in kubectl."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


# --- kinds ----------------------------------------------------------------------------------

Builder = Callable[[RayftConfig, str, str | None, str], list[dict[str, Any]]]
KINDS: dict[str, Builder] = {}


def _kind(name: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        KINDS[name] = builder
        return builder

    return register


def _ray_job(
    config: RayftConfig,
    image: str,
    namespace: str | None,
    config_text: str,
    *,
    kind: str,
    module: str,
    component: str,
    max_replicas: int,
) -> list[dict[str, Any]]:
    name = dns_name("rayft", component, posixpath.basename(str(config.output_dir).rstrip("/")))
    config_map = f"{name}-config"
    # `ray.address=auto` joins the job's cluster instead of starting a private one. `env -C`
    # runs it in WORKDIR, so relative paths (saves/..., data/...) mean what they mean on a
    # laptop; KubeRay pastes the entrypoint into a shell script, so it holds no `&&` or `;`.
    command = ["env", "-C", WORKDIR, "python", "-m", module]
    command += [f"{CONFIG_DIR}/{CONFIG_KEY}", "ray.address=auto"]
    spec: dict[str, Any] = {
        "entrypoint": shlex.join(command),
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": {"PYTHONUNBUFFERED": "1"}}),
        # The submitter runs beside the head: no extra pod, no image pull race.
        "submissionMode": "SidecarMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
        # A retry resumes from the last checkpoint on the volume, unless the config asks to
        # start over, where a retry would throw the progress away.
        "backoffLimit": 0 if config.overwrite_output_dir else BACKOFF_LIMIT,
        "activeDeadlineSeconds": ACTIVE_DEADLINE_S[kind],
        "rayClusterSpec": cluster_spec(
            config,
            image=image,
            component=component,
            config_map=config_map,
            replicas=config.ray.num_workers,
            min_replicas=0,
            max_replicas=max_replicas,
        ),
    }
    return [
        _config_map(config_map, namespace, component, config_text),
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": _metadata(name, namespace, component),
            "spec": spec,
        },
    ]


@_kind("job")
def _train(config: RayftConfig, image: str, namespace: str | None, text: str) -> list[dict]:
    """RayJob: `python -m jobs.train`, a cluster sized for `ray.num_workers`."""
    return _ray_job(
        config,
        image,
        namespace,
        text,
        kind="job",
        module="jobs.train",
        component="train",
        max_replicas=config.ray.num_workers,
    )


@_kind("tune")
def _tune(config: RayftConfig, image: str, namespace: str | None, text: str) -> list[dict]:
    """RayJob: `python -m jobs.tune`, room for `TUNE_PARALLEL_TRIALS` trials at once."""
    return _ray_job(
        config,
        image,
        namespace,
        text,
        kind="tune",
        module="jobs.tune",
        component="tune",
        max_replicas=config.ray.num_workers * TUNE_PARALLEL_TRIALS,
    )


def _in_pod(path: str | None) -> str | None:
    # Replicas are actors whose working directory is Ray's, not WORKDIR: pass absolute paths.
    if path is None or not _is_local(path) or path.startswith("/"):
        return path
    return posixpath.normpath(posixpath.join(WORKDIR, path))


@_kind("service")
def _service(config: RayftConfig, image: str, namespace: str | None, text: str) -> list[dict]:
    """RayService: `serve:build_app` with the config's model, template and sampling.

    `ray.num_workers` is the ceiling of replicas (one per worker pod); Serve's autoscaler adds
    replicas under load and the Ray autoscaler adds the pods for them.
    """
    from cluster.cli import serve_args_from_config
    from serve.args import ServeArgs

    shape = worker_shape(config)
    local = config.model_copy(
        update={
            "model_name_or_path": _in_pod(config.model_name_or_path),
            "adapter_name_or_path": _in_pod(config.adapter_name_or_path),
        }
    )
    max_replicas = config.ray.num_workers
    autoscaling = {"min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": 2}
    args = ServeArgs.model_validate(
        {
            **serve_args_from_config(local, num_cpus_per_replica=shape.train_cpus).model_dump(),
            # build_app ignores host and port (http_options below bind); they say the same.
            "host": "0.0.0.0",
            "port": SERVE_PORT,
            "autoscaling": autoscaling,
            "api_keys_env": API_KEYS_ENV,
        }
    )
    serve_config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [
            {
                "name": args.model_name,
                "route_prefix": args.route_prefix,
                "import_path": "serve:build_app",
                "args": args.model_dump(mode="json"),
                # Overrides of what build_app sets: the same autoscaling, stated where Serve
                # and KubeRay show it, and the replica's GPU, which ServeArgs cannot ask for.
                "deployments": [
                    {
                        "name": SERVE_DEPLOYMENT,
                        "ray_actor_options": {"num_cpus": shape.train_cpus, "num_gpus": shape.gpus},
                        "autoscaling_config": autoscaling,
                    }
                ],
            }
        ],
    }
    name = dns_name("rayft", "serve", args.model_name)
    config_map = f"{name}-config"
    spec = {
        "serveConfigV2": yaml.dump(serve_config, Dumper=_BlockDumper, sort_keys=False, width=100),
        # Blue/green: a new cluster takes the traffic once its applications are healthy.
        "upgradeStrategy": {"type": "NewCluster"},
        "excludeHeadPodFromServeSvc": True,
        "rayClusterConfig": cluster_spec(
            config,
            image=image,
            component="serve",
            config_map=config_map,
            replicas=1,
            min_replicas=1,
            max_replicas=max_replicas,
        ),
    }
    return [
        _config_map(config_map, namespace, "serve", text),
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayService",
            "metadata": _metadata(name, namespace, "serve"),
            "spec": spec,
        },
    ]


def render(
    config: RayftConfig,
    *,
    kind: str,
    image: str | None = None,
    namespace: str | None = None,
    config_text: str,
) -> list[dict[str, Any]]:
    """The manifests that run `config` on a KubeRay cluster: a ConfigMap, then the workload.

    Args:
        config: the validated config (only `ray:` sizes the pods).
        kind: `job` (RayJob, jobs.train), `tune` (RayJob, jobs.tune) or `service` (RayService).
        image: a rayft image (see docker/); default `rayft:gpu` or `rayft:cpu` by `ray.use_gpu`.
        namespace: set on every object; None leaves it to kubectl's context.
        config_text: the YAML `config` was loaded from, shipped verbatim in the ConfigMap.

    Returns:
        Manifests as dicts, ConfigMap first (apply in order).

    Raises:
        ValueError: unknown kind, a bad namespace or image, or YAML that is not a mapping.
        ConfigError: every reason the config would fail on the cluster, a CPU image for a
            config that asks for GPUs included.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind `{kind}` (known: {', '.join(sorted(KINDS))})")
    if namespace is not None and not re.fullmatch(DNS_LABEL, namespace):
        raise ValueError(
            f"namespace `{namespace}` is not a DNS-1123 label (lowercase, digits, '-')"
        )
    image = image if image is not None else DEFAULT_IMAGES[config.ray.use_gpu]
    if not image or any(char.isspace() for char in image):
        raise ValueError(f"image `{image}` is not an image reference")
    try:
        mapping = isinstance(yaml.safe_load(config_text), dict)
    except yaml.YAMLError:
        mapping = False
    if not mapping:
        raise ValueError("config_text is not a YAML mapping; pass the file the config came from")
    problems = check_config(config, kind) + gpu_image_problems(config, image)
    if problems:
        raise ConfigError(f"{kind} manifests", problems)
    return KINDS[kind](config, image, namespace, config_text)


# --- output ---------------------------------------------------------------------------------


def dump_manifests(manifests: list[dict[str, Any]]) -> str:
    """Multi-document YAML, for `kubectl apply -f -`."""
    return yaml.dump_all(manifests, Dumper=_BlockDumper, sort_keys=False, width=100)


def write_manifests(manifests: list[dict[str, Any]], folder: Path) -> list[Path]:
    """One file per object, numbered so that `kubectl apply -f FOLDER` keeps the order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, manifest in enumerate(manifests):
        path = (
            folder / f"{index:02d}-{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"
        )
        path.write_text(dump_manifests([manifest]), encoding="utf-8")
        paths.append(path)
    return paths


# --- command line ---------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `rayft k8s render ...` to the CLI's sub-commands (sets `handler=run`)."""
    k8s = subparsers.add_parser("k8s", help="KubeRay manifests (RayJob, RayService)")
    verbs = k8s.add_subparsers(dest="k8s_command", required=True)
    command = verbs.add_parser(
        "render",
        help="print or write the manifests that run a config on KubeRay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("config", help="the rayft YAML (shipped verbatim in a ConfigMap)")
    command.add_argument(
        "--kind",
        choices=sorted(KINDS),
        default="job",
        help="job: train (RayJob); tune: sweep (RayJob); service: RayService",
    )
    command.add_argument("--image", help="rayft image; default rayft:gpu or rayft:cpu")
    command.add_argument("--namespace", help="namespace of every object")
    command.add_argument(
        "--output", type=Path, help="write one file per object into this folder instead of stdout"
    )
    command.set_defaults(handler=run)
    return k8s


def run(args: argparse.Namespace) -> int:
    """`rayft k8s render`: 0 on success, 1 with every problem on stderr."""
    try:
        config = load_config(args.config)
        text = Path(args.config).read_text(encoding="utf-8")
        manifests = render(
            config, kind=args.kind, image=args.image, namespace=args.namespace, config_text=text
        )
    except ValueError as err:  # ConfigError included
        print(f"rayft k8s render {args.config}: {err}", file=sys.stderr)
        return 1
    if args.output is None:
        sys.stdout.write(dump_manifests(manifests))
    else:
        for path in write_manifests(manifests, args.output):
            print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.k8s render ...`, until `rayft k8s` is wired into the CLI."""
    parser = argparse.ArgumentParser(prog="rayft")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["k8s", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
