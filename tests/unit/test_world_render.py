"""freemask.world rendering: determinism, exact label maps, every class at every size."""

from __future__ import annotations

import numpy as np
import pytest

from freemask.world import (
    BACKGROUND_ID,
    DEFAULT_WORLD,
    IGNORE_ID,
    RULES,
    ObjectSpec,
    SceneSpec,
    dataset,
    render_object,
    render_objects_one_by_one,
    render_scene,
    sample_scene_spec,
    typical_sizes,
)
from freemask.world.lighting import Lighting


def overlapping_spec(image_size: int = 64) -> SceneSpec:
    """Three animals on grass whose boxes overlap, so occlusion is exercised."""
    s = image_size / 64
    return SceneSpec(
        "grass",
        (
            ObjectSpec("cow", (4 * s, 20 * s, 44 * s, 48 * s), seed=1),
            ObjectSpec("sheep", (24 * s, 30 * s, 52 * s, 52 * s), seed=2, flip=True),
            ObjectSpec("person", (30 * s, 14 * s, 44 * s, 60 * s), seed=3),
        ),
        image_size=image_size,
        seed=5,
        lighting=Lighting(0.9, (1.05, 1.0, 0.95), 1.1),
    )


def test_same_spec_gives_identical_bytes() -> None:
    a, b = render_scene(overlapping_spec()), render_scene(overlapping_spec())
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert a.instances.tobytes() == b.instances.tobytes()
    assert a.caption == b.caption


def test_same_split_index_gives_identical_scene_and_different_index_differs() -> None:
    assert dataset("train", 7).image.tobytes() == dataset("train", 7).image.tobytes()
    assert dataset("train", 7).image.tobytes() != dataset("train", 8).image.tobytes()


def test_seed_changes_background_and_object_seed_changes_object() -> None:
    spec = overlapping_spec()
    other_seed = SceneSpec(spec.background, spec.objects, spec.image_size, seed=6, lighting=spec.lighting)
    assert render_scene(spec).image.tobytes() != render_scene(other_seed).image.tobytes()
    _, a = render_object("car", 1, (4, 20, 44, 40), 64)
    _, b = render_object("car", 2, (4, 20, 44, 40), 64)
    assert a.colour.tobytes() != b.colour.tobytes()


def test_output_types_and_shapes() -> None:
    scene = render_scene(overlapping_spec())
    assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
    assert scene.label.shape == (64, 64) and scene.label.dtype == np.uint8
    assert scene.instances.shape == (64, 64) and scene.instances.dtype == np.uint16
    assert [o.instance_id for o in scene.objects] == [1, 2, 3]


@pytest.mark.parametrize("size", [32, 64, 128])
def test_label_map_is_the_last_object_drawn_at_each_pixel(size: int) -> None:
    spec = overlapping_spec(size)
    scene = render_scene(spec)
    # Each object rendered alone, through the whole scene path, gives its own mask.
    alone = [render_scene(SceneSpec(spec.background, (o,), size, spec.seed)).label > 0 for o in spec.objects]
    assert [m.sum() for m in alone] == [m.sum() for m in render_objects_one_by_one(spec)]
    expected_label = np.zeros((size, size), np.uint8)
    expected_instance = np.zeros((size, size), np.uint16)
    for index, (obj, mask) in enumerate(zip(spec.objects, alone), start=1):
        expected_label[mask] = DEFAULT_WORLD.class_id(obj.cls)
        expected_instance[mask] = index
    np.testing.assert_array_equal(scene.label, expected_label)
    np.testing.assert_array_equal(scene.instances, expected_instance)
    # The scene really has occlusion: a later object hides part of an earlier one.
    assert (alone[0] & alone[2]).any() and ((scene.instances == 1) & alone[2]).sum() == 0
    assert [o.visible_pixels for o in scene.objects] == [int((scene.instances == i).sum()) for i in (1, 2, 3)]


