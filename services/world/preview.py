"""Sample grids for looking at the world: `python -m freemask.world.preview OUT_DIR`.

Three PNGs: every class on its backgrounds, multi-object scenes beside their
label maps, and lighting pairs (real, composite, mask) for RAIN. Looking at
them is the check that the silhouettes stay recognisable after a change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from freemask.shared.images import voc_colour_map
from freemask.world.composition import sample_scene_spec
from freemask.world.scene import render_lighting_pair, render_scene
from freemask.world.splits import dataset
from freemask.world.vocabulary import DEFAULT_WORLD, World


def label_colours(num_classes: int) -> np.ndarray:
    """A fixed colour per label id (VOC's palette); 255 is white here, to stand out in previews."""
    palette = voc_colour_map()
    palette[255] = (255, 255, 255)
    return palette


def _grid(tiles: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
    h, w = tiles[0][0].shape[:2]
    cols = max(len(r) for r in tiles)
    out = np.full(((h + gap) * len(tiles) + gap, (w + gap) * cols + gap, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            out[gap + i * (h + gap):gap + i * (h + gap) + h, gap + j * (w + gap):gap + j * (w + gap) + w] = tile
    return out


def _up(image: np.ndarray, factor: int) -> np.ndarray:
    return image.repeat(factor, 0).repeat(factor, 1)


def class_grid(world: World = DEFAULT_WORLD, image_size: int = 64, per_class: int = 8, seed: int = 0) -> np.ndarray:
    rows = []
    for c, cls in enumerate(world.classes):
        rng = np.random.default_rng([seed, c])
        rows.append([_up(render_scene(sample_scene_spec(rng, world, image_size, n_objects=1, main_class=cls),
                                      world).image, 2) for _ in range(per_class)])
    return _grid(rows)


def scenes_grid(world: World = DEFAULT_WORLD, image_size: int = 64, count: int = 24, columns: int = 4) -> np.ndarray:
    palette = label_colours(world.num_classes)
    pairs = []
    for i in range(count):
        scene = dataset("val", i, image_size, world)
        pairs.append(np.concatenate([_up(scene.image, 2), _up(palette[scene.label], 2)], axis=1))
    return _grid([pairs[i:i + columns] for i in range(0, count, columns)], gap=4)


def lighting_grid(world: World = DEFAULT_WORLD, image_size: int = 64, count: int = 12, seed: int = 1) -> np.ndarray:
    rows = []
    for i in range(count):
        spec = sample_scene_spec(np.random.default_rng([seed, i]), world, image_size, n_objects=int(1 + i % 3))
        pair = render_lighting_pair(spec, world=world)
        mask = np.repeat(pair.mask[..., None], 3, axis=2).astype(np.uint8) * 255
        rows.append(np.concatenate([_up(pair.real, 2), _up(pair.composite, 2), _up(mask, 2)], axis=1))
    return _grid([rows[i:i + 3] for i in range(0, count, 3)], gap=4)


def main() -> None:
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, grid in (("classes.png", class_grid(image_size=args.size)),
                       ("scenes_and_labels.png", scenes_grid(image_size=args.size)),
                       ("lighting_pairs.png", lighting_grid(image_size=args.size))):
        Image.fromarray(grid).save(args.out / name)
        print(args.out / name)


if __name__ == "__main__":
    main()
