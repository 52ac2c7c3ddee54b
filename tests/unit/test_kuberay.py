"""KubeRay manifests, checked offline: `kuberay/` (kustomize) and `rayft k8s render`.

Every manifest passes three layers of checks, each shown able to fail by a negative test:
1. the KubeRay v1.7.0 CRDs' v1 ``openAPIV3Schema`` (copied from ``../shared/kuberay-crds`` into ``tests/fixtures/kuberay-crds``), made strict as
   ``kubectl apply`` is (unknown fields rejected), with Kubernetes' extensions honoured
   (int-or-string, preserve-unknown-fields, embedded resources, list types, int32/int64);
   ConfigMap and PVC against small core schemas;
2. the operator's admission rules that a schema cannot express (a subset of KubeRay v1.7's
   ``ray-operator/controllers/ray/utils/validation.go``);
3. rayft's layout: head with ``num-cpus: "0"``, requests == limits, memory-backed /dev/shm,
   the shared PVC, the config from a ConfigMap, secrets only by ``secretKeyRef``, worker pods
   sized from the mounted config as `cluster.k8s.worker_shape` sizes them.

`kuberay/` is built by a small kustomize for the subset it uses (resources, patches as
strategic merge of maps or JSON6902, namespace, labels, commonLabels, images); it is compared
with ``kubectl kustomize`` wherever kubectl is installed.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import importlib.util
import inspect
import posixpath
import re
import shlex
import shutil
import subprocess
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from cluster import k8s
from configs import ConfigError, load_config
from serve.args import ServeArgs

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "kuberay"
# A copy of ../shared/kuberay-crds (KubeRay v1.7.0, provenance in its SOURCE.md), so CI always validates.
CRD_DIR = ROOT / "tests" / "fixtures" / "kuberay-crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
KUSTOMIZATIONS = sorted(path.parent for path in KUBERAY.rglob("kustomization.yaml"))
needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR}")

Doc = dict[str, Any]


class UnsupportedByRenderer(ValueError):
    """A kustomize feature this test's small renderer does not implement (refused, not guessed)."""


# --- a small kustomize ----------------------------------------------------------------------
# Only what kuberay/ uses, each behaving as kustomize v5 does; anything else is refused.

KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "patches",
    "namespace",
    "labels",
    "commonLabels",
    "images",
}
# Kinds whose labels kustomize puts in metadata only (no selectors or templates to follow).
LABEL_KINDS = {"ConfigMap", "PersistentVolumeClaim", "RayCluster", "RayJob", "RayService"}


def kustomize(folder: Path) -> list[Doc]:
    """`kubectl kustomize folder` for the subset above."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    if unknown:
        raise UnsupportedByRenderer(f"{folder}: kustomization fields {sorted(unknown)}")
    docs: list[Doc] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        if path.is_dir():
            docs += kustomize(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    ids = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{folder}: duplicate resources {ids}")
    # kustomize's builtin transformer order: namespace, patches, labels, images.
    if "namespace" in spec:
        for doc in docs:
            doc["metadata"]["namespace"] = spec["namespace"]
    for patch in spec.get("patches", []):
        _apply_patch(folder, patch, docs)
    pairs = dict(spec.get("commonLabels", {}))
    for entry in spec.get("labels", []):
        if (
            set(entry) - {"pairs", "includeSelectors", "includeTemplates"}
            or entry.get("includeSelectors")
            or entry.get("includeTemplates")
        ):
            raise UnsupportedByRenderer(f"{folder}: labels option {entry}")
        pairs.update(entry["pairs"])
    for doc in docs:
        if pairs and doc["kind"] not in LABEL_KINDS:
            raise UnsupportedByRenderer(f"labels on {doc['kind']} also go to selectors")
        if pairs:
            doc["metadata"].setdefault("labels", {}).update(pairs)
    for image in spec.get("images", []):
        for doc in docs:
            _set_image(doc, image)
    return docs


def _apply_patch(folder: Path, patch: Doc, docs: list[Doc]) -> None:
    if set(patch) - {"path", "patch", "target"}:
        raise UnsupportedByRenderer(f"patch options {sorted(patch)}")
    text = (folder / patch["path"]).read_text() if "path" in patch else patch["patch"]
    body = yaml.safe_load(text)
    target = patch.get("target")
    if isinstance(body, list):  # JSON6902
        if target is None:
            raise ValueError("a JSON6902 patch needs a target")
        for doc in _select(docs, target):
            json6902(doc, body)
        return
    selector = target or {"kind": body["kind"], "name": body["metadata"]["name"]}
    for doc in _select(docs, selector):
        strategic_merge(doc, body)


def _select(docs: list[Doc], target: Doc) -> list[Doc]:
    if set(target) - {"group", "version", "kind", "name"}:
        raise UnsupportedByRenderer(f"target selector {target}")
    found = []
    for doc in docs:
        group, _, version = doc["apiVersion"].rpartition("/")
        wanted = {"group": group, "version": version, "kind": doc["kind"]}
        if all(target[key] == wanted[key] for key in wanted if key in target) and (
            "name" not in target or re.fullmatch(target["name"], doc["metadata"]["name"])
        ):
            found.append(doc)
    if not found:
        raise ValueError(f"no resource matches the patch target {target}")
    return found


def strategic_merge(doc: Doc, patch: Doc) -> None:
    """Maps merge key by key and null deletes, as in kustomize. Lists are refused: in a custom
    resource kustomize replaces them whole (no merge keys known), which silently drops
    containers or env; kuberay/ edits lists with JSON6902 instead."""
    for key, value in patch.items():
        if key.startswith("$"):
            raise UnsupportedByRenderer(f"patch directive {key}")
        if value is None:
            doc.pop(key, None)
        elif isinstance(value, list):
            raise UnsupportedByRenderer(f"list `{key}` in a strategic-merge patch; use JSON6902")
        elif isinstance(value, dict) and isinstance(doc.get(key), dict):
            strategic_merge(doc[key], value)
        else:
            doc[key] = copy.deepcopy(value)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer `{path}` must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    for part in parts:
        try:
            doc = doc[int(part)] if isinstance(doc, list) else doc[part]
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"JSON6902: `{path}` does not exist") from err
    return doc


def json6902(doc: Doc, ops: list[Doc]) -> None:
    """RFC 6902 add, remove, replace, test, copy and move, in order."""
    for op in ops:
        parts = _pointer(op["path"])
        parent, leaf = _walk(doc, parts[:-1], op["path"]), parts[-1]
        kind = op["op"]
        if kind == "test":
            if _walk(doc, parts, op["path"]) != op["value"]:
                raise ValueError(f"JSON6902 test failed at {op['path']}")
        elif kind == "remove":
            _walk(doc, parts, op["path"])
            del parent[int(leaf) if isinstance(parent, list) else leaf]
        elif kind == "replace":
            _walk(doc, parts, op["path"])
            parent[int(leaf) if isinstance(parent, list) else leaf] = copy.deepcopy(op["value"])
        elif kind in ("add", "copy", "move"):
            if kind == "add":
                value = copy.deepcopy(op["value"])
            else:
                source = _pointer(op["from"])
                value = copy.deepcopy(_walk(doc, source, op["from"]))
                if kind == "move":
                    json6902(doc, [{"op": "remove", "path": op["from"]}])
            if isinstance(parent, list):
                parent.insert(len(parent) if leaf == "-" else int(leaf), value)
            else:
                parent[leaf] = value
        else:
            raise ValueError(f"JSON6902: unknown op `{kind}`")


def _set_image(node: Any, image: Doc) -> None:
    # kustomize's image transformer rewrites `image` in any containers/initContainers list.
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    container["image"] = _new_image(container["image"], image)
            else:
                _set_image(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_image(item, image)


def _new_image(current: str, image: Doc) -> str:
    name, _, digest = current.partition("@")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    if name != image["name"]:
        return current
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    tag = image.get("newTag", tag)
    return f"{name}:{tag}" if tag else (f"{name}@{digest}" if digest else name)


# --- layer 1: schemas -----------------------------------------------------------------------

QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN},
        "namespace": {"type": "string", "pattern": f"^{k8s.DNS_LABEL}$"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}
CORE_SCHEMAS: dict[str, Doc] = {
    "ConfigMap": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "ConfigMap"},
            "metadata": OBJECT_META,
            "data": {**STRING_MAP, "propertyNames": {"pattern": r"^[-._a-zA-Z0-9]+$"}},
            "immutable": {"type": "boolean"},
        },
    },
    "PersistentVolumeClaim": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "PersistentVolumeClaim"},
            "metadata": OBJECT_META,
            "spec": {
                "type": "object",
                "required": ["accessModes", "resources"],
                "additionalProperties": False,
                "properties": {
                    "accessModes": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "enum": [
                                "ReadWriteOnce",
                                "ReadOnlyMany",
                                "ReadWriteMany",
                                "ReadWriteOncePod",
                            ]
                        },
                    },
                    "resources": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["requests"],
                        "properties": {
                            "requests": {
                                "type": "object",
                                "required": ["storage"],
                                "additionalProperties": False,
                                "properties": {"storage": {"type": "string", "pattern": QUANTITY}},
                            },
                        },
                    },
                    "storageClassName": {"type": "string"},
                    "volumeMode": {"enum": ["Filesystem", "Block"]},
                },
            },
        },
    },
}


def to_jsonschema(node: Any) -> Any:
    """A structural schema as jsonschema reads it: objects closed unless the schema keeps
    unknown fields, int-or-string and nullable spelled out, embedded resources typed."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = to_jsonschema(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [to_jsonschema(item) for item in node[key]]
    if "properties" in node:
        node["properties"] = {name: to_jsonschema(sub) for name, sub in node["properties"].items()}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        node.setdefault("properties", {}).update(
            {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
            }
        )
        node["required"] = sorted({*node.get("required", []), "apiVersion", "kind"})
    if node.get("nullable") and "type" in node:
        node["type"] = [node["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    return node


def _list_type(validator: Any, list_type: str, instance: Any, schema: Doc) -> Iterator[Any]:
    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen = [yaml.safe_dump(item) for item in instance]
        if len(seen) != len(set(seen)):
            yield jsonschema.ValidationError(f"duplicate items in a set list: {instance}")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = [tuple(item.get(key) for key in keys) for item in instance]
        if len(seen) != len(set(seen)):
            yield jsonschema.ValidationError(f"duplicate {keys} in a map list: {seen}")


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type}
)


