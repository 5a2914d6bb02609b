"""Every drawable class: its drawer, and one entry point that renders an object.

An object is a pure function of (class, seed, box, flip): the seed chooses the
look (colour) first and then the shape variation, so the same seed gives the
same object wherever it is placed, which the lighting pairs for RAIN rely on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np

from freemask.world.animals import draw_bird, draw_cat, draw_cow, draw_dog, draw_horse, draw_sheep
from freemask.world.looks import Look, choose_look
from freemask.world.names import DRAWABLE_CLASSES, Box, check_box, check_class, check_image_size
from freemask.world.person import draw_person
from freemask.world.raster import Layer, Part, rasterise
from freemask.world.vehicles import draw_aeroplane, draw_boat, draw_bus, draw_car, draw_train

Drawer = Callable[[np.random.Generator, float, Look], list[Part]]

DRAWERS: Mapping[str, Drawer] = MappingProxyType({
    "aeroplane": draw_aeroplane,
    "bird": draw_bird,
    "boat": draw_boat,
    "bus": draw_bus,
    "car": draw_car,
    "cat": draw_cat,
    "cow": draw_cow,
    "dog": draw_dog,
    "horse": draw_horse,
    "person": draw_person,
    "sheep": draw_sheep,
    "train": draw_train,
})
assert tuple(DRAWERS) == DRAWABLE_CLASSES, "names.DRAWABLE_CLASSES and the drawers disagree"


def object_look(cls: str, seed: int) -> Look:
    """The colour an object of this seed will have, without drawing it (for captions)."""
    return choose_look(check_class(cls), np.random.default_rng(seed))


def supersampling_for(image_size: int) -> int:
    """Small images get more samples per pixel: their objects are only a few pixels across."""
    return 4 if image_size <= 48 else 3 if image_size <= 96 else 2


def render_object(cls: str, seed: int, box: Box, image_size: int, flip: bool = False) -> tuple[Look, Layer]:
    """Draw one object into `box` of a square image; returns its look and its layer (alpha, albedo)."""
    check_class(cls)
    check_image_size(image_size)
    x0, y0, x1, y1 = check_box(box, image_size)
    rng = np.random.default_rng(seed)
    look = choose_look(cls, rng)
    parts = DRAWERS[cls](rng, (x1 - x0) / (y1 - y0), look)
    layer = rasterise(parts, (x0, y0, x1, y1), image_size, flip=flip, supersample=supersampling_for(image_size))
    return look, layer
