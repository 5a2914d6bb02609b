"""From a soft cross-attention map to a binary mask: affinity random walk and eq. 23.

1. **Random walk (AffinityNet).** An affinity ``W`` between grid positions (a learned
   AffinityNet head on the image, `affinity.py`, or the UNet's mean self-attention)
   becomes a transition matrix ``T = D⁻¹ W^{∘β}`` (element-wise power β sharpens it, ``D``
   normalises rows); the map is propagated ``vec(M') = Tᵗ vec(M)``. Propagation fills an
   object whose parts have a high affinity for each other and starves background that
   merely sits next to it: after enough steps the map is close to each region's mean attention.
2. **Threshold search (eq. 23).** Each candidate τ of a grid binarises a map, and the τ
   whose mask agrees best with the propagated map M' is kept. Agreement is the fuzzy IoU
   ``Σ min(B, M') / Σ max(B, M')`` of the binary mask B with the soft map M', which needs
   no binarisation level of its own and is 1 only where M' is already binary; or, with a
   ``reference_threshold``, the IoU with M' binarised at that level. Which map
   is cut is ``RefineConfig.cut``: ``"refined"`` cuts M' itself, which is best when the
   affinity grid is the image's own (the learned head at 32 px): the raw map's blur
   around a small object is what the walk removes, and cutting the raw map would put it
   back. ``"attention"`` cuts the fused attention map, as DiffuMask does, which keeps its
   detail when the affinity grid is coarser than the image (SD's 32×32 on 512 px).
3. **Clean-up.** Connected components smaller than a fraction of the image are dropped;
   the largest component is always kept, so clean-up alone never empties a mask.

All functions are pure. `transition_matrix`, `random_walk` and `propagate` take one sample
(``(H, W)`` maps) or a stack of them (``(B, H, W)``), and `refine_batch` refines a pass's
batch without waiting on the device between samples (its docstring says how it splits the
work on a CPU and on a GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from freemask.attention_mask.aggregate import Resolution, normalize_unit
from freemask.shared.config import CIRCULAR_SEARCH
from freemask.shared.errors import InvalidInput

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * step, 2) for step in range(1, 20))  # 0.05 … 0.95


@dataclass(frozen=True)
class RefineConfig:
    """Knobs of the refinement; the defaults are starting points for the benchmark to tune.

    ``beta`` and ``iterations`` are AffinityNet's β and t (its paper used β=8, t=256 on
    learned affinities in [0, 1]). ``symmetrize`` averages W with Wᵀ, as AffinityNet's
    affinities are symmetric by construction (self-attention is not).
    ``cut`` is the map the mask is cut from and ``reference_threshold`` the level at which
    the walked map is binarised for the comparison (``None``: fuzzy IoU with the map itself;
    module docstring, step 2).
    ``min_component_fraction`` is the smallest blob kept, as a fraction of the image area.
    """

    beta: float = 4.0
    iterations: int = 256
    symmetrize: bool = True
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    cut: Literal["refined", "attention"] = "refined"
    reference_threshold: float | None = None
    min_component_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.cut == "refined" and self.reference_threshold is not None:
            raise InvalidInput(CIRCULAR_SEARCH)


@dataclass(frozen=True)
class RefinedMask:
    """The outcome for one sample: what the service stores and records in the metadata."""

    mask: torch.Tensor  # (H, W) bool on the host, after small-blob removal
    threshold: float  # the τ chosen by eq. 23
    iou: float  # IoU of the chosen τ's mask with the binarised propagated map
    refined_map: torch.Tensor  # (H, W) float in [0, 1]: the propagated soft map


def transition_matrix(affinity: torch.Tensor, beta: float = 2.0, symmetrize: bool = True) -> torch.Tensor:
    """AffinityNet's ``T = D⁻¹ W^{∘β}`` from an ``(N, N)`` non-negative affinity, or from each of a stack.

    W is scaled by its maximum before the power so that β ≫ 1 does not underflow float32
    (the scale cancels in the row normalisation). A row with no affinity left becomes a
    self-loop, so such a position keeps its value instead of turning into NaN. Both cases
    are decided by tensor operations, not by reading values back, so a GPU is never waited on.
    """
    if affinity.ndim not in (2, 3) or affinity.shape[-1] != affinity.shape[-2]:
        raise InvalidInput(f"affinity must be a square (N, N) matrix or a (B, N, N) stack of them, "
                           f"got shape {tuple(affinity.shape)}")
    if beta <= 0:
        raise InvalidInput(f"beta must be positive, got {beta}")
    weights = affinity.float().clamp_min(0.0)
    if symmetrize:
        weights = 0.5 * (weights + weights.transpose(-2, -1))
    peak = weights.amax(dim=(-2, -1), keepdim=True)
    weights = (weights / torch.where(peak > 0, peak, torch.ones_like(peak))).pow(beta)
    row_sums = weights.sum(dim=-1, keepdim=True)
    empty = (row_sums <= 0).to(weights.dtype)  # 1 for a row with no affinity left, else 0
    weights.diagonal(dim1=-2, dim2=-1).add_(empty[..., 0])
    return weights / (row_sums + empty)


def random_walk(values: torch.Tensor, transition: torch.Tensor, iterations: int) -> torch.Tensor:
    """``Tᵗ · vec(values)``: ``values`` is ``(h, w)`` and ``transition`` ``(h·w, h·w)``, or stacks of both.

    Iterating the vector costs ``t·N²`` instead of the ``log t · N³`` of a matrix power,
    which wins for the few steps used here.
    """
    if iterations < 0:
        raise InvalidInput(f"iterations must be non-negative, got {iterations}")
    positions = values.shape[-1] * values.shape[-2] if values.ndim >= 2 else 0
    if values.ndim not in (2, 3) or transition.shape != (*values.shape[:-2], positions, positions):
        raise InvalidInput(
            f"a ({positions}, {positions}) transition is needed for each map of shape "
            f"{tuple(values.shape)}, got {tuple(transition.shape)}"
        )
    vector = values.reshape(*values.shape[:-2], positions, 1).float()
    for _ in range(iterations):
        vector = transition @ vector
    return vector.reshape(values.shape)


def propagate(
    soft_map: torch.Tensor,
    affinity: torch.Tensor,
    affinity_size: Resolution,
    beta: float = 2.0,
    iterations: int = 4,
    symmetrize: bool = True,
) -> torch.Tensor:
    """The refined soft map: ``soft_map`` (H, W) walked on an affinity over an ``affinity_size`` grid.

    A ``(B, H, W)`` stack with a ``(B, N, N)`` stack of affinities gives a ``(B, H, W)`` stack.
    Each map is brought to the affinity's grid (area averaging, so no value is skipped),
    walked, brought back bilinearly and normalised to [0, 1].
    """
    if soft_map.ndim not in (2, 3):
        raise InvalidInput(f"soft map must be (H, W) or a (B, H, W) stack, got shape {tuple(soft_map.shape)}")
    height, width = affinity_size
    if affinity.shape != (*soft_map.shape[:-2], height * width, height * width):
        raise InvalidInput(
            f"affinity of shape {tuple(affinity.shape)} does not describe a {height}×{width} grid "
            f"for each of the soft maps of shape {tuple(soft_map.shape)}"
        )
    maps = soft_map.float().reshape(-1, *soft_map.shape[-2:])
    output_size = tuple(maps.shape[-2:])
    if output_size != (height, width):
        maps = F.interpolate(maps[:, None], size=(height, width), mode="area")[:, 0]
    transitions = transition_matrix(affinity.reshape(len(maps), *affinity.shape[-2:]), beta, symmetrize)
    walked = random_walk(maps, transitions, iterations)
    if walked.shape[-2:] != output_size:
        walked = F.interpolate(walked[:, None], size=output_size, mode="bilinear", align_corners=False)[:, 0]
    return normalize_unit(walked).reshape(soft_map.shape)


def _check_thresholds(thresholds: Sequence[float]) -> list[float]:
    """The candidate τ in ascending order, so that the first best one is the smallest."""
    if len(thresholds) == 0:
        raise InvalidInput("the threshold grid is empty: give at least one candidate τ")
    if any(not 0.0 <= tau <= 1.0 for tau in thresholds):
        raise InvalidInput(f"thresholds must lie in [0, 1], got {list(thresholds)}")
    return sorted(float(tau) for tau in thresholds)


def _best_thresholds(candidate_maps: torch.Tensor, refined_maps: torch.Tensor, levels: torch.Tensor,
                     reference_threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 23 for each map of a ``(B, H, W)`` stack: the index of the best of the ascending τ `levels`, and its IoU.

    Every candidate of every map at once, and nothing read back: the caller decides when to wait.
    """
    reference = refined_maps.float().clamp(0.0, 1.0)[:, None]
    if reference_threshold is not None:
        reference = (reference >= reference_threshold).float()
    candidates = (candidate_maps.float()[:, None] >= levels[None, :, None, None]).float()
    inter = torch.minimum(candidates, reference).sum(dim=(2, 3)).double()
    union = torch.maximum(candidates, reference).sum(dim=(2, 3)).double()
    ious = torch.where(union > 0, inter / union.clamp_min(1e-12), torch.ones_like(union))  # both empty: agree
    best = torch.argmax(ious, dim=1)  # the first maximum: ties go to the smallest τ
    return best, ious.gather(1, best[:, None])[:, 0]


