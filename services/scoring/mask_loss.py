"""Mask2Former's training loss, computed densely on the mask grid and batched over images and layers.

The loss is the paper's: each decoder layer's queries are matched one to one to the image's
classes by the Hungarian algorithm on class + sigmoid-BCE + dice costs, then the matched queries
learn their class and mask and the others "no object" (weighted `no_object_weight`); the layers'
losses are summed with the config's class, mask and dice weights.

Why not `transformers`' own loss: it compares masks at randomly sampled points (Mask2Former's
memory saving for large masks) and loops over the images of a batch in Python, once per layer.
For the tiny preset at 32 px, whose mask grid is 16 × 16, that is 3 × 1,024 points drawn to judge
256 cells, and on a CPU that loop was a large part of each training step. Here every cell of the
grid counts, the costs of all layers and images come from a few batched products, and only the
assignment itself (a few queries against a few classes per image) runs per image.

Targets are brought to the grid by area averaging, so a cell on a boundary gets a soft target
and no sub-cell detail is lost to sampling. Pixels labelled 255 (ignore) weigh nothing, in the
costs and in the loss: a pseudo-label's unsure pixels teach nothing either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from freemask.shared.errors import InvalidInput
from freemask.world.names import IGNORE_ID


@dataclass(frozen=True)
class Mask2FormerWeights:
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1

    @classmethod
    def of(cls, config) -> Mask2FormerWeights:
        """The weights of a `Mask2FormerConfig` (its defaults are the paper's)."""
        return cls(config.class_weight, config.mask_weight, config.dice_weight, config.no_object_weight)


@dataclass(frozen=True)
class GridTargets:
    """A batch's label maps on the mask grid: per image its class ids, padded to `T` targets."""

    masks: torch.Tensor  # (B, T, N) float in [0, 1]: the share of each cell's valid pixels in the class
    valid: torch.Tensor  # (B, N) float: the share of each cell's pixels that are not ignored
    classes: torch.Tensor  # (B, T) int64, -1 where padded
    counts: list[int]  # targets per image


def grid_targets(labels: torch.Tensor, grid: tuple[int, int]) -> GridTargets:
    """(B, S, S) int64 label maps, 255 = ignore -> per-class soft masks on the (h, w) mask grid."""
    ids_per_image = []
    for label in labels:
        ids = [int(c) for c in torch.unique(label) if int(c) != IGNORE_ID]
        if not ids:
            raise InvalidInput("a training label map has no labelled pixel")
        ids_per_image.append(ids)
    most = max(len(ids) for ids in ids_per_image)
    classes = torch.full((len(labels), most), -1, dtype=torch.int64, device=labels.device)
    for index, ids in enumerate(ids_per_image):
        classes[index, :len(ids)] = torch.tensor(ids, device=labels.device)
    valid_pixels = (labels != IGNORE_ID).float()
    # (B, T, S, S): pixel in the target's class; a padded target matches nothing
    in_class = (labels[:, None] == classes[:, :, None, None]).float() * valid_pixels[:, None]
    area = F.interpolate(torch.cat([in_class, valid_pixels[:, None]], 1), size=grid, mode="area")
    valid = area[:, -1]
    masks = area[:, :-1] / valid[:, None].clamp_min(1e-6)
    return GridTargets(masks.flatten(2), valid.flatten(1), classes, [len(ids) for ids in ids_per_image])


def _pairwise_costs(logits: torch.Tensor, probabilities: torch.Tensor, targets: GridTargets,
                    weights: Mask2FormerWeights) -> torch.Tensor:
    """(K, Q, T) matching costs of every query against every target, K = layers × images."""
    layers = logits.shape[0] // targets.masks.shape[0]
    masks, valid = targets.masks.repeat(layers, 1, 1), targets.valid.repeat(layers, 1)
    classes = targets.classes.repeat(layers, 1)
    total = valid.sum(-1).clamp_min(1.0)[:, None, None]
    weighted = logits * valid[:, None]
    # BCE(x, t) = softplus(x) - x t, averaged over the valid share of each cell
    bce = ((F.softplus(logits) * valid[:, None]).sum(-1)[:, :, None]
           - torch.einsum("kqn,ktn->kqt", weighted, masks)) / total
    sigmoid = logits.sigmoid() * valid[:, None]
    overlap = torch.einsum("kqn,ktn->kqt", sigmoid, masks)
    dice = 1 - (2 * overlap + 1) / (sigmoid.sum(-1)[:, :, None] + (masks * valid[:, None]).sum(-1)[:, None] + 1)
    class_cost = -probabilities.gather(2, classes.clamp_min(0)[:, None].expand(-1, probabilities.shape[1], -1))
    return weights.mask_weight * bce + weights.dice_weight * dice + weights.class_weight * class_cost


def mask2former_loss(mask_logits: Sequence[torch.Tensor], class_logits: Sequence[torch.Tensor],
                     labels: torch.Tensor, weights: Mask2FormerWeights) -> torch.Tensor:
    """The summed loss of every decoder layer's prediction.

    `mask_logits[l]` is (B, Q, h, w), `class_logits[l]` (B, Q, C + 1) with "no object" last, and
    `labels` (B, S, S) class ids with 255 = ignore."""
    masks_all = torch.cat(list(mask_logits))  # (L·B, Q, h, w), layer-major
    classes_all = torch.cat(list(class_logits))  # (L·B, Q, C + 1)
    batch, queries = labels.shape[0], masks_all.shape[1]
    no_object = classes_all.shape[-1] - 1
    targets = grid_targets(labels, tuple(masks_all.shape[-2:]))
    logits = masks_all.flatten(2)
    with torch.no_grad():
        costs = _pairwise_costs(logits, classes_all.softmax(-1), targets, weights)
        costs = torch.nan_to_num(costs, nan=1e9, posinf=1e9, neginf=1e9).cpu().numpy()
    rows, query_index, target_index = [], [], []
    for k, cost in enumerate(costs):
        count = targets.counts[k % batch]
        chosen_queries, chosen_targets = linear_sum_assignment(cost[:, :count])
        rows.append(np.full(len(chosen_queries), k))
        query_index.append(chosen_queries)
        target_index.append(chosen_targets)
    row = torch.as_tensor(np.concatenate(rows), device=logits.device)
    query = torch.as_tensor(np.concatenate(query_index), device=logits.device)
    target = torch.as_tensor(np.concatenate(target_index), device=logits.device)
    image = row % batch

    wanted = torch.full((classes_all.shape[0], queries), no_object, dtype=torch.int64, device=logits.device)
    wanted[row, query] = targets.classes[image, target]
    class_weights = torch.ones(no_object + 1, device=logits.device)
    class_weights[no_object] = weights.no_object_weight
    layers = classes_all.shape[0] // batch
    # per layer, the weighted mean over its queries, as Mask2Former's cross-entropy; summed over layers
    class_loss = layers * F.cross_entropy(classes_all.flatten(0, 1), wanted.flatten(), weight=class_weights)

    matched = logits[row, query]  # (M, N)
    truth, valid = targets.masks[image, target], targets.valid[image]
    per_mask_bce = (F.binary_cross_entropy_with_logits(matched, truth, reduction="none") * valid).sum(-1)
    per_mask_bce = per_mask_bce / valid.sum(-1).clamp_min(1.0)
    probabilities = matched.sigmoid() * valid
    per_mask_dice = 1 - (2 * (probabilities * truth).sum(-1) + 1) / (
        probabilities.sum(-1) + (truth * valid).sum(-1) + 1)
    num_masks = max(1, sum(targets.counts))
    return (weights.class_weight * class_loss + weights.mask_weight * per_mask_bce.sum() / num_masks
            + weights.dice_weight * per_mask_dice.sum() / num_masks)
