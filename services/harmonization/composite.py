"""Pasting one object into a scene with occlusion-correct label and instance maps.

The foreground is cut to its mask's tight box and scaled to the placement box:
the image bilinearly, the mask bilinearly and then cut at 0.5. Cutting a
bilinear mask (rather than nearest-neighbour resizing) gives smooth outlines when
an object is enlarged instead of blocky steps, and it is exactly how FOPA saw
the object (`freemask.placement.geometry.foreground_input`), so the pasted
shape is the one whose placement was scored.

The binarised mask is the truth: its pixels get the new class id in the label map
and the new instance id in the instance map, overwriting whatever was there, so
the object occludes older ones by construction and the maps stay exact. Only the
image is softened: with `feather_px` > 0 the outermost rings of the object blend
with the scene behind them. The ramp lies inside the mask, so every pixel outside
the new object keeps its scene value bit for bit.

Boxes here are (x, y, width, height) in scene pixels, as in `common.BoundingBox`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from freemask.shared.errors import InvalidInput, Unusable
from freemask.shared.images import check_cutout, check_rgb, size_text

PixelBox = tuple[int, int, int, int]
# Harmonizes the pasted pixels: (image uint8 H×W×3, object mask bool H×W) -> image.
HarmonizeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

MAX_CLASS_ID = 254  # 255 is "ignore" in label maps
MAX_INSTANCE_ID = 65535  # instance maps are 16-bit


@dataclass(frozen=True)
class Extent:
    """Where an instance is still visible: its pixel count and tight box (None when fully covered)."""

    area: int
    box: PixelBox | None


@dataclass(frozen=True)
class PasteResult:
    image: np.ndarray  # uint8 H×W×3: pasted, harmonized, edges feathered
    labels: np.ndarray  # uint8 H×W: class ids, the new object on top
    instances: np.ndarray  # uint16 H×W: instance ids, the new object on top
    object_mask: np.ndarray  # bool H×W: the new object's pixels (exactly its labels)
    object_box: PixelBox  # tight box of object_mask; may be smaller than the placement box
    object_area: int
    earlier: dict[int, Extent]  # every instance id of the scene's instance map, after the paste


def tight_box(mask: np.ndarray) -> PixelBox | None:
    """(x, y, width, height) of a boolean mask's pixels, or None when it has none."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1)


def visible_extents(instances: np.ndarray, ids: Iterable[int]) -> dict[int, Extent]:
    """Visible area and tight box of each instance id in an instance map (area 0 if absent)."""
    extents = {}
    for instance_id in ids:
        pixels = instances == instance_id
        extents[int(instance_id)] = Extent(int(np.count_nonzero(pixels)), tight_box(pixels))
    return extents


def instance_map_from_labels(labels: np.ndarray, class_id: int, instance_id: int) -> np.ndarray:
    """The instance map of a single-object scene: its class's pixels are the one instance."""
    return np.where(labels == class_id, instance_id, 0).astype(np.uint16)


def scale_foreground(foreground: np.ndarray, mask: np.ndarray, width: int, height: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The foreground cut to its mask's tight box and scaled to width × height: (image, mask)."""
    box = tight_box(mask)
    if box is None:
        raise InvalidInput("foreground mask is empty: no pixel is marked as the object")
    x, y, w, h = box
    image = Image.fromarray(foreground[y:y + h, x:x + w]).resize((width, height), Image.BILINEAR)
    soft = Image.fromarray(mask[y:y + h, x:x + w].astype(np.uint8) * 255).resize((width, height), Image.BILINEAR)
    return np.asarray(image), np.asarray(soft, dtype=np.float32) / 255.0 >= 0.5


def feather_alpha(mask: np.ndarray, feather_px: int) -> np.ndarray:
    """Opacity of each object pixel: 1 inside, ramping down over the outer `feather_px`
    rings (4-neighbour erosions) to 1/(feather_px + 1); 0 outside the mask."""
    alpha = mask.astype(np.float32)
    inner = mask
    for ring in range(1, feather_px + 1):
        padded = np.pad(inner, 1, constant_values=False)
        eroded = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
                  & padded[1:-1, :-2] & padded[1:-1, 2:])
        alpha[inner & ~eroded] = ring / (feather_px + 1)
        inner = eroded
    return alpha


