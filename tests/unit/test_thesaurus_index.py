"""Eq. 3 on hand-written corpora, word normalisation, the index's storage form, and
the errors a builder or a query can meet."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import pytest

from freemask.shared.errors import InvalidInput
from freemask.thesaurus.index import ThesaurusIndex, build_index
from freemask.thesaurus.words import WordNormalizer, regular_plurals

OBJECTS = ("aeroplane", "boat", "bus", "dog", "person", "sheep")
BACKGROUNDS = ("sea", "sky", "road", "grass")
SYNONYMS = {"aeroplane": ("plane", "airplane"), "person": ("man", "woman", "people"), "sea": ("ocean",)}
CORPUS = {"name": "hand-written"}


def words() -> WordNormalizer:
    return WordNormalizer(OBJECTS, BACKGROUNDS, SYNONYMS)


def index_of(captions: list[str]) -> ThesaurusIndex:
    return build_index(captions, words(), CORPUS)


HAND_CORPUS = [
    "a boat on the sea",                  # sea: boat
    "two boats at sea",                   # sea: boat
    "a plane over the ocean",             # sea: aeroplane (synonyms)
    "a boat and a man on the sea",        # sea: boat, person
    "a quiet sea",                        # sea: nothing
    "a plane in the sky",                 # sky: aeroplane
    "a bus on the road",                  # road: bus
    "a dog on the grass",                 # grass: dog
    "a dog and a boat",                   # no background: not counted anywhere
]


def test_eq3_matches_hand_counted_captions() -> None:
    index = index_of(HAND_CORPUS)
    assert index.captions == 9
    assert index.background_counts == {"grass": 1, "road": 1, "sea": 5, "sky": 1}
    boat = index.relation("boat", "sea")
    assert (boat.co_occurrence_count, boat.background_count, boat.relation) == (3, 5, pytest.approx(3 / 5))
    assert index.relation("aeroplane", "sea").relation == pytest.approx(1 / 5)
    assert index.relation("person", "sea").relation == pytest.approx(1 / 5)
    assert index.relation("dog", "sea").relation == 0.0  # "a dog and a boat" names no background
    assert index.relation("aeroplane", "sky").relation == 1.0


def test_a_word_counts_once_per_caption() -> None:
    index = index_of(["a dog, a dog and two dogs on the grass on green grass", "a boat on the grass"])
    assert index.background_counts["grass"] == 2
    assert index.relation("dog", "grass").co_occurrence_count == 1


@pytest.mark.parametrize(("word", "canonical"), [
    ("Boat", "boat"), ("BOATS", "boat"), ("buses", "bus"), ("sheep", "sheep"), ("planes", "aeroplane"),
    ("Airplanes", "aeroplane"), ("people", "person"), ("woman", "person"), ("oceans", "sea"), ("grass", "grass"),
    ("grasses", "grass"), ("gras", None), ("bu", None), ("photo", None), ("seas", "sea"),
])
def test_normalisation_of_case_plurals_and_synonyms(word: str, canonical: str | None) -> None:
    assert words().canonical(word) == canonical


def test_regular_plurals() -> None:
    assert regular_plurals("bus") == ("bus", "buss", "buses")
    assert regular_plurals("lorry") == ("lorry", "lorrys", "lorries")
    assert regular_plurals("day") == ("day", "days")


def test_queries_are_normalised_like_the_corpus() -> None:
    index = index_of(HAND_CORPUS)
    assert index.relation("Planes", "OCEAN") == index.relation("aeroplane", "sea")


@pytest.mark.parametrize(("object_name", "background"), [("unicorn", "sea"), ("boat", "moon"), ("sea", "boat")])
def test_unknown_words_name_the_vocabulary_size(object_name: str, background: str) -> None:
    index = index_of(HAND_CORPUS)
    with pytest.raises(InvalidInput, match=r"this index knows \d+ \w+s \(10 words in all\)"):
        index.relation(object_name, background)


def test_empty_words_are_refused() -> None:
    with pytest.raises(InvalidInput, match="object word is empty"):
        index_of(HAND_CORPUS).relation(" ", "sea")


def test_a_known_background_no_caption_names_has_no_relation() -> None:
    index = index_of(["a boat on the sea"])
    with pytest.raises(InvalidInput, match="'sky' appears in none of the index's 1 captions"):
        index.relation("aeroplane", "sky")
    with pytest.raises(InvalidInput, match="appears in none"):
        index.top_objects("sky", 3)


def test_an_empty_corpus_is_refused() -> None:
    with pytest.raises(InvalidInput, match="holds no captions"):
        index_of([])


def test_a_corpus_naming_no_background_is_refused() -> None:
    with pytest.raises(InvalidInput, match="none of the 2 captions .* names a background"):
        index_of(["a dog", "two boats"])


def test_top_objects_rank_filter_and_exclude() -> None:
    index = index_of(HAND_CORPUS)
    ranked = index.top_objects("sea", 10)
    assert [(r.object_name, r.co_occurrence_count) for r in ranked] == [("boat", 3), ("aeroplane", 1), ("person", 1)]
    assert [r.object_name for r in index.top_objects("sea", 2)] == ["boat", "aeroplane"]  # ties by name
    assert [r.object_name for r in index.top_objects("sea", 10, exclude=["boats"])] == ["aeroplane", "person"]
    assert [r.object_name for r in index.top_objects("sea", 10, min_relation=0.5)] == ["boat"]
    assert index.top_objects("sea", 10, min_relation=1.0) == []
    for k in (0, 1001):
        with pytest.raises(InvalidInput, match="k must be in 1..1000"):
            index.top_objects("sea", k)
    with pytest.raises(InvalidInput, match=r"min_relation must be in \[0, 1\]"):
        index.top_objects("sea", 3, min_relation=1.5)
    with pytest.raises(InvalidInput, match="unknown object 'kraken'"):
        index.top_objects("sea", 3, exclude=["kraken"])


def test_storage_round_trip_is_exact_and_versioned_by_content() -> None:
    index = index_of(HAND_CORPUS)
    again = ThesaurusIndex.from_bytes(index.to_bytes())
    assert again == index and again.to_bytes() == index.to_bytes()
    assert again.relation("planes", "ocean") == index.relation("aeroplane", "sea")
    assert index.content_version() == index_of(list(HAND_CORPUS)).content_version()
    assert index.content_version() != index_of(HAND_CORPUS[:-2]).content_version()
    assert index.source["words"]["synonyms"]["aeroplane"] == ["plane", "airplane"]


@pytest.mark.parametrize("data", [b"not json", b"[]", b'{"format": 99}', b'{"format": 1, "objects": []}'])
def test_damaged_index_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        ThesaurusIndex.from_bytes(data)


@pytest.mark.parametrize(("objects", "backgrounds", "synonyms", "fragment"), [
    (("dog",), ("dog",), {}, "both an object and a background"),
    (("dog",), ("sea",), {"cat": ("kitty",)}, "neither an object nor a background"),
    (("dog", "cat"), ("sea",), {"dog": ("pet",), "cat": ("pet",)}, "'pet' is given for both"),
    (("dog",), ("sea",), {"dog": ("hot dog",)}, "one word of lower-case letters"),
])
def test_inconsistent_word_rules_are_refused(objects: tuple, backgrounds: tuple, synonyms: dict,
                                             fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        WordNormalizer(objects, backgrounds, synonyms)


def _captions(count: int) -> Iterator[str]:
    for i in range(count):
        yield f"caption {i}: a dog and {i % 7} boats on the sea"


def _peak_bytes(count: int) -> int:
    tracemalloc.start()
    try:
        build_index(_captions(count), words(), CORPUS)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_building_streams_so_memory_does_not_grow_with_the_corpus() -> None:
    _peak_bytes(100)  # first use compiles and caches; not what is measured
    small, large = _peak_bytes(2_000), _peak_bytes(40_000)
    # Keeping the captions would cost ~50 bytes each, about 2 MB more for the large corpus.
    assert large - small < 200_000, (small, large)
