"""S(x) and mIoU against hand-made label maps: ignore pixels, absent classes, accumulation."""

from __future__ import annotations

import numpy as np
import pytest

from freemask.scoring.iou import ConfusionAccumulator, class_ious, confusion, sample_score
from freemask.shared.errors import InvalidInput

# 4x4 maps. Reference: class 1 in the top-left 2x2, class 2 in the bottom row, 255 at (1, 3).
REFERENCE = np.array([[1, 1, 0, 0],
                      [1, 1, 0, 255],
                      [0, 0, 0, 0],
                      [2, 2, 2, 2]], np.uint8)
PREDICTION = np.array([[1, 1, 1, 0],
                       [1, 0, 0, 1],  # (1, 3) is ignored: predicting 1 there costs nothing
                       [0, 0, 0, 0],
                       [2, 2, 0, 0]], np.uint8)


def test_the_confusion_matrix_counts_reference_rows_and_predicted_columns() -> None:
    matrix = confusion(REFERENCE, PREDICTION, num_classes=4)
    assert matrix.sum() == 15  # 16 pixels, one ignored
    assert matrix[1, 1] == 3 and matrix[1, 0] == 1  # class 1: three kept, one lost to background
    assert matrix[0, 1] == 1  # background (0, 2) predicted as 1
    assert matrix[2, 2] == 2 and matrix[2, 0] == 2
    assert matrix[3].sum() == 0 and matrix[:, 3].sum() == 0


def test_sample_score_is_the_mean_over_classes_present_in_either_map() -> None:
    result = sample_score(REFERENCE, PREDICTION, num_classes=4)
    # background: reference 7 px, predicted 9 px (ignored pixel excluded), 6 in both -> 6 / 10
    # class 1: reference 4, predicted 4 (one on background), 3 in both -> 3 / 5
    # class 2: reference 4, predicted 2, 2 in both -> 2 / 4
    assert result.class_iou == pytest.approx({0: 0.6, 1: 0.6, 2: 0.5})
    assert result.score == pytest.approx((0.6 + 0.6 + 0.5) / 3)
    assert 3 not in result.class_iou  # absent from both maps: not averaged in as 0 or 1


def test_a_class_only_the_prediction_has_counts_as_zero() -> None:
    reference = np.zeros((2, 2), np.uint8)
    prediction = np.array([[0, 0], [0, 5]], np.uint8)
    result = sample_score(reference, prediction, num_classes=6)
    assert result.class_iou == pytest.approx({0: 3 / 4, 5: 0.0})
    assert result.score == pytest.approx(3 / 8)


def test_identical_maps_score_one_and_all_ignored_maps_agree_trivially() -> None:
    assert sample_score(REFERENCE, np.where(REFERENCE == 255, 0, REFERENCE), 4).score == 1.0
    everything_ignored = np.full((3, 3), 255, np.uint8)
    assert sample_score(everything_ignored, np.zeros((3, 3), np.uint8), 4).score == 1.0


def test_dataset_miou_accumulates_pixels_before_dividing() -> None:
    accumulator = ConfusionAccumulator(num_classes=2)
    big = np.zeros((10, 10), np.uint8)
    big[:5] = 1  # 50 px of class 1, predicted perfectly
    small_truth = np.zeros((10, 10), np.uint8)
    small_truth[0, 0] = 1  # 1 px of class 1, missed
    accumulator.add(big, big.copy())
    accumulator.add(small_truth, np.zeros((10, 10), np.uint8))
    mean, ious = accumulator.result()
    # class 1 over both images: inter 50, union 51 — not the mean of per-image 1.0 and 0.0
    assert ious[1] == pytest.approx(50 / 51)
    assert ious[0] == pytest.approx(149 / 150)
    assert mean == pytest.approx((50 / 51 + 149 / 150) / 2)
    assert accumulator.images == 2


def test_class_ious_leave_out_classes_with_an_empty_union() -> None:
    matrix = np.zeros((3, 3), np.int64)
    matrix[0, 0] = 4
    assert class_ious(matrix) == {0: 1.0}


@pytest.mark.parametrize("prediction, fragment", [
    (np.zeros((3, 4), np.uint8), "differ in shape"),
    (np.full((4, 4), 9, np.uint8), "prediction label map holds class id 9"),
])
def test_bad_maps_are_refused(prediction: np.ndarray, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        confusion(REFERENCE, prediction, num_classes=4)


def test_an_unknown_reference_class_is_refused_not_dropped() -> None:
    reference = REFERENCE.copy()
    reference[0, 0] = 7
    with pytest.raises(InvalidInput, match="reference label map holds class id 7"):
        sample_score(reference, PREDICTION, num_classes=4)
