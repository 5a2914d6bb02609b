"""Refinement of the attention map: AffinityNet random walk, eq. 23 threshold search, clean-up.

Every case is synthetic with a known answer, so a failure points at the maths, not at a model.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError
import torch
import torch.nn.functional as F

from freemask.attention_mask.refine import (
    DEFAULT_THRESHOLDS,
    RefineConfig,
    connected_components,
    propagate,
    random_walk,
    refine,
    refine_batch,
    remove_small_components,
    threshold_search,
    transition_matrix,
)
from freemask.shared.config import AttentionMaskConfig
from freemask.shared.errors import InvalidInput


def disk(size: int, radius: float, centre: float | None = None) -> torch.Tensor:
    centre = (size - 1) / 2 if centre is None else centre
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    return ((ys - centre) ** 2 + (xs - centre) ** 2).sqrt() <= radius


def blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    offsets = torch.arange(-6, 7, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.conv2d(image[None, None].float(), kernel.view(1, 1, 1, -1), padding=(0, 6))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1), padding=(6, 0))
    return out[0, 0]


def mask_iou(first: torch.Tensor, second: torch.Tensor) -> float:
    return int((first & second).sum()) / max(int((first | second).sum()), 1)


def group_affinity(groups: torch.Tensor) -> torch.Tensor:
    """Affinity 1 between positions of the same group, 0 across groups."""
    flat = groups.flatten()
    return (flat[:, None] == flat[None, :]).float()


def test_the_default_grid_is_005_to_095_in_steps_of_005() -> None:
    assert DEFAULT_THRESHOLDS[0] == 0.05 and DEFAULT_THRESHOLDS[-1] == 0.95 and len(DEFAULT_THRESHOLDS) == 19


def test_transition_rows_are_stochastic_and_beta_sharpens() -> None:
    affinity = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.25], [0.0, 0.25, 1.0]])
    soft, sharp = transition_matrix(affinity, beta=1.0), transition_matrix(affinity, beta=4.0)
    assert torch.allclose(soft.sum(dim=1), torch.ones(3)) and torch.allclose(sharp.sum(dim=1), torch.ones(3))
    assert torch.allclose(soft[0], torch.tensor([1.0, 0.5, 0.0]) / 1.5)
    assert float(sharp[0, 0]) > float(soft[0, 0])
    lonely = transition_matrix(torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(lonely, torch.eye(2)), "a row with no affinity keeps its own value"


def test_a_random_walk_on_the_identity_affinity_leaves_the_map_unchanged() -> None:
    cam = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(random_walk(cam, transition_matrix(torch.eye(16), beta=8.0), 5), cam)
    unit = (cam - cam.min()) / (cam.max() - cam.min())
    assert torch.allclose(propagate(unit, torch.eye(16), (4, 4), beta=8.0, iterations=5), unit, atol=1e-6)


def test_a_random_walk_on_a_block_affinity_spreads_within_the_block_only() -> None:
    groups = torch.zeros(4, 4, dtype=torch.long)
    groups[:, 2:] = 1  # left half and right half
    cam = torch.zeros(4, 4)
    cam[1, 0] = 1.0
    walked = random_walk(cam, transition_matrix(group_affinity(groups)), iterations=3)
    assert torch.allclose(walked[:, :2], torch.full((4, 2), 1 / 8))
    assert torch.equal(walked[:, 2:], torch.zeros(4, 2))


def test_threshold_search_picks_the_known_tau() -> None:
    # An object at 1.0 with a halo around it at level h, and 0 elsewhere (areas 100, 100, 824).
    # Any τ <= h cuts object + halo: fuzzy IoU (100 + 100h) / 200; any τ > h cuts the object
    # alone: 100 / (100 + 100h). A faint halo (h = 0.3: 0.65 against 0.77) is left out and
    # the first τ above it wins; a strong one (h = 0.6: 0.80 against 0.625) is kept, and
    # the smallest τ wins the tie among the τ that keep it.
    def object_with_halo(halo: float) -> torch.Tensor:
        values = torch.zeros(32, 32)
        values[:10, :20] = halo
        values[:10, :10] = 1.0
        return values

    tau, iou = threshold_search(object_with_halo(0.3), object_with_halo(0.3))
    assert tau == 0.35 and iou == pytest.approx(100 / 130)
    tau, iou = threshold_search(object_with_halo(0.6), object_with_halo(0.6))
    assert tau == 0.05 and iou == pytest.approx(160 / 200)
    # A map that is already binary is reproduced exactly.
    assert threshold_search(object_with_halo(0.0), object_with_halo(0.0)) == (0.05, 1.0)
    # Cutting another map: the τ whose disk of a cone 1 - r/20 is the binary reference disk of radius 13.
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    radius = ((ys - 31.5) ** 2 + (xs - 31.5) ** 2).sqrt()
    cone = (1 - radius / 20).clamp_min(0)
    assert threshold_search(cone, (radius <= 13).float()) == (0.35, 1.0)
    # A reference level binarises the walked map there: the cone's own cut at that level wins.
    assert threshold_search(cone, cone, reference_threshold=0.5) == (0.5, 1.0)


def blurred_disk_with_speck(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    truth = disk(size, 9.0)
    soft = blur(truth.float(), sigma=2.0)
    soft[2:4, 28] = 1.0  # a two-pixel speck of spurious attention far from the object
    return truth, (soft - soft.min()) / (soft.max() - soft.min())


def test_refine_cuts_the_walked_map_on_an_affinity_at_image_resolution() -> None:
    # Attention that also lights the ground under the object (a band at 0.7, as the small
    # generator's does): no single cut of the raw map separates the two. An affinity that
    # groups the disk at the image's own grid (as the learned head does) averages the band
    # into the rest of the background, and the walked map's cut is the disk.
    truth, soft = blurred_disk_with_speck(32)
    soft[24:30, 4:28] = torch.maximum(soft[24:30, 4:28], torch.tensor(0.7))
    result = refine(soft, group_affinity(truth), (32, 32), RefineConfig(iterations=8))
    assert result.refined_map.shape == (32, 32)
    assert float(result.refined_map.min()) == 0.0 and float(result.refined_map.max()) == 1.0
    assert result.iou > 0.95
    assert not bool(result.mask[2:4, 28].any()), "the speck must be removed"
    assert mask_iou(result.mask, truth) > 0.95
    assert max(mask_iou(soft >= tau, truth) for tau in DEFAULT_THRESHOLDS) < 0.85, "no raw cut is this good"


def test_refine_cuts_the_attention_map_on_a_coarser_affinity() -> None:
    size, coarse = 32, 16
    truth, soft = blurred_disk_with_speck(size)
    coarse_groups = F.interpolate(truth[None, None].float(), size=(coarse, coarse), mode="area")[0, 0] > 0.5
    result = refine(soft, group_affinity(coarse_groups), (coarse, coarse), RefineConfig(iterations=2, cut="attention"))
    assert result.refined_map.shape == (size, size)
    assert 0.3 <= result.threshold <= 0.6  # the blurred edge crosses the disk's rim near 0.5
    assert not bool(result.mask[2:4, 28].any()), "the speck must be removed"
    assert mask_iou(result.mask, truth) > 0.9


def three_scenes(size: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Soft maps (3, size, size), their affinities (3, N, N) and true masks: a disk with a speck,
    the same with attention on the ground under it, and an off-centre disk on an affinity with a dead row."""
    truth, soft = blurred_disk_with_speck(size)
    ground = soft.clone()
    ground[24:30, 4:28] = torch.maximum(ground[24:30, 4:28], torch.tensor(0.7))
    off_centre = disk(size, 6.0, centre=10.0)
    lonely = group_affinity(off_centre)
    lonely[5, :] = lonely[:, 5] = 0.0
    maps = torch.stack([soft, ground, blur(off_centre.float(), sigma=1.5)])
    affinities = torch.stack([group_affinity(truth), group_affinity(truth), lonely])
    return maps, affinities, [truth, truth, off_centre]


