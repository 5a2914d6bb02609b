"""Captions for scenes, worded the way people caption photos.

"a red car parked on a city road", "two sheep grazing in a field", "a dog and a
person on the grass": a caption names every class present (with a count), the
background, a verb that fits the class and where it is (a bird on the grass is
"perched", in the sky "flying"), and a colour when the colour is salient.

The words used for each class and background are data (CLASS_NOUNS,
BACKGROUND_WORDS) so that the thesaurus can normalise them back to the
vocabulary: `canonical_words()` lists every surface form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from freemask.world.backgrounds import BANDS
from freemask.world.classes import object_look
from freemask.world.names import Box
from freemask.world.rules import RULES, Anchor, Region
from freemask.world.sampling import cumulative, weighted_index
from freemask.world.spec import SceneSpec

# (singular, plural) surface forms per class; the first is the canonical name.
CLASS_NOUNS: Mapping[str, tuple[tuple[str, str], ...]] = MappingProxyType({
    "aeroplane": (("aeroplane", "aeroplanes"), ("airplane", "airplanes"), ("plane", "planes")),
    "bird": (("bird", "birds"),),
    "boat": (("boat", "boats"),),
    "bus": (("bus", "buses"),),
    "car": (("car", "cars"),),
    "cat": (("cat", "cats"),),
    "cow": (("cow", "cows"),),
    "dog": (("dog", "dogs"),),
    "horse": (("horse", "horses"),),
    "person": (("person", "people"), ("man", "people"), ("woman", "people")),
    "sheep": (("sheep", "sheep"),),
    "train": (("train", "trains"),),
})

# Phrases placing the subject on the background, by how it is anchored there.
# Every phrase contains one of BACKGROUND_WORDS[background].
BACKGROUND_PHRASES: Mapping[str, Mapping[Anchor, tuple[str, ...]]] = MappingProxyType({
    "sky": {"fly": ("in the sky", "in a blue sky", "across the sky", "high in the sky"),
            "ground": ("against the sky",)},
    "sea": {"fly": ("over the sea", "above the sea", "over the ocean"),
            "ground": ("on the sea", "at sea", "on the ocean", "on the calm sea", "on the open sea")},
    "road": {"fly": ("above the road",),
             "ground": ("on a city road", "on the road", "on the street", "along a city street", "on a busy road")},
    "grass": {"fly": ("over the grass", "above the grass"),
              "ground": ("on the grass", "in the grass", "on green grass", "on the grass in a park")},
    "field": {"fly": ("over a field", "above the fields"),
              "ground": ("in a field", "in the field", "in a green field", "in a farm field", "in an open field")},
    "room": {"fly": ("in a room",),
             "ground": ("in a room", "in the living room", "in a cosy room", "on the floor of a room")},
    "rail": {"fly": ("over the railway", "above the railway tracks"),
             "ground": ("on the railway", "on the tracks", "on a railway line", "on the rails", "along the railway")},
})
BACKGROUND_WORDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "sky": ("sky",), "sea": ("sea", "ocean"), "road": ("road", "street"), "grass": ("grass",),
    "field": ("field", "fields"), "room": ("room",), "rail": ("railway", "rails", "tracks"),
})

# Participles, so the same word serves "a dog running" and "two dogs running"; "" means no verb.
VERBS: Mapping[str, Mapping[Anchor, tuple[str, ...]]] = MappingProxyType({
    "aeroplane": {"fly": ("flying", "", "soaring", "cruising")},
    "bird": {"fly": ("flying", "gliding", ""), "ground": ("standing", "perched", "", "pecking")},
    "boat": {"ground": ("sailing", "floating", "", "moored")},
    "bus": {"ground": ("driving", "parked", "", "waiting")},
    "car": {"ground": ("parked", "driving", "")},
    "cat": {"ground": ("sitting", "lying", "walking", "", "resting")},
    "cow": {"ground": ("grazing", "standing", "")},
    "dog": {"ground": ("running", "playing", "standing", "", "sitting")},
    "horse": {"ground": ("grazing", "standing", "galloping", "")},
    "person": {"ground": ("standing", "walking", "", "waiting")},
    "sheep": {"ground": ("grazing", "standing", "")},
    "train": {"ground": ("travelling", "running", "", "passing")},
})
COLLECTIVES: Mapping[str, str] = MappingProxyType({"sheep": "flock", "bird": "flock", "cow": "herd", "horse": "herd"})
COUNT_WORDS = ("", "a", "two", "three", "four", "five", "six")
PREFIXES = (("", 0.55), ("a photo of ", 0.25), ("a picture of ", 0.1), ("an image of ", 0.05),
            ("a photograph of ", 0.05))
_PREFIX_CDF = cumulative([p for _, p in PREFIXES])


@dataclass(frozen=True)
class Mention:
    """An object as a caption sees it: what it is, its colour, and whether it flies or stands."""

    cls: str
    colour: str
    salient: bool
    anchor: Anchor
    size: float = 0.0  # bigger subjects are named first


def canonical_words() -> dict[str, str]:
    """Every surface form the captions use -> the class or background it stands for."""
    words = {form: cls for cls, forms in CLASS_NOUNS.items() for pair in forms for form in pair}
    words.update({w: bg for bg, ws in BACKGROUND_WORDS.items() for w in ws})
    words["rail"] = "rail"
    return words


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _noun_phrase(rng: np.random.Generator, group: list[Mention]) -> str:
    cls, count = group[0].cls, len(group)
    singular, plural = CLASS_NOUNS[cls][int(rng.integers(len(CLASS_NOUNS[cls])))]
    colours = {m.colour for m in group}
    colour = group[0].colour if len(colours) == 1 and group[0].salient and rng.random() < 0.65 else ""
    if count == 1:
        if colour and cls == "person":
            return f"{_article(singular)} {singular} in {_article(colour)} {colour} shirt"
        words = f"{colour} {singular}" if colour else singular
        return f"{_article(words)} {words}"
    noun = f"{colour} {plural}" if colour and cls != "person" else plural
    if count >= 3 and cls in COLLECTIVES and rng.random() < 0.4:
        return f"a {COLLECTIVES[cls]} of {noun}"
    if count >= len(COUNT_WORDS) or rng.random() < 0.1:
        return f"several {noun}" if count >= 3 else f"two {noun}"
    return f"{COUNT_WORDS[count]} {noun}"


def _verb(rng: np.random.Generator, cls: str, anchor: Anchor) -> str:
    options = VERBS[cls].get(anchor, ("",))
    return _choice(rng, options)


def _place(rng: np.random.Generator, background: str, anchor: Anchor) -> str:
    return _choice(rng, BACKGROUND_PHRASES[background][anchor])


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _groups(mentions: Sequence[Mention]) -> list[list[Mention]]:
    by_class: dict[str, list[Mention]] = {}
    for m in sorted(mentions, key=lambda m: -m.size):
        by_class.setdefault(m.cls, []).append(m)
    return list(by_class.values())


def _clause(rng: np.random.Generator, group: list[Mention], background: str) -> str:
    verb = _verb(rng, group[0].cls, group[0].anchor)
    words = [_noun_phrase(rng, group), verb, _place(rng, background, group[0].anchor)]
    return " ".join(w for w in words if w)


def describe(background: str, mentions: Sequence[Mention], rng: np.random.Generator) -> str:
    """One caption for a whole scene."""
    prefix = PREFIXES[weighted_index(rng, _PREFIX_CDF)][0]
    if not mentions:
        return f"{prefix}an empty scene {_place(rng, background, 'ground')}"
    groups = _groups(mentions)
    if len(groups) == 1:
        return prefix + _clause(rng, groups[0], background)
    grounded = [g for g in groups if g[0].anchor == "ground"]
    flying = [g for g in groups if g[0].anchor == "fly"]
    if grounded and flying:
        ground = _join([_noun_phrase(rng, g) for g in grounded])
        air = _join([_noun_phrase(rng, g) for g in flying])
        return f"{prefix}{ground} {_place(rng, background, 'ground')} with {air} flying overhead"
    style = rng.random()
    if style < 0.5:
        return f"{prefix}{_join([_noun_phrase(rng, g) for g in groups])} {_place(rng, background, groups[0][0].anchor)}"
    rest = _join([_noun_phrase(rng, g) for g in groups[1:]])
    link = "next to" if style < 0.75 else "with"
    return f"{prefix}{_clause(rng, groups[0], background)} {link} {rest}"


def describe_one(background: str, mention: Mention, rng: np.random.Generator) -> str:
    """A caption for one object as if it were alone: "a red car parked on a city road"."""
    return _clause(rng, [mention], background)


def anchor_of(cls: str, background: str, box: Box, image_size: int) -> Anchor:
    """Whether the object flies or stands here: the first of its regions the box satisfies."""
    regions: tuple[Region, ...] = RULES[cls].where.get(background, ())
    aspect = (box[2] - box[0]) / (box[3] - box[1])
    for region in regions:
        if region.aspect and not region.aspect[0] <= aspect <= region.aspect[1]:
            continue  # a perched bird is never "flying", wherever its box is
        top, bottom = BANDS[background][region.band]
        y0, y1 = box[1] / image_size, box[3] / image_size
        if region.anchor == "fly" and y0 >= top - 1e-6 and y1 <= bottom + 1e-6:
            return "fly"
        if region.anchor == "ground" and top - 1e-6 <= y1 <= bottom + 1e-6:
            return "ground"
    return "fly" if all(r.anchor == "fly" for rs in RULES[cls].where.values() for r in rs) else "ground"


def mentions_of(spec: SceneSpec) -> list[Mention]:
    result = []
    for obj in spec.objects:
        look = object_look(obj.cls, obj.seed)
        x0, y0, x1, y1 = obj.box
        anchor = anchor_of(obj.cls, spec.background, obj.box, spec.image_size)
        result.append(Mention(obj.cls, look.name, look.salient, anchor, (x1 - x0) * (y1 - y0)))
    return result


def caption_scene(spec: SceneSpec) -> tuple[str, list[str]]:
    """The scene's caption and one caption per object, a pure function of the spec."""
    mentions = mentions_of(spec)
    scene = describe(spec.background, mentions, np.random.default_rng([spec.seed, 2]))
    singles = [
        describe_one(spec.background, m, np.random.default_rng([spec.seed, 2, i])) for i, m in enumerate(mentions)
    ]
    return scene, singles
