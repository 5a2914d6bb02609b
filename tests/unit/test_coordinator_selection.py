"""The α cut of Algorithm 1 on hand-made scores."""

from __future__ import annotations

import random

import pytest

from freemask.coordinator.selection import retained, score_threshold
from freemask.shared.errors import InvalidInput

TEN = {f"s-{i}": i / 10 for i in range(10)}  # 0.0 .. 0.9


def test_the_top_seventy_percent_of_ten_distinct_scores_are_kept() -> None:
    cut, kept = retained(TEN, 0.7)
    assert cut == pytest.approx(0.3)
    assert kept == [f"s-{i}" for i in range(9, 2, -1)]


def test_the_cut_rounds_the_kept_count_up() -> None:
    scores = {"a": 0.9, "b": 0.5, "c": 0.1}
    assert retained(scores, 0.7) == (0.1, ["a", "b", "c"])  # ceil(2.1) = 3
    assert retained(scores, 0.5) == (0.5, ["a", "b"])  # ceil(1.5) = 2
    assert retained(scores, 0.3) == (0.9, ["a"])


def test_ties_at_the_cut_are_kept_together() -> None:
    scores = {"a": 0.8, "b": 0.5, "c": 0.5, "d": 0.5, "e": 0.1}
    cut, kept = retained(scores, 0.4)  # ceil(2.0) = 2: the 2nd best is 0.5, shared by three
    assert cut == 0.5 and kept == ["a", "b", "c", "d"]


def test_arrival_order_does_not_change_the_result() -> None:
    items = list(TEN.items())
    random.Random(3).shuffle(items)
    assert retained(dict(items), 0.7) == retained(TEN, 0.7)


def test_alpha_one_keeps_everything_and_no_scores_keep_nothing() -> None:
    assert retained(TEN, 1.0) == (0.0, sorted(TEN, key=lambda k: -TEN[k]))
    assert score_threshold({}, 0.7) == 0.0 and retained({}, 0.7) == (0.0, [])


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_alpha_outside_zero_one_is_refused(alpha: float) -> None:
    with pytest.raises(InvalidInput, match="alpha must be in"):
        score_threshold(TEN, alpha)
