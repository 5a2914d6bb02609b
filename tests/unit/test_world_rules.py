"""freemask.world.rules: the plausibility table, legal boxes and heatmaps, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from freemask.shared.errors import InvalidInput
from freemask.world import (
    RULES,
    ObjectSpec,
    SceneSpec,
    allowed_backgrounds,
    dataset,
    is_plausible,
    legal_boxes,
    legal_center_map,
    render_object,
    render_scene,
    sample_legal_box,
    sample_scene_spec,
)
from freemask.world.backgrounds import BANDS


def test_every_class_has_a_home_and_every_background_an_inhabitant() -> None:
    homes = {bg for rule in RULES.values() for bg in rule.where}
    assert homes == set(BANDS)
    assert all(rule.where for rule in RULES.values())


def test_sampled_scenes_obey_the_rules() -> None:
    for index in range(40):
        scene = dataset("val", index)
        for obj in scene.objects:
            assert is_plausible(obj.cls, scene.background, obj.box, 64), (index, obj)
    for size in (32, 128):
        rng = np.random.default_rng(size)
        for _ in range(20):
            spec = sample_scene_spec(rng, image_size=size)
            assert all(is_plausible(o.cls, spec.background, o.box, size) for o in spec.objects)


@pytest.mark.parametrize("cls", list(RULES))
def test_sampled_boxes_are_legal_on_every_allowed_background(cls: str) -> None:
    rng = np.random.default_rng(0)
    for background in allowed_backgrounds(cls):
        for size in (32, 64, 128):
            for _ in range(5):
                box = sample_legal_box(rng, cls, background, size)
                assert all(isinstance(v, int) for v in box)
                assert is_plausible(cls, background, box, size)


def test_obvious_violations_are_rejected() -> None:
    # A boat in the sky band of the sea, and a boat in a clear sky.
    assert is_plausible("boat", "sea", (10, 30, 40, 52), 64)
    assert not is_plausible("boat", "sea", (10, 0, 40, 20), 64)
    assert not is_plausible("boat", "sky", (10, 30, 40, 52), 64)
    # A car on the sea, a car on the road.
    assert not is_plausible("car", "sea", (10, 40, 40, 55), 64)
    assert is_plausible("car", "road", (10, 40, 40, 55), 64)
    # An aeroplane must be in the sky band, not down on the water.
    assert is_plausible("aeroplane", "sea", (4, 4, 40, 22), 64)
    assert not is_plausible("aeroplane", "sea", (4, 40, 40, 58), 64)
    # A train stands on the track, not floating above it.
    assert is_plausible("train", "rail", (0, 33, 60, 48), 64)
    assert not is_plausible("train", "rail", (0, 5, 60, 20), 64)
    # Wrong aspect (a tall car) and wrong scale (a tiny bus).
    assert not is_plausible("car", "road", (20, 20, 30, 55), 64)
    assert not is_plausible("bus", "road", (20, 50, 26, 53), 64)
    # Sheep live in fields, not in rooms.
    assert not is_plausible("sheep", "room", (10, 40, 30, 55), 64)


def test_legal_center_map_agrees_with_is_plausible() -> None:
    size, w, h = 64, 30, 15
    heat = legal_center_map("car", "road", size, w, h)
    assert heat.any() and not heat.all()
    for row in range(0, size, 3):
        for col in range(0, size, 5):
            x0, y0 = col + 0.5 - w / 2, row + 0.5 - h / 2
            box = (x0, y0, x0 + w, y0 + h)
            inside = x0 >= 0 and y0 >= 0 and x0 + w <= size and y0 + h <= size
            assert heat[row, col] == (inside and is_plausible("car", "road", box, size)), (row, col)
    assert not legal_center_map("car", "sea", size, w, h).any()


def test_legal_boxes_are_all_plausible_and_cover_the_region() -> None:
    boxes = legal_boxes("boat", "sea", 64, stride=2)
    assert len(boxes) > 0
    assert all(is_plausible("boat", "sea", tuple(b), 64) for b in boxes[:: max(1, len(boxes) // 200)])
    assert boxes[:, 3].min() >= BANDS["sea"]["water"][0] * 64 - 0.5
    assert len(legal_boxes("boat", "road", 64)) == 0


def test_rendered_objects_stay_inside_their_boxes() -> None:
    spec = SceneSpec("road", (ObjectSpec("bus", (5, 20, 60, 44), 3),), 64)
    scene = render_scene(spec)
    ys, xs = np.nonzero(scene.label)
    assert xs.min() >= 5 and xs.max() < 60 and ys.min() >= 20 and ys.max() < 44


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: is_plausible("unicorn", "sky", (0, 0, 10, 10), 64), "unknown class 'unicorn'"),
        (lambda: is_plausible("car", "moon", (0, 0, 10, 10), 64), "unknown background 'moon'"),
        (lambda: is_plausible("car", "road", (0, 0, 10, 10), 8), "image_size 8 is outside"),
        (lambda: is_plausible("car", "road", (50, 40, 70, 50), 64), "outside the 64x64 image"),
        (lambda: is_plausible("car", "road", (-1, 40, 20, 50), 64), "outside the 64x64 image"),
        (lambda: is_plausible("car", "road", (20, 40, 10, 50), 64), "is empty"),
        (lambda: is_plausible("car", "road", (1, 2, 3), 64), "four numbers"),
        (lambda: render_object("car", 0, (0, 0, 100, 10), 64), "outside the 64x64 image"),
        (lambda: render_object("unicorn", 0, (0, 0, 10, 10), 64), "unknown class"),
        (lambda: render_scene(SceneSpec("road", (ObjectSpec("car", (0, 0, 10, 10), 0),), 15)), "image_size 15"),
        (lambda: render_scene(SceneSpec("moon", ())), "unknown background"),
        (lambda: sample_legal_box(np.random.default_rng(0), "boat", "road", 64), "never appears on road"),
        (lambda: legal_center_map("car", "road", 64, 0, 5), "must be positive"),
    ],
)
def test_invalid_input_raises_value_error_with_a_clear_message(call, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert isinstance(info.value, InvalidInput)
