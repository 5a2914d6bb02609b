"""Where each class may plausibly appear: one table, and the functions that read it.

A placement is plausible when the background is one the class lives on, the
box's aspect and scale are typical of the class, and the box sits in a legal
region of that background's layout (backgrounds.BANDS):

- a *grounded* region says where the box's bottom edge (feet, wheels, hull) may
  stand: cars stand on the road band, boats float on the water band;
- a *flying* region says the whole box must lie inside the band: aeroplanes and
  birds in the sky.

Scale is the box's longer side over the image side. Because the rule never
depends on a scene's seed, FOPA's ground-truth heatmaps (`legal_center_map`)
and the thesaurus benchmark can both be computed from the table alone.
`weight` says how often the class is seen on that background: it drives the
co-occurrence of sampled scenes and captions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import numpy as np

from freemask.shared.errors import InvalidInput
from freemask.world.backgrounds import BANDS
from freemask.world.names import (
    DRAWABLE_CLASSES,
    Box,
    check_background,
    check_box,
    check_class,
    check_image_size,
)
from freemask.world.sampling import cumulative, weighted_index

Anchor = Literal["ground", "fly"]
# Integer boxes from the samplers are rounded; half a pixel of slack on every
# coordinate keeps a rounded legal box legal.
TOLERANCE_PX = 0.5


@dataclass(frozen=True)
class Region:
    band: str
    anchor: Anchor
    weight: float
    aspect: tuple[float, float] | None = None  # overrides the class's (a flying bird is wider than a perched one)


@dataclass(frozen=True)
class ClassRule:
    aspect: tuple[float, float]  # w / h
    scale: tuple[float, float]  # longer side / image side
    where: Mapping[str, tuple[Region, ...]]  # background -> regions (any one suffices)


def _rule(aspect: tuple[float, float], scale: tuple[float, float], **where: tuple[Region, ...]) -> ClassRule:
    return ClassRule(aspect, scale, MappingProxyType(where))


def _fly(weight: float, band: str = "sky", aspect: tuple[float, float] | None = None) -> tuple[Region, ...]:
    return (Region(band, "fly", weight, aspect),)


def _on(band: str, weight: float, aspect: tuple[float, float] | None = None) -> tuple[Region, ...]:
    return (Region(band, "ground", weight, aspect),)


# The bird drawer draws wings spread at aspect >= 1.15 and a perched bird below.
_FLYING_BIRD, _PERCHED_BIRD = (1.15, 1.6), (0.85, 1.12)


RULES: Mapping[str, ClassRule] = MappingProxyType({
    "aeroplane": _rule((1.6, 2.6), (0.3, 0.75), sky=_fly(0.55), sea=_fly(0.15), field=_fly(0.05), grass=_fly(0.03)),
    "bird": _rule((0.85, 1.6), (0.14, 0.35), sky=_fly(0.45, aspect=_FLYING_BIRD), sea=_fly(0.25, aspect=_FLYING_BIRD),
                  rail=_fly(0.1, aspect=_FLYING_BIRD),
                  grass=_fly(0.04, aspect=_FLYING_BIRD) + _on("grass", 0.06, _PERCHED_BIRD),
                  field=_fly(0.04, aspect=_FLYING_BIRD) + _on("field", 0.06, _PERCHED_BIRD)),
    "boat": _rule((1.0, 1.8), (0.25, 0.7), sea=_on("water", 0.6)),
    "bus": _rule((1.9, 2.8), (0.45, 0.95), road=_on("road", 0.2)),
    "car": _rule((1.6, 2.4), (0.28, 0.7), road=_on("road", 0.5)),
    "cat": _rule((0.75, 1.6), (0.2, 0.45), room=_on("floor", 0.4), grass=_on("grass", 0.05)),
    "cow": _rule((1.3, 1.9), (0.3, 0.65), grass=_on("grass", 0.2), field=_on("field", 0.25)),
    "dog": _rule((1.0, 1.6), (0.2, 0.5), grass=_on("grass", 0.15), room=_on("floor", 0.3), road=_on("road", 0.08),
                 field=_on("field", 0.05)),
    "horse": _rule((1.0, 1.45), (0.35, 0.8), grass=_on("grass", 0.15), field=_on("field", 0.2)),
    "person": _rule((0.28, 0.5), (0.35, 0.9), grass=_on("grass", 0.15), room=_on("floor", 0.3),
                    road=_on("road", 0.22), field=_on("field", 0.1)),
    "sheep": _rule((1.15, 1.6), (0.25, 0.55), grass=_on("grass", 0.2), field=_on("field", 0.25)),
    "train": _rule((2.8, 4.5), (0.6, 1.0), rail=_on("track", 0.9)),
})
assert tuple(RULES) == DRAWABLE_CLASSES
assert all(r.band in BANDS[bg] for rule in RULES.values() for bg, rs in rule.where.items() for r in rs)


def allowed_backgrounds(cls: str) -> tuple[str, ...]:
    return tuple(RULES[check_class(cls)].where)


def class_weights(background: str, classes: Sequence[str]) -> dict[str, float]:
    """How often each class is seen on `background` (0 where it never is)."""
    check_background(background)
    return {c: sum(r.weight for r in RULES[c].where.get(background, ())) for c in classes}


def _shape_ok(rule: ClassRule, region: Region, w: float, h: float, size: int) -> bool:
    t = TOLERANCE_PX
    lo_a, hi_a = region.aspect or rule.aspect
    if (w + t) / max(h - t, 1e-6) < lo_a or (w - t) / (h + t) > hi_a:
        return False
    longer = max(w, h)
    lo_s, hi_s = rule.scale
    return (longer + t) / size >= lo_s and (longer - t) / size <= hi_s


def _region_ok(region: Region, background: str, y0: float, y1: float, size: int) -> bool:
    top, bottom = BANDS[background][region.band]
    t = TOLERANCE_PX
    if region.anchor == "ground":
        return top * size - t <= y1 <= bottom * size + t
    return y0 >= top * size - t and y1 <= bottom * size + t


def is_plausible(cls: str, background: str, box: Box, image_size: int) -> bool:
    """Whether an object of `cls` in `box` (pixels x0, y0, x1, y1) looks right on `background`.

    Raises InvalidInput (a ValueError) for an unknown class or background, an
    image smaller than 16 px, or a box that is empty or leaves the image.
    """
    rule = RULES[check_class(cls)]
    check_background(background)
    check_image_size(image_size)
    x0, y0, x1, y1 = check_box(box, image_size)
    return any(
        _shape_ok(rule, r, x1 - x0, y1 - y0, image_size) and _region_ok(r, background, y0, y1, image_size)
        for r in rule.where.get(background, ())
    )


def legal_center_map(cls: str, background: str, image_size: int, width: float, height: float) -> np.ndarray:
    """bool (size, size): True at pixel (row, col) if a width x height box centred on
    that pixel's centre is plausible. FOPA's ground-truth heatmap for one scale.

    Legality separates into a row condition (the regions) and a column
    condition (staying in the image), so the map is an outer product.
    """
    rule = RULES[check_class(cls)]
    check_background(background)
    size = check_image_size(image_size)
    if not (width > 0 and height > 0):
        raise InvalidInput(f"box size must be positive, got {width} x {height}")
    centres = np.arange(size, dtype=np.float64) + 0.5
    regions = [r for r in rule.where.get(background, ()) if _shape_ok(rule, r, width, height, size)]
    if not regions:
        return np.zeros((size, size), dtype=bool)
    y0, y1 = centres - height / 2, centres + height / 2
    x0, x1 = centres - width / 2, centres + width / 2
    rows = (y0 >= 0) & (y1 <= size)
    rows &= np.logical_or.reduce([_region_rows(r, background, y0, y1, size) for r in regions])
    cols = (x0 >= 0) & (x1 <= size)
    return rows[:, None] & cols[None, :]


def _region_rows(region: Region, background: str, y0: np.ndarray, y1: np.ndarray, size: int) -> np.ndarray:
    top, bottom = BANDS[background][region.band]
    t = TOLERANCE_PX
    if region.anchor == "ground":
        return (y1 >= top * size - t) & (y1 <= bottom * size + t)
    return (y0 >= top * size - t) & (y1 <= bottom * size + t)


def typical_sizes(cls: str, image_size: int, scales: int = 3, aspects: int = 3) -> list[tuple[int, int]]:
    """A small grid of (width, height) in pixels spanning the class's legal scale and aspect ranges."""
    rule = RULES[check_class(cls)]
    sizes: list[tuple[int, int]] = []
    for s in np.linspace(*rule.scale, scales):
        for a in np.linspace(*rule.aspect, aspects + 2)[1:-1]:  # inner aspects, clear of the edges
            longer = s * image_size
            w, h = (longer, longer / a) if a >= 1 else (longer * a, longer)
            size = (max(1, int(round(w))), max(1, int(round(h))))
            if size not in sizes:
                sizes.append(size)
    return sizes


