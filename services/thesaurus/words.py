"""Which caption words name which class or background.

Every surface form is listed up front (the canonical name, its configured
synonyms, and the regular plurals of both), so normalising a caption word is one
dictionary lookup: no stemming, which would turn "grass" into "gras" or "bus"
into "bu". Irregular plurals ("people", "men") are synonyms in the config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from freemask.shared.errors import InvalidInput

_WORD = re.compile(r"[a-z]+")
_VOWELS = frozenset("aeiou")


def regular_plurals(word: str) -> tuple[str, ...]:
    """`word` and its regular English plural forms ("bus" -> buses, "lorry" -> lorries)."""
    forms = [word, word + "s"]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        forms.append(word + "es")
    if len(word) > 1 and word.endswith("y") and word[-2] not in _VOWELS:
        forms.append(word[:-1] + "ies")
    return tuple(forms)


@dataclass(frozen=True)
class CaptionTerms:
    """The classes and backgrounds one caption names, each once."""

    objects: frozenset[str]
    backgrounds: frozenset[str]


class WordNormalizer:
    """Maps caption words to canonical object and background names.

    Args:
        objects: canonical object (class) names, e.g. the configured classes.
        backgrounds: canonical background names.
        synonyms: extra surface forms per canonical name ("plane" for "aeroplane").
    """

    def __init__(self, objects: Sequence[str], backgrounds: Sequence[str],
                 synonyms: Mapping[str, Sequence[str]] | None = None) -> None:
        self.objects = tuple(objects)
        self.backgrounds = tuple(backgrounds)
        self.synonyms = {name: tuple(words) for name, words in sorted((synonyms or {}).items())}
        both = set(self.objects) & set(self.backgrounds)
        if both:
            raise InvalidInput(f"words cannot be both an object and a background: {sorted(both)}")
        unknown = set(self.synonyms) - set(self.objects) - set(self.backgrounds)
        if unknown:
            raise InvalidInput(f"synonyms given for words that are neither an object nor a background: "
                               f"{sorted(unknown)}")
        self._background_names = frozenset(self.backgrounds)
        self._forms = self._surface_forms()

    def _surface_forms(self) -> dict[str, str]:
        """surface form -> canonical name; an explicit word beats a generated plural."""
        explicit: dict[str, str] = {}
        for canonical in (*self.objects, *self.backgrounds):
            for word in (canonical, *self.synonyms.get(canonical, ())):
                if not _WORD.fullmatch(word):
                    raise InvalidInput(f"{word!r} (a name or synonym of {canonical!r}) must be one word of "
                                       "lower-case letters a-z")
                if explicit.setdefault(word, canonical) != canonical:
                    raise InvalidInput(f"{word!r} is given for both {explicit[word]!r} and {canonical!r}")
        forms = dict(explicit)
        for word, canonical in explicit.items():
            for plural in regular_plurals(word)[1:]:
                forms.setdefault(plural, canonical)
        return forms

    @property
    def vocabulary_size(self) -> int:
        return len(self.objects) + len(self.backgrounds)

    def canonical(self, word: str) -> str | None:
        """The object or background `word` names, or None."""
        return self._forms.get(word.strip().lower())

    def terms(self, caption: str) -> CaptionTerms:
        objects, backgrounds = set(), set()
        for word in _WORD.findall(caption.lower()):
            canonical = self._forms.get(word)
            if canonical is not None:
                (backgrounds if canonical in self._background_names else objects).add(canonical)
        return CaptionTerms(frozenset(objects), frozenset(backgrounds))

    def describe(self) -> dict[str, object]:
        """How words were read, recorded in the index for provenance."""
        return {"objects": list(self.objects), "backgrounds": list(self.backgrounds),
                "synonyms": {name: list(words) for name, words in self.synonyms.items()}, "plurals": "regular"}