def test_a_stack_of_maps_walks_as_each_map_does_alone() -> None:
    maps, affinities, _ = three_scenes()
    transitions = transition_matrix(affinities, beta=4.0)
    for i in range(3):
        assert torch.allclose(transitions[i], transition_matrix(affinities[i], beta=4.0), atol=1e-7)
    assert float(transitions[2, 5, 5]) == 1.0, "the dead row of the third affinity becomes a self-loop"
    walked = propagate(maps, affinities, (32, 32), beta=4.0, iterations=8)
    coarse = propagate(maps, affinities[:, ::8, ::8], (16, 8), beta=4.0, iterations=8)
    for i in range(3):
        assert torch.allclose(walked[i], propagate(maps[i], affinities[i], (32, 32), beta=4.0, iterations=8),
                              atol=1e-6)
        assert torch.allclose(coarse[i], propagate(maps[i], affinities[i, ::8, ::8], (16, 8), beta=4.0, iterations=8),
                              atol=1e-6)


def test_refining_a_batch_gives_each_sample_its_own_refinement() -> None:
    maps, affinities, truths = three_scenes()
    config = RefineConfig(iterations=8)
    batch = refine_batch(maps, affinities, (32, 32), config)
    assert len(batch) == 3
    for i, result in enumerate(batch):
        alone = refine(maps[i], affinities[i], (32, 32), config)
        assert torch.equal(result.mask, alone.mask) and result.threshold == alone.threshold
        assert result.iou == pytest.approx(alone.iou) and torch.allclose(result.refined_map, alone.refined_map)
        assert result.mask.device.type == "cpu" and mask_iou(result.mask, truths[i]) > 0.9
    assert refine_batch(maps[:0], affinities[:0], (32, 32), config) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the batch is refined together only on a GPU")
