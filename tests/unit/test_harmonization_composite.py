"""freemask.harmonization.composite: pasting with occlusion-correct label and instance maps."""

from __future__ import annotations

import numpy as np
import pytest

from freemask.harmonization.composite import (
    Extent,
    PasteResult,
    feather_alpha,
    instance_map_from_labels,
    paste,
    tight_box,
    visible_extents,
)
from freemask.shared.errors import InvalidInput, Unusable

W, H = 40, 30


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (H, W, 3), dtype=np.uint8), np.zeros((H, W), np.uint8),
            np.zeros((H, W), np.uint16))


def solid(width: int, height: int, colour: tuple[int, int, int] = (200, 40, 10)) -> tuple[np.ndarray, np.ndarray]:
    """A foreground whose every pixel is object: it fills its box exactly."""
    return np.full((height, width, 3), colour, np.uint8), np.ones((height, width), bool)


def disc(side: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(side)
    yy, xx = np.mgrid[:side, :side]
    mask = (yy - (side - 1) / 2) ** 2 + (xx - (side - 1) / 2) ** 2 <= (side / 2 - 1) ** 2
    return rng.integers(0, 256, (side, side, 3), dtype=np.uint8), mask


def paste_all(steps: list[tuple[tuple[int, int, int, int], int]], **kwargs) -> list[PasteResult]:
    """Paste a solid object per (box, class id), instance ids 1, 2, … in order."""
    image, labels, instances = scene()
    results = []
    for instance_id, (box, class_id) in enumerate(steps, start=1):
        foreground, mask = solid(5, 7)  # scaled to each box: a solid mask fills it
        result = paste(image, labels, instances, foreground, mask, box, class_id, instance_id, **kwargs)
        image, labels, instances = result.image, result.labels, result.instances
        results.append(result)
    return results


# --- occlusion --------------------------------------------------------------------------------------------------

STEPS = [((2, 2, 20, 15), 3), ((10, 8, 20, 15), 7), ((15, 5, 10, 10), 9)]


def drawn_by_hand(steps: list[tuple[tuple[int, int, int, int], int]]) -> tuple[np.ndarray, np.ndarray]:
    labels, instances = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint16)
    for instance_id, ((x, y, w, h), class_id) in enumerate(steps, start=1):
        labels[y:y + h, x:x + w] = class_id
        instances[y:y + h, x:x + w] = instance_id
    return labels, instances


def test_every_label_pixel_is_the_class_of_the_last_object_drawn_there() -> None:
    results = paste_all(STEPS)
    labels, instances = drawn_by_hand(STEPS)
    np.testing.assert_array_equal(results[-1].labels, labels)
    np.testing.assert_array_equal(results[-1].instances, instances)
    assert results[-1].labels[10, 12] == 7 and results[-1].labels[6, 16] == 9  # B over A, C over both


def test_earlier_instances_get_their_visible_area_and_box_recomputed() -> None:
    first, second, third = paste_all(STEPS)
    assert first.earlier == {}
    # A (2..21 x 2..16) loses columns 10..21 of rows 8..16 to B
    assert second.earlier == {1: Extent(20 * 15 - 12 * 9, (2, 2, 20, 15))}
    _, instances = drawn_by_hand(STEPS)
    assert third.earlier == {i: Extent(int((instances == i).sum()), tight_box(instances == i)) for i in (1, 2)}
    assert third.earlier[2].box == (10, 8, 20, 15)  # C covers B's top-left corner, not its extremes
    assert (third.object_box, third.object_area) == ((15, 5, 10, 10), 100)


def test_a_fully_covered_object_has_area_zero_and_no_box() -> None:
    _, covering = paste_all([((5, 5, 4, 4), 3), ((0, 0, 20, 20), 7)])
    assert covering.earlier == {1: Extent(0, None)}
    assert not (covering.instances == 1).any() and not (covering.labels == 3).any()


