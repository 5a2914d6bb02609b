"""freemask.world lighting: scene-wide casts and the mismatched pairs RAIN trains on."""

from __future__ import annotations

import numpy as np
import pytest

from freemask.world import (
    NEUTRAL,
    Lighting,
    ObjectSpec,
    SceneSpec,
    render_lighting_pair,
    render_scene,
    sample_lighting,
    sample_mismatched_lighting,
    sample_scene_spec,
)
from freemask.world.lighting import lighting_distance


def test_neutral_lighting_is_identity_and_others_change_the_image() -> None:
    albedo = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(NEUTRAL.apply(albedo), albedo, atol=1e-6)
    assert not np.allclose(Lighting(0.7, (1.1, 1.0, 0.9), 1.2).apply(albedo), albedo)


def test_scene_lighting_applies_to_the_whole_scene() -> None:
    objects = (ObjectSpec("car", (10, 40, 40, 55), 1),)
    dim = render_scene(SceneSpec("road", objects, seed=1, lighting=Lighting(0.6, (1, 1, 1), 1.0)))
    bright = render_scene(SceneSpec("road", objects, seed=1, lighting=NEUTRAL))
    assert (dim.image.astype(int) <= bright.image.astype(int)).all()
    assert dim.image.mean() < 0.7 * bright.image.mean()
    np.testing.assert_array_equal(dim.label, bright.label)


@pytest.mark.parametrize("index", range(6))
def test_lighting_pair_differs_only_where_the_object_is(index: int) -> None:
    spec = sample_scene_spec(np.random.default_rng([9, index]), n_objects=1 + index % 3)
    pair = render_lighting_pair(spec)
    differs = (pair.real != pair.composite).any(axis=2)
    assert differs.any(), "the mismatched object must look different"
    assert not (differs & ~pair.mask).any(), "nothing outside the object may change"
    assert (pair.label_mask <= pair.mask).all()
    # The real image is exactly the ordinary render of the scene.
    np.testing.assert_array_equal(pair.real, render_scene(spec).image)
    assert lighting_distance(pair.object_lighting, pair.scene_lighting) >= 0.35


def test_lighting_pair_is_deterministic_and_takes_a_given_lighting() -> None:
    spec = sample_scene_spec(np.random.default_rng(4), n_objects=2)
    a, b = render_lighting_pair(spec), render_lighting_pair(spec)
    assert a.composite.tobytes() == b.composite.tobytes()
    given = Lighting(1.5, (1.3, 1.0, 0.7), 0.8)
    assert render_lighting_pair(spec, given).object_lighting == given


def test_sampled_lightings_vary_and_mismatches_keep_their_distance() -> None:
    rng = np.random.default_rng(0)
    scenes = [sample_lighting(rng) for _ in range(50)]
    assert len({l.gain for l in scenes}) == 50
    for scene in scenes:
        assert lighting_distance(sample_mismatched_lighting(rng, scene), scene) >= 0.35


def test_invalid_lighting_and_empty_pair_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive gain"):
        Lighting(0.0)
    with pytest.raises(ValueError, match="at least one object"):
        render_lighting_pair(SceneSpec("sky", ()))