def test_a_batch_refined_together_on_a_gpu_matches_each_sample_refined_on_the_cpu() -> None:
    maps, affinities, _ = three_scenes()
    config = RefineConfig(iterations=8)
    on_gpu = refine_batch(maps.cuda(), affinities.cuda(), (32, 32), config)
    for i, result in enumerate(on_gpu):
        alone = refine(maps[i], affinities[i], (32, 32), config)
        assert torch.equal(result.mask, alone.mask) and result.threshold == alone.threshold
        assert result.refined_map.is_cuda and torch.allclose(result.refined_map.cpu(), alone.refined_map, atol=1e-5)


def test_small_blob_removal_removes_an_isolated_speck_and_keeps_the_object() -> None:
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[5:12, 5:12] = True  # 49 px object
    mask[17, 17] = True  # 1 px speck
    cleaned = remove_small_components(mask, min_fraction=0.01)  # 4 px minimum
    assert bool(cleaned[5:12, 5:12].all()) and not bool(cleaned[17, 17])
    assert int(cleaned.sum()) == 49
    only_specks = torch.zeros(20, 20, dtype=torch.bool)
    only_specks[1, 1] = only_specks[10, 10] = only_specks[10, 11] = True
    kept = remove_small_components(only_specks, min_fraction=0.1)
    assert int(kept.sum()) == 2, "the largest component survives so clean-up never empties a mask"


def test_connected_components_follow_the_chosen_connectivity() -> None:
    mask = torch.tensor(
        [
            [1, 1, 0, 0, 1],
            [0, 0, 1, 0, 1],
            [1, 0, 0, 0, 1],
            [1, 0, 1, 1, 0],
        ],
        dtype=torch.bool,
    )
    labels8, count8 = connected_components(mask, connectivity=8)
    labels4, count4 = connected_components(mask, connectivity=4)
    assert count8 == 3 and count4 == 5
    assert labels8[0, 0] == labels8[1, 2]  # joined through a diagonal
    assert labels8[0, 4] == labels8[3, 2] != labels8[0, 0]  # the right column reaches the bottom bar
    assert labels4[0, 4] != labels4[3, 3] and labels4[0, 0] != labels4[1, 2]
    assert labels8[2, 0] not in (labels8[0, 0], labels8[0, 4])
    assert torch.equal(labels8 > 0, mask) and torch.equal(labels4 > 0, mask)
    # A U shape whose arms meet only in the last row is one component.
    u_shape = torch.zeros(5, 5, dtype=torch.bool)
    u_shape[:, 0] = u_shape[:, 4] = u_shape[4, :] = True
    assert connected_components(u_shape, connectivity=4)[1] == 1


def test_bad_inputs_get_clear_errors() -> None:
    with pytest.raises(InvalidInput, match="threshold grid is empty"):
        threshold_search(torch.zeros(4, 4), torch.zeros(4, 4), thresholds=())
    with pytest.raises(InvalidInput, match="one shape"):
        threshold_search(torch.zeros(4, 4), torch.zeros(4, 5))
    with pytest.raises(InvalidInput, match=r"in \[0, 1\]"):
        threshold_search(torch.zeros(4, 4), torch.zeros(4, 4), thresholds=(1.5,))
    with pytest.raises(InvalidInput, match="square"):
        transition_matrix(torch.zeros(3, 4))
    with pytest.raises(InvalidInput, match="does not describe a 4×4 grid"):
        propagate(torch.zeros(8, 8), torch.eye(9), (4, 4))
    with pytest.raises(InvalidInput, match="transition is needed"):
        random_walk(torch.zeros(3, 3), torch.eye(4), 1)
    with pytest.raises(InvalidInput, match="one B"):
        refine_batch(torch.zeros(2, 4, 4), torch.eye(16).expand(3, 16, 16), (4, 4))
    with pytest.raises(InvalidInput, match=r"\(H, W\)"):
        refine(torch.zeros(1, 4, 4), torch.eye(16), (4, 4))
    with pytest.raises(InvalidInput, match="circular"):
        RefineConfig(cut="refined", reference_threshold=0.5)
    with pytest.raises(ValidationError, match="circular"):
        AttentionMaskConfig(refine_cut="refined", refine_reference_threshold=0.5)
    assert AttentionMaskConfig(refine_cut="attention", refine_reference_threshold=0.5).refine_reference_threshold == 0.5
    with pytest.raises(InvalidInput, match="min_fraction"):
        remove_small_components(torch.zeros(2, 2, dtype=torch.bool), 1.5)
