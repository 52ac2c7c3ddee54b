"""The cluster launcher YAMLs in `cluster/launcher/` are valid for the installed Ray.

Each file is checked against the JSON schema that ships inside the `ray` package
(`ray/autoscaler/ray-schema.json`, what `ray up` validates with), and once more after Ray fills in
its provider defaults (`prepare_config` + `validate_config`, as `ray up` does before launching).
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

LAUNCHER = Path(__file__).resolve().parents[2] / "cluster" / "launcher"
FILES = sorted(LAUNCHER.glob("*.yaml"))


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_local_aws_and_gcp_are_shipped() -> None:
    assert {path.stem for path in FILES} >= {"local", "aws", "gcp"}


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.name)
def test_launcher_yaml_matches_rays_schema(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, _schema())
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in starts  # the clusters rayft submits to use token auth


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_cloud_examples_offer_gpu_worker_types(name: str) -> None:
    config = yaml.safe_load((LAUNCHER / f"{name}.yaml").read_text())
    gpu_types = {
        node: spec
        for node, spec in config["available_node_types"].items()
        if spec["resources"].get("GPU", 0) > 0
    }
    assert len(gpu_types) >= 2  # a one-GPU and a multi-GPU shape
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert all(spec.get("min_workers", 0) == 0 for spec in gpu_types.values())  # scale from zero


def test_a_broken_launcher_yaml_is_caught() -> None:
    config = yaml.safe_load((LAUNCHER / "aws.yaml").read_text())
    config["available_node_types"]["gpu_1x_a10g"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _schema())