def crd_sources() -> dict[str, Doc]:
    """The three CRDs, parsed once."""
    return _crd_sources()


@functools.cache
def _crd_sources() -> dict[str, Doc]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return {
        kind: yaml.load((CRD_DIR / name).read_text(), Loader=loader)
        for kind, name in CRD_FILES.items()
    }


@functools.cache
def validator(kind: str) -> Any:
    """A validator for `kind`: the CRD's v1 schema, or our core schema."""
    if kind in CORE_SCHEMAS:
        return KubeValidator(CORE_SCHEMAS[kind], format_checker=FORMATS)
    (version,) = [v for v in crd_sources()[kind]["spec"]["versions"] if v["name"] == "v1"]
    return KubeValidator(
        to_jsonschema(version["schema"]["openAPIV3Schema"]), format_checker=FORMATS
    )


def schema_errors(doc: Doc) -> list[str]:
    """Layer 1."""
    kind = doc.get("kind")
    if kind not in CORE_SCHEMAS and kind not in CRD_FILES:
        return [f"{kind}: no schema for this kind"]
    errors = []
    if kind in CRD_FILES:
        if doc.get("apiVersion") != "ray.io/v1":
            errors.append(f"{kind}: apiVersion {doc.get('apiVersion')} is not ray.io/v1")
        # The CRD leaves metadata open; the API server checks it as ObjectMeta.
        errors += [
            f"{kind} metadata: {error.message}"
            for error in KubeValidator(OBJECT_META).iter_errors(doc.get("metadata"))
        ]
    errors += [
        f"{kind} {'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator(kind).iter_errors(doc)
    ]
    return errors


# --- layer 2: the operator's admission rules ------------------------------------------------

SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}


def cluster_of(doc: Doc) -> Doc | None:
    """The RayCluster spec a RayCluster, RayJob or RayService carries."""
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    if doc["kind"] not in key:
        return None
    return doc["spec"] if key[doc["kind"]] is None else doc["spec"].get(key[doc["kind"]])


def _groups(spec: Doc) -> list[tuple[str, Doc]]:
    return [("head", spec["headGroupSpec"])] + [
        (group["groupName"], group) for group in spec.get("workerGroupSpecs", [])
    ]


