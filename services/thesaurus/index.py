"""The Adaptive Matching Thesaurus index (Free-Mask eq. 3) and its builder.

    R(o, b) = |captions naming background b and object o| / |captions naming b|

The builder streams captions once and keeps only counts: one per background and
one per (background, object) pair, so its memory is bounded by the vocabulary,
not by the corpus. The index is a small JSON document with sorted keys, so the
same corpus and word rules give the same bytes and the same content-digest
version.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from tqdm import tqdm

from freemask.shared.errors import InvalidInput
from freemask.thesaurus.words import WordNormalizer

INDEX_FORMAT = 1
INDEX_FILE = "index.json"


@dataclass(frozen=True)
class Relation:
    """R(o, b) with the counts it came from."""

    object_name: str
    relation: float
    co_occurrence_count: int
    background_count: int


@dataclass(frozen=True)
class ThesaurusIndex:
    """Caption counts over a fixed vocabulary, and the queries of eq. 3 on them."""

    objects: tuple[str, ...]
    backgrounds: tuple[str, ...]
    captions: int
    background_counts: Mapping[str, int]
    co_occurrence: Mapping[str, Mapping[str, int]]  # background -> object -> captions naming both
    source: Mapping[str, Any]  # corpus and word rules, for provenance

    @property
    def vocabulary_size(self) -> int:
        return len(self.objects) + len(self.backgrounds)

    @cached_property
    def words(self) -> WordNormalizer:
        """Reads query words the way the corpus was read when the index was built."""
        rules = self.source.get("words", {})
        return WordNormalizer(self.objects, self.backgrounds, rules.get("synonyms", {}))

    def _check(self, word: str, known: Sequence[str], role: str) -> str:
        """The canonical name of a query word, which must be one of `known`."""
        if not word.strip():
            raise InvalidInput(f"the {role} word is empty")
        word = self.words.canonical(word) or word
        if word not in known:
            shown = word if len(word) <= 40 else word[:40] + "…"
            raise InvalidInput(
                f"unknown {role} {shown!r}: this index knows {len(known)} {role}s "
                f"({self.vocabulary_size} words in all): {', '.join(known)}"
            )
        return word

    def _background(self, word: str) -> tuple[str, int]:
        """A query's background and its caption count (the denominator of eq. 3), which must be > 0."""
        background = self._check(word, self.backgrounds, "background")
        count = self.background_counts.get(background, 0)
        if count == 0:
            raise InvalidInput(
                f"background {background!r} appears in none of the index's {self.captions} captions, "
                "so R(o, b) is undefined for it"
            )
        return background, count

    def background_count(self, background: str) -> int:
        return self._background(background)[1]

    def relation(self, object_name: str, background: str) -> Relation:
        """Eq. 3 for one pair; unknown words and never-seen backgrounds are InvalidInput."""
        object_name = self._check(object_name, self.objects, "object")
        background, total = self._background(background)
        both = self.co_occurrence.get(background, {}).get(object_name, 0)
        return Relation(object_name, both / total, both, total)

    def ranked(self, background: str, exclude: Iterable[str] = (), min_relation: float = 0.0) -> list[Relation]:
        """Every object with R(o, b) > 0 and >= `min_relation`, best first (ties by name)."""
        if not 0.0 <= min_relation <= 1.0:
            raise InvalidInput(f"min_relation must be in [0, 1], got {min_relation}")
        excluded = {self._check(word, self.objects, "object") for word in exclude}
        background, total = self._background(background)
        pairs = self.co_occurrence.get(background, {})
        found = [Relation(name, count / total, count, total) for name, count in pairs.items()
                 if name not in excluded and count > 0 and count / total >= min_relation]
        return sorted(found, key=lambda r: (-r.relation, r.object_name))

    def top_objects(self, background: str, k: int, exclude: Iterable[str] = (),
                    min_relation: float = 0.0) -> list[Relation]:
        if not 1 <= k <= 1000:
            raise InvalidInput(f"k must be in 1..1000, got {k}")
        return self.ranked(background, exclude, min_relation)[:k]

    # -- storage ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        document = {
            "format": INDEX_FORMAT,
            "objects": list(self.objects),
            "backgrounds": list(self.backgrounds),
            "captions": self.captions,
            "background_counts": dict(self.background_counts),
            "co_occurrence": {b: dict(pairs) for b, pairs in self.co_occurrence.items()},
            "source": dict(self.source),
        }
        return (json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")

    def content_version(self) -> str:
        """A version named by the index's own bytes: same counts, same version."""
        return "sha256-" + hashlib.sha256(self.to_bytes()).hexdigest()[:16]

    @classmethod
    def from_bytes(cls, data: bytes, what: str = INDEX_FILE) -> ThesaurusIndex:
        try:
            document = json.loads(data)
            if document.get("format") != INDEX_FORMAT:
                raise InvalidInput(f"{what} has format {document.get('format')!r}; this reader knows {INDEX_FORMAT}")
            return cls(
                objects=tuple(document["objects"]), backgrounds=tuple(document["backgrounds"]),
                captions=int(document["captions"]),
                background_counts={b: int(n) for b, n in document["background_counts"].items()},
                co_occurrence={b: {o: int(n) for o, n in pairs.items()}
                               for b, pairs in document["co_occurrence"].items()},
                source=document["source"],
            )
        except InvalidInput:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InvalidInput(f"{what} is not a thesaurus index: {type(err).__name__}: {err}") from None


def build_index(captions: Iterable[str], normalizer: WordNormalizer, corpus: Mapping[str, Any],
                progress: bool = False) -> ThesaurusIndex:
    """Count eq. 3's terms over `captions` in one streaming pass.

    `corpus` describes where the captions came from (recorded in the index). An empty
    corpus, or one where no caption names a background, is InvalidInput: an index
    without a single background cannot answer anything.
    """
    captions_read = 0
    background_counts: Counter[str] = Counter()
    pair_counts: Counter[tuple[str, str]] = Counter()
    for caption in tqdm(captions, desc="captions", unit="cap", disable=not progress, mininterval=1.0):
        captions_read += 1
        terms = normalizer.terms(caption)
        for background in terms.backgrounds:
            background_counts[background] += 1
            for object_name in terms.objects:
                pair_counts[background, object_name] += 1
    if captions_read == 0:
        raise InvalidInput(f"the caption corpus {corpus.get('name', '')!r} holds no captions")
    if not background_counts:
        raise InvalidInput(
            f"none of the {captions_read} captions of {corpus.get('name', '')!r} names a background "
            f"(known: {', '.join(normalizer.backgrounds)}); check the corpus and thesaurus.synonyms"
        )
    co_occurrence: dict[str, dict[str, int]] = {}
    for (background, object_name), count in sorted(pair_counts.items()):
        co_occurrence.setdefault(background, {})[object_name] = count
    return ThesaurusIndex(
        objects=normalizer.objects, backgrounds=normalizer.backgrounds, captions=captions_read,
        background_counts=dict(sorted(background_counts.items())), co_occurrence=co_occurrence,
        source={"corpus": dict(corpus), "words": normalizer.describe()},
    )
