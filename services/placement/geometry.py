"""What the FOPA model sees and what its heatmap means, shared by training, export,
the Triton model and the service, so that all of them agree to the pixel.

- **Inputs.** The background is resized to `BACKGROUND_SIDE`² (bilinear) and scaled
  to [-1, 1]. The foreground is cut to its mask's box and letterboxed, aspect kept,
  into `FOREGROUND_SIDE`²: RGB in [-1, 1] (0 outside the object) plus the mask.
- **Heatmap.** `HEATMAP[b, s, i, j]` in [0, 1] scores the box of scale `SCALES[s]`
  centred on cell (i, j) of a `HEATMAP_SIDE`² grid laid over the background. A
  scale is the box's longer side over the image side (as in the reference world's
  rules); the box keeps the foreground's aspect, so (scale, cell, aspect) fix it.

Coordinates here are *normalised*: x, y in [0, 1] over the background's width and
height. `pixel_box` turns a normalised box into the integer pixels of an image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from freemask.shared.errors import InvalidInput

BACKGROUND_SIDE = 64
FOREGROUND_SIDE = 32
HEATMAP_SIDE = 32
SCALES: tuple[float, ...] = tuple(float(s) for s in np.geomspace(0.15, 0.95, 8))
NUM_SCALES = len(SCALES)


def _to_unit_range(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / 127.5 - 1.0


def background_input(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, BACKGROUND_SIDE, BACKGROUND_SIDE) float32 in [-1, 1]."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InvalidInput(f"background must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    resized = np.asarray(Image.fromarray(image).resize((BACKGROUND_SIDE, BACKGROUND_SIDE), Image.BILINEAR))
    return _to_unit_range(resized).transpose(2, 0, 1)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), exclusive ends, of a non-empty boolean mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise InvalidInput("the foreground mask is empty")
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def foreground_aspect(mask: np.ndarray) -> float:
    """Width over height of the mask's box, in pixels."""
    x0, y0, x1, y1 = mask_box(mask)
    return (x1 - x0) / (y1 - y0)


def foreground_input(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 and (h, w) bool -> (4, FOREGROUND_SIDE, FOREGROUND_SIDE) float32.

    The mask's box is letterboxed into the square, aspect kept, so the model sees the
    object's shape and proportions; pixels outside the mask are 0 in every channel.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InvalidInput(f"foreground must be (h, w, 3) uint8, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise InvalidInput(f"foreground mask {mask.shape} does not match the foreground image {image.shape[:2]}")
    x0, y0, x1, y1 = mask_box(mask)
    width, height = x1 - x0, y1 - y0
    fit = FOREGROUND_SIDE / max(width, height)
    new_w, new_h = max(1, round(width * fit)), max(1, round(height * fit))
    crop = Image.fromarray(image[y0:y1, x0:x1]).resize((new_w, new_h), Image.BILINEAR)
    crop_mask = Image.fromarray(mask[y0:y1, x0:x1].astype(np.uint8) * 255).resize((new_w, new_h), Image.BILINEAR)
    out = np.zeros((4, FOREGROUND_SIDE, FOREGROUND_SIDE), dtype=np.float32)
    top, left = (FOREGROUND_SIDE - new_h) // 2, (FOREGROUND_SIDE - new_w) // 2
    inside = np.asarray(crop_mask, dtype=np.float32) / 255.0 >= 0.5
    out[:3, top:top + new_h, left:left + new_w] = _to_unit_range(np.asarray(crop)).transpose(2, 0, 1) * inside
    out[3, top:top + new_h, left:left + new_w] = inside
    return out


def box_size(scale: float, aspect: float, width: int, height: int) -> tuple[float, float]:
    """Normalised (w, h) of a box whose longer side is `scale` of the image side and whose
    pixel aspect is `aspect`, on a width x height background (square in the world)."""
    if not (scale > 0 and aspect > 0 and width > 0 and height > 0):
        raise InvalidInput(f"scale, aspect and image size must be positive: {scale}, {aspect}, {width}x{height}")
    side = min(width, height)
    longer = scale * side
    w_px, h_px = (longer, longer / aspect) if aspect >= 1 else (longer * aspect, longer)
    return w_px / width, h_px / height


def candidate_boxes(aspect: float, width: int, height: int) -> np.ndarray:
    """(NUM_SCALES, HEATMAP_SIDE, HEATMAP_SIDE, 4) normalised boxes (x0, y0, x1, y1)
    of every heatmap cell, in the heatmap's own layout."""
    centres = (np.arange(HEATMAP_SIDE, dtype=np.float64) + 0.5) / HEATMAP_SIDE
    boxes = np.empty((NUM_SCALES, HEATMAP_SIDE, HEATMAP_SIDE, 4), dtype=np.float64)
    for s, scale in enumerate(SCALES):
        w, h = box_size(scale, aspect, width, height)
        boxes[s, :, :, 0] = centres[None, :] - w / 2
        boxes[s, :, :, 1] = centres[:, None] - h / 2
        boxes[s, :, :, 2] = centres[None, :] + w / 2
        boxes[s, :, :, 3] = centres[:, None] + h / 2
    return boxes


def inside_image(boxes: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """Which normalised boxes lie wholly inside the image."""
    return (boxes[..., 0] >= -eps) & (boxes[..., 1] >= -eps) & (boxes[..., 2] <= 1 + eps) & (boxes[..., 3] <= 1 + eps)


def pixel_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) normalised (x0, y0, x1, y1) -> (N, 4) int64 pixel (x, y, w, h): rounded half to
    even, at least 1 px, inside the image."""
    x0 = np.clip(np.rint(boxes[:, 0] * width), 0, width - 1)
    y0 = np.clip(np.rint(boxes[:, 1] * height), 0, height - 1)
    x1 = np.clip(np.rint(boxes[:, 2] * width), x0 + 1, width)
    y1 = np.clip(np.rint(boxes[:, 3] * height), y0 + 1, height)
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).astype(np.int64)


def pixel_box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """One normalised (x0, y0, x1, y1) as integer pixels (x, y, w, h); see `pixel_boxes`."""
    x, y, w, h = pixel_boxes(np.asarray(box, dtype=np.float64).reshape(1, 4), width, height)[0]
    return int(x), int(y), int(w), int(h)