def operator_errors(doc: Doc) -> list[str]:
    """Layer 2: KubeRay v1.7 validation.go rules for the fields rayft sets."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind not in NAME_LIMITS:
        return []
    errors = []
    if len(name) > NAME_LIMITS[kind] or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"{kind} name `{name}`: a DNS-1035 label of at most {NAME_LIMITS[kind]}")
    spec = cluster_of(doc)
    if spec is not None:
        autoscaling = spec.get("enableInTreeAutoscaling", False)
        v2 = autoscaling and spec.get("autoscalerOptions", {}).get("version") == "v2"
        for group, body in _groups(spec):
            pod = body["template"]["spec"]
            if not pod.get("containers"):
                errors.append(f"{group}: needs at least one container")
            params = body.get("rayStartParams", {})
            if body.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(
                params
            ):
                errors.append(f"{group}: resources both in rayStartParams and resources")
            if "labels" in params:
                errors.append(f"{group}: rayStartParams['labels'] is not supported")
            if v2 and pod.get("restartPolicy", "Never") != "Never":
                errors.append(f"{group}: restartPolicy must be Never or unset with autoscaler v2")
            if autoscaling and body.get("suspend"):
                errors.append(f"{group}: cannot be suspended with the autoscaler")
            if (
                group != "head"
                and not body["minReplicas"]
                <= body.get("replicas", body["minReplicas"])
                <= body["maxReplicas"]
            ):
                errors.append(f"{group}: replicas outside [minReplicas, maxReplicas]")
    if kind == "RayJob":
        job = doc["spec"]
        mode = job.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            errors.append(f"submissionMode `{mode}` is not one of {sorted(SUBMISSION_MODES)}")
        if job.get("rayClusterSpec") is None and not job.get("clusterSelector"):
            errors.append("one of rayClusterSpec or clusterSelector must be set")
        if mode == "SidecarMode":
            if (
                job.get("submitterPodTemplate")
                or job.get("submitterConfig")
                or job.get("clusterSelector")
            ):
                errors.append(
                    "SidecarMode takes no submitterPodTemplate, submitterConfig or clusterSelector"
                )
            head = (job.get("rayClusterSpec") or {}).get("headGroupSpec", {})
            if head.get("template", {}).get("spec", {}).get("restartPolicy", "Never") != "Never":
                errors.append("SidecarMode needs the head's restartPolicy Never or unset")
        if job.get("ttlSecondsAfterFinished", 0) > 0 and not job.get("shutdownAfterJobFinishes"):
            errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if job.get("activeDeadlineSeconds", 1) <= 0:
            errors.append("activeDeadlineSeconds must be positive")
        if job.get("backoffLimit", 0) < 0:
            errors.append("backoffLimit must not be negative")
        try:
            runtime_env = yaml.safe_load(job.get("runtimeEnvYAML", "")) or {}
            if not isinstance(runtime_env, dict):
                errors.append("runtimeEnvYAML is not a mapping")
        except yaml.YAMLError:
            errors.append("runtimeEnvYAML is not YAML")
    if kind == "RayService":
        service = doc["spec"]
        upgrade = service.get("upgradeStrategy", {}).get("type")
        if upgrade is not None and upgrade not in UPGRADE_TYPES:
            errors.append(f"upgradeStrategy.type `{upgrade}` is not one of {sorted(UPGRADE_TYPES)}")
        head_service = service["rayClusterConfig"]["headGroupSpec"].get("headService", {})
        if head_service.get("metadata", {}).get("name"):
            errors.append("headService.metadata.name must not be set in a RayService")
    return errors


# --- layer 3: rayft's layout ----------------------------------------------------------------

SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


def _mounted(pod: Doc, container: Doc, path: str) -> Doc | None:
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] == path:
            return next(v for v in pod.get("volumes", []) if v["name"] == mount["name"])
    return None


def _env_errors(where: str, env: list[Doc]) -> list[str]:
    return [
        f"{where}: env {var['name']} looks secret; take it from a secretKeyRef only"
        for var in env
        if SECRET_NAME.search(var["name"])
        and ("value" in var or "secretKeyRef" not in var.get("valueFrom", {}))
    ]


def layout_errors(doc: Doc) -> list[str]:
    """Layer 3 for one object."""
    errors: list[str] = []
    spec = cluster_of(doc)
    if spec is not None:
        if spec.get("rayVersion") != k8s.RAY_VERSION:
            errors.append(f"rayVersion {spec.get('rayVersion')} is not {k8s.RAY_VERSION}")
        if not spec.get("enableInTreeAutoscaling"):
            errors.append("enableInTreeAutoscaling must be true")
        scaler = spec.get("autoscalerOptions", {})
        if scaler.get("version") != "v2":
            errors.append("autoscalerOptions.version must be v2")
        resources = scaler.get("resources", {})
        if not resources or resources.get("requests") != resources.get("limits"):
            errors.append("autoscaler: resource requests must equal limits")
        if spec["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") != "0":
            errors.append('head: rayStartParams num-cpus must be "0"')
        if not spec.get("workerGroupSpecs"):
            errors.append("no worker group")
        for group, body in _groups(spec):
            if group != "head" and ("idleTimeoutSeconds" not in body or body["maxReplicas"] < 1):
                errors.append(f"{group}: needs idleTimeoutSeconds and maxReplicas >= 1")
            errors += _pod_errors(group, body["template"]["spec"])
    if doc["kind"] == "RayJob":
        job = doc["spec"]
        if job.get("submissionMode") != "SidecarMode":
            errors.append("RayJob: submissionMode must be SidecarMode")
        for key in (
            "shutdownAfterJobFinishes",
            "ttlSecondsAfterFinished",
            "backoffLimit",
            "activeDeadlineSeconds",
            "runtimeEnvYAML",
        ):
            if key not in job:
                errors.append(f"RayJob: {key} is not set")
        if not job.get("shutdownAfterJobFinishes"):
            errors.append("RayJob: shutdownAfterJobFinishes must be true")
        entrypoint = job.get("entrypoint", "")
        # KubeRay pastes the entrypoint into the submitter's shell script (`-- ENTRYPOINT ; fi`):
        # a `&&` or `;` would run the rest in the submitter, not as the job.
        if re.search(r"[;&|<>`$()]", entrypoint):
            errors.append(f"RayJob: entrypoint `{entrypoint}` holds shell operators")
        config_path = f"{k8s.CONFIG_DIR}/{k8s.CONFIG_KEY}"
        expected = ["env", "-C", k8s.WORKDIR, "python", "-m"]
        words = shlex.split(entrypoint)
        if not (
            len(words) == 8
            and words[:5] == expected
            and words[5] in ("jobs.train", "jobs.tune")
            and words[6:] == [config_path, "ray.address=auto"]
        ):
            errors.append(
                f"RayJob: entrypoint `{entrypoint}` must be {shlex.join(expected)} "
                f"jobs.train|jobs.tune {config_path} ray.address=auto"
            )
        env_vars = (yaml.safe_load(job.get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})
        errors += [
            f"RayJob: runtimeEnvYAML holds {name}; secrets go in a secretKeyRef"
            for name in env_vars
            if SECRET_NAME.search(name)
        ]
    if doc["kind"] == "RayService":
        errors += _serve_errors(doc["spec"])
    return errors


def _pod_errors(group: str, pod: Doc) -> list[str]:
    errors = []
    gpus = False
    for container in pod["containers"]:
        where = f"{group}/{container['name']}"
        resources = container.get("resources", {})
        requests, limits = resources.get("requests"), resources.get("limits")
        if not limits or requests != limits or not {"cpu", "memory"} <= set(limits):
            errors.append(f"{where}: cpu and memory requests must equal limits")
        gpus = gpus or "nvidia.com/gpu" in (limits or {})
        errors += _env_errors(where, container.get("env", []))
    ray = pod["containers"][0]
    where = f"{group}/{ray['name']}"
    image = ray.get("image", "")
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        errors.append(f"{where}: image `{image}` needs a tag other than latest")
    if ray.get("workingDir") != k8s.WORKDIR:
        errors.append(f"{where}: workingDir must be {k8s.WORKDIR}")
    shm = _mounted(pod, ray, "/dev/shm")
    if not shm or shm.get("emptyDir", {}).get("medium") != "Memory":
        errors.append(f"{where}: /dev/shm must be a memory-backed emptyDir")
    shared = _mounted(pod, ray, k8s.SHARED_MOUNT)
    if not shared or shared.get("persistentVolumeClaim", {}).get("claimName") != k8s.PVC_NAME:
        errors.append(f"{where}: {k8s.SHARED_MOUNT} must mount PVC {k8s.PVC_NAME}")
    config = _mounted(pod, ray, k8s.CONFIG_DIR)
    if not config or "configMap" not in config:
        errors.append(f"{where}: {k8s.CONFIG_DIR} must mount the config's ConfigMap")
    tolerated = {toleration.get("key") for toleration in pod.get("tolerations", [])}
    if gpus and "nvidia.com/gpu" not in tolerated:
        errors.append(f"{group}: GPU pods need the nvidia.com/gpu toleration")
    return errors


def _serve_errors(service: Doc) -> list[str]:
    errors = []
    if service.get("upgradeStrategy", {}).get("type") not in UPGRADE_TYPES:
        errors.append("RayService: upgradeStrategy.type must be set")
    serve_config = yaml.safe_load(service.get("serveConfigV2", "")) or {}
    apps = serve_config.get("applications", [])
    if not apps:
        errors.append("RayService: serveConfigV2 has no applications")
    for app in apps:
        if app.get("import_path") != "serve:build_app":
            errors.append(
                f"RayService: import_path `{app.get('import_path')}` is not serve:build_app"
            )
        try:
            args = ServeArgs.model_validate(app.get("args"))
        except ValueError as err:
            errors.append(f"RayService: args are not ServeArgs: {err}")
            continue
        errors += _api_key_errors(service["rayClusterConfig"], args.api_keys_env)
        if not app.get("deployments"):
            errors.append("RayService: no deployment options (autoscaling_config)")
        for deployment in app.get("deployments", []):
            scaling = deployment.get("autoscaling_config")
            if not scaling or not 1 <= scaling["min_replicas"] <= scaling["max_replicas"]:
                errors.append(
                    f"RayService: {deployment.get('name')} needs autoscaling_config "
                    "with 1 <= min_replicas <= max_replicas"
                )
            elif args.autoscaling is None or scaling != args.autoscaling.model_dump(
                exclude_none=True
            ):
                errors.append("RayService: autoscaling_config is not args.autoscaling")
    return errors


def _api_key_errors(spec: Doc, variable: str | None) -> list[str]:
    # A served model is never open: its keys come from a required Secret in every pod.
    if not variable:
        return ["RayService: args.api_keys_env is unset, the API would be open"]
    errors = []
    for group, body in _groups(spec):
        env = {var["name"]: var for var in body["template"]["spec"]["containers"][0].get("env", [])}
        ref = env.get(variable, {}).get("valueFrom", {}).get("secretKeyRef")
        if not ref or ref.get("optional", False):
            errors.append(f"{group}: {variable} must come from a required secretKeyRef")
    return errors


def reference_errors(docs: list[Doc], *, external: set[tuple[str, str]] = frozenset()) -> list[str]:
    """Every ConfigMap and PVC a pod mounts is in the set (or `external`), with the config key;
    one namespace for all."""
    have = {(doc["kind"], doc["metadata"]["name"]) for doc in docs} | set(external)
    errors = []
    for doc in docs:
        spec = cluster_of(doc)
        for _, body in _groups(spec) if spec else []:
            for volume in body["template"]["spec"].get("volumes", []):
                if "configMap" in volume:
                    name = volume["configMap"]["name"]
                    maps = [
                        d
                        for d in docs
                        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name
                    ]
                    if not maps or k8s.CONFIG_KEY not in maps[0].get("data", {}):
                        errors.append(f"ConfigMap {name} with {k8s.CONFIG_KEY} is not in the set")
                claim = volume.get("persistentVolumeClaim", {}).get("claimName")
                if claim and ("PersistentVolumeClaim", claim) not in have:
                    errors.append(f"PVC {claim} is not in the set")
    if len({doc["metadata"].get("namespace") for doc in docs}) > 1:
        errors.append("objects in different namespaces")
    return errors


def validate(docs: list[Doc], **kwargs: Any) -> list[str]:
    """All three layers, every error at once; layers 2 and 3 read only schema-valid objects."""
    errors = [error for doc in docs for error in schema_errors(doc)]
    if errors:
        return errors
    errors = reference_errors(docs, **kwargs)
    for doc in docs:
        errors += operator_errors(doc) + layout_errors(doc)
    return errors


# --- pods sized from the config they mount --------------------------------------------------


def _config_of(doc: Doc, docs: list[Doc]) -> Any:
    spec = cluster_of(doc)
    volume = next(
        v for v in spec["headGroupSpec"]["template"]["spec"]["volumes"] if "configMap" in v
    )
    (config_map,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]
    ]
    return load_config(None, base=yaml.safe_load(config_map["data"][k8s.CONFIG_KEY]))


def _kind_of(doc: Doc) -> str:
    if doc["kind"] == "RayService":
        return "service"
    return "tune" if "jobs.tune" in doc["spec"].get("entrypoint", "") else "job"


def sizing_errors(docs: list[Doc]) -> list[str]:
    """Worker pods, replicas and Serve options equal what `ray:` of the mounted config asks."""
    errors = []
    for doc in docs:
        if cluster_of(doc) is None:
            continue
        config = _config_of(doc, docs)
        kind = _kind_of(doc)
        errors += [
            f"{doc['metadata']['name']}: {problem}" for problem in k8s.check_config(config, kind)
        ]
        shape = k8s.worker_shape(config)
        (group,) = cluster_of(doc)["workerGroupSpecs"]
        pod = group["template"]["spec"]
        want = k8s._resources(shape.cpus, shape.memory_gib, shape.gpus)
        if pod["containers"][0]["resources"] != want:
            errors.append(
                f"{doc['metadata']['name']}: worker resources "
                f"{pod['containers'][0]['resources']} != {want} from ray:"
            )
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
        if shm != f"{k8s.shm_gib(shape.memory_gib)}Gi":
            errors.append(f"{doc['metadata']['name']}: /dev/shm {shm}")
        workers = config.ray.num_workers
        ceiling = {"job": workers, "tune": workers * k8s.TUNE_PARALLEL_TRIALS, "service": workers}[
            kind
        ]
        if doc["kind"] == "RayCluster":
            ok = group["maxReplicas"] >= workers
        else:
            ok = group["maxReplicas"] == ceiling
        if not ok:
            errors.append(
                f"{doc['metadata']['name']}: maxReplicas {group['maxReplicas']} "
                f"for {workers} worker(s)"
            )
        if doc["kind"] == "RayJob":
            retries = 0 if config.overwrite_output_dir else k8s.BACKOFF_LIMIT
            if doc["spec"]["backoffLimit"] != retries:
                errors.append(f"backoffLimit must be {retries} (overwrite_output_dir)")
        if doc["kind"] == "RayService":
            for app in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]:
                (deployment,) = app["deployments"]
                actor = deployment["ray_actor_options"]
                if (actor["num_cpus"], actor.get("num_gpus", 0)) != (shape.train_cpus, shape.gpus):
                    errors.append(f"replica options {actor} do not fit the worker pods")
                if ServeArgs.model_validate(app["args"]).num_cpus_per_replica != actor["num_cpus"]:
                    errors.append("args.num_cpus_per_replica != ray_actor_options.num_cpus")
                if deployment["autoscaling_config"]["max_replicas"] != group["maxReplicas"]:
                    errors.append("Serve's max_replicas != the worker group's maxReplicas")
    return errors


# --- fixtures -------------------------------------------------------------------------------

CPU_CONFIG = """\
model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
template: qwen
dataset: alpaca_en_demo
output_dir: saves/qwen-alpaca
ray:
  num_workers: 2
  storage_path: /home/ray/rayft/saves/qwen-alpaca/ray
