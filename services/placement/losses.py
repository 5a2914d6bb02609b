"""FOPA's training losses (Free-Mask eq. 4–7), on plain tensors so each can be
checked against numbers worked out by hand.

Boxes are normalised (x0, y0, x1, y1) over the background, as in `geometry`.

- eq. 4, spatial: λ_IoU·(1 − IoU) + λ_center·‖c − c*‖² / diag² + λ_aspect·|arctan(w/h) − arctan(w*/h*)|,
  between the box the heatmap points at and a legal ground-truth box; the centre term
  is the squared centre distance over the squared diagonal of the image (1² + 1² = 2
  in normalised units), so all three terms are on comparable [0, 1]-ish scales.
- eq. 5, semantic: mean squared difference between the model's predicted composite
  features and the encoder's features of the true composite.
- eq. 6, heatmap: mean squared difference between predicted and true heatmaps.
- eq. 7: λ1·L_spatial + λ2·L_semantic + λ3·L_heatmap with λ1 + λ2 + λ3 = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from freemask.shared.errors import InvalidInput

_DIAGONAL_SQUARED = 2.0  # of the unit square the boxes live in


def box_iou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of matching rows of two (N, 4) box tensors; differentiable."""
    x0 = torch.maximum(pred[:, 0], target[:, 0])
    y0 = torch.maximum(pred[:, 1], target[:, 1])
    x1 = torch.minimum(pred[:, 2], target[:, 2])
    y1 = torch.minimum(pred[:, 3], target[:, 3])
    intersection = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    area = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_target = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    return intersection / (area + area_target - intersection + eps)


@dataclass(frozen=True)
class SpatialWeights:
    iou: float = 1.0
    center: float = 1.0
    aspect: float = 1.0


def spatial_loss(pred: torch.Tensor, target: torch.Tensor, weights: SpatialWeights = SpatialWeights()
                 ) -> torch.Tensor:
    """Eq. 4, averaged over the batch."""
    iou_term = 1.0 - box_iou(pred, target)
    pred_centre = (pred[:, :2] + pred[:, 2:]) / 2
    target_centre = (target[:, :2] + target[:, 2:]) / 2
    centre_term = ((pred_centre - target_centre) ** 2).sum(dim=1) / _DIAGONAL_SQUARED
    pred_w, pred_h = pred[:, 2] - pred[:, 0], pred[:, 3] - pred[:, 1]
    target_w, target_h = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
    aspect_term = (torch.atan(pred_w / pred_h) - torch.atan(target_w / target_h)).abs()
    return (weights.iou * iou_term + weights.center * centre_term + weights.aspect * aspect_term).mean()


def semantic_loss(predicted_features: torch.Tensor, composite_features: torch.Tensor) -> torch.Tensor:
    """Eq. 5: the composite's features are a target, never trained through."""
    return ((predicted_features - composite_features.detach()) ** 2).mean()


def heatmap_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 6."""
    return ((predicted - target) ** 2).mean()


@dataclass(frozen=True)
class LossWeights:
    """λ1 (spatial), λ2 (semantic), λ3 (heatmap) of eq. 7; they must sum to 1."""

    spatial: float = 0.2
    semantic: float = 0.1
    heatmap: float = 0.7

    def __post_init__(self) -> None:
        values = (self.spatial, self.semantic, self.heatmap)
        if any(v < 0 for v in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
            raise InvalidInput(f"eq. 7 weights must be non-negative and sum to 1, got {values}")


def total_loss(spatial: torch.Tensor, semantic: torch.Tensor, heatmap: torch.Tensor,
               weights: LossWeights = LossWeights()) -> torch.Tensor:
    """Eq. 7."""
    return weights.spatial * spatial + weights.semantic * semantic + weights.heatmap * heatmap


def expected_box(heatmap: torch.Tensor, boxes: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """The box a heatmap points at, differentiably: the heatmap-weighted mean of its cells'
    boxes. `heatmap` is (B, S, H, W) in [0, 1]; `boxes` (B, S, H, W, 4); returns (B, 4)."""
    weights = heatmap.flatten(1)
    weights = weights / (weights.sum(dim=1, keepdim=True) + eps)
    return torch.einsum("bn,bnk->bk", weights, boxes.flatten(1, 3))
