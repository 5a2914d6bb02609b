"""The segmenter's Mask2Former loss (services/scoring/mask_loss.py): the batched computation against
a plain one written image by image and pair by pair, ignored pixels, and what it rewards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from freemask.scoring.mask_loss import Mask2FormerWeights, grid_targets, mask2former_loss
from freemask.shared.errors import InvalidInput

WEIGHTS = Mask2FormerWeights()
CLASSES = 6  # ids 0..5; logits have one more, "no object"


def labels_of(seed: int, batch: int = 3, size: int = 16) -> torch.Tensor:
    """Label maps with rectangles of a few classes and an ignored band."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((batch, size, size), np.int64)
    for label in labels:
        for _ in range(int(rng.integers(1, 4))):
            top, left = rng.integers(0, size - 4, 2)
            label[top:top + int(rng.integers(3, 8)), left:left + int(rng.integers(3, 8))] = rng.integers(1, CLASSES)
        label[:, int(rng.integers(0, size))] = 255
    return torch.from_numpy(labels)


def plain_loss(mask_logits: list[torch.Tensor], class_logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The same loss, one layer, image and (query, target) pair at a time."""
    grid = tuple(mask_logits[0].shape[-2:])
    total = torch.zeros(())
    count = sum(len([c for c in torch.unique(label).tolist() if c != 255]) for label in labels)
    for masks, classes in zip(mask_logits, class_logits):
        class_terms, class_weights, mask_terms, dice_terms = [], [], [], []
        for image, label in enumerate(labels):
            ids = [c for c in torch.unique(label).tolist() if c != 255]
            valid_pixels = (label != 255).float()[None, None]
            valid = F.interpolate(valid_pixels, size=grid, mode="area").flatten()
            truths = [(F.interpolate(((label == c).float() * valid_pixels[0, 0])[None, None], size=grid,
                                     mode="area").flatten() / valid.clamp_min(1e-6)) for c in ids]
            logits = masks[image].flatten(1)
            probabilities = classes[image].softmax(-1)

            def bce(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return (F.binary_cross_entropy_with_logits(x, t, reduction="none") * valid).sum() / valid.sum()

            def dice(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                p = x.sigmoid() * valid
                return 1 - (2 * (p * t).sum() + 1) / (p.sum() + (t * valid).sum() + 1)

            cost = np.array([[float(WEIGHTS.mask_weight * bce(logits[q], t) + WEIGHTS.dice_weight * dice(logits[q], t)
                                    - WEIGHTS.class_weight * probabilities[q, c]) for t, c in zip(truths, ids)]
                             for q in range(logits.shape[0])])
            chosen = dict(zip(*linear_sum_assignment(cost)))
            for q in range(logits.shape[0]):
                wanted = ids[chosen[q]] if q in chosen else CLASSES
                class_terms.append(F.cross_entropy(classes[image, q][None], torch.tensor([wanted]), reduction="sum"))
                class_weights.append(1.0 if q in chosen else WEIGHTS.no_object_weight)
                if q in chosen:
                    mask_terms.append(bce(logits[q], truths[chosen[q]]))
                    dice_terms.append(dice(logits[q], truths[chosen[q]]))
        weights = torch.tensor(class_weights)
        total = total + (WEIGHTS.class_weight * (torch.stack(class_terms) * weights).sum() / weights.sum()
                         + WEIGHTS.mask_weight * torch.stack(mask_terms).sum() / count
                         + WEIGHTS.dice_weight * torch.stack(dice_terms).sum() / count)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_batched_loss_is_the_plain_one(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    labels = labels_of(seed)
    masks = [torch.randn(3, 8, 8, 8, generator=generator) * 3 for _ in range(3)]
    classes = [torch.randn(3, 8, CLASSES + 1, generator=generator) for _ in range(3)]
    batched = mask2former_loss(masks, classes, labels, WEIGHTS)
    assert float(batched) == pytest.approx(float(plain_loss(masks, classes, labels)), rel=1e-5)


def test_a_cell_whose_pixels_are_all_ignored_does_not_count() -> None:
    labels = labels_of(3)
    labels[:, :, :4] = 255  # the grid's first two columns, at a grid of 8 for 16 px
    masks = [torch.randn(3, 8, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)]
    classes = [torch.randn(3, 8, CLASSES + 1, generator=torch.Generator().manual_seed(1))]
    mask2former_loss(masks, classes, labels, WEIGHTS).backward()
    gradient = masks[0].grad
    assert gradient[..., :2].abs().max() == 0 and gradient[..., 2:].abs().max() > 0


def test_a_boundary_cell_gets_the_share_of_its_pixels_in_the_class() -> None:
    label = torch.zeros(1, 4, 4, dtype=torch.int64)
    label[0, :, :1] = 3  # the first pixel column: half of each left cell, at a grid of 2 for 4 px
    label[0, 0, 1] = 255  # and one pixel of the top-left cell ignored
    targets = grid_targets(label, (2, 2))
    assert targets.classes.tolist() == [[0, 3]]
    class_three = targets.masks[0, 1].view(2, 2)
    assert class_three[0, 0] == pytest.approx(2 / 3) and class_three[1, 0] == pytest.approx(0.5)
    assert class_three[:, 1].abs().max() == 0
    assert targets.valid[0].view(2, 2)[0, 0] == pytest.approx(0.75)


def test_the_right_masks_and_classes_cost_less_than_wrong_ones() -> None:
    labels = labels_of(4, batch=2, size=8)  # the grid is the label's size: targets are exact
    targets = grid_targets(labels, (8, 8))
    right_masks = torch.full((2, 8, 8, 8), -8.0)
    right_classes = torch.full((2, 8, CLASSES + 1), -8.0)
    right_classes[..., CLASSES] = 8.0
    for image, count in enumerate(targets.counts):
        for t in range(count):
            right_masks[image, t] = (targets.masks[image, t].view(8, 8) * 16 - 8)
            right_classes[image, t, targets.classes[image, t]] = 8.0
            right_classes[image, t, CLASSES] = -8.0
    right = mask2former_loss([right_masks], [right_classes], labels, WEIGHTS)
    wrong = mask2former_loss([right_masks.flip(-1)], [right_classes.roll(1, dims=-1)], labels, WEIGHTS)
    assert float(right) < 0.1 * float(wrong)


def test_a_label_map_with_nothing_labelled_is_refused() -> None:
    labels = torch.full((1, 8, 8), 255, dtype=torch.int64)
    with pytest.raises(InvalidInput, match="no labelled pixel"):
        mask2former_loss([torch.zeros(1, 4, 4, 4)], [torch.zeros(1, 4, CLASSES + 1)], labels, WEIGHTS)