tune:
  search_space:
    learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
"""
GPU_CONFIG = """\
model_name_or_path: saves/models/qwen2.5-7b   # on the shared volume
adapter_name_or_path: saves/qwen7b-alpaca
template: qwen
dataset: alpaca_en_demo
output_dir: /home/ray/rayft/saves/qwen7b-alpaca-2
export_dir: saves/qwen7b-merged
overwrite_output_dir: true
bf16: true
ray:
  num_workers: 4
  use_gpu: true
  resources_per_worker: {CPU: 7, GPU: 1, memory: 64000000000}
  storage_path: s3://bucket/rayft
tune:
  search_space:
    lora_rank: {choice: [8, 16]}
"""


def _config(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path)


def _render(tmp_path: Path, text: str, kind: str, **kwargs: Any) -> list[Doc]:
    return k8s.render(_config(tmp_path, text), kind=kind, config_text=text, **kwargs)


@pytest.fixture(scope="module")
def built() -> dict[str, list[Doc]]:
    """Every kustomization under kuberay/, built."""
    return {str(folder.relative_to(KUBERAY)): kustomize(folder) for folder in KUSTOMIZATIONS}


@pytest.fixture()
def job(tmp_path: Path) -> list[Doc]:
    """A valid rendered training job (ConfigMap, RayJob) to break in negative tests."""
    return _render(tmp_path, GPU_CONFIG, "job", namespace="ml")


# --- the CRDs -------------------------------------------------------------------------------


@needs_crds
def test_crds_are_kuberay_v1_7_0_unmodified() -> None:
    source = (CRD_DIR / "SOURCE.md").read_text()
    assert "v1.7.0" in source
    for name in CRD_FILES.values():
        digest = hashlib.sha256((CRD_DIR / name).read_bytes()).hexdigest()
        assert re.search(rf"`{re.escape(name)}` \| `[0-9a-f]+` \| `{digest}`", source), name


# --- kuberay/ -------------------------------------------------------------------------------


def test_every_yaml_under_kuberay_is_built() -> None:
    """No manifest escapes validation: each file is a kustomization or used by one."""
    used = set()
    for folder in KUSTOMIZATIONS:
        used.add(folder / "kustomization.yaml")
        spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
        used |= {(folder / entry).resolve() for entry in spec.get("resources", [])}
        used |= {
            (folder / patch["path"]).resolve()
            for patch in spec.get("patches", [])
            if "path" in patch
        }
    files = {path.resolve() for path in KUBERAY.rglob("*") if path.is_file()}
    assert files <= {path.resolve() for path in used}
    assert {"base", "overlays/dev", "overlays/gpu"} <= {
        str(folder.relative_to(KUBERAY)) for folder in KUSTOMIZATIONS
    }


@needs_crds
@pytest.mark.parametrize("folder", [str(f.relative_to(KUBERAY)) for f in KUSTOMIZATIONS])
def test_kustomization_builds_valid_manifests(built: dict[str, list[Doc]], folder: str) -> None:
    docs = built[folder]
    assert sorted(doc["kind"] for doc in docs) == [
        "ConfigMap",
        "PersistentVolumeClaim",
        "RayCluster",
        "RayJob",
        "RayJob",
        "RayService",
    ]
    assert validate(docs) == []
    assert sizing_errors(docs) == []


def test_kuberay_workloads_and_service_agree(built: dict[str, list[Doc]]) -> None:
    for folder, docs in built.items():
        by_name = {doc["metadata"]["name"]: doc for doc in docs}
        assert "python -m jobs.train" in by_name["rayft-train"]["spec"]["entrypoint"], folder
        assert "python -m jobs.tune" in by_name["rayft-tune"]["spec"]["entrypoint"], folder
        config = _config_of(by_name["rayft-train"], docs)
        (app,) = yaml.safe_load(by_name["rayft-serve"]["spec"]["serveConfigV2"])["applications"]
        args = ServeArgs.model_validate(app["args"])
        # The service serves what the training job writes, on the base model it trained.
        assert args.adapter_path == posixpath.join(k8s.WORKDIR, config.output_dir), folder
        assert args.model_path == config.model_name_or_path, folder


def test_overlays_are_cpu_dev_and_gpu_production(built: dict[str, list[Doc]]) -> None:
    def workers(docs: list[Doc]) -> list[Doc]:
        return [
            group
            for doc in docs
            if cluster_of(doc)
            for group in cluster_of(doc)["workerGroupSpecs"]
        ]

    def images(docs: list[Doc]) -> set[str]:
        return {
            c["image"]
            for doc in docs
            if cluster_of(doc)
            for _, body in _groups(cluster_of(doc))
            for c in body["template"]["spec"]["containers"]
        }

    dev, gpu = built["overlays/dev"], built["overlays/gpu"]
    assert {doc["metadata"]["namespace"] for doc in dev} == {"rayft-dev"}
    assert "nvidia.com/gpu" not in yaml.safe_dump(dev) and images(dev) == {"rayft:cpu"}
    assert {doc["metadata"]["namespace"] for doc in gpu} == {"rayft"}
    assert images(gpu) == {"rayft:gpu"}
    for group in workers(gpu):
        assert group["groupName"] == "gpu-workers"
        assert (
            group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            == "1"
        )
    assert all(doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "rayft" for doc in gpu)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("folder", [str(f.relative_to(KUBERAY)) for f in KUSTOMIZATIONS])
def test_small_kustomize_equals_kubectl_kustomize(built: dict[str, list[Doc]], folder: str) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(KUBERAY / folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    def keyed(docs: list[Doc]) -> dict[tuple[str, str], Doc]:
        return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}

    assert keyed(list(yaml.safe_load_all(result.stdout))) == keyed(built[folder])


# --- rayft k8s render -----------------------------------------------------------------------


@needs_crds
@pytest.mark.parametrize("kind", sorted(k8s.KINDS))
@pytest.mark.parametrize("text", [CPU_CONFIG, GPU_CONFIG], ids=["cpu", "gpu"])
def test_render_is_valid(tmp_path: Path, kind: str, text: str) -> None:
    docs = _render(tmp_path, text, kind, namespace="ml", image="registry.example/rayft:1.0")
    assert [doc["kind"] for doc in docs] == [
        "ConfigMap",
        "RayService" if kind == "service" else "RayJob",
    ]
    assert validate(docs, external={("PersistentVolumeClaim", k8s.PVC_NAME)}) == []
    assert sizing_errors(docs) == []
    assert docs[0]["data"] == {k8s.CONFIG_KEY: text}  # the YAML as written
    assert {doc["metadata"]["namespace"] for doc in docs} == {"ml"}


def test_render_sizes_pods_from_ray_section(tmp_path: Path) -> None:
    (_, job_doc) = _render(tmp_path, GPU_CONFIG, "job")
    spec = job_doc["spec"]
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    # 7 CPUs + 1 spare; 64 GB asked of Ray -> 64e9 / 2**30 / 0.7 -> 86 GiB + 1.
    assert limits == {"cpu": "8", "memory": "87Gi", "nvidia.com/gpu": "1"}
    assert (group["groupName"], group["maxReplicas"], group["replicas"]) == ("gpu-workers", 4, 4)
    assert spec["backoffLimit"] == 0  # overwrite_output_dir: a retry would start over
    assert spec["entrypoint"] == (
        "env -C /home/ray/rayft python -m jobs.train /home/ray/rayft-config/rayft.yaml "
        "ray.address=auto"
    )
    (_, tune) = _render(tmp_path, CPU_CONFIG, "tune")
    assert tune["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] == 8
    assert tune["spec"]["backoffLimit"] == k8s.BACKOFF_LIMIT
    assert "jobs.tune" in tune["spec"]["entrypoint"]
    assert tune["spec"]["activeDeadlineSeconds"] > spec["activeDeadlineSeconds"]


def test_render_service_serves_the_config(tmp_path: Path) -> None:
    from data_pipelines.templates import get_template

    (_, service) = _render(tmp_path, GPU_CONFIG, "service")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    args = ServeArgs.model_validate(app["args"])
    # Relative paths become the pod's absolute ones: replicas do not run in WORKDIR.
    assert args.model_path == "/home/ray/rayft/saves/models/qwen2.5-7b"
    assert args.adapter_path == "/home/ray/rayft/saves/qwen7b-alpaca"
    assert args.model_name == "qwen7b-alpaca" == app["name"]
    assert args.chat_template == get_template("qwen").to_jinja()
    assert args.stop_words == list(get_template("qwen").stop_words)
    assert app["deployments"][0]["ray_actor_options"] == {"num_cpus": 7.0, "num_gpus": 1}
    assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert service["metadata"]["name"] == "rayft-serve-qwen7b-alpaca"
    hub = _render(tmp_path, CPU_CONFIG, "service")[1]
    (app,) = yaml.safe_load(hub["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["model_path"] == "Qwen/Qwen2.5-0.5B-Instruct"  # a hub id stays


def _every_manifest_set(built: dict[str, list[Doc]], tmp_path: Path) -> dict[str, list[Doc]]:
    """The kustomize builds and what `render` makes of both fixtures, for every kind."""
    sets = {f"kuberay/{folder}": docs for folder, docs in built.items()}
    for name, text in (("cpu", CPU_CONFIG), ("gpu", GPU_CONFIG)):
        for kind in sorted(k8s.KINDS):
            sets[f"render {name} {kind}"] = _render(tmp_path, text, kind)
    return sets


def _entry_module(entrypoint: str) -> str:
    words = shlex.split(entrypoint)
    assert "-m" in words, f"entrypoint `{entrypoint}` runs no module"
    return words[words.index("-m") + 1]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic fields
def test_entry_points_named_in_manifests_exist(built: dict[str, list[Doc]], tmp_path: Path) -> None:
    """What the schema cannot see: every RayJob's `python -m X` is a module of the project,
    every RayService's import path imports and takes its args, and the deployment the serve
    config tunes is serve/app.py's."""
    seen_modules, seen_apps = set(), 0
    for where, docs in _every_manifest_set(built, tmp_path).items():
        for doc in docs:
            if doc["kind"] == "RayJob":
                module = _entry_module(doc["spec"]["entrypoint"])
                assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
                origin = Path(importlib.util.find_spec(module).origin).resolve()
                assert ROOT in origin.parents, f"{where}: {module} is not the project's"
                seen_modules.add(module)
            if doc["kind"] == "RayService":
                for app in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]:
                    module, _, attr = app["import_path"].partition(":")
                    build_app = getattr(importlib.import_module(module), attr)
                    args = ServeArgs.model_validate(app["args"])
                    inspect.signature(build_app).bind(app["args"])
                    # What Serve does with the import path: call it with the args dict.
                    bound = build_app(app["args"])
                    assert bound is not None, where
                    assert args.api_keys_env == k8s.API_KEYS_ENV
                    seen_apps += 1
    assert seen_modules == {"jobs.train", "jobs.tune"}
    assert seen_apps >= 3  # base, gpu overlay, rendered
    import serve

    assert serve._HOMES["build_app"] == "serve.app"
    app = (ROOT / "serve" / "app.py").read_text()
    assert re.search(rf"@serve\.deployment[^\n]*\n(@[^\n]*\n)*class {k8s.SERVE_DEPLOYMENT}\b", app)