def threshold_search(
    candidate_map: torch.Tensor,
    refined_map: torch.Tensor,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    reference_threshold: float | None = None,
) -> tuple[float, float]:
    """Eq. 23: the τ whose mask ``candidate_map ≥ τ`` best matches ``refined_map``.

    The match is the fuzzy IoU with ``refined_map``'s values, or, with a
    ``reference_threshold``, the IoU with ``refined_map ≥ reference_threshold``.

    Returns ``(τ, IoU)``. Ties go to the smallest τ, the more inclusive mask: among equally
    good masks the one that loses fewer object pixels makes fewer holes in the label.
    """
    if candidate_map.shape != refined_map.shape or refined_map.ndim != 2:
        raise InvalidInput(
            f"candidate and refined maps must both be (H, W) of one shape, got {tuple(candidate_map.shape)} "
            f"and {tuple(refined_map.shape)}"
        )
    taus = _check_thresholds(thresholds)
    levels = torch.tensor(taus, device=candidate_map.device)
    best, iou = _best_thresholds(candidate_map[None], refined_map[None], levels, reference_threshold)
    return taus[int(best[0])], float(iou[0])


def connected_components(mask: torch.Tensor, connectivity: int = 8) -> tuple[torch.Tensor, int]:
    """Label the 4- or 8-connected components of a boolean ``(H, W)`` mask.

    Returns ``(labels, count)`` with labels ``1..count`` in raster order of each component's
    first pixel, and 0 for background. scipy's labelling runs in C: a pure-Python union–find
    over row runs cost about 20 ms per 512² mask, most of the refinement's time.
    """
    if mask.ndim != 2:
        raise InvalidInput(f"mask must be (H, W), got shape {tuple(mask.shape)}")
    if connectivity not in (4, 8):
        raise InvalidInput(f"connectivity must be 4 or 8, got {connectivity}")
    grid = mask.detach().cpu().numpy().astype(bool)
    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    labels, count = ndimage.label(grid, structure=structure)
    return torch.from_numpy(labels.astype(np.int64)), int(count)


