"""Fixed train and validation splits of the reference world.

Scene i of a split is a pure function of (split seed, i): its spec is sampled
from a generator seeded with [split seed, i], never from a shared stream, so
any scene can be rendered alone, in any order, on any worker, and two runs
agree byte for byte. The two splits use different seeds, and the validation
split, the held-out "real" data every quality figure is measured on, is fixed
at VAL_SIZE scenes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from freemask.shared.errors import InvalidInput
from freemask.world.composition import sample_scene_spec
from freemask.world.names import check_image_size
from freemask.world.scene import Scene, render_scene
from freemask.world.spec import SceneSpec
from freemask.world.vocabulary import DEFAULT_WORLD, World

VAL_SIZE = 500
TRAIN_SIZE = 100_000


@dataclass(frozen=True)
class SplitInfo:
    seed: int
    size: int


SPLITS: Mapping[str, SplitInfo] = MappingProxyType({
    "train": SplitInfo(seed=0x7E57_0001, size=TRAIN_SIZE),
    "val": SplitInfo(seed=0x7E57_0002, size=VAL_SIZE),
})


def split_info(split: str) -> SplitInfo:
    if split not in SPLITS:
        raise InvalidInput(f"unknown split {str(split)[:32]!r}; known splits: {', '.join(SPLITS)}")
    return SPLITS[split]


def scene_spec(split: str, index: int, image_size: int = 64, world: World = DEFAULT_WORLD) -> SceneSpec:
    """The spec of scene `index` of `split` (cheap: no pixels)."""
    info = split_info(split)
    check_image_size(image_size)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise InvalidInput(f"index must be an int, got {type(index).__name__}")
    if not 0 <= index < info.size:
        raise IndexError(f"{split} has {info.size} scenes; index {index} is out of range")
    return sample_scene_spec(np.random.default_rng([info.seed, int(index)]), world, image_size)


def dataset(split: str, index: int, image_size: int = 64, world: World = DEFAULT_WORLD,
            edge_ignore: bool = False) -> Scene:
    """Scene `index` of `split`, rendered."""
    return render_scene(scene_spec(split, index, image_size, world), world, edge_ignore)


@dataclass(frozen=True)
class ReferenceSplit:
    """A split as a sequence: `len()`, indexing and iteration, e.g. for a torch Dataset.

    `size` may be smaller than the split's (a quick subset); the first `size`
    scenes are always the same ones.
    """

    split: str = "train"
    size: int | None = None
    image_size: int = 64
    world: World = DEFAULT_WORLD
    edge_ignore: bool = False

    def __post_init__(self) -> None:
        info = split_info(self.split)
        check_image_size(self.image_size)
        if self.size is not None and not 0 <= self.size <= info.size:
            raise InvalidInput(f"size {self.size} is outside [0, {info.size}] for split {self.split!r}")

    def __len__(self) -> int:
        return split_info(self.split).size if self.size is None else self.size

    def __getitem__(self, index: int) -> Scene:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} scenes")
        return dataset(self.split, int(index), self.image_size, self.world, self.edge_ignore)

    def __iter__(self) -> Iterator[Scene]:
        return (self[i] for i in range(len(self)))

    def spec(self, index: int) -> SceneSpec:
        return scene_spec(self.split, index, self.image_size, self.world)
