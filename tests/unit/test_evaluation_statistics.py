"""The evaluation benchmark's error bar on its headline ratio (bench_evaluation.ratio_standard_error)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_evaluation import ratio_standard_error  # noqa: E402


def test_the_error_of_a_ratio_of_means_takes_each_side_s_spread_by_the_delta_method() -> None:
    # numerator mean 2, variance 2 over 2 trainings; denominator exact: sqrt(2 / 2) / 2
    assert ratio_standard_error([1.0, 3.0], [2.0, 2.0]) == pytest.approx(0.5)
    # denominator mean 2, variance 2, ratio 1: sqrt(1 * 2 / 2) / 2
    assert ratio_standard_error([2.0, 2.0], [1.0, 3.0]) == pytest.approx(0.5)
    # both spread (variances 16/3 and 4/3 over 4 trainings), ratio 2: sqrt(16/3 / 4 + 2² · 4/3 / 4) / 2 = sqrt(8/3) / 2
    assert ratio_standard_error([2.0, 6.0, 2.0, 6.0], [1.0, 3.0, 1.0, 3.0]) == pytest.approx((8 / 3) ** 0.5 / 2)


def test_no_error_bar_without_two_trainings_on_each_side_or_with_a_zero_denominator() -> None:
    assert ratio_standard_error([0.2], [0.2, 0.3]) is None
    assert ratio_standard_error([0.2, 0.3], [0.2]) is None
    assert ratio_standard_error([0.2, 0.3], [0.0, 0.0]) is None
