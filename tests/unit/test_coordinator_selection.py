"""The α cut of Algorithm 1 on hand-made scores: over all scores, by class, and by class and slot kind."""

from __future__ import annotations

import random

import pytest

from freemask.coordinator.selection import (
    GLOBAL,
    PER_CLASS,
    PER_CLASS_AND_KIND,
    Selection,
    group_of,
    retained,
    score_threshold,
    select,
)
from freemask.shared.errors import InvalidInput

TEN = {f"s-{i}": i / 10 for i in range(10)}  # 0.0 .. 0.9


def test_the_top_seventy_percent_of_ten_distinct_scores_are_kept() -> None:
    cut, kept = retained(TEN, 0.7)
    assert cut == pytest.approx(0.3)
    assert kept == [f"s-{i}" for i in range(9, 2, -1)]


def test_the_cut_rounds_the_kept_count_up() -> None:
    scores = {"a": 0.9, "b": 0.5, "c": 0.1}
    assert retained(scores, 0.7) == (0.1, ["a", "b", "c"])  # ceil(2.1) = 3
    assert retained(scores, 0.5) == (0.5, ["a", "b"])  # ceil(1.5) = 2
    assert retained(scores, 0.3) == (0.9, ["a"])


def test_ties_at_the_cut_are_kept_together() -> None:
    scores = {"a": 0.8, "b": 0.5, "c": 0.5, "d": 0.5, "e": 0.1}
    cut, kept = retained(scores, 0.4)  # ceil(2.0) = 2: the 2nd best is 0.5, shared by three
    assert cut == 0.5 and kept == ["a", "b", "c", "d"]


def test_arrival_order_does_not_change_the_result() -> None:
    items = list(TEN.items())
    random.Random(3).shuffle(items)
    assert retained(dict(items), 0.7) == retained(TEN, 0.7)


def test_alpha_one_keeps_everything_and_no_scores_keep_nothing() -> None:
    assert retained(TEN, 1.0) == (0.0, sorted(TEN, key=lambda k: -TEN[k]))
    assert score_threshold({}, 0.7) == 0.0 and retained({}, 0.7) == (0.0, [])


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_alpha_outside_zero_one_is_refused(alpha: float) -> None:
    with pytest.raises(InvalidInput, match="alpha must be in"):
        score_threshold(TEN, alpha)


# --- per-class selection ---------------------------------------------------------------

# Two classes: f_t knows "horse" (high scores) and not yet "cat" (low scores).
SKEWED = {**{f"h-{i}": 0.6 + i / 100 for i in range(10)}, **{f"c-{i}": 0.01 * i for i in range(10)}}
CLASS_OF = {sample_id: "horse" if sample_id.startswith("h") else "cat" for sample_id in SKEWED}


def test_a_global_cut_keeps_the_class_the_segmenter_knows() -> None:
    selection = select(SKEWED, CLASS_OF, 0.5, GLOBAL)
    assert sorted(selection.retained) == sorted(f"h-{i}" for i in range(10))
    assert selection.threshold == pytest.approx(0.6) and selection.group_cuts == {}


def test_a_per_class_cut_keeps_the_top_alpha_of_each_class() -> None:
    selection = select(SKEWED, CLASS_OF, 0.5, PER_CLASS)
    assert selection.retained == [f"h-{i}" for i in range(9, 4, -1)] + [f"c-{i}" for i in range(9, 4, -1)]
    assert selection.group_cuts == {"cat": pytest.approx(0.05), "horse": pytest.approx(0.65)}
    assert selection.threshold == pytest.approx(0.05)


def test_per_class_keeps_as_many_as_the_global_cut_when_classes_divide_evenly() -> None:
    for alpha in (0.3, 0.5, 0.7, 1.0):
        assert len(select(SKEWED, CLASS_OF, alpha, PER_CLASS).retained) == len(retained(SKEWED, alpha)[1])


def test_per_class_shares_the_cut_by_within_class_rank_across_unequal_classes() -> None:
    scores = {"a-1": 0.9, "a-2": 0.8, "a-3": 0.7, "a-4": 0.6, "b-1": 0.2, "b-2": 0.1}
    classes = {sample_id: sample_id[0] for sample_id in scores}
    # mid-ranks: a 1/8, 3/8, 5/8, 7/8; b 1/4, 3/4. ceil(0.5 * 6) = 3: the 3rd smallest is 3/8
    assert select(scores, classes, 0.5, PER_CLASS).retained == ["a-1", "a-2", "b-1"]


