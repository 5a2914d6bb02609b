"""FOPA training pairs from the reference world, whose rules say where each class may go.

A pair is a background scene (a rendered reference scene, possibly with objects
already in it) and a foreground object (cut from a rendered single-object scene,
with its exact mask). Its ground truth is, for every scale, the world's
`legal_center_map` for the foreground's class and aspect on that background: the
cells where a box of that scale is plausible. Pairs whose class never appears on
the background are kept on purpose (a share set by `positive_rate`): their heatmaps
are all zero, which teaches the model to score an odd pairing low.

Scenes are rendered once into pools (backgrounds by name, foregrounds by class)
and paired at random per batch, so an epoch of pairs costs no rendering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from freemask.placement.geometry import (
    BACKGROUND_SIDE,
    HEATMAP_SIDE,
    SCALES,
    background_input,
    box_size,
    foreground_aspect,
    foreground_input,
)
from freemask.world import (
    DEFAULT_WORLD,
    ObjectSpec,
    SceneSpec,
    World,
    allowed_backgrounds,
    class_weights,
    legal_center_map,
    render_scene,
    sample_legal_box,
    sample_lighting,
    sample_scene_spec,
)

FOREGROUND_RENDER_SIDES = (32, 64)  # generated singles are 32 px; rendered scenes 64 px
_SEED_LIMIT = 2**31


@dataclass(frozen=True)
class Foreground:
    cls: str
    input: np.ndarray  # (4, 32, 32) float32, geometry.foreground_input
    aspect: float  # mask box width / height, in pixels


@dataclass(frozen=True)
class Batch:
    backgrounds: np.ndarray  # (B, 3, 64, 64) float32
    foregrounds: np.ndarray  # (B, 4, 32, 32) float32
    heatmaps: np.ndarray  # (B, S, 32, 32) float32 in {0, 1}
    aspects: np.ndarray  # (B,) float64
    classes: tuple[str, ...]
    background_names: tuple[str, ...]


def legal_heatmaps(cls: str, background: str, aspect: float) -> np.ndarray:
    """(S, 32, 32) bool: where a box of each scale, with this aspect, may be centred."""
    maps = np.zeros((len(SCALES), HEATMAP_SIDE, HEATMAP_SIDE), dtype=bool)
    for s, scale in enumerate(SCALES):
        w, h = box_size(scale, aspect, BACKGROUND_SIDE, BACKGROUND_SIDE)
        maps[s] = legal_center_map(cls, background, HEATMAP_SIDE, w * HEATMAP_SIDE, h * HEATMAP_SIDE)
    return maps


def render_single_object(rng: np.random.Generator, cls: str) -> tuple[np.ndarray, np.ndarray]:
    """One object of `cls` on one of its backgrounds: the image and the object's exact mask."""
    side = int(rng.choice(FOREGROUND_RENDER_SIDES))
    background = str(rng.choice(allowed_backgrounds(cls)))
    box = sample_legal_box(rng, cls, background, side)
    spec = SceneSpec(background, (ObjectSpec(cls, box, int(rng.integers(_SEED_LIMIT)), bool(rng.random() < 0.5)),),
                     side, int(rng.integers(_SEED_LIMIT)), sample_lighting(rng))
    scene = render_scene(spec)
    return scene.image, scene.instances == 1


def render_foreground(rng: np.random.Generator, cls: str) -> Foreground:
    image, mask = render_single_object(rng, cls)
    return Foreground(cls, foreground_input(image, mask), foreground_aspect(mask))


class PairSampler:
    """Pools of rendered backgrounds and foregrounds, paired at random into batches."""

    def __init__(self, seed: int, backgrounds_per_name: int, foregrounds_per_class: int,
                 world: World = DEFAULT_WORLD, positive_rate: float = 0.85, progress: bool = False) -> None:
        self.world = world
        self.positive_rate = positive_rate
        rng = np.random.default_rng([seed, 11])
        total = len(world.backgrounds) * backgrounds_per_name + len(world.classes) * foregrounds_per_class
        bar = tqdm(total=total, desc="render pools", unit="scene", disable=not progress)
        self.backgrounds: dict[str, list[np.ndarray]] = {}
        for name in world.backgrounds:
            pool = []
            for _ in range(backgrounds_per_name):
                spec = sample_scene_spec(rng, world, BACKGROUND_SIDE, background=name,
                                         n_objects=int(rng.integers(0, 3)))
                pool.append(background_input(render_scene(spec, world).image))
                bar.update()
            self.backgrounds[name] = pool
        self.foregrounds: dict[str, list[Foreground]] = {}
        for cls in world.classes:
            self.foregrounds[cls] = [render_foreground(rng, cls) for _ in range(foregrounds_per_class)]
            bar.update(foregrounds_per_class)
        bar.close()
        self._rng = np.random.default_rng([seed, 12])

    def _pick_class(self, background: str) -> str:
        weights = class_weights(background, self.world.classes)
        if self._rng.random() < self.positive_rate and any(weights.values()):
            names = [c for c, w in weights.items() if w > 0]
            p = np.array([weights[c] for c in names])
            return names[int(self._rng.choice(len(names), p=p / p.sum()))]
        return self.world.classes[int(self._rng.integers(len(self.world.classes)))]

    def batch(self, size: int) -> Batch:
        names = [self.world.backgrounds[int(i)] for i in self._rng.integers(len(self.world.backgrounds), size=size)]
        backgrounds, foregrounds = [], []
        for name in names:
            pool = self.backgrounds[name]
            backgrounds.append(pool[int(self._rng.integers(len(pool)))])
            fg_pool = self.foregrounds[self._pick_class(name)]
            foregrounds.append(fg_pool[int(self._rng.integers(len(fg_pool)))])
        return _stack(names, backgrounds, foregrounds)


def _stack(names: Sequence[str], backgrounds: Sequence[np.ndarray], foregrounds: Sequence[Foreground]) -> Batch:
    return Batch(
        backgrounds=np.stack(backgrounds), foregrounds=np.stack([f.input for f in foregrounds]),
        heatmaps=np.stack([legal_heatmaps(f.cls, n, f.aspect) for f, n in zip(foregrounds, names)]).astype(np.float32),
        aspects=np.array([f.aspect for f in foregrounds]), classes=tuple(f.cls for f in foregrounds),
        background_names=tuple(names))
