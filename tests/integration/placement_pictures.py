"""Pictures for placement tests: a textured scene per seed and one object (pixels and class map)."""

from __future__ import annotations

import numpy as np

SCENE_W, SCENE_H = 96, 64
FOREGROUND = np.random.default_rng(7).integers(0, 256, (40, 40, 3), dtype=np.uint8)
LABELS = np.zeros((40, 40), np.uint8)
LABELS[12:26, 6:30] = 5  # a 24 x 14 object of class 5


def scene_image(seed: int) -> np.ndarray:
    """A textured scene: a sky-to-ground gradient plus noise, different per seed."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, SCENE_H)[:, None, None]
    colour = rng.integers(0, 256, (2, 3))
    base = colour[0] * (1 - rows) + colour[1] * rows + rng.normal(0, 12, (SCENE_H, SCENE_W, 3))
    return np.clip(base, 0, 255).astype(np.uint8)