def test_a_class_drawn_once_keeps_its_sample_at_the_usual_alpha() -> None:
    scores = {"a-1": 0.9, "a-2": 0.8, "a-3": 0.7, "a-4": 0.6, "lone": 0.01}
    classes = {sample_id: sample_id[0] for sample_id in scores}
    # the lone sample ranks 1/2 (the middle of its class), not last: a 4-sample class keeps 3 of 4
    assert select(scores, classes, 0.7, PER_CLASS).retained == ["a-1", "a-2", "a-3", "lone"]
    assert select(scores, classes, 0.4, PER_CLASS).retained == ["a-1", "a-2"]


def test_lone_samples_of_many_classes_share_a_rank_and_the_better_scores_are_kept() -> None:
    scores = {f"lone-{i}": i / 10 for i in range(10)}  # ten classes, one sample each: each ranks 1/2
    classes = {sample_id: sample_id for sample_id in scores}
    assert select(scores, classes, 0.5, PER_CLASS).retained == [f"lone-{i}" for i in range(9, 4, -1)]
    tied = {**scores, "lone-8": 0.9}  # equal in rank and in score: kept together
    assert select(tied, classes, 0.5, PER_CLASS).retained == ["lone-8", "lone-9", "lone-7", "lone-6", "lone-5"]
    assert select(tied, classes, 0.1, PER_CLASS).retained == ["lone-8", "lone-9"]


def test_per_class_keeps_ties_within_a_class_together() -> None:
    scores = {"a-1": 0.9, "a-2": 0.5, "a-3": 0.5, "a-4": 0.1}
    selection = select(scores, {sample_id: "a" for sample_id in scores}, 0.5, PER_CLASS)
    assert selection.retained == ["a-1", "a-2", "a-3"] and selection.group_cuts == {"a": 0.5}


def test_per_class_arrival_order_does_not_change_the_result() -> None:
    items = list(SKEWED.items())
    random.Random(5).shuffle(items)
    assert select(dict(items), CLASS_OF, 0.7, PER_CLASS) == select(SKEWED, CLASS_OF, 0.7, PER_CLASS)



# --- per-class-and-kind selection -----------------------------------------------------

# One class, whose single objects f_t scores higher than its composed scenes, as it does for
# scenes holding several objects.
MIXED = {**{f"s-{i}": 0.5 + i / 100 for i in range(6)}, **{f"c-{i}": 0.2 + i / 100 for i in range(4)}}
KIND_OF = {sample_id: "single" if sample_id.startswith("s") else "composed" for sample_id in MIXED}


def test_a_sample_is_grouped_by_its_class_or_by_its_class_and_kind() -> None:
    assert group_of(PER_CLASS, "cat", "composed") == "cat" == group_of(GLOBAL, "cat", "single")
    assert group_of(PER_CLASS_AND_KIND, "cat", "composed") == "cat/composed"
    assert group_of(PER_CLASS_AND_KIND, "cat", "single") == "cat/single"


def test_ranked_apart_composed_scenes_keep_their_share_of_a_class() -> None:
    by_class = select(MIXED, {sample_id: group_of(PER_CLASS, "cat", KIND_OF[sample_id]) for sample_id in MIXED},
                      0.5, PER_CLASS)
    assert sorted(by_class.retained) == sorted(f"s-{i}" for i in range(1, 6))  # no composed scene
    groups = {sample_id: group_of(PER_CLASS_AND_KIND, "cat", KIND_OF[sample_id]) for sample_id in MIXED}
    selection = select(MIXED, groups, 0.5, PER_CLASS_AND_KIND)
    assert selection.retained == ["s-5", "s-4", "s-3", "c-3", "c-2"]
    assert selection.group_cuts == {"cat/composed": pytest.approx(0.22), "cat/single": pytest.approx(0.53)}
    assert selection.threshold == pytest.approx(0.22)


def test_select_refuses_an_unknown_way_and_keeps_nothing_of_nothing() -> None:
    with pytest.raises(InvalidInput, match="unknown selection 'by_colour'"):
        select(SKEWED, CLASS_OF, 0.7, "by_colour")
    assert select({}, {}, 0.7, PER_CLASS) == Selection([], 0.0, {})
    with pytest.raises(InvalidInput, match="unknown selection"):
        select({}, {}, 0.7, "by_colour")
    with pytest.raises(InvalidInput, match="alpha must be in"):
        select(SKEWED, CLASS_OF, 0.0, PER_CLASS)
