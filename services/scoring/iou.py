"""IoU arithmetic of the scoring service: S(x) for one sample and mIoU over a dataset.

Both come from a confusion matrix over class ids (rows: the reference map, columns: the
prediction), counted only where the reference is not the ignore label 255. A class
"takes part" when its union is non-empty, i.e. it is present in either map:

- `sample_score`: S(x) = mean IoU over the classes present in either of the two maps of
  one sample (the segmenter's f(x) and the pipeline's y_pseudo);
- `ConfusionAccumulator.result`: the dataset's mIoU, each class's IoU accumulated over all
  images first (the standard segmentation metric, not a mean of per-image means).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from freemask.shared.errors import InvalidInput
from freemask.world.names import IGNORE_ID


def confusion(reference: np.ndarray, prediction: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts of (reference id, predicted id) over the reference's non-ignored pixels.

    A reference id other than 255 that is not below `num_classes` is an error: it would
    otherwise vanish from the score silently.
    """
    if reference.shape != prediction.shape:
        raise InvalidInput(f"label maps differ in shape: {reference.shape} vs {prediction.shape}")
    valid = reference != IGNORE_ID
    truth = reference[valid].astype(np.int64)
    predicted = prediction[valid].astype(np.int64)
    for name, ids in (("reference", truth), ("prediction", predicted)):
        if ids.size and int(ids.max()) >= num_classes:
            raise InvalidInput(f"{name} label map holds class id {int(ids.max())}; the model knows "
                               f"ids 0..{num_classes - 1} (and 255 = ignore)")
    return np.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def class_ious(matrix: np.ndarray) -> dict[int, float]:
    """IoU per class id whose union is non-empty (present in the reference or the prediction)."""
    intersection = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - intersection
    return {int(c): float(intersection[c] / union[c]) for c in np.flatnonzero(union)}


def mean_of(ious: dict[int, float]) -> float:
    """Mean of the per-class IoUs; two maps with no non-ignored pixel agree trivially (1.0)."""
    return float(np.mean(list(ious.values()))) if ious else 1.0


@dataclass(frozen=True)
class SampleScore:
    score: float  # S(x) in [0, 1]
    class_iou: dict[int, float]  # class id -> IoU, over the classes present in either map


def sample_score(pseudo_label: np.ndarray, prediction: np.ndarray, num_classes: int) -> SampleScore:
    """S(x) = mean IoU between the segmenter's prediction and the generated label y_pseudo."""
    ious = class_ious(confusion(pseudo_label, prediction, num_classes))
    return SampleScore(score=mean_of(ious), class_iou=ious)


class ConfusionAccumulator:
    """Sums confusion matrices image by image, for a dataset's mIoU and per-class IoU."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), np.int64)
        self.images = 0

    def add(self, reference: np.ndarray, prediction: np.ndarray) -> None:
        self.matrix += confusion(reference, prediction, self.num_classes)
        self.images += 1

    def result(self) -> tuple[float, dict[int, float]]:
        ious = class_ious(self.matrix)
        return mean_of(ious), ious
