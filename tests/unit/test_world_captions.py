"""freemask.world captions: what they mention, their variety, and the corpus's co-occurrence."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest

from freemask.world import (
    BACKGROUND_WORDS,
    CLASS_NOUNS,
    RULES,
    ObjectSpec,
    SceneSpec,
    canonical_words,
    caption_corpus,
    dataset,
    render_scene,
)


def mentioned(caption: str) -> set[str]:
    """The classes and backgrounds a caption names, through the canonical word table."""
    words = canonical_words()
    return {words[w] for w in re.findall(r"[a-z]+", caption.lower()) if w in words}


def test_scene_captions_mention_every_class_present_and_the_background() -> None:
    for index in range(60):
        scene = dataset("train", index)
        names = mentioned(scene.caption)
        assert {o.cls for o in scene.objects} <= names, scene.caption
        assert scene.background in names, scene.caption
        for obj in scene.objects:
            assert {obj.cls, scene.background} <= mentioned(obj.caption), obj.caption


def test_captions_use_counts_colours_and_class_verbs() -> None:
    sheep = SceneSpec("field", tuple(ObjectSpec("sheep", (4 + 20 * i, 30, 24 + 20 * i, 45), i) for i in range(2)))
    captions = [render_scene(SceneSpec(sheep.background, sheep.objects, seed=s)).caption for s in range(30)]
    assert all(re.search(r"\b(two|several)\b", c) for c in captions)
    assert any("grazing" in c for c in captions)
    car = (ObjectSpec("car", (10, 40, 40, 55), seed=0),)
    car_captions = [render_scene(SceneSpec("road", car, seed=s)).caption for s in range(30)]
    colour = render_scene(SceneSpec("road", car)).objects[0].colour
    assert any(colour in c for c in car_captions) and any(colour not in c for c in car_captions)
    assert any(v in c for c in car_captions for v in ("parked", "driving"))


def test_wording_varies() -> None:
    spec_objects = (ObjectSpec("dog", (10, 30, 34, 50), 1), ObjectSpec("person", (36, 10, 52, 58), 2))
    captions = {render_scene(SceneSpec("grass", spec_objects, seed=s)).caption for s in range(40)}
    assert len(captions) >= 15


def test_corpus_is_deterministic_and_streams() -> None:
    first = list(caption_corpus(500, seed=3))
    assert first == list(caption_corpus(500, seed=3))
    assert first != list(caption_corpus(500, seed=4))
    assert list(itertools.islice(caption_corpus(10**9, seed=3), 500)) == first
    assert len(set(first)) > 250


def test_corpus_co_occurrence_is_realistic_with_some_noise() -> None:
    pairs: Counter[tuple[str, str]] = Counter()
    for caption in caption_corpus(4000, seed=0):
        names = mentioned(caption)
        backgrounds = [n for n in names if n in BACKGROUND_WORDS]
        assert len(backgrounds) == 1, caption
        for cls in names - set(backgrounds):
            pairs[(cls, backgrounds[0])] += 1
    plausible = sum(n for (c, b), n in pairs.items() if b in RULES[c].where)
    implausible = sum(n for (c, b), n in pairs.items() if b not in RULES[c].where)
    assert implausible > 0, "a realistic corpus has some noise"
    assert plausible > 15 * implausible
    assert pairs[("boat", "sea")] > 50 * max(1, pairs[("boat", "road")])
    assert pairs[("car", "road")] > pairs[("car", "grass")]


def test_vocabulary_tables_cover_every_class_and_background() -> None:
    assert set(CLASS_NOUNS) == set(RULES)
    words = canonical_words()
    assert set(words.values()) == set(RULES) | set(BACKGROUND_WORDS)
    assert words["airplane"] == "aeroplane" and words["people"] == "person" and words["railway"] == "rail"


@pytest.mark.parametrize(("n", "noise"), [(-1, 0.0), (1, 1.5)])
def test_corpus_rejects_bad_arguments(n: int, noise: float) -> None:
    with pytest.raises(ValueError):
        next(caption_corpus(n, noise=noise))


def test_scene_with_no_objects_still_has_a_caption() -> None:
    caption = render_scene(SceneSpec("sea", (), seed=1)).caption
    assert mentioned(caption) == {"sea"}