def legal_boxes(cls: str, background: str, image_size: int, sizes: Sequence[tuple[int, int]] | None = None,
                stride: int = 1) -> np.ndarray:
    """Every legal integer box (N, 4: x0, y0, x1, y1) for the given (width, height)
    sizes (default: `typical_sizes`), with corners on a `stride`-pixel grid."""
    check_image_size(image_size)
    if stride < 1:
        raise InvalidInput(f"stride must be >= 1, got {stride}")
    boxes: list[np.ndarray] = []
    for w, h in sizes if sizes is not None else typical_sizes(cls, image_size):
        if w > image_size or h > image_size:
            continue
        x0 = np.arange(0, image_size - w + 1, stride)
        y0 = np.arange(0, image_size - h + 1, stride)
        xx, yy = np.meshgrid(x0, y0)
        candidates = np.stack([xx, yy, xx + w, yy + h], axis=-1).reshape(-1, 4)
        keep = [is_plausible(cls, background, tuple(b), image_size) for b in candidates[:: max(1, len(x0))]]
        # Legality does not depend on x (inside the image), so test one box per row.
        row_ok = np.repeat(np.asarray(keep, dtype=bool), len(x0))
        boxes.append(candidates[row_ok])
    return np.concatenate(boxes).astype(np.int64) if boxes else np.zeros((0, 4), dtype=np.int64)