def test_the_new_instance_id_is_written_and_ids_already_used_are_refused() -> None:
    image, labels, instances = scene()
    foreground, mask = solid(4, 4)
    result = paste(image, labels, instances, foreground, mask, (1, 1, 4, 4), 5, 300)
    assert set(np.unique(result.instances)) == {0, 300}
    with pytest.raises(InvalidInput, match="instance_id 300 is already used in the scene's instance map"):
        paste(result.image, result.labels, result.instances, foreground, mask, (20, 10, 4, 4), 5, 300)


# --- geometry ---------------------------------------------------------------------------------------------------

def test_the_foreground_is_cut_to_its_mask_box_and_scaled_to_the_placement_box() -> None:
    foreground = np.zeros((20, 30, 3), np.uint8)
    foreground[:] = (0, 200, 0)
    foreground[5:15, 10:20] = (200, 0, 0)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:20] = True
    image, labels, instances = scene()
    result = paste(image, labels, instances, foreground, mask, (4, 6, 20, 20), 2, 1)
    # a square 10x10 object doubled into the 20x20 box: it fills the box, in its own colour only
    assert (result.object_box, result.object_area) == ((4, 6, 20, 20), 400)
    assert (result.image[6:26, 4:24] == (200, 0, 0)).all()


def test_masks_never_leak_outside_the_pasted_box_and_the_image_changes_only_on_the_object() -> None:
    image, labels, instances = scene()
    labels[:] = 1  # an older object everywhere
    foreground, mask = disc(16)
    box = (11, 4, 13, 19)
    result = paste(image, labels, instances, foreground, mask, box, 4, 2)
    x, y, w, h = box
    outside = np.ones((H, W), bool)
    outside[y:y + h, x:x + w] = False
    assert not result.object_mask[outside].any()
    assert (result.labels[outside] == 1).all() and (result.instances[outside] == 0).all()
    np.testing.assert_array_equal(result.labels == 4, result.object_mask)
    np.testing.assert_array_equal(result.instances == 2, result.object_mask)
    np.testing.assert_array_equal(result.image[~result.object_mask], image[~result.object_mask])
    # the disc is a disc, not its box: corners of the box stay the scene's
    assert not result.object_mask[y, x] and not result.object_mask[y + h - 1, x + w - 1]
    # bilinear-then-0.5 keeps the area in proportion to the box (within the outline's rounding)
    assert result.object_area == pytest.approx(mask.sum() * (w * h) / (14 * 14), rel=0.15)


def test_the_inputs_are_not_modified() -> None:
    image, labels, instances = scene()
    copies = image.copy(), labels.copy(), instances.copy()
    foreground, mask = solid(6, 6)
    paste(image, labels, instances, foreground, mask, (0, 0, 10, 10), 3, 1, feather_px=2)
    for before, after in zip(copies, (image, labels, instances)):
        np.testing.assert_array_equal(before, after)


# --- feathering and harmonization -------------------------------------------------------------------------------

def test_feather_alpha_ramps_inside_the_mask() -> None:
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    alpha = feather_alpha(mask, 2)
    assert alpha[0].max() == 0 and alpha[1, 3] == pytest.approx(1 / 3) and alpha[2, 3] == pytest.approx(2 / 3)
    assert alpha[3, 3] == 1.0
    np.testing.assert_array_equal(feather_alpha(mask, 0), mask.astype(np.float32))


def test_labels_stay_exact_with_feathering_and_only_the_image_edge_blends() -> None:
    image = np.full((H, W, 3), 0, np.uint8)
    labels, instances = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint16)
    foreground, mask = disc(20)
    foreground[:] = 240
    hard = paste(image, labels, instances, foreground, mask, (5, 5, 20, 20), 6, 1, feather_px=0)
    soft = paste(image, labels, instances, foreground, mask, (5, 5, 20, 20), 6, 1, feather_px=2)
    np.testing.assert_array_equal(soft.labels, hard.labels)
    np.testing.assert_array_equal(soft.instances, hard.instances)
    np.testing.assert_array_equal(soft.object_mask, hard.object_mask)
    assert (hard.image[hard.object_mask] == 240).all()
    edge = hard.object_mask & (feather_alpha(hard.object_mask, 2) < 1)
    assert edge.any() and (soft.image[edge] > 0).all() and (soft.image[edge] < 240).all()
    assert (soft.image[hard.object_mask & ~edge] == 240).all()
    assert (soft.image[~hard.object_mask] == 0).all()


