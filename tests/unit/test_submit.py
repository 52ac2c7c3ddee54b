"""`rayft submit` without a cluster: what is uploaded, how the config is shipped, the token."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster import cli
from cluster.submit import (
    MAX_UPLOAD_BYTES,
    SHIPPED_CONFIG,
    SubmitError,
    plan_upload,
    read_auth_token,
    ship_config,
    stage_upload,
)
from configs import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def _project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    for relative, size in {
        "jobs/train.py": 10,
        "jobs/__pycache__/train.cpython-311.pyc": 10,
        "data/small.json": 100,
        "data/huge.json": 3000,
        ".git/HEAD": 5,
        ".venv/bin/python": 5,
        "vllm-env/pyvenv.cfg": 5,  # a virtual environment under another name
        "vllm-env/lib/vllm.so": 20,
        "saves/run/adapter.safetensors": 50,
        "outs/model.bin": 20,
        "pkg.egg-info/PKG-INFO": 5,
    }.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    return root


def test_plan_upload_leaves_out_vcs_envs_outputs_and_large_files(tmp_path: Path) -> None:
    root = _project(tmp_path)
    plan = plan_upload(root, exclude=[root / "outs"], max_file_bytes=1000)
    assert [path for path, _ in plan.files] == ["data/small.json", "jobs/train.py"]
    assert plan.total_bytes == 110
    skipped = dict(plan.skipped)
    assert {
        ".git/",
        ".venv/",
        "vllm-env/",
        "saves/",
        "outs/",
        "pkg.egg-info/",
        "data/huge.json",
    } <= set(skipped)
    assert "MiB" in skipped["data/huge.json"]
    assert "jobs/__pycache__/" not in skipped  # caches are left out silently
    summary = plan.summary()
    assert "uploading 2 files" in summary and "data/huge.json" in summary
    staged = stage_upload(plan, tmp_path / "stage")
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == [
        "data/small.json",
        "jobs/train.py",
    ]


def test_the_real_project_stays_far_under_the_upload_limit() -> None:
    plan = plan_upload(ROOT)
    assert plan.total_bytes < MAX_UPLOAD_BYTES / 2
    uploaded = {path for path, _ in plan.files}
    assert "jobs/train.py" in uploaded and "data/dataset_info.json" in uploaded
    assert not any(p.startswith((".git/", ".venv/", "saves/", "tests/")) for p in uploaded)


def test_shipped_config_paths_and_address(tmp_path: Path) -> None:
    root = _project(tmp_path)
    elsewhere = tmp_path / "models" / "base"
    elsewhere.mkdir(parents=True)
    config = load_config(
        None,
        [
            f"model_name_or_path={elsewhere}",
            "dataset_dir=data",
            "output_dir=saves/run",
            "ray.storage_path=s3://bucket/ckpt",
            "ray.address=ray://head:10001",
            "ray.runtime_env={env_vars: {HF_HOME: /cache}}",
        ],
    )
    shipped, warnings = ship_config(config, root=root, cwd=root, uploaded=["data/small.json"])
    assert shipped["ray"]["address"] == "auto"  # the job joins the cluster it runs on
    assert shipped["dataset_dir"] == "data"  # relative to the upload's root (= config's folder)
    assert shipped["model_name_or_path"] == str(elsewhere)
    assert shipped["ray"]["storage_path"] == "s3://bucket/ckpt"
    assert shipped["output_dir"] == "saves/run"
    text = "\n".join(warnings)
    assert "model_name_or_path" in text and "shared storage" in text
    assert "output_dir" in text and "temporary working directory" in text
    # Run from a sub-folder: relative paths are read from there, shipped root-relative.
    (root / "jobs" / "data").mkdir()
    shipped, _ = ship_config(config, root=root, cwd=root / "jobs", uploaded=[])
    assert shipped["dataset_dir"] == "jobs/data"
    # The shipped mapping loads back as the same config.
    again = load_config(None, base=shipped)
    moved = {"ray", "dataset_dir", "model_name_or_path", "output_dir"}
    assert again.model_dump(exclude=moved) == config.model_dump(exclude=moved)
    assert again.output_dir == "jobs/saves/run"


def test_hub_ids_are_kept(tmp_path: Path) -> None:
    config = load_config(None, ["model_name_or_path=Qwen/Qwen2.5-0.5B-Instruct"])
    shipped, warnings = ship_config(config, root=tmp_path, cwd=tmp_path)
    assert shipped["model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert not any("model_name_or_path" in w for w in warnings)


def test_auth_token_lookup_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert read_auth_token({}, home=home) is None
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert read_auth_token({}, home=home) == "from-home"
    file = tmp_path / "token"
    file.write_text("from-file")
    assert read_auth_token({"RAY_AUTH_TOKEN_PATH": str(file)}, home=home) == "from-file"
    assert (
        read_auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(file)}, home=home)
        == "from-env"
    )
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN_PATH"):
        read_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=home)


def test_runtime_env_and_placement_keys_are_validated() -> None:
    config = load_config(None, ["model_name_or_path=m", "placement_strategy=SPREAD"])
    assert config.ray.placement_strategy == "SPREAD"  # LLaMA-Factory's top-level key
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            [
                "model_name_or_path=m",
                "ray.placement_strategy=EVERYWHERE",
                "ray.runtime_env={working_dir: .}",
            ],
        )
    text = str(err.value)
    assert "ray.placement_strategy" in text and "ray.runtime_env" in text
    assert "working_dir is set by `rayft submit`" in text
    with pytest.raises(ConfigError, match="unknown runtime_env key"):
        load_config(None, ["model_name_or_path=m", "ray.runtime_env={pipp: [emoji]}"])
    with pytest.raises(ConfigError, match="env_vars must map names to strings"):
        load_config(None, ["model_name_or_path=m", "ray.runtime_env={env_vars: {A: 1}}"])


def test_cli_dry_run_takes_options_and_overrides_in_any_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": "Qwen/Qwen2.5-0.5B", "dataset": "x"}))
    code = cli.main(
        [
            "submit",
            str(config),
            "--dry-run",
            "max_steps=3",
            "--skip-local-checks",
            "--address",
            "http://127.0.0.1:1",
            "ray.num_workers=2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"python -m jobs.train {SHIPPED_CONFIG}" in out
    shipped = yaml.safe_load(out.split("with:\n", 1)[1])
    assert shipped["max_steps"] == 3 and shipped["ray"]["num_workers"] == 2


def test_cli_reports_config_problems_before_uploading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": "m", "lora_rnak": 8}))
    assert cli.main(["submit", str(config), "--skip-local-checks"]) == 1
    captured = capsys.readouterr()
    assert "lora_rank" in captured.err and "uploading" not in captured.out


def test_llamafactory_ray_init_kwargs_runtime_env_maps_to_ray_runtime_env() -> None:
    config = load_config(
        None,
        ["model_name_or_path=m", "ray_init_kwargs={runtime_env: {env_vars: {A: b}, pip: [emoji]}}"],
    )
    assert config.ray.runtime_env == {"env_vars": {"A": "b"}, "pip": ["emoji"]}
    with pytest.raises(ConfigError, match="ray_init_kwargs"):
        load_config(None, ["model_name_or_path=m", "ray_init_kwargs={num_cpus: 4}"])


def test_cli_submits_a_sweep_with_tune_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "Qwen/Qwen2.5-0.5B",
                "dataset": "x",
                "tune": {"search_space": {"lora_rank": {"choice": [8, 16]}}},
            }
        )
    )
    assert cli.main(["submit", str(config), "--tune", "--dry-run", "--skip-local-checks"]) == 0
    assert f"python -m jobs.tune {SHIPPED_CONFIG}" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "m",
                "dataset": "x",
                "tune": {"search_space": {"lora_rnk": {"choice": [8]}}},
            }
        )
    )
    assert cli.main(["submit", str(bad), "--tune", "--dry-run", "--skip-local-checks"]) == 1
    assert "did you mean `lora_rank`" in capsys.readouterr().err