def sample_legal_box(rng: np.random.Generator, cls: str, background: str, image_size: int,
                     max_tries: int = 200) -> tuple[int, int, int, int]:
    """A random legal integer box: a region by weight, then aspect (log-uniform), scale, position."""
    rule = RULES[check_class(cls)]
    check_background(background)
    size = check_image_size(image_size)
    regions = rule.where.get(background)
    if not regions:
        raise InvalidInput(f"a {cls} never appears on {background}; it may appear on: {', '.join(rule.where)}")
    cdf = cumulative([r.weight for r in regions])
    for _ in range(max_tries):
        region = regions[weighted_index(rng, cdf)]
        aspect = float(np.exp(rng.uniform(*np.log(region.aspect or rule.aspect))))
        top, bottom = BANDS[background][region.band]
        # The largest scale that still fits the region (a plane must fit in a sea's sky band).
        max_h = (bottom - top) if region.anchor == "fly" else bottom
        max_longer = min(rule.scale[1], max_h * max(aspect, 1.0), 1.0)
        if max_longer < rule.scale[0]:
            continue
        longer = float(rng.uniform(rule.scale[0], max_longer)) * size
        w, h = (longer, longer / aspect) if aspect >= 1 else (longer * aspect, longer)
        w, h = max(1, int(round(w))), max(1, int(round(h)))
        if w > size or h > size:
            continue
        if region.anchor == "ground":
            lo, hi = max(h, math.ceil(top * size)), min(size, math.floor(bottom * size))
            if lo > hi:
                continue
            y1 = int(rng.integers(lo, hi + 1))
            y0 = y1 - h
        else:
            lo, hi = math.ceil(top * size), min(size, math.floor(bottom * size)) - h
            if lo > hi:
                continue
            y0 = int(rng.integers(lo, hi + 1))
            y1 = y0 + h
        x0 = int(rng.integers(0, size - w + 1))
        box = (x0, y0, x0 + w, y1)
        # Rounding may not push the aspect out of the region's range, even within
        # tolerance: drawers choose a pose from it (a bird's wings spread at >= 1.15).
        lo_a, hi_a = region.aspect or rule.aspect
        if lo_a <= w / h <= hi_a and is_plausible(cls, background, box, size):
            return box
    raise InvalidInput(f"no legal box for a {cls} on {background} at {size}x{size} after {max_tries} tries")
