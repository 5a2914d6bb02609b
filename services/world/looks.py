"""Class-typical colour palettes, and the choice of one per object.

A look is chosen first from an object's seed, before any shape is drawn, so
captions can name the colour ("a red car") from the seed alone without
rendering. `salient` says whether a caption would naturally mention the
colour: a red bus yes, a white sheep no (white is what sheep are).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from freemask.world.raster import Colour
from freemask.world.sampling import cumulative, weighted_index


@dataclass(frozen=True)
class Look:
    name: str  # colour words for captions: "red", "black and white"
    salient: bool
    colours: Mapping[str, Colour]  # role ("body", "trim", ...) -> albedo

    def __getitem__(self, role: str) -> Colour:
        return self.colours[role]


@dataclass(frozen=True)
class Swatch:
    name: str
    weight: float
    salient: bool
    colours: Mapping[str, Colour]


def _sw(name: str, weight: float, salient: bool, **colours: Colour) -> Swatch:
    return Swatch(name, weight, salient, MappingProxyType(colours))


# Colours shared by many classes.
TYRE = (0.08, 0.08, 0.09)
HUB = (0.62, 0.63, 0.66)
GLASS = (0.55, 0.7, 0.82)
DARK_GLASS = (0.18, 0.24, 0.3)
LAMP = (1.0, 0.9, 0.45)
EYE = (0.05, 0.05, 0.05)

PALETTES: Mapping[str, tuple[Swatch, ...]] = MappingProxyType({
    "aeroplane": (
        _sw("white", 5, True, body=(0.93, 0.94, 0.96), tail=(0.8, 0.1, 0.12), wing=(0.78, 0.8, 0.84)),
        _sw("white", 3, True, body=(0.93, 0.94, 0.96), tail=(0.1, 0.2, 0.6), wing=(0.78, 0.8, 0.84)),
        _sw("silver", 2, True, body=(0.72, 0.74, 0.78), tail=(0.55, 0.57, 0.62), wing=(0.6, 0.62, 0.66)),
        _sw("grey", 1, True, body=(0.45, 0.48, 0.5), tail=(0.38, 0.4, 0.42), wing=(0.4, 0.42, 0.45)),
        _sw("red", 1, True, body=(0.8, 0.12, 0.1), tail=(0.95, 0.95, 0.95), wing=(0.7, 0.1, 0.1)),
    ),
    "bird": (
        _sw("brown", 4, True, body=(0.45, 0.3, 0.18), wing=(0.35, 0.22, 0.12), belly=(0.78, 0.66, 0.5)),
        _sw("black", 3, True, body=(0.1, 0.1, 0.12), wing=(0.05, 0.05, 0.07), belly=(0.2, 0.2, 0.22)),
        _sw("blue", 2, True, body=(0.15, 0.35, 0.8), wing=(0.08, 0.2, 0.6), belly=(0.85, 0.85, 0.9)),
        _sw("red", 2, True, body=(0.82, 0.1, 0.08), wing=(0.6, 0.05, 0.05), belly=(0.85, 0.2, 0.15)),
        _sw("yellow", 1, True, body=(0.95, 0.82, 0.1), wing=(0.2, 0.2, 0.2), belly=(0.98, 0.9, 0.4)),
        _sw("white", 2, True, body=(0.92, 0.92, 0.92), wing=(0.6, 0.62, 0.66), belly=(0.97, 0.97, 0.97)),
    ),
    "boat": (
        _sw("white", 4, True, hull=(0.94, 0.94, 0.94), trim=(0.1, 0.25, 0.6), deck=(0.75, 0.6, 0.4)),
        _sw("red", 2, True, hull=(0.78, 0.1, 0.1), trim=(0.95, 0.95, 0.95), deck=(0.9, 0.9, 0.88)),
        _sw("blue", 2, True, hull=(0.12, 0.25, 0.65), trim=(0.95, 0.95, 0.95), deck=(0.9, 0.9, 0.88)),
        _sw("wooden", 2, True, hull=(0.5, 0.32, 0.16), trim=(0.3, 0.18, 0.08), deck=(0.7, 0.55, 0.35)),
        _sw("green", 1, True, hull=(0.1, 0.45, 0.25), trim=(0.95, 0.9, 0.8), deck=(0.85, 0.85, 0.8)),
    ),
    "bus": (
        _sw("yellow", 3, True, body=(0.98, 0.78, 0.05), trim=(0.1, 0.1, 0.1)),
        _sw("red", 4, True, body=(0.82, 0.08, 0.08), trim=(0.95, 0.95, 0.95)),
        _sw("blue", 2, True, body=(0.1, 0.3, 0.75), trim=(0.95, 0.95, 0.95)),
        _sw("green", 1, True, body=(0.1, 0.55, 0.3), trim=(0.95, 0.95, 0.95)),
        _sw("white", 2, True, body=(0.93, 0.93, 0.93), trim=(0.1, 0.4, 0.8)),
    ),
    "car": (
        _sw("red", 4, True, body=(0.8, 0.06, 0.06)),
        _sw("blue", 3, True, body=(0.1, 0.25, 0.75)),
        _sw("black", 3, True, body=(0.08, 0.08, 0.1)),
        _sw("white", 3, True, body=(0.94, 0.94, 0.94)),
        _sw("silver", 3, True, body=(0.68, 0.7, 0.74)),
        _sw("yellow", 1, True, body=(0.98, 0.8, 0.08)),
        _sw("green", 1, True, body=(0.1, 0.5, 0.2)),
    ),
    "cat": (
        _sw("ginger", 3, True, fur=(0.88, 0.5, 0.16), mark=(0.7, 0.35, 0.08), eye=(0.3, 0.7, 0.2)),
        _sw("black", 3, True, fur=(0.08, 0.08, 0.09), mark=(0.08, 0.08, 0.09), eye=(0.9, 0.8, 0.1)),
        _sw("grey", 3, True, fur=(0.55, 0.56, 0.58), mark=(0.38, 0.39, 0.41), eye=(0.9, 0.75, 0.1)),
        _sw("white", 1, True, fur=(0.94, 0.93, 0.9), mark=(0.85, 0.84, 0.8), eye=(0.2, 0.5, 0.9)),
        _sw("tabby", 2, True, fur=(0.6, 0.45, 0.28), mark=(0.3, 0.2, 0.1), eye=(0.4, 0.7, 0.2)),
    ),
    "cow": (
        _sw("black and white", 4, True, body=(0.95, 0.95, 0.93), patch=(0.07, 0.07, 0.08), muzzle=(0.9, 0.65, 0.65)),
        _sw("brown", 3, True, body=(0.5, 0.28, 0.13), patch=(0.5, 0.28, 0.13), muzzle=(0.75, 0.55, 0.45)),
        _sw("brown and white", 2, True, body=(0.95, 0.93, 0.9), patch=(0.55, 0.3, 0.12), muzzle=(0.9, 0.68, 0.62)),
        _sw("black", 1, True, body=(0.1, 0.1, 0.1), patch=(0.1, 0.1, 0.1), muzzle=(0.3, 0.28, 0.28)),
    ),
    "dog": (
        _sw("brown", 4, True, fur=(0.5, 0.3, 0.14), ear=(0.35, 0.2, 0.08), snout=(0.5, 0.3, 0.14)),
        _sw("black", 3, True, fur=(0.1, 0.1, 0.1), ear=(0.06, 0.06, 0.06), snout=(0.1, 0.1, 0.1)),
        _sw("golden", 3, True, fur=(0.85, 0.65, 0.3), ear=(0.75, 0.52, 0.2), snout=(0.85, 0.65, 0.3)),
        _sw("white", 2, True, fur=(0.93, 0.92, 0.88), ear=(0.7, 0.55, 0.4), snout=(0.93, 0.92, 0.88)),
        _sw("grey", 1, True, fur=(0.5, 0.5, 0.52), ear=(0.35, 0.35, 0.37), snout=(0.6, 0.6, 0.62)),
        _sw("black and tan", 2, True, fur=(0.1, 0.08, 0.07), ear=(0.08, 0.06, 0.05), snout=(0.7, 0.45, 0.2)),
    ),
    "horse": (
        _sw("brown", 4, True, coat=(0.45, 0.25, 0.1), mane=(0.12, 0.08, 0.05)),
        _sw("chestnut", 2, True, coat=(0.62, 0.3, 0.1), mane=(0.55, 0.25, 0.08)),
        _sw("black", 2, True, coat=(0.09, 0.08, 0.08), mane=(0.04, 0.04, 0.04)),
        _sw("white", 2, True, coat=(0.93, 0.92, 0.9), mane=(0.82, 0.8, 0.78)),
        _sw("grey", 1, True, coat=(0.62, 0.62, 0.64), mane=(0.3, 0.3, 0.32)),
    ),
    "person": (
        _sw("red", 3, True, shirt=(0.8, 0.1, 0.1)),
        _sw("blue", 3, True, shirt=(0.12, 0.3, 0.8)),
        _sw("green", 2, True, shirt=(0.12, 0.55, 0.22)),
        _sw("white", 2, True, shirt=(0.95, 0.95, 0.95)),
        _sw("yellow", 2, True, shirt=(0.98, 0.82, 0.1)),
        _sw("black", 2, True, shirt=(0.08, 0.08, 0.08)),
        _sw("orange", 1, True, shirt=(0.95, 0.5, 0.05)),
    ),
    "sheep": (
        _sw("white", 6, False, wool=(0.93, 0.92, 0.86), face=(0.12, 0.1, 0.1)),
        _sw("cream", 2, False, wool=(0.88, 0.83, 0.7), face=(0.15, 0.12, 0.1)),
        _sw("white", 2, False, wool=(0.95, 0.95, 0.93), face=(0.85, 0.8, 0.75)),
        _sw("black", 1, True, wool=(0.15, 0.14, 0.14), face=(0.08, 0.08, 0.08)),
    ),
    "train": (
        _sw("red", 3, True, body=(0.78, 0.1, 0.1), stripe=(0.95, 0.95, 0.95)),
        _sw("blue", 3, True, body=(0.1, 0.25, 0.65), stripe=(0.98, 0.85, 0.1)),
        _sw("green", 2, True, body=(0.1, 0.45, 0.22), stripe=(0.95, 0.9, 0.6)),
        _sw("yellow", 2, True, body=(0.98, 0.8, 0.1), stripe=(0.15, 0.15, 0.15)),
        _sw("white", 2, True, body=(0.93, 0.93, 0.93), stripe=(0.8, 0.1, 0.1)),
        _sw("black", 1, True, body=(0.1, 0.1, 0.11), stripe=(0.75, 0.1, 0.08)),
    ),
})

# Worn by every person whatever the shirt: skin tones, trousers, hair.
SKIN: tuple[Colour, ...] = ((0.96, 0.8, 0.69), (0.87, 0.67, 0.5), (0.72, 0.5, 0.34), (0.5, 0.33, 0.22), (0.33, 0.22, 0.15))
TROUSERS: tuple[Colour, ...] = ((0.15, 0.25, 0.5), (0.1, 0.1, 0.12), (0.4, 0.4, 0.42), (0.45, 0.33, 0.2), (0.2, 0.3, 0.2))
HAIR: tuple[Colour, ...] = ((0.08, 0.06, 0.05), (0.3, 0.18, 0.08), (0.75, 0.6, 0.3), (0.5, 0.5, 0.5), (0.55, 0.25, 0.1))


def jitter(rng: np.random.Generator, colour: Colour, amount: float = 0.05) -> Colour:
    """A slightly different shade of the same colour, so no two objects are identical.

    Mostly a change of brightness; the hue moves little, so a white sheep never turns pink.
    """
    shift = rng.normal(0.0, amount * 0.35, 3) + rng.normal(0.0, amount)
    c = np.clip(np.asarray(colour) + shift, 0.0, 1.0)
    return (float(c[0]), float(c[1]), float(c[2]))


_SWATCH_CDF: Mapping[str, np.ndarray] = MappingProxyType(
    {cls: cumulative([s.weight for s in swatches]) for cls, swatches in PALETTES.items()}
)


def choose_swatch(cls: str, rng: np.random.Generator) -> Swatch:
    """The palette entry, by weight: all a caption needs to know about colour."""
    return PALETTES[cls][weighted_index(rng, _SWATCH_CDF[cls])]


def choose_look(cls: str, rng: np.random.Generator) -> Look:
    """Pick a swatch by weight and jitter it. Must be the first use of an object's rng."""
    swatch = choose_swatch(cls, rng)
    colours = {role: jitter(rng, rgb) for role, rgb in swatch.colours.items()}
    return Look(swatch.name, swatch.salient, MappingProxyType(colours))


def pick(rng: np.random.Generator, options: tuple[Colour, ...]) -> Colour:
    return jitter(rng, options[int(rng.integers(len(options)))], 0.03)


def darker(colour: Colour, factor: float = 0.7) -> Colour:
    return (colour[0] * factor, colour[1] * factor, colour[2] * factor)


def lighter(colour: Colour, amount: float = 0.35) -> Colour:
    return tuple(c + (1.0 - c) * amount for c in colour)  # type: ignore[return-value]
