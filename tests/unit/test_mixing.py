"""mix_strategy: the order in which several datasets' rows are interleaved."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.mixing import interleave_sources


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        # Strict alternation; stop when the 3-row dataset runs out ...
        ("interleave_under", [0, 1, 0, 1, 0, 1]),
        # ... or restart it until the 4-row one has been read once ...
        ("interleave_over", [0, 1, 0, 1, 0, 1, 0, 1]),
        # ... or keep going with the rest, without repeats.
        ("interleave_once", [0, 1, 0, 1, 0, 1, 1]),
    ],
)
def test_strict_alternation(strategy: str, expected: list[int]) -> None:
    assert interleave_sources([3, 4], strategy, None, seed=42).tolist() == expected


def test_probabilities_draw_the_next_dataset_with_the_seed() -> None:
    first = interleave_sources([200, 200], "interleave_under", [0.8, 0.2], seed=7)
    again = interleave_sources([200, 200], "interleave_under", [0.8, 0.2], seed=7)
    other = interleave_sources([200, 200], "interleave_under", [0.8, 0.2], seed=8)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    # Undersampling stops when the favoured dataset is used up: about a quarter as many of the
    # other one were drawn by then.
    counts = np.bincount(first, minlength=2)
    assert counts[0] == 200 and 30 < counts[1] < 80


def test_oversampling_repeats_the_small_dataset_until_the_large_one_is_read() -> None:
    sources = interleave_sources([2, 10], "interleave_over", [0.5, 0.5], seed=0)
    counts = np.bincount(sources, minlength=2)
    assert counts[1] >= 10 and counts[0] > 2


def test_an_empty_dataset_cannot_be_interleaved() -> None:
    with pytest.raises(ValueError, match="have no rows"):
        interleave_sources([3, 0], "interleave_under", None, seed=0)
