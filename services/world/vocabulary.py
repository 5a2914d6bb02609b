"""Which classes and backgrounds a deployment uses, and their label ids.

The world can draw a fixed set of classes and backgrounds (names.py); the
configuration (`world.classes`, `world.backgrounds` in default.yaml) chooses
which of them a deployment uses and in what order. The order fixes the label
ids: class i of the configured list is id i + 1, 0 is background and 255 is
"ignore", the PASCAL VOC convention that the segmenter and the metrics share.
"""

from __future__ import annotations

from dataclasses import dataclass

from freemask.shared.errors import InvalidInput
from freemask.world.names import (
    DRAWABLE_BACKGROUNDS,
    DRAWABLE_CLASSES,
    IGNORE_ID,
    check_background,
    check_class,
)
from freemask.world.rules import allowed_backgrounds


@dataclass(frozen=True)
class World:
    """The configured vocabulary: an immutable value, passed explicitly (no global registry).

    Build it from the service config with `World.from_config(config.world)` so
    that label ids follow the operator's class order.
    """

    classes: tuple[str, ...] = DRAWABLE_CLASSES
    backgrounds: tuple[str, ...] = DRAWABLE_BACKGROUNDS

    def __post_init__(self) -> None:
        # Lists from YAML become tuples, so the value stays immutable and hashable.
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "backgrounds", tuple(self.backgrounds))
        problems = [f"class {c!r} cannot be drawn" for c in self.classes if c not in DRAWABLE_CLASSES]
        problems += [f"background {b!r} cannot be drawn" for b in self.backgrounds if b not in DRAWABLE_BACKGROUNDS]
        if not self.classes:
            problems.append("no classes")
        if not self.backgrounds:
            problems.append("no backgrounds")
        if len(set(self.classes)) != len(self.classes) or len(set(self.backgrounds)) != len(self.backgrounds):
            problems.append("duplicate names")
        if len(self.classes) >= IGNORE_ID:
            problems.append(f"at most {IGNORE_ID - 1} classes fit a uint8 label map")
        if problems:
            raise InvalidInput(
                "invalid world vocabulary: " + "; ".join(problems)
                + f" (drawable classes: {', '.join(DRAWABLE_CLASSES)};"
                f" drawable backgrounds: {', '.join(DRAWABLE_BACKGROUNDS)})"
            )
        # A class none of whose backgrounds is configured could never be placed.
        homeless = [c for c in self.classes if not set(allowed_backgrounds(c)) & set(self.backgrounds)]
        if homeless:
            raise InvalidInput(f"classes with no configured background they may appear on: {', '.join(homeless)}")

    @classmethod
    def from_config(cls, world_config: object) -> World:
        """From `freemask.shared.config.WorldConfig` (or anything with .classes and .backgrounds)."""
        return cls(classes=tuple(world_config.classes), backgrounds=tuple(world_config.backgrounds))  # type: ignore[attr-defined]

    @property
    def num_classes(self) -> int:
        """Number of object classes, not counting background."""
        return len(self.classes)

    def class_id(self, name: str) -> int:
        return self.classes.index(check_class(name, self.classes)) + 1

    def class_name(self, class_id: int) -> str:
        if not 1 <= class_id <= len(self.classes):
            raise InvalidInput(f"class id {class_id} is outside [1, {len(self.classes)}]")
        return self.classes[class_id - 1]

    def check_class(self, name: str) -> str:
        return check_class(name, self.classes)

    def check_background(self, name: str) -> str:
        return check_background(name, self.backgrounds)


DEFAULT_WORLD = World()