def remove_small_components(mask: torch.Tensor, min_fraction: float, connectivity: int = 8) -> torch.Tensor:
    """Drop components smaller than ``min_fraction`` of the image; never the largest one."""
    if not 0.0 <= min_fraction < 1.0:
        raise InvalidInput(f"min_fraction must be in [0, 1), got {min_fraction}")
    labels, count = connected_components(mask, connectivity)
    if count <= 1 or min_fraction == 0.0:
        return mask.clone()
    sizes = torch.bincount(labels.flatten(), minlength=count + 1)
    sizes[0] = 0
    keep = sizes >= min_fraction * mask.numel()
    keep[int(sizes.argmax())] = True
    keep[0] = False
    return keep[labels].to(mask.device)


def refine(soft_map: torch.Tensor, affinity: torch.Tensor, affinity_size: Resolution,
           config: RefineConfig = RefineConfig()) -> RefinedMask:
    """Propagate, search τ (eq. 23), binarise the chosen map at τ and clean it up.

    ``soft_map`` is one sample's fused [0, 1] map (H, W); ``affinity`` its ``(h·w, h·w)``
    affinity over the ``affinity_size`` grid (the learned head's, or the self-attention).
    """
    if soft_map.ndim != 2:
        raise InvalidInput(f"soft map must be (H, W), got shape {tuple(soft_map.shape)}")
    return refine_batch(soft_map[None], affinity[None], affinity_size, config)[0]


def refine_batch(soft_maps: torch.Tensor, affinities: torch.Tensor, affinity_size: Resolution,
                 config: RefineConfig = RefineConfig()) -> list[RefinedMask]:
    """`refine` for each of ``soft_maps`` (B, H, W) with its affinity of ``affinities`` (B, h·w, h·w).

    On a GPU the whole batch goes through each step together: a walk step is one launch for
    the batch, and the results cross to the host once, where a loop over samples paid the
    launches and about seven host syncs per sample. On a CPU the samples go one at a time,
    because one sample's transition matrix (4 MB at 32×32) stays in cache over the walk's
    steps while a batch's streams from memory at every step: 16 samples walked together took
    15 times as long (measured on 2 cores). The masks (clean-up runs in scipy) are on the host;
    the refined maps stay on the maps' device.
    """
    if soft_maps.ndim != 3 or affinities.ndim != 3 or len(soft_maps) != len(affinities):
        raise InvalidInput(f"a (B, H, W) stack of soft maps and a (B, N, N) stack of affinities of one B are "
                           f"needed, got shapes {tuple(soft_maps.shape)} and {tuple(affinities.shape)}")
    taus = _check_thresholds(config.thresholds)
    # made before the walk is queued: a copy from host memory waits for the device's queue to drain
    levels = torch.tensor(taus, device=soft_maps.device)
    together = len(soft_maps) if soft_maps.device.type != "cpu" else 1
    results: list[RefinedMask] = []
    for start in range(0, len(soft_maps), max(together, 1)):
        maps = soft_maps[start:start + together].float()
        refined = propagate(maps, affinities[start:start + together], affinity_size, config.beta,
                            config.iterations, config.symmetrize)
        cut = refined if config.cut == "refined" else maps
        best, ious = _best_thresholds(cut, refined, levels, config.reference_threshold)
        masks = (cut >= levels[best][:, None, None]).cpu()
        results.extend(
            RefinedMask(mask=remove_small_components(mask, config.min_component_fraction), threshold=taus[index],
                        iou=iou, refined_map=refined_map)
            for mask, index, iou, refined_map in zip(masks, best.tolist(), ious.tolist(), refined, strict=True))
    return results
