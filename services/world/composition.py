"""Sampling what a scene contains, with realistic co-occurrence, and the caption corpus.

Scenes are sampled the way photos happen: pick a background, then a main
subject in proportion to how often it is seen there (rules.RULES weights),
then companions, often more of the same kind (a flock, a row of parked cars).
Every sampled object has a legal box, so sampled scenes are always plausible;
the caption corpus alone adds a little noise (an implausible object now and
then), as real caption corpora have.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from freemask.shared.errors import InvalidInput
from freemask.world.captions import Mention, anchor_of, describe
from freemask.world.lighting import sample_lighting
from freemask.world.looks import choose_swatch
from freemask.world.names import Box, check_image_size
from freemask.world.rules import RULES, class_weights, sample_legal_box
from freemask.world.sampling import cumulative, weighted_index
from freemask.world.spec import ObjectSpec, SceneSpec
from freemask.world.vocabulary import DEFAULT_WORLD, World

OBJECT_COUNTS = (1, 2, 3, 4)
OBJECT_COUNT_WEIGHTS = (0.45, 0.3, 0.15, 0.1)
SAME_CLASS_PROBABILITY = 0.5
# A railway scene has one track, a street rarely more than two buses.
MAX_PER_SCENE: Mapping[str, int] = MappingProxyType({"train": 1, "bus": 2})
# Two boxes may overlap, but by at most this fraction of the smaller one, so
# occlusion happens without hiding an object whole.
MAX_OVERLAP = 0.45
SEED_LIMIT = 2**31


@dataclass(frozen=True)
class Cooccurrence:
    """For one world: which classes are seen on each background and how often.

    Built once per world (it only reads rules.RULES) and handed to the
    samplers, so the corpus's inner loop does no table look-ups.
    """

    world: World
    inhabited: tuple[str, ...]  # backgrounds on which at least one configured class appears
    weights: Mapping[str, np.ndarray]  # background -> weight per world.classes entry

    @classmethod
    def of(cls, world: World) -> Cooccurrence:
        weights = {}
        for background in world.backgrounds:
            seen = class_weights(background, world.classes)
            w = np.array([seen[c] for c in world.classes], dtype=np.float64)
            w.setflags(write=False)
            weights[background] = w
        inhabited = tuple(b for b in world.backgrounds if weights[b].sum() > 0)
        return cls(world, inhabited, MappingProxyType(weights))

    def draw_class(self, rng: np.random.Generator, background: str, exclude: Sequence[str] = ()) -> str | None:
        w = self.weights[background]
        if exclude:
            w = w * np.array([c not in exclude for c in self.world.classes])
        if w.sum() <= 0:
            return None
        return self.world.classes[weighted_index(rng, np.cumsum(w))]


_COUNT_CDF = cumulative(OBJECT_COUNT_WEIGHTS)


def sample_content(rng: np.random.Generator, world: World = DEFAULT_WORLD, background: str | None = None,
                   n_objects: int | None = None, main_class: str | None = None,
                   table: Cooccurrence | None = None) -> tuple[str, list[str]]:
    """A background and the classes in the scene, main subject first (no boxes yet)."""
    table = table if table is not None and table.world == world else Cooccurrence.of(world)
    if main_class is not None:
        world.check_class(main_class)
    if background is None:
        if main_class is not None:
            homes = [b for b in world.backgrounds if table.weights[b][world.class_id(main_class) - 1] > 0]
            if not homes:
                raise InvalidInput(f"no configured background hosts a {main_class}")
            background = homes[int(rng.integers(len(homes)))]
        else:
            background = table.inhabited[int(rng.integers(len(table.inhabited)))]
    world.check_background(background)
    if main_class is not None and table.weights[background][world.class_id(main_class) - 1] <= 0:
        raise InvalidInput(f"a {main_class} never appears on {background}; "
                           f"it may appear on: {', '.join(RULES[main_class].where)}")
    if n_objects is None:
        n_objects = OBJECT_COUNTS[weighted_index(rng, _COUNT_CDF)]
    if n_objects < 0:
        raise InvalidInput(f"n_objects must be >= 0, got {n_objects}")
    main = main_class or table.draw_class(rng, background)
    if main is None:
        raise InvalidInput(f"no configured class appears on {background}")
    if n_objects == 0:
        return background, []
    classes = [main]
    for _ in range(n_objects - 1):
        full = [c for c, limit in MAX_PER_SCENE.items() if classes.count(c) >= limit]
        if rng.random() < SAME_CLASS_PROBABILITY and main not in full:
            classes.append(main)
            continue
        companion = table.draw_class(rng, background, exclude=full)
        if companion is None:
            break
        classes.append(companion)
    return background, classes


def _overlap(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def _is_flyer(cls: str, background: str, box: Box, image_size: int) -> bool:
    return anchor_of(cls, background, box, image_size) == "fly"


def sample_scene_spec(rng: np.random.Generator, world: World = DEFAULT_WORLD, image_size: int = 64,
                      background: str | None = None, n_objects: int | None = None,
                      main_class: str | None = None, tries_per_object: int = 20,
                      table: Cooccurrence | None = None) -> SceneSpec:
    """A plausible scene: content by co-occurrence, legal boxes, limited overlap, random lighting.

    Objects standing on the ground are drawn far to near (by the bottom of
    their box), then flying ones, so nearer objects occlude farther ones as in
    a photo. An object that finds no box clear of the others is left out.
    """
    check_image_size(image_size)
    background, classes = sample_content(rng, world, background, n_objects, main_class, table)
    placed: list[ObjectSpec] = []
    for cls in classes:
        for _ in range(tries_per_object):
            box = sample_legal_box(rng, cls, background, image_size)
            if all(_overlap(box, o.box) <= MAX_OVERLAP for o in placed):
                placed.append(ObjectSpec(cls, box, int(rng.integers(SEED_LIMIT)), bool(rng.random() < 0.5)))
                break
    placed.sort(key=lambda o: (_is_flyer(o.cls, background, o.box, image_size), o.box[3]))
    return SceneSpec(background, tuple(placed), image_size, int(rng.integers(SEED_LIMIT)), sample_lighting(rng))


def _mention(rng: np.random.Generator, cls: str, background: str) -> Mention:
    regions = RULES[cls].where.get(background)
    if regions:
        anchor = regions[weighted_index(rng, cumulative([r.weight for r in regions]))].anchor if len(regions) > 1 \
            else regions[0].anchor
    else:  # an implausible (noise) pairing: fly if the class only ever flies
        anchor = "fly" if all(r.anchor == "fly" for rs in RULES[cls].where.values() for r in rs) else "ground"
    swatch = choose_swatch(cls, rng)
    return Mention(cls, swatch.name, swatch.salient, anchor, float(rng.random()))


def caption_corpus(n: int, seed: int = 0, world: World = DEFAULT_WORLD, noise: float = 0.03) -> Iterator[str]:
    """Stream `n` captions of sampled scenes, deterministic for (seed, n, world, noise).

    Skips rendering and box placement (captions need neither), so it runs at
    tens of thousands of captions a second. With probability `noise` a caption
    has one object of a uniformly random class, which is how a real corpus
    contains "a boat on the road" now and then.
    """
    if n < 0:
        raise InvalidInput(f"n must be >= 0, got {n}")
    if not 0.0 <= noise <= 1.0:
        raise InvalidInput(f"noise must be in [0, 1], got {noise}")
    rng = np.random.default_rng([seed, 7])
    table = Cooccurrence.of(world)
    for _ in range(n):
        background, classes = sample_content(rng, world, n_objects=OBJECT_COUNTS[weighted_index(rng, _COUNT_CDF)],
                                             table=table)
        if rng.random() < noise:
            classes[int(rng.integers(len(classes)))] = world.classes[int(rng.integers(len(world.classes)))]
        yield describe(background, [_mention(rng, c, background) for c in classes], rng)