def test_instance_map_agrees_with_label_map_and_background_is_zero() -> None:
    for index in range(12):
        scene = dataset("val", index)
        assert set(np.unique(scene.instances)) <= {0} | {o.instance_id for o in scene.objects}
        assert ((scene.label == BACKGROUND_ID) == (scene.instances == 0)).all()
        for obj in scene.objects:
            assert (scene.label[scene.instances == obj.instance_id] == obj.class_id).all()
        assert IGNORE_ID not in scene.label


def test_pixels_no_object_touches_are_the_background_render() -> None:
    spec = overlapping_spec()
    scene = render_scene(spec)
    empty = render_scene(SceneSpec(spec.background, (), spec.image_size, spec.seed, spec.lighting))
    touched = np.zeros((64, 64), bool)
    for obj in spec.objects:
        _, layer = render_object(obj.cls, obj.seed, obj.box, 64, obj.flip)
        touched[layer.window] |= layer.alpha > 0
    assert (scene.image[~touched] == empty.image[~touched]).all()
    assert (scene.image[touched] != empty.image[touched]).any()
    assert (empty.label == 0).all() and (empty.instances == 0).all()


def test_edge_ignore_marks_only_object_rims() -> None:
    spec = overlapping_spec()
    exact = render_scene(spec)
    rimmed = render_scene(spec, edge_ignore=True)
    ignored = rimmed.label == IGNORE_ID
    assert ignored.any()
    np.testing.assert_array_equal(rimmed.label[~ignored], exact.label[~ignored])
    # Every ignored pixel touches an object, and each object keeps a solid interior.
    near = np.zeros_like(ignored)
    for obj in spec.objects:
        _, layer = render_object(obj.cls, obj.seed, obj.box, 64, obj.flip)
        near[layer.window] |= layer.alpha > 0
    assert not (ignored & ~near).any()
    assert all((rimmed.instances == i).any() for i in (1, 2, 3))


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("cls", list(RULES))
def test_every_class_renders_a_nontrivial_mask(cls: str, size: int) -> None:
    w, h = typical_sizes(cls, size, scales=3, aspects=1)[1]  # the middle scale
    box = ((size - w) / 2, (size - h) / 2, (size + w) / 2, (size + h) / 2)
    _, layer = render_object(cls, seed=3, box=box, image_size=size)
    mask = layer.mask
    area = mask.sum()
    assert area >= max(12, 0.15 * w * h), f"{cls} at {size}px covers only {area} of {w * h} box pixels"
    assert area < 0.95 * w * h, f"{cls} at {size}px fills its box: not a silhouette"
    ys, xs = np.nonzero(mask)
    # The silhouette spans its box: the box is (nearly) the object's tight bounding box.
    assert xs.max() - xs.min() + 1 >= 0.75 * w and ys.max() - ys.min() + 1 >= 0.75 * h


@pytest.mark.parametrize("cls", list(RULES))
def test_classes_vary_in_colour_and_shape(cls: str) -> None:
    w, h = typical_sizes(cls, 64, scales=3, aspects=1)[2]  # the largest scale
    box = (0.0, 0.0, float(w), float(h))
    looks, masks = set(), set()
    for seed in range(12):
        look, layer = render_object(cls, seed, box, 64)
        looks.add(look.name)
        masks.add(layer.mask.tobytes())
    assert len(looks) >= 2 and len(masks) >= 6


def test_flip_mirrors_the_object() -> None:
    _, right = render_object("dog", 4, (10, 10, 50, 40), 64)
    _, left = render_object("dog", 4, (10, 10, 50, 40), 64, flip=True)
    np.testing.assert_allclose(right.alpha[:, ::-1], left.alpha, atol=1e-6)


def test_sampled_multi_object_scenes_render_at_other_sizes() -> None:
    for size in (32, 96, 160):
        spec = sample_scene_spec(np.random.default_rng(size), image_size=size, n_objects=3)
        scene = render_scene(spec)
        assert scene.image.shape == (size, size, 3)
        assert (scene.label > 0).sum() > 0
