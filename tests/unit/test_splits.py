"""`val_size` holds rows out by content: deterministic, seed-dependent, about the asked share."""

from __future__ import annotations

import pytest

from configs import RayftConfig
from data_pipelines.splits import held_out_share, row_key


def test_row_keys_are_stable_and_seeded() -> None:
    assert row_key([1, 2, 3], 42) == row_key([1, 2, 3], 42)
    assert row_key([1, 2, 3], 42) != row_key([1, 2, 3], 7)
    assert 0.0 <= row_key([5], 0) < 1.0


def test_held_out_share_is_about_right() -> None:
    keys = [row_key([i, i + 1], 42) for i in range(5000)]
    share = sum(key < 0.1 for key in keys) / len(keys)
    assert 0.085 < share < 0.115


def test_integer_val_size_is_a_count_of_rows() -> None:
    assert held_out_share(0.2, 100) == 0.2
    assert held_out_share(25, 100) == 0.25
    with pytest.raises(ValueError, match="holds out every one"):
        held_out_share(100, 100)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"val_size": 0.1}, "eval_strategy is no"),
        ({"eval_strategy": "steps"}, "needs evaluation data"),
        ({"val_size": 0.1, "eval_dataset": "x", "eval_strategy": "steps"}, "both set"),
    ],
)
def test_evaluation_settings_must_agree(keys: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RayftConfig(model_name_or_path="m", **keys)