def test_the_harmonizer_sees_the_composite_and_the_object_mask_and_changes_only_the_object() -> None:
    image, labels, instances = scene()
    foreground, mask = solid(8, 8)
    seen = {}

    def invert_everything(composite: np.ndarray, object_mask: np.ndarray) -> np.ndarray:
        seen["mask"] = object_mask.copy()
        return 255 - composite

    result = paste(image, labels, instances, foreground, mask, (3, 3, 8, 8), 1, 1, harmonize=invert_everything)
    np.testing.assert_array_equal(seen["mask"], result.object_mask)
    assert (result.image[3:11, 3:11] == 255 - np.array((200, 40, 10), np.uint8)).all()
    np.testing.assert_array_equal(result.image[~result.object_mask], image[~result.object_mask])


# --- helpers ----------------------------------------------------------------------------------------------------

def test_instance_map_from_labels_and_extents() -> None:
    labels = np.zeros((4, 5), np.uint8)
    labels[1:3, 2:5] = 7
    labels[0, 0] = 255  # ignore is not the object
    instances = instance_map_from_labels(labels, 7, 1)
    assert instances.dtype == np.uint16 and int(instances.sum()) == 6
    assert visible_extents(instances, [1, 2]) == {1: Extent(6, (2, 1, 3, 2)), 2: Extent(0, None)}


# --- bad input --------------------------------------------------------------------------------------------------

def _args(**changes):
    image, labels, instances = scene()
    foreground, mask = solid(6, 6)
    args = dict(scene=image, labels=labels, instances=instances, foreground=foreground, mask=mask,
                box=(1, 1, 10, 10), class_id=3, instance_id=1)
    return {**args, **changes}


@pytest.mark.parametrize(("changes", "message"), [
    (dict(labels=np.zeros((H, W - 1), np.uint8)), "scene label map is 39x30 uint8; it must be uint8 and the size of "
                                                  "the scene image (40x30)"),
    (dict(instances=np.zeros((H + 1, W), np.uint16)), "scene instance map is 40x31 uint16; it must be uint16"),
    (dict(instances=np.zeros((H, W), np.uint8)), "scene instance map is 40x30 uint8; it must be uint16"),
    (dict(scene=np.zeros((H, W), np.uint8)), "scene image must be a non-empty (H, W, 3) uint8 image"),
    (dict(mask=np.ones((6, 5), bool)), "foreground mask is 5x6 bool; it must be a boolean mask the size of the foreground "
                                       "(6x6)"),
    (dict(foreground=np.zeros((6, 6, 4), np.uint8)), "foreground must be a non-empty (h, w, 3) uint8 image"),
    (dict(mask=np.zeros((6, 6), bool)), "foreground mask is empty"),
    (dict(box=(35, 1, 10, 10)), "box (x=35, y=1, width=10, height=10) does not lie inside the 40x30 scene"),
    (dict(box=(-1, 1, 10, 10)), "does not lie inside the 40x30 scene"),
    (dict(box=(1, 25, 10, 10)), "does not lie inside the 40x30 scene"),
    (dict(box=(1, 1, 0, 10)), "box (x=1, y=1, width=0, height=10) is empty"),
    (dict(class_id=0), "class_id must be in 1..254, got 0"),
    (dict(class_id=255), "class_id must be in 1..254, got 255"),
    (dict(instance_id=0), "instance_id must be in 1..65535, got 0"),
    (dict(instance_id=65536), "instance_id must be in 1..65535, got 65536"),
])
def test_bad_input_is_refused_with_a_clear_message(changes: dict, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        paste(**_args(**changes))
    assert message in str(info.value)


def test_a_mask_that_vanishes_when_shrunk_is_unusable() -> None:
    foreground = np.zeros((40, 40, 3), np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[0, :] = mask[:, 0] = True  # a thin L whose box is 40x40
    with pytest.raises(Unusable, match="vanishes when scaled to the 2x2 box"):
        paste(**_args(foreground=foreground, mask=mask, box=(0, 0, 2, 2)))
