"""What a scene is made of, as plain immutable values.

A SceneSpec is everything needed to render a scene and caption it, and nothing
else: rendering is a pure function of it. Specs are cheap to sample (no
pixels), so the caption corpus and the placement benchmarks can draw millions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from freemask.shared.errors import InvalidInput
from freemask.world.lighting import NEUTRAL, Lighting
from freemask.world.names import Box, check_image_size



@dataclass(frozen=True)
class ObjectSpec:
    """One object: its class, where it goes, and the seed of its look and shape."""

    cls: str
    box: Box
    seed: int
    flip: bool = False  # facing left instead of right


@dataclass(frozen=True)
class SceneSpec:
    """A background, objects drawn in order (later ones occlude earlier ones), and the lighting."""

    background: str
    objects: tuple[ObjectSpec, ...] = ()
    image_size: int = 64
    seed: int = 0  # background texture and caption wording
    lighting: Lighting = field(default=NEUTRAL)

    def __post_init__(self) -> None:
        check_image_size(self.image_size)
        if not isinstance(self.objects, tuple):
            raise InvalidInput("SceneSpec.objects must be a tuple of ObjectSpec")
        if self.seed < 0 or any(o.seed < 0 for o in self.objects):
            raise InvalidInput("seeds must be non-negative integers")