def validate_paste(scene: np.ndarray, labels: np.ndarray, instances: np.ndarray, foreground: np.ndarray,
                   mask: np.ndarray, box: PixelBox, class_id: int, instance_id: int) -> None:
    """InvalidInput naming the first thing wrong with a paste, before any pixel changes."""
    check_rgb(scene, "scene image")
    height, width = scene.shape[:2]
    if labels.dtype != np.uint8 or labels.shape != (height, width):
        raise InvalidInput(f"scene label map is {size_text(labels)} {labels.dtype}; it must be uint8 and the size of "
                           f"the scene image ({width}x{height})")
    if instances.dtype != np.uint16 or instances.shape != (height, width):
        raise InvalidInput(f"scene instance map is {size_text(instances)} {instances.dtype}; it must be uint16 and the "
                           f"size of the scene image ({width}x{height})")
    check_cutout(foreground, mask)
    x, y, w, h = box
    if w < 1 or h < 1:
        raise InvalidInput(f"box (x={x}, y={y}, width={w}, height={h}) is empty")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise InvalidInput(f"box (x={x}, y={y}, width={w}, height={h}) does not lie inside the {width}x{height} "
                           "scene")
    if not 1 <= class_id <= MAX_CLASS_ID:
        raise InvalidInput(f"class_id must be in 1..{MAX_CLASS_ID}, got {class_id}")
    if not 1 <= instance_id <= MAX_INSTANCE_ID:
        raise InvalidInput(f"instance_id must be in 1..{MAX_INSTANCE_ID}, got {instance_id}")
    if (instances == instance_id).any():
        raise InvalidInput(f"instance_id {instance_id} is already used in the scene's instance map")


def paste(scene: np.ndarray, labels: np.ndarray, instances: np.ndarray, foreground: np.ndarray,
          mask: np.ndarray, box: PixelBox, class_id: int, instance_id: int,
          harmonize: HarmonizeFn | None = None, feather_px: int = 0) -> PasteResult:
    """Paste `foreground` (its `mask`'s pixels) into `box` of the scene, harmonize it and relabel.

    Harmonization sees the hard-edged composite and the exact object mask (what RAIN
    was trained on); the feathered edge then blends the harmonized object with the
    original scene. The inputs are not modified.
    """
    validate_paste(scene, labels, instances, foreground, mask, box, class_id, instance_id)
    if feather_px < 0:
        raise InvalidInput(f"feather_px must be >= 0, got {feather_px}")
    x, y, w, h = box
    scaled, scaled_mask = scale_foreground(foreground, mask, w, h)
    if not scaled_mask.any():  # a thin object shrunk to nothing: the same input always does this
        raise Unusable(f"the foreground mask vanishes when scaled to the {w}x{h} box")

    obj = np.zeros(labels.shape, dtype=bool)
    obj[y:y + h, x:x + w] = scaled_mask
    composite = scene.copy()
    composite[y:y + h, x:x + w][scaled_mask] = scaled[scaled_mask]
    if harmonize is not None:
        # Whatever the harmonizer does elsewhere, only the object's pixels may change.
        composite = np.where(obj[..., None], harmonize(composite, obj), scene)
    if feather_px:
        alpha = feather_alpha(obj, feather_px)[..., None]
        blended = np.rint(alpha * composite + (1.0 - alpha) * scene).astype(np.uint8)
        composite = np.where(obj[..., None], blended, scene)

    new_labels = labels.copy()
    new_labels[obj] = class_id
    new_instances = instances.copy()
    new_instances[obj] = instance_id
    earlier = [int(i) for i in np.unique(instances) if i != 0]
    object_box = tight_box(obj)
    assert object_box is not None  # scaled_mask is not empty
    return PasteResult(image=composite, labels=new_labels, instances=new_instances, object_mask=obj,
                       object_box=object_box, object_area=int(obj.sum()),
                       earlier=visible_extents(new_instances, earlier))
