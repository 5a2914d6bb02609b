"""The names the renderer can draw, the label-id conventions, and input checks.

Kept free of other world imports so that every module (rules, renderer,
vocabulary) can use the same checks and messages without import cycles.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from freemask.shared.errors import InvalidInput

BACKGROUND_ID = 0
IGNORE_ID = 255

# Everything the renderer can draw, in the order of the packaged default.yaml.
# A test checks the two lists agree, so a change to one is noticed at once.
DRAWABLE_CLASSES: tuple[str, ...] = (
    "aeroplane", "bird", "boat", "bus", "car", "cat", "cow", "dog", "horse", "person", "sheep", "train",
)
DRAWABLE_BACKGROUNDS: tuple[str, ...] = ("sky", "sea", "road", "grass", "field", "room", "rail")

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels

MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 4096


def check_image_size(image_size: int) -> int:
    """Images are square; below 16 px the silhouettes are no longer recognisable."""
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise InvalidInput(f"image_size must be an int, got {type(image_size).__name__}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise InvalidInput(f"image_size {image_size} is outside [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]")
    return image_size


def check_class(name: str, known: Iterable[str] = DRAWABLE_CLASSES) -> str:
    known = tuple(known)
    if name not in known:
        raise InvalidInput(f"unknown class {str(name)[:64]!r}; known classes: {', '.join(known)}")
    return name


def check_background(name: str, known: Iterable[str] = DRAWABLE_BACKGROUNDS) -> str:
    known = tuple(known)
    if name not in known:
        raise InvalidInput(f"unknown background {str(name)[:64]!r}; known backgrounds: {', '.join(known)}")
    return name


def check_box(box: Box, image_size: int) -> Box:
    """A box is (x0, y0, x1, y1) in pixels, non-empty and inside the image."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise InvalidInput(f"box must be four numbers (x0, y0, x1, y1), got {box!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InvalidInput(f"box {box!r} has a non-finite coordinate")
    if not (x0 < x1 and y0 < y1):
        raise InvalidInput(f"box {box!r} is empty: need x0 < x1 and y0 < y1")
    if x0 < 0 or y0 < 0 or x1 > image_size or y1 > image_size:
        raise InvalidInput(f"box {box!r} lies outside the {image_size}x{image_size} image")
    return (x0, y0, x1, y1)
