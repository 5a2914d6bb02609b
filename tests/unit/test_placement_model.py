"""FOPA's losses against hand-computed values (eq. 4–7), the input geometry, the
world-derived ground truth, and the model's save/load."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from freemask.placement.dataset import PairSampler, legal_heatmaps
from freemask.placement.geometry import (
    FOREGROUND_SIDE,
    HEATMAP_SIDE,
    NUM_SCALES,
    SCALES,
    background_input,
    box_size,
    candidate_boxes,
    foreground_aspect,
    foreground_input,
    inside_image,
    pixel_box,
)
from freemask.placement.losses import (
    LossWeights,
    SpatialWeights,
    box_iou,
    expected_box,
    heatmap_loss,
    semantic_loss,
    spatial_loss,
    total_loss,
)
from freemask.placement.model import FopaNet, load_fopa, save_fopa, weights_version
from freemask.placement.train import losses, nearest_legal_box, paste
from freemask.shared.errors import InvalidInput
from freemask.world import is_plausible


def boxes(*rows: tuple[float, float, float, float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_box_iou_by_hand() -> None:
    iou = box_iou(boxes((0, 0, 0.5, 0.5), (0, 0, 0.4, 0.2)), boxes((0.25, 0.25, 0.75, 0.75), (0, 0, 0.2, 0.2)))
    # 0.0625 / (0.25 + 0.25 - 0.0625) = 1/7; 0.04 / (0.08 + 0.04 - 0.04) = 0.5
    assert iou.tolist() == pytest.approx([1 / 7, 0.5])


def test_eq4_spatial_loss_by_hand() -> None:
    # IoU term 1 - 1/7; centres (0.25, 0.25) vs (0.5, 0.5): 0.125 / 2; same aspect: 0
    same_aspect = spatial_loss(boxes((0, 0, 0.5, 0.5)), boxes((0.25, 0.25, 0.75, 0.75)))
    assert float(same_aspect) == pytest.approx(6 / 7 + 0.0625)
    # IoU term 0.5; centres (0.2, 0.1) vs (0.1, 0.1): 0.01 / 2; aspect |atan 2 - atan 1|
    pred, target = boxes((0, 0, 0.4, 0.2)), boxes((0, 0, 0.2, 0.2))
    aspect = math.atan(2) - math.atan(1)
    assert float(spatial_loss(pred, target)) == pytest.approx(0.5 + 0.005 + aspect)
    weighted = spatial_loss(pred, target, SpatialWeights(iou=2.0, center=3.0, aspect=0.5))
    assert float(weighted) == pytest.approx(2 * 0.5 + 3 * 0.005 + 0.5 * aspect)
    both = spatial_loss(boxes((0, 0, 0.5, 0.5), (0, 0, 0.4, 0.2)), boxes((0.25, 0.25, 0.75, 0.75), (0, 0, 0.2, 0.2)))
    assert float(both) == pytest.approx((6 / 7 + 0.0625 + 0.5 + 0.005 + aspect) / 2)  # a batch mean


def test_eq5_semantic_loss_by_hand_and_the_target_gets_no_gradient() -> None:
    predicted = torch.zeros(1, 2, 1, 1, requires_grad=True)
    composite = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1).requires_grad_()
    loss = semantic_loss(predicted, composite)
    assert float(loss.detach()) == pytest.approx((1 + 9) / 2)
    loss.backward()
    assert predicted.grad.flatten().tolist() == pytest.approx([-1.0, -3.0])  # d/dp mean((p - t)^2) = (p - t)
    assert composite.grad is None


def test_eq6_heatmap_loss_by_hand() -> None:
    assert float(heatmap_loss(torch.tensor([0.5, 1.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(0.125)


def test_eq7_weights_sum_to_one() -> None:
    one, two, three = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    assert float(total_loss(one, two, three, LossWeights(0.2, 0.1, 0.7))) == pytest.approx(0.2 + 0.2 + 2.1)
    assert float(total_loss(one, two, three, LossWeights(1.0, 0.0, 0.0))) == pytest.approx(1.0)
    for bad in ((0.5, 0.5, 0.5), (1.2, -0.1, -0.1)):
        with pytest.raises(InvalidInput, match="sum to 1"):
            LossWeights(*bad)


def test_expected_box_is_the_heatmap_weighted_mean() -> None:
    heat = torch.zeros(1, 1, 1, 2)
    heat[0, 0, 0] = torch.tensor([1.0, 3.0])
    cells = torch.tensor([[0, 0, 0.2, 0.2], [0.4, 0.4, 0.8, 0.8]]).view(1, 1, 1, 2, 4)
    assert expected_box(heat, cells)[0].tolist() == pytest.approx([0.3, 0.3, 0.65, 0.65])


def test_nearest_legal_box_ignores_illegal_cells() -> None:
    cells = torch.tensor([[0, 0, 0.5, 0.5], [0.1, 0.1, 0.6, 0.6], [0.5, 0.5, 1, 1]]).view(1, 1, 1, 3, 4)
    legal = torch.tensor([True, False, True]).view(1, 1, 1, 3)
    nearest = nearest_legal_box(torch.tensor([[0.1, 0.1, 0.6, 0.6]]), cells, legal)
    assert nearest[0].tolist() == pytest.approx([0, 0, 0.5, 0.5])


def test_background_input_is_resized_and_in_unit_range() -> None:
    image = np.zeros((32, 48, 3), np.uint8)
    image[..., 0] = 255
    x = background_input(image)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    assert np.allclose(x[0], 1.0) and np.allclose(x[1:], -1.0)
    with pytest.raises(InvalidInput):
        background_input(np.zeros((8, 8), np.uint8))


def test_foreground_is_letterboxed_with_its_aspect() -> None:
    image = np.full((20, 30, 3), 200, np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10:20] = True  # 10 wide, 4 high
    assert foreground_aspect(mask) == 2.5
    x = foreground_input(image, mask)
    assert x.shape == (4, FOREGROUND_SIDE, FOREGROUND_SIDE)
    rows = np.nonzero(x[3].any(axis=1))[0]
    assert x[3].any(axis=0).all()  # the longer side fills the square
    assert len(rows) == round(4 * FOREGROUND_SIDE / 10) and rows[0] == (FOREGROUND_SIDE - len(rows)) // 2
    assert (x[:3, x[3] == 0] == 0).all()  # nothing outside the object
    with pytest.raises(InvalidInput, match="empty"):
        foreground_input(image, np.zeros((20, 30), bool))
    with pytest.raises(InvalidInput, match="does not match"):
        foreground_input(image, mask[:10])


def test_box_sizes_and_candidate_layout() -> None:
    assert box_size(0.5, 2.0, 64, 64) == pytest.approx((0.5, 0.25))
    assert box_size(0.5, 0.5, 64, 64) == pytest.approx((0.25, 0.5))
    grid = candidate_boxes(1.0, 64, 64)
    assert grid.shape == (NUM_SCALES, HEATMAP_SIDE, HEATMAP_SIDE, 4)
    centre = (grid[..., :2] + grid[..., 2:]) / 2
    assert centre[3, 0, 0] == pytest.approx([0.5 / HEATMAP_SIDE] * 2)
    assert centre[3, 4, 7] == pytest.approx([7.5 / HEATMAP_SIDE, 4.5 / HEATMAP_SIDE])  # (x, y) = (col, row)
    assert grid[2, 0, 0, 2] - grid[2, 0, 0, 0] == pytest.approx(SCALES[2])
    inside = inside_image(grid)
    assert inside[0].any() and not inside[0, 0, 0]  # a corner cell's box pokes out of the image
    assert pixel_box(np.array([0.1, 0.2, 0.5, 0.6]), 64, 32) == (6, 6, 26, 13)
    assert pixel_box(np.array([-0.2, 0.9, 0.0, 1.3]), 10, 10) == (0, 9, 1, 1)  # clipped, never empty


def test_ground_truth_heatmaps_follow_the_world_rules() -> None:
    aspect = 1.8
    maps = legal_heatmaps("car", "road", aspect)
    assert maps.shape == (NUM_SCALES, HEATMAP_SIDE, HEATMAP_SIDE) and maps.any()
    grid = candidate_boxes(aspect, HEATMAP_SIDE, HEATMAP_SIDE)
    rng = np.random.default_rng(0)
    for _ in range(300):
        s, i, j = rng.integers(NUM_SCALES), rng.integers(HEATMAP_SIDE), rng.integers(HEATMAP_SIDE)
        x0, y0, x1, y1 = grid[s, i, j] * HEATMAP_SIDE
        if x0 < 0 or y0 < 0 or x1 > HEATMAP_SIDE or y1 > HEATMAP_SIDE:
            assert not maps[s, i, j]
            continue
        assert maps[s, i, j] == is_plausible("car", "road", (x0, y0, x1, y1), HEATMAP_SIDE)
    assert not legal_heatmaps("car", "sky", aspect).any()


def test_paste_puts_the_object_inside_its_box() -> None:
    background = -torch.ones(1, 3, 64, 64)
    foreground = torch.zeros(1, 4, FOREGROUND_SIDE, FOREGROUND_SIDE)
    foreground[0, :, 8:24, :] = 1.0  # an object twice as wide as high, filling the letterbox's width
    box = torch.tensor([[0.25, 0.5, 0.75, 0.75]])  # 32 x 16 px at (16, 32)
    composite = paste(background, foreground, box)
    changed = (composite[0, 0] > -1).nonzero()
    rows, cols = changed[:, 0], changed[:, 1]
    assert rows.min() >= 31 and rows.max() <= 48 and cols.min() >= 15 and cols.max() <= 48
    assert (composite[0, 0, 34:46, 18:46] > 0.9).all()


def test_a_training_step_gives_every_loss_and_gradients() -> None:
    torch.manual_seed(0)
    net = FopaNet()
    batch = PairSampler(0, backgrounds_per_name=2, foregrounds_per_class=2).batch(8)
    parts = losses(net, batch)
    assert set(parts) == {"heatmap", "spatial", "semantic", "total"}
    assert all(torch.isfinite(v) for v in parts.values()) and float(parts["spatial"].detach()) > 0
    parts["total"].backward()
    assert all(p.grad is not None for p in net.head.parameters())


def test_weights_round_trip_and_are_versioned_by_content(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = FopaNet().eval()
    save_fopa(net, tmp_path / "a")
    loaded = load_fopa(tmp_path / "a")
    bg, fg = torch.randn(2, 3, 64, 64), torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(bg, fg).logits, loaded(bg, fg).logits)
    save_fopa(loaded, tmp_path / "b")
    assert weights_version(tmp_path / "a") == weights_version(tmp_path / "b")
    torch.manual_seed(2)
    save_fopa(FopaNet(), tmp_path / "c")
    assert weights_version(tmp_path / "c") != weights_version(tmp_path / "a")