def test_every_config_map_holds_a_valid_rayft_config(
    built: dict[str, list[Doc]], tmp_path: Path
) -> None:
    """The YAML in every ConfigMap passes rayft's schema (`configs.load_config`) and the k8s
    checks for the workload that mounts it; the pods run the image the config asks for.

    Schema level only: `jobs.preflight.load_run_config` also opens the model and the datasets,
    which live in the image or on the shared volume, not in this checkout."""
    maps = 0
    for where, docs in _every_manifest_set(built, tmp_path).items():
        for doc in docs:
            if doc["kind"] == "ConfigMap":
                load_config(None, base=yaml.safe_load(doc["data"][k8s.CONFIG_KEY]))
                maps += 1
            spec = cluster_of(doc)
            if spec is None:
                continue
            config = _config_of(doc, docs)
            kind = "cluster" if doc["kind"] == "RayCluster" else _kind_of(doc)
            assert not k8s.check_config(config, kind), where
            for group, body in _groups(spec):
                image = body["template"]["spec"]["containers"][0]["image"]
                problems = k8s.gpu_image_problems(config, image)
                assert not problems, f"{where} {group}: {problems}"
    assert maps >= 8


def test_render_defaults_image_by_gpu_and_leaves_namespace_to_kubectl(tmp_path: Path) -> None:
    for text, image in ((CPU_CONFIG, "rayft:cpu"), (GPU_CONFIG, "rayft:gpu")):
        docs = _render(tmp_path, text, "job")
        assert image in yaml.safe_dump(docs)
        assert all("namespace" not in doc["metadata"] for doc in docs)


