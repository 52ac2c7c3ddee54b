"""Config validation: every problem at once, with key names and fixes, before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from configs import ConfigError, load_config
from jobs.preflight import load_run_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "configs" / "examples").glob("*.yaml"))


def _write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _valid(model_dir: Path, tmp_path: Path) -> dict:
    return {
        "model_name_or_path": str(model_dir),
        "template": "qwen",
        "dataset": "alpaca_en_demo",
        "dataset_dir": str(ROOT / "data"),
        "output_dir": str(tmp_path / "out"),
    }


def test_valid_config_loads_and_is_frozen(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = load_run_config(_write(tmp_path, _valid(tiny_model_dir, tmp_path)))
    assert config.lora_rank == 8 and config.effective_lora_alpha == 16
    with pytest.raises(ValidationError, match="frozen"):
        config.lora_rank = 4  # type: ignore[misc]


def test_three_mistakes_are_reported_together_without_starting_ray(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    values = _valid(tiny_model_dir, tmp_path)
    values |= {"lora_rnk": 16, "learning_rate": "fast", "mix_strategy": "zip"}
    path = _write(tmp_path, values)
    code = (
        "import sys\nfrom cluster.cli import main\n"
        f"status = main(['validate', {str(path)!r}])\n"
        "assert 'ray' not in sys.modules, 'validate imported ray'\n"
        "sys.exit(status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1, done.stderr
    assert "3 problem(s)" in done.stderr
    assert "`lora_rnk`: unknown key; did you mean `lora_rank`?" in done.stderr
    assert "`learning_rate`" in done.stderr
    assert "`mix_strategy`" in done.stderr and "interleave_under" in done.stderr


def test_unknown_section_key_suggests_the_right_one(tmp_path: Path, tiny_model_dir: Path) -> None:
    values = _valid(tiny_model_dir, tmp_path) | {"ray": {"num_wrkers": 2}}
    with pytest.raises(
        ConfigError, match=r"`ray.num_wrkers`: unknown key; did you mean `ray.num_workers`"
    ):
        load_config(_write(tmp_path, values))


def test_overrides_win_and_llamafactory_alias_maps_into_ray(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    path = _write(tmp_path, _valid(tiny_model_dir, tmp_path))
    config = load_config(path, ["learning_rate=1e-3", "ray_num_workers=2", "ray.max_failures=1"])
    assert config.learning_rate == 1e-3
    assert config.ray.num_workers == 2 and config.ray.max_failures == 1


def test_missing_dataset_file_names_the_path(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    values = _valid(tiny_model_dir, tmp_path) | {"dataset": "mine", "dataset_dir": str(data)}
    with pytest.raises(ConfigError, match=r"file not found: .*data/mine\.json"):
        load_run_config(_write(tmp_path, values))


def test_unknown_dataset_lists_close_names(tmp_path: Path, tiny_model_dir: Path) -> None:
    values = _valid(tiny_model_dir, tmp_path) | {"dataset": "alpaca_en_dmo"}
    with pytest.raises(ConfigError, match="close names: alpaca_en_demo"):
        load_run_config(_write(tmp_path, values))


def test_missing_model_dir_and_unknown_template_are_both_reported(tmp_path: Path) -> None:
    values = _valid(tmp_path / "nope", tmp_path) | {"template": "gemmma"}
    with pytest.raises(ConfigError) as caught:
        load_run_config(_write(tmp_path, values))
    keys = {problem.key for problem in caught.value.problems}
    assert keys == {"model_name_or_path", "template"}


def test_script_dataset_entries_say_they_are_not_supported_yet(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"script": {"script_url": "my_script"}}))
    values = _valid(tiny_model_dir, tmp_path) | {"dataset": "script", "dataset_dir": str(data)}
    with pytest.raises(ConfigError, match="`script_url` sources are not supported yet"):
        load_run_config(_write(tmp_path, values))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_is_valid(path: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    # The examples name the demo datasets shipped in data/ (their row kinds must fit the stage).
    load_run_config(path, [f"model_name_or_path={tiny_model_dir}", f"dataset_dir={ROOT / 'data'}"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"neat_packing": True, "stage": "dpo"}, "neat_packing applies to stage sft only"),
        ({"neat_packing": True, "packing": False}, "remove packing: false"),
        ({"packing": True, "stage": "kto"}, "packing applies to stages pt and sft"),
        ({"interleave_probs": "0.5,0.5"}, "mix_strategy is concat"),
        (
            {"mix_strategy": "interleave_under", "interleave_probs": "1.0"},
            "interleave_probs has 1 values but dataset names 2",
        ),
        (
            {"mix_strategy": "interleave_over", "interleave_probs": "0.9,0.3"},
            "must be non-negative and sum to 1",
        ),
        (
            {"mix_strategy": "interleave_over", "interleave_probs": "half,half"},
            "is not a comma list of numbers",
        ),
    ],
)
def test_packing_and_mixing_mistakes_name_the_key(
    extra: dict, message: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    values = _valid(tiny_model_dir, tmp_path) | {"dataset": "alpaca_en_demo,identity"} | extra
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, values))


def test_neat_packing_implies_packing_with_lf_block_size(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from data_pipelines.pipeline import block_size, packing_enabled

    values = _valid(tiny_model_dir, tmp_path) | {"neat_packing": True, "cutoff_len": 64}
    config = load_config(_write(tmp_path, values))
    assert packing_enabled(config) and block_size(config) == 63
