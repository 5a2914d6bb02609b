"""freemask.world splits and vocabulary: fixed, pure, disjoint, and consistent with the config."""

from __future__ import annotations

import hashlib

import pytest

from freemask.shared.config import WorldConfig, load_config
from freemask.world import (
    DRAWABLE_BACKGROUNDS,
    DRAWABLE_CLASSES,
    SPLITS,
    VAL_SIZE,
    ReferenceSplit,
    World,
    dataset,
    scene_spec,
)


def digest(scene) -> str:
    return hashlib.sha256(scene.image.tobytes() + scene.label.tobytes()).hexdigest()


def test_validation_split_is_large_enough_and_fixed() -> None:
    assert VAL_SIZE >= 500 and len(ReferenceSplit("val")) == VAL_SIZE
    assert SPLITS["train"].seed != SPLITS["val"].seed


def test_scene_i_is_a_pure_function_of_split_and_index() -> None:
    forward = [scene_spec("val", i) for i in range(5)]
    backward = [scene_spec("val", i) for i in reversed(range(5))][::-1]
    assert forward == backward
    split = ReferenceSplit("val", size=5)
    assert [digest(s) for s in split] == [digest(dataset("val", i)) for i in range(5)]
    assert digest(split[-1]) == digest(split[4])


def test_train_and_validation_do_not_overlap() -> None:
    val = {digest(dataset("val", i)) for i in range(40)}
    train = {digest(dataset("train", i)) for i in range(80)}
    assert len(val) == 40 and len(train) == 80
    assert not val & train
    assert not {scene_spec("val", i) for i in range(300)} & {scene_spec("train", i) for i in range(300)}


def test_split_access_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="unknown split 'test'"):
        dataset("test", 0)
    with pytest.raises(IndexError):
        scene_spec("val", VAL_SIZE)
    with pytest.raises(IndexError):
        ReferenceSplit("val", size=3)[3]
    with pytest.raises(ValueError, match="size"):
        ReferenceSplit("val", size=VAL_SIZE + 1)
    with pytest.raises(ValueError, match="image_size"):
        dataset("val", 0, image_size=8)


def test_world_vocabulary_matches_the_packaged_config() -> None:
    config = load_config(environ={})
    assert config.world.classes == DRAWABLE_CLASSES
    assert config.world.backgrounds == DRAWABLE_BACKGROUNDS
    world = World.from_config(config.world)
    assert [world.class_id(c) for c in world.classes] == list(range(1, 13))
    assert world.class_name(10) == "person"


def test_configured_class_order_sets_the_label_ids() -> None:
    world = World.from_config(WorldConfig(classes=("dog", "cat"), backgrounds=("room", "grass"),
                                          prompt_templates=("a {cls} on the {background}",)))
    assert world.class_id("dog") == 1 and world.class_id("cat") == 2
    for index in range(5):
        scene = ReferenceSplit("val", size=5, world=world)[index]
        assert {o.cls for o in scene.objects} <= {"dog", "cat"}
        assert scene.background in ("room", "grass")
        assert set(scene.label.ravel()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="unknown class 'car'"):
        world.class_id("car")


def test_world_rejects_what_it_cannot_draw() -> None:
    with pytest.raises(ValueError, match="'unicorn' cannot be drawn"):
        World(classes=("unicorn",))
    with pytest.raises(ValueError, match="no configured background"):
        World(classes=("boat",), backgrounds=("room",))