def _problems(tmp_path: Path, text: str, kind: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        _render(tmp_path, text, kind)
    return {problem.key: problem.message for problem in caught.value.problems}


def test_render_refuses_paths_pods_cannot_see_all_at_once(tmp_path: Path) -> None:
    text = """\
model_name_or_path: .cache/models/gemma-3-270m
adapter_name_or_path: /Users/me/adapter
dataset: identity
dataset_dir: ~/data
output_dir: out/run
export_dir: /tmp/merged
ray:
  storage_path: checkpoints
"""
    problems = _problems(tmp_path, text, "job")
    assert set(problems) == {
        "model_name_or_path",
        "adapter_name_or_path",
        "dataset_dir",
        "output_dir",
        "export_dir",
        "ray.storage_path",
    }
    assert "not in the image" in problems["model_name_or_path"]
    assert "shared volume" in problems["output_dir"]


def test_render_refuses_a_service_without_a_servable_model(tmp_path: Path) -> None:
    demo = (ROOT / "configs" / "examples" / "demo_gemma_lora_sft.yaml").read_text()
    assert "model_name_or_path" in _problems(tmp_path, demo, "service")
    bad = CPU_CONFIG.replace("template: qwen", "template: nope") + "temperature: 3.0\n"
    problems = _problems(tmp_path, bad, "service")
    assert "unknown template" in problems["template"]
    # Training would take these; serving would not.
    assert _render(tmp_path, CPU_CONFIG + "temperature: 3.0\n", "job")
    assert "temperature" in _problems(tmp_path, CPU_CONFIG + "temperature: 3.0\n", "service")


def test_render_needs_output_dir_and_sane_resources(tmp_path: Path) -> None:
    text = CPU_CONFIG.replace("output_dir: saves/qwen-alpaca\n", "").replace(
        "  num_workers: 2\n", "  num_workers: 2\n  resources_per_worker: {GPU: 1, TPU: 4}\n"
    )
    problems = _problems(tmp_path, text, "tune")
    # GPUs asked without use_gpu: the default image is the CPU one, refused too.
    assert set(problems) == {"output_dir", "ray.resources_per_worker", "ray.use_gpu", "--image"}
    assert "TPU" in problems["ray.resources_per_worker"]
    assert "resources_per_worker GPU=1" in problems["--image"]


def test_render_tune_needs_what_jobs_tune_checks(tmp_path: Path) -> None:
    """A sweep's RayJob fails at once without a `tune:` section: refused when rendering."""
    no_tune = CPU_CONFIG[: CPU_CONFIG.index("tune:")]
    assert set(_problems(tmp_path, no_tune, "tune")) == {"tune"}
    assert _render(tmp_path, no_tune, "job")  # training ignores it
    bad = CPU_CONFIG + "  metric: eval_loss\n"
    assert "is never reported" in _problems(tmp_path, bad, "tune")["tune.metric"]


@pytest.mark.parametrize("kind", ["job", "tune", "service"])
@pytest.mark.parametrize(
    "image",
    ["rayft:cpu", "registry.example.com/ml/rayft:2.60.0-cpu", "reg:5000/rayft:CPU@sha256:ab"],
)
def test_render_refuses_gpus_on_a_cpu_image(tmp_path: Path, kind: str, image: str) -> None:
    config = _config(tmp_path, GPU_CONFIG)
    with pytest.raises(ConfigError) as caught:
        k8s.render(config, kind=kind, image=image, config_text=GPU_CONFIG)
    (problem,) = caught.value.problems
    assert problem.key == "--image"
    assert f"`{image}` is a CPU image" in problem.message
    assert "ray.use_gpu: true" in problem.message and "--image rayft:gpu" in problem.message
    # A GPU tag, a `cpu` elsewhere than the tag, or a CPU run on a CPU image are fine.
    for ok in ("rayft:gpu", "registry/cpu-team/rayft:gpu", "rayft"):
        assert k8s.render(config, kind=kind, image=ok, config_text=GPU_CONFIG)
    assert _render(tmp_path, CPU_CONFIG, kind, image=image)


UNSET_STORAGE = CPU_CONFIG.replace("  storage_path: /home/ray/rayft/saves/qwen-alpaca/ray\n", "")


def _storage(storage: str | None) -> str:
    line = "" if storage is None else f"  storage_path: {storage}\n"
    return UNSET_STORAGE.replace("  num_workers: 2\n", f"  num_workers: 2\n{line}")


@pytest.mark.parametrize("kind", ["job", "tune"])
@pytest.mark.parametrize(
    "storage",
    [
        None,
        "/tmp/ray",
        "checkpoints",
        "saves/ray",
        "~/ray",
        "file:///tmp/ray",
        "local:///ray",
        "/home/ray/rayft/savesx",
    ],
)
def test_render_refuses_checkpoints_pods_do_not_share(
    tmp_path: Path, kind: str, storage: str | None
) -> None:
    text = _storage(storage)
    problems = _problems(tmp_path, text, kind)
    assert set(problems) == {"ray.storage_path"}
    message = problems["ray.storage_path"]
    assert ("is unset" if storage is None else "is node-local") in message
    assert "ray.num_workers=2 runs in 2 worker pod(s) plus the head" in message
    # The fix, ready to paste.
    assert "set `ray.storage_path: /home/ray/rayft/saves/qwen-alpaca/ray`" in message
    assert "s3://bucket/rayft" in message and "gs://" in message


@pytest.mark.parametrize(
    "storage",
    [
        "s3://bucket/rayft",
        "gs://bucket/rayft",
        "/home/ray/rayft/saves/ray",
        "file:///home/ray/rayft/saves/x/ray",
        "/home/ray/rayft/saves",
    ],
)
def test_render_accepts_shared_checkpoint_storage(tmp_path: Path, storage: str) -> None:
    text = _storage(storage)
    assert _render(tmp_path, text, "job")
    # A service keeps no checkpoints: unset is fine there.
    assert _render(tmp_path, UNSET_STORAGE, "service")


def test_render_refuses_bad_arguments(tmp_path: Path) -> None:
    config = _config(tmp_path, CPU_CONFIG)
    with pytest.raises(ValueError, match=r"unknown kind `train` \(known: job, service, tune\)"):
        k8s.render(config, kind="train", config_text=CPU_CONFIG)
    with pytest.raises(ValueError, match="DNS-1123"):
        k8s.render(config, kind="job", namespace="ML_Team", config_text=CPU_CONFIG)
    with pytest.raises(ValueError, match="image reference"):
        k8s.render(config, kind="job", image="rayft cpu", config_text=CPU_CONFIG)
    for text in ("- a list", "a: [unclosed"):
        with pytest.raises(ValueError, match="YAML mapping"):
            k8s.render(config, kind="job", config_text=text)


def test_dns_names_fit_kuberay() -> None:
    assert (
        k8s.dns_name("rayft", "serve", "Qwen2.5-7B_Instruct") == "rayft-serve-qwen2-5-7b-instruct"
    )
    assert len(k8s.dns_name("rayft", "train", "x" * 80)) == k8s.MAX_NAME
    with pytest.raises(ValueError):
        k8s.dns_name("42")


def test_ray_version_is_pyprojects() -> None:
    # tomllib is 3.11+ and the project supports 3.10: read the one quoted requirement.
    (line,) = re.findall(r'"(ray\[[^"]*)"', (ROOT / "pyproject.toml").read_text())
    assert Requirement(line).specifier.contains(k8s.RAY_VERSION)


# --- the command line -----------------------------------------------------------------------


def _args(config: Path, **kwargs: Any) -> Namespace:
    return Namespace(
        config=str(config),
        kind=kwargs.get("kind", "job"),
        image=kwargs.get("image"),
        namespace=kwargs.get("namespace"),
        output=kwargs.get("output"),
    )


def test_cli_prints_multi_document_yaml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(CPU_CONFIG)
    assert k8s.run(_args(path, namespace="ml")) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [doc["kind"] for doc in docs] == ["ConfigMap", "RayJob"]
    assert docs[0]["data"][k8s.CONFIG_KEY] == CPU_CONFIG


def test_cli_writes_ordered_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(CPU_CONFIG)
    out = tmp_path / "k8s"
    assert k8s.run(_args(path, kind="service", output=out)) == 0
    names = sorted(file.name for file in out.iterdir())
    assert names == [
        "00-configmap-rayft-serve-qwen2-5-0-5b-instruct-config.yaml",
        "01-rayservice-rayft-serve-qwen2-5-0-5b-instruct.yaml",
    ]
    assert capsys.readouterr().out.split() == [str(out / name) for name in names]


def test_cli_reports_problems_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    demo = ROOT / "configs" / "examples" / "demo_gemma_lora_sft.yaml"
    assert k8s.run(_args(demo, kind="service")) == 1
    err = capsys.readouterr().err
    assert "service manifests: 1 problem(s)" in err and "model_name_or_path" in err
    assert k8s.run(_args(tmp_path / "missing.yaml")) == 1
    assert "no config file" in capsys.readouterr().err
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text(GPU_CONFIG.replace("  storage_path: s3://bucket/rayft\n", ""))
    assert k8s.run(_args(gpu, image="reg/rayft:cpu")) == 1
    err = capsys.readouterr().err
    assert "`--image`: `reg/rayft:cpu` is a CPU image" in err
    assert "`ray.storage_path`: is unset" in err and "s3://bucket/rayft" in err


def test_add_parser_wires_one_subcommand(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="rayft")
    k8s.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "k8s",
            "render",
            "cfg.yaml",
            "--kind",
            "tune",
            "--image",
            "x:1",
            "--namespace",
            "ml",
            "--output",
            str(tmp_path),
        ]
    )
    assert (args.handler, args.kind, args.image, args.namespace, args.output) == (
        k8s.run,
        "tune",
        "x:1",
        "ml",
        tmp_path,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["k8s", "render", "cfg.yaml", "--kind", "train"])


