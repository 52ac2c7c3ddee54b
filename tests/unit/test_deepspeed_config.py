"""A DeepSpeed JSON is refused before any cluster time when DeepSpeed would fail on it or quietly
ignore part of it: no file, bad JSON, a scheduler section, and ZeRO options its stage cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from configs import ConfigError
from jobs.preflight import load_run_config
from jobs.strategies import StrategyError, load_deepspeed_config, zero_problems

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))


def _zero(stage: int, **options: object) -> dict:
    return {"zero_optimization": {"stage": stage, **options}}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda path: path.name)
def test_shipped_presets_have_no_problems(preset: Path) -> None:
    assert load_deepspeed_config(str(preset.relative_to(ROOT)))
    assert zero_problems(json.loads(preset.read_text())) == []


@pytest.mark.parametrize(
    ("ds_config", "expected"),
    [
        (
            _zero(2, offload_param={"device": "cpu"}),
            "offload_param needs ZeRO stage 3 (stage is 2)",
        ),
        (_zero(0, offload_optimizer={"device": "cpu"}), "offload_optimizer needs ZeRO stage 1, 2"),
        (_zero(3, offload_param={"device": "nvme"}), 'device "nvme" needs "nvme_path"'),
        (_zero(5), "zero_optimization.stage: Input should be 0, 1, 2, 3"),
        (
            _zero(2, offload_optimizer={"device": "gpu"}),
            "zero_optimization.offload_optimizer.device",
        ),
        (_zero(2, reduce_bucket_sise=5), "zero_optimization.reduce_bucket_sise: Extra inputs"),
        (
            {"fp16": {"enabled": True}, "bf16": {"enabled": True}, **_zero(2)},
            "fp16.enabled and bf16.enabled are both true",
        ),
    ],
)
def test_zero_option_problems(ds_config: dict, expected: str) -> None:
    problems = zero_problems(ds_config)
    assert len(problems) == 1 and expected in problems[0], problems


def test_offload_is_fine_where_deepspeed_uses_it() -> None:
    assert zero_problems(_zero(1, offload_optimizer={"device": "cpu"})) == []
    assert zero_problems(_zero(3, offload_param={"device": "nvme", "nvme_path": "/nvme"})) == []
    assert zero_problems(_zero(2, offload_param={"device": "none"})) == []
    assert zero_problems(_zero(3, reduce_bucket_size="auto")) == []  # filled later from the model


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(StrategyError, match="no file at 'missing.json'"):
        load_deepspeed_config("missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(StrategyError, match="broken.json is not valid JSON"):
        load_deepspeed_config(str(broken))
    scheduled = tmp_path / "scheduled.json"
    scheduled.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(StrategyError, match="`scheduler` section"):
        load_deepspeed_config(str(scheduled))


def test_preflight_names_the_key(tiny_model_dir: Path, tmp_path: Path) -> None:
    ds_file = tmp_path / "z2_offload.json"
    ds_file.write_text(json.dumps(_zero(2, offload_param={"device": "cpu"})))
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_model_dir),
                "template": "qwen",
                "dataset": "alpaca_en_demo",
                "dataset_dir": str(ROOT / "data"),
                "output_dir": str(tmp_path / "out"),
                "deepspeed": str(ds_file),
            }
        )
    )
    with pytest.raises(ConfigError) as caught:
        load_run_config(config)
    message = str(caught.value)
    assert "ray.deepspeed_config" in message and "needs ZeRO stage 3" in message, message
