"""The reference world: a deterministic procedural renderer of VOC-like scenes.

It is the embedded stand-in for real photos (DESIGN §4): training data for the
small models, a caption corpus for the thesaurus, placement rules for FOPA,
lighting pairs for RAIN, and the held-out validation split every quality
figure is measured on. Everything is a pure function of explicit seeds.

    from freemask.world import World, dataset, render_scene, is_plausible
    scene = dataset("val", 0)            # Scene: image, label, instances, objects, caption
    world = World.from_config(config.world)  # label ids follow the configured class order
"""

from freemask.world.captions import BACKGROUND_WORDS, CLASS_NOUNS, canonical_words, caption_scene
from freemask.world.classes import object_look, render_object
from freemask.world.composition import Cooccurrence, caption_corpus, sample_content, sample_scene_spec
from freemask.world.lighting import NEUTRAL, Lighting, sample_lighting, sample_mismatched_lighting
from freemask.world.names import (
    BACKGROUND_ID,
    DRAWABLE_BACKGROUNDS,
    DRAWABLE_CLASSES,
    IGNORE_ID,
    MIN_IMAGE_SIZE,
)
from freemask.world.rules import (
    RULES,
    allowed_backgrounds,
    class_weights,
    is_plausible,
    legal_boxes,
    legal_center_map,
    sample_legal_box,
    typical_sizes,
)
from freemask.world.scene import (
    LightingPair,
    Scene,
    SceneObject,
    render_lighting_pair,
    render_objects_one_by_one,
    render_scene,
)
from freemask.world.spec import ObjectSpec, SceneSpec
from freemask.world.splits import SPLITS, VAL_SIZE, ReferenceSplit, dataset, scene_spec
from freemask.world.vocabulary import DEFAULT_WORLD, World

__all__ = [
    "BACKGROUND_ID", "BACKGROUND_WORDS", "CLASS_NOUNS", "DEFAULT_WORLD", "DRAWABLE_BACKGROUNDS", "DRAWABLE_CLASSES",
    "IGNORE_ID", "MIN_IMAGE_SIZE", "NEUTRAL", "RULES", "SPLITS", "VAL_SIZE",
    "Cooccurrence", "Lighting", "LightingPair", "ObjectSpec", "ReferenceSplit", "Scene", "SceneObject", "SceneSpec", "World",
    "allowed_backgrounds", "canonical_words", "caption_corpus", "caption_scene", "class_weights", "dataset",
    "is_plausible", "legal_boxes", "legal_center_map", "object_look", "render_lighting_pair", "render_object",
    "render_objects_one_by_one", "render_scene", "sample_content", "sample_legal_box", "sample_lighting",
    "sample_mismatched_lighting", "sample_scene_spec", "scene_spec", "typical_sizes",
]