# --- the checks can fail --------------------------------------------------------------------


def _broken(docs: list[Doc], edit: Any) -> list[str]:
    docs = copy.deepcopy(docs)
    edit(docs)
    return validate(docs, external={("PersistentVolumeClaim", k8s.PVC_NAME)})


def _worker(docs: list[Doc]) -> Doc:
    return docs[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _container(docs: list[Doc]) -> Doc:
    return _worker(docs)["template"]["spec"]["containers"][0]


BREAKAGES = {
    "wrong type": (lambda d: _worker(d).update(minReplicas="0"), "is not of type 'integer'"),
    "unknown field": (
        lambda d: d[1]["spec"]["rayClusterSpec"]["headGroupSpec"].update(rayStartParam={}),
        "Additional properties are not allowed ('rayStartParam'",
    ),
    "missing required": (lambda d: _worker(d).pop("groupName"), "'groupName' is a required"),
    "bad quantity": (
        lambda d: _container(d)["resources"]["limits"].update(memory="48 GB"),
        "does not match",
    ),
    "int32 overflow": (lambda d: _worker(d).update(maxReplicas=2**31), "is not a 'int32'"),
    "duplicate container": (
        lambda d: _worker(d)["template"]["spec"]["containers"].append(copy.deepcopy(_container(d))),
        "duplicate ['name']",
    ),
    "enum": (
        lambda d: d[1]["spec"]["rayClusterSpec"]["autoscalerOptions"].update(version="v3"),
        "'v3' is not one of",
    ),
    "bad name": (lambda d: d[1]["metadata"].update(name="9-train"), "DNS-1035"),
    "long name": (lambda d: d[1]["metadata"].update(name="t" * 48), "at most 47"),
    "bad metadata": (lambda d: d[1]["metadata"].update(name="Train_Job"), "does not match"),
    "configmap data": (lambda d: d[0]["data"].update(steps=3), "3 is not of type 'string'"),
    "submission mode": (
        lambda d: d[1]["spec"].update(submissionMode="Sidecar"),
        "submissionMode `Sidecar`",
    ),
    "restart policy": (
        lambda d: _worker(d)["template"]["spec"].update(restartPolicy="Always"),
        "restartPolicy must be Never",
    ),
    "ttl without shutdown": (
        lambda d: d[1]["spec"].update(shutdownAfterJobFinishes=False),
        "ttlSecondsAfterFinished needs shutdownAfterJobFinishes",
    ),
    "head takes work": (
        lambda d: d[1]["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update(
            {"num-cpus": "4"}
        ),
        'num-cpus must be "0"',
    ),
    "requests below limits": (
        lambda d: _container(d)["resources"]["requests"].update(cpu="1"),
        "requests must equal limits",
    ),
    "literal token": (
        lambda d: _container(d)["env"].__setitem__(0, {"name": "HF_TOKEN", "value": "hf_x"}),
        "HF_TOKEN looks secret",
    ),
    "secret in runtime env": (
        lambda d: d[1]["spec"].update(runtimeEnvYAML="env_vars: {OPENAI_API_KEY: sk-1}\n"),
        "runtimeEnvYAML holds",
    ),
    "no gpu toleration": (
        lambda d: _worker(d)["template"]["spec"].pop("tolerations"),
        "nvidia.com/gpu toleration",
    ),
    "disk /dev/shm": (
        lambda d: _worker(d)["template"]["spec"]["volumes"][1].update(emptyDir={}),
        "memory-backed",
    ),
    "shell in entrypoint": (
        lambda d: d[1]["spec"].update(
            entrypoint="cd /home/ray/rayft && python -m jobs.train "
            "/home/ray/rayft-config/rayft.yaml ray.address=auto"
        ),
        "holds shell operators",
    ),
    "entrypoint args": (
        lambda d: d[1]["spec"].update(entrypoint="python -m jobs.train cfg.yaml"),
        "must be env -C /home/ray/rayft python -m",
    ),
    "missing configmap": (lambda d: d.pop(0), "ConfigMap rayft-train-qwen7b-alpaca-2-config"),
    "no autoscaling": (
        lambda d: d[1]["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling=False),
        "enableInTreeAutoscaling must be true",
    ),
}


@needs_crds
def test_valid_job_has_no_errors(job: list[Doc]) -> None:
    assert _broken(job, lambda docs: None) == []


@needs_crds
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_validation_rejects(job: list[Doc], breakage: str) -> None:
    edit, message = BREAKAGES[breakage]
    errors = _broken(job, edit)
    assert any(message in error for error in errors), errors


@needs_crds
def test_validation_rejects_service_and_core_breakage(tmp_path: Path) -> None:
    docs = _render(tmp_path, CPU_CONFIG, "service")

    def bad_import(d: list[Doc]) -> None:
        config = yaml.safe_load(d[1]["spec"]["serveConfigV2"])
        config["applications"][0]["import_path"] = "serve.app:main"
        config["applications"][0]["args"]["temperature"] = "hot"
        d[1]["spec"]["serveConfigV2"] = yaml.safe_dump(config)
        d[1]["spec"]["upgradeStrategy"]["type"] = "BlueGreen"

    errors = "\n".join(_broken(docs, bad_import))
    assert "args are not ServeArgs" in errors
    for message in ("serve:build_app", "upgradeStrategy.type `BlueGreen`"):
        assert message in errors

    def open_or_unscaled(d: list[Doc]) -> None:
        config = yaml.safe_load(d[1]["spec"]["serveConfigV2"])
        config["applications"][0]["args"]["api_keys_env"] = None
        del config["applications"][0]["deployments"][0]["autoscaling_config"]
        d[1]["spec"]["serveConfigV2"] = yaml.safe_dump(config)

    errors = "\n".join(_broken(docs, open_or_unscaled))
    assert "the API would be open" in errors and "needs autoscaling_config" in errors

    def optional_keys(d: list[Doc]) -> None:
        cluster = d[1]["spec"]["rayClusterConfig"]
        for _, body in _groups(cluster):
            for var in body["template"]["spec"]["containers"][0]["env"]:
                if var["name"] == k8s.API_KEYS_ENV:
                    var["valueFrom"]["secretKeyRef"]["optional"] = True

    assert "must come from a required secretKeyRef" in "\n".join(_broken(docs, optional_keys))
    pvc = yaml.safe_load((KUBERAY / "base" / "storage.yaml").read_text())
    assert schema_errors(pvc) == []
    del pvc["spec"]["accessModes"]
    pvc["spec"]["resources"]["requests"]["storage"] = "lots"
    errors = "\n".join(schema_errors(pvc))
    assert "'accessModes' is a required property" in errors and "does not match" in errors


@needs_crds
def test_schema_conversion_handles_kubernetes_extensions() -> None:
    schema = {
        "type": "object",
        "properties": {
            "size": {"x-kubernetes-int-or-string": True, "pattern": "^[0-9]+Gi$"},
            "free": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"a": {"type": "string"}},
            },
            "pod": {
                "type": "object",
                "x-kubernetes-embedded-resource": True,
                "x-kubernetes-preserve-unknown-fields": True,
            },
            "maybe": {"type": "string", "nullable": True},
        },
    }
    check = KubeValidator(to_jsonschema(schema))
    assert check.is_valid(
        {
            "size": 4,
            "free": {"a": "x", "b": 1},
            "maybe": None,
            "pod": {"apiVersion": "v1", "kind": "Pod", "spec": {}},
        }
    )
    assert check.is_valid({"size": "4Gi"})
    assert not check.is_valid({"size": "4GB"})
    assert not check.is_valid({"size": 4.5})
    assert not check.is_valid({"pod": {"spec": {}}})  # embedded: apiVersion and kind required
    assert not check.is_valid({"other": 1})


