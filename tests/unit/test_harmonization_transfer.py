"""Harmonizers: statistics transfer and copy-paste (freemask.harmonization.transfer), and
the RAIN layer and harmonizer (freemask.harmonization.rain) on hand-made tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freemask.harmonization.rain import RainHarmonizer, RainNet, rain, region_statistics
from freemask.harmonization.transfer import CopyPaste, StatisticsTransfer, transfer_statistics
from freemask.shared.errors import InvalidInput


def hand_made() -> tuple[np.ndarray, np.ndarray]:
    """4x4 image, 2x2 object in the middle. Channel 0: background alternates 100/140 (mean 120,
    std 20), object 10, 20, 30, 40 (mean 25, std sqrt(125)). Channel 1 object is flat (7)."""
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0] = np.array([[100, 140, 100, 140], [140, 10, 20, 100], [100, 30, 40, 140], [140, 100, 140, 100]])
    image[..., 1] = 50
    image[1:3, 1:3, 1] = 7
    image[..., 2] = np.arange(16).reshape(4, 4) * 10
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    return image, mask


def test_statistics_transfer_matches_the_background_by_hand() -> None:
    image, mask = hand_made()
    out = transfer_statistics(image, mask)
    # (x - 25) / sqrt(125) * 20 + 120, rounded: 93.17, 111.06, 128.94, 146.83
    assert out[1:3, 1:3, 0].tolist() == [[93, 111], [129, 147]]
    # a flat region has no spread to scale: it is shifted onto the background's mean
    assert (out[1:3, 1:3, 1] == 50).all()
    np.testing.assert_array_equal(out[~mask], image[~mask])  # bit for bit


def test_statistics_transfer_sets_the_regions_mean_and_std_to_the_backgrounds() -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(128, 20, (24, 32, 3)).clip(0, 255).astype(np.uint8)
    mask = np.zeros((24, 32), bool)
    mask[6:18, 8:20] = True
    image[mask] = rng.normal(60, 6, (mask.sum(), 3)).clip(0, 255).astype(np.uint8)
    out = transfer_statistics(image, mask)
    background = image[~mask].astype(float)
    region = out[mask].astype(float)
    np.testing.assert_allclose(region.mean(axis=0), background.mean(axis=0), atol=0.5)
    np.testing.assert_allclose(region.std(axis=0), background.std(axis=0), atol=0.5)
    np.testing.assert_array_equal(out[~mask], image[~mask])


@pytest.mark.parametrize("mask_value", [False, True])
def test_statistics_transfer_with_nothing_to_match_returns_the_image(mask_value: bool) -> None:
    image, _ = hand_made()
    np.testing.assert_array_equal(transfer_statistics(image, np.full((4, 4), mask_value)), image)


def test_copy_paste_is_the_identity_and_both_are_non_learned() -> None:
    image, mask = hand_made()
    np.testing.assert_array_equal(CopyPaste()(image, mask), image)
    assert (CopyPaste().method, CopyPaste().version) == ("copy_paste", None)
    assert (StatisticsTransfer().method, StatisticsTransfer().version) == ("statistics_transfer", None)


@pytest.mark.parametrize("harmonizer", [CopyPaste(), StatisticsTransfer()])
def test_bad_shapes_are_refused(harmonizer) -> None:
    image, mask = hand_made()
    with pytest.raises(InvalidInput, match="mask must be a boolean array of the image's size"):
        harmonizer(image, mask[:3])
    with pytest.raises(InvalidInput, match=r"image must be \(H, W, 3\) uint8"):
        harmonizer(image.astype(np.float32), mask)


# --- RAIN -------------------------------------------------------------------------------------------------------

FEATURES = torch.tensor([[[[1.0, 3.0], [10.0, 14.0]],
                          [[0.0, 4.0], [5.0, 5.0]]]])  # (1, 2, 2, 2)
TOP_ROW = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])  # (1, 1, 2, 2): the foreground region


def test_region_statistics_by_hand() -> None:
    mean, std = region_statistics(FEATURES, TOP_ROW, eps=0.0)
    # channel 0: {1, 3} -> mean 2, std 1; channel 1: {0, 4} -> mean 2, std 2
    assert mean.flatten().tolist() == [2.0, 2.0] and std.flatten().tolist() == [1.0, 2.0]
    mean, std = region_statistics(FEATURES, 1 - TOP_ROW, eps=0.0)
    # channel 0: {10, 14} -> mean 12, std 2; channel 1: {5, 5} -> mean 5, std 0
    assert mean.flatten().tolist() == [12.0, 5.0] and std.flatten().tolist() == [2.0, 0.0]


def test_rain_restyles_the_foreground_with_the_background_statistics_by_hand() -> None:
    out = rain(FEATURES, TOP_ROW, eps=0.0)
    # channel 0: (1 - 2) / 1 * 2 + 12 = 10, (3 - 2) / 1 * 2 + 12 = 14; channel 1: (x - 2) / 2 * 0 + 5 = 5
    expected = torch.tensor([[[[10.0, 14.0], [10.0, 14.0]],
                              [[5.0, 5.0], [5.0, 5.0]]]])
    torch.testing.assert_close(out, expected)
    # with the default eps the result moves by far less than a grey level
    torch.testing.assert_close(rain(FEATURES, TOP_ROW), expected, atol=1e-2, rtol=0)


@pytest.fixture(scope="module")
def harmonizer() -> RainHarmonizer:
    torch.manual_seed(0)
    return RainHarmonizer(RainNet(), "test")


@pytest.mark.parametrize(("height", "width"), [(13, 17), (16, 16), (5, 9)])
def test_rain_harmonizer_leaves_unmasked_pixels_bit_identical_at_any_size(harmonizer: RainHarmonizer,
                                                                           height: int, width: int) -> None:
    rng = np.random.default_rng(height * width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), bool)
    mask[1:height - 1, 2:width - 2] = True
    out = harmonizer(image, mask)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~mask], image[~mask])
    assert (out[mask] != image[mask]).any()  # a random net does change the object
    np.testing.assert_array_equal(harmonizer(image, mask), out)  # deterministic
