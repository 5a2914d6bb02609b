"""Rendering scenes with exact label maps, and lighting-mismatched pairs for RAIN.

Composition follows the pipeline's own rule (DESIGN §1.2, occlusion): objects
are drawn in order and each one's mask (coverage >= 0.5) overwrites the labels
and instance ids beneath it, so every labelled pixel belongs to the object
drawn last there. The image is composited with the soft coverage, so edges are
anti-aliased while the label map stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from freemask.shared.errors import InvalidInput
from freemask.world.backgrounds import render_background
from freemask.world.captions import caption_scene
from freemask.world.classes import render_object
from freemask.world.lighting import Lighting, sample_mismatched_lighting
from freemask.world.names import BACKGROUND_ID, IGNORE_ID, Box, check_box
from freemask.world.raster import Layer
from freemask.world.spec import ObjectSpec, SceneSpec
from freemask.world.vocabulary import DEFAULT_WORLD, World

# With edge_ignore, pixels an object covers by a fraction in this open interval
# are labelled 255, unless a later object covers them firmly.
EDGE_BAND = (0.25, 0.75)


@dataclass(frozen=True)
class SceneObject:
    cls: str
    class_id: int
    instance_id: int  # 1-based draw order; the value in Scene.instances
    box: Box
    colour: str
    caption: str  # this object alone in this scene: "a red car parked on a city road"
    visible_pixels: int  # label pixels it still owns after later objects are drawn


@dataclass(frozen=True)
class Scene:
    spec: SceneSpec
    image: np.ndarray  # uint8 (H, W, 3)
    label: np.ndarray  # uint8 (H, W): 0 background, class ids 1..N, 255 ignore
    instances: np.ndarray  # uint16 (H, W): 0 background, else SceneObject.instance_id
    objects: tuple[SceneObject, ...]
    caption: str

    @property
    def background(self) -> str:
        return self.spec.background


@dataclass(frozen=True)
class LightingPair:
    """The same scene twice: `real` with every layer under the scene lighting, and
    `composite` with the last object under `object_lighting`. They differ only
    where `mask` is True (the object's coverage > 0)."""

    real: np.ndarray  # uint8 (H, W, 3): the harmonised target
    composite: np.ndarray  # uint8 (H, W, 3): the input, the object looks pasted in
    mask: np.ndarray  # bool (H, W): every pixel the object touches
    label_mask: np.ndarray  # bool (H, W): the object's label pixels (coverage >= 0.5)
    scene_lighting: Lighting
    object_lighting: Lighting


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _check_spec(spec: SceneSpec, world: World) -> None:
    world.check_background(spec.background)
    for obj in spec.objects:
        world.check_class(obj.cls)
        check_box(obj.box, spec.image_size)
    if len(spec.objects) >= np.iinfo(np.uint16).max:
        raise InvalidInput(f"too many objects for a uint16 instance map: {len(spec.objects)}")


def _paste(image: np.ndarray, layer: Layer, lighting: Lighting) -> None:
    ys, xs = layer.window
    alpha = layer.alpha[..., None]
    image[ys, xs] = image[ys, xs] * (1.0 - alpha) + lighting.apply(layer.colour) * alpha


def _draw_labels(label: np.ndarray, instances: np.ndarray, layer: Layer, class_id: int, instance_id: int,
                 edge_ignore: bool) -> None:
    ys, xs = layer.window
    mask = layer.mask
    label[ys, xs][mask] = class_id
    instances[ys, xs][mask] = instance_id
    if edge_ignore:
        lo, hi = EDGE_BAND
        label[ys, xs][(layer.alpha > lo) & (layer.alpha < hi)] = IGNORE_ID


def _layers(spec: SceneSpec) -> list[tuple[str, Layer]]:
    return [
        (look.name, layer)
        for look, layer in (render_object(o.cls, o.seed, o.box, spec.image_size, o.flip) for o in spec.objects)
    ]


def _background(spec: SceneSpec) -> np.ndarray:
    albedo = render_background(spec.background, spec.image_size, np.random.default_rng([spec.seed, 0]))
    return spec.lighting.apply(albedo)


def render_scene(spec: SceneSpec, world: World = DEFAULT_WORLD, edge_ignore: bool = False) -> Scene:
    """Render `spec`: the image, its exact label and instance maps, and captions.

    `edge_ignore` marks the anti-aliased rim of every object 255 (ignore) in the
    label map, for losses that should not be charged for ambiguous boundary
    pixels; by default every pixel has a definite label.
    """
    _check_spec(spec, world)
    size = spec.image_size
    image = _background(spec)
    label = np.full((size, size), BACKGROUND_ID, dtype=np.uint8)
    instances = np.zeros((size, size), dtype=np.uint16)
    layers = _layers(spec)
    for index, (obj, (_, layer)) in enumerate(zip(spec.objects, layers), start=1):
        _paste(image, layer, spec.lighting)
        _draw_labels(label, instances, layer, world.class_id(obj.cls), index, edge_ignore)
    counts = np.bincount(instances.ravel(), minlength=len(spec.objects) + 1)
    scene_caption, object_captions = caption_scene(spec)
    objects = tuple(
        SceneObject(obj.cls, world.class_id(obj.cls), index, obj.box, colour, object_captions[index - 1],
                    int(counts[index]))
        for index, (obj, (colour, _)) in enumerate(zip(spec.objects, layers), start=1)
    )
    return Scene(spec, _to_uint8(image), label, instances, objects, scene_caption)


def render_lighting_pair(spec: SceneSpec, object_lighting: Lighting | None = None,
                         world: World = DEFAULT_WORLD) -> LightingPair:
    """The scene with its last object lit correctly and lit wrongly (a RAIN training pair).

    The last object is the one "pasted" on top, as harmonisation pastes it.
    Without `object_lighting`, a clearly mismatched one is drawn from the spec's seed.
    """
    _check_spec(spec, world)
    if not spec.objects:
        raise InvalidInput("a lighting pair needs at least one object in the scene")
    if object_lighting is None:
        object_lighting = sample_mismatched_lighting(np.random.default_rng([spec.seed, 3]), spec.lighting)
    base = _background(spec)
    layers = [layer for _, layer in _layers(spec)]
    for layer in layers[:-1]:
        _paste(base, layer, spec.lighting)
    last = layers[-1]
    real, composite = base, base.copy()
    _paste(real, last, spec.lighting)
    _paste(composite, last, object_lighting)
    mask = np.zeros(base.shape[:2], dtype=bool)
    label_mask = np.zeros(base.shape[:2], dtype=bool)
    ys, xs = last.window
    mask[ys, xs] = last.alpha > 0
    label_mask[ys, xs] = last.mask
    return LightingPair(_to_uint8(real), _to_uint8(composite), mask, label_mask, spec.lighting, object_lighting)


def render_objects_one_by_one(spec: SceneSpec) -> list[np.ndarray]:
    """Each object's own label mask (bool H x W), ignoring occlusion: what the
    label map must agree with, exposed so tests and benchmarks can check it."""
    masks = []
    for _, layer in _layers(spec):
        full = np.zeros((spec.image_size, spec.image_size), dtype=bool)
        ys, xs = layer.window
        full[ys, xs] = layer.mask
        masks.append(full)
    return masks


def scene_with(spec: SceneSpec, objects: Sequence[ObjectSpec]) -> SceneSpec:
    """The same background, seed and lighting with other objects."""
    return SceneSpec(spec.background, tuple(objects), spec.image_size, spec.seed, spec.lighting)