def test_small_kustomize_refuses_what_it_does_not_do(tmp_path: Path) -> None:
    doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}}
    with pytest.raises(ValueError, match="test failed"):
        json6902(copy.deepcopy(doc), [{"op": "test", "path": "/data/a", "value": "2"}])
    with pytest.raises(ValueError, match="does not exist"):
        json6902(copy.deepcopy(doc), [{"op": "replace", "path": "/data/b", "value": "2"}])
    with pytest.raises(UnsupportedByRenderer, match="use JSON6902"):
        strategic_merge(copy.deepcopy(doc), {"data": {"a": ["x"]}})
    patched = copy.deepcopy(doc)
    strategic_merge(patched, {"data": {"a": None, "b": "2"}})
    assert patched["data"] == {"b": "2"}
    (tmp_path / "cm.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["cm.yaml"], "namePrefix": "x-"})
    )
    with pytest.raises(UnsupportedByRenderer, match="namePrefix"):
        kustomize(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {"resources": ["cm.yaml"], "patches": [{"target": {"kind": "Secret"}, "patch": "[]"}]}
        )
    )
    with pytest.raises(ValueError, match="no resource matches"):
        kustomize(tmp_path)
    assert _new_image("rayft:cpu", {"name": "rayft", "newName": "reg/rayft", "newTag": "gpu"}) == (
        "reg/rayft:gpu"
    )
    assert _new_image("other:cpu", {"name": "rayft", "newTag": "gpu"}) == "other:cpu"
