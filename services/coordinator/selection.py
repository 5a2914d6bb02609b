"""Which scored samples a round keeps: the top α of Algorithm 1.

Three ways to take the cut (`coordinator.selection`):

- ``global`` (the paper's): the cut is the score of the ⌈α·n⌉-th best sample, and every
  sample scoring at or above it is retained, so ties at the cut are kept together (a few
  more than α·n may pass, never fewer).
- ``per_class``: each sample is ranked only against the samples of its group, here those
  drawn for its own class, and the same top-α cut is taken over those within-group ranks,
  so every group keeps about α·n of its n samples, rounded to the nearest (a lone sample
  ranks in the middle of its group, not at its bottom), and the round ⌈α·n⌉ of its n
  (more only where scores tie within a group). An early f_t knows a few classes
  well and scores the rest near 0; a global cut then keeps mostly the classes it already
  knows, and each round narrows D_{t+1} towards them.
- ``per_class_and_kind``: the same, with single objects and composed scenes of a class in
  two groups. A composed scene holds several objects, and f_t scores it lower than a single
  object of the same class, whatever its labels are worth; ranked together, the single
  objects take most of the places and D_{t+1} holds fewer composed scenes than the round's
  composed fraction asked for. Apart, each keeps its share.

Either way the order of arrival does not matter: the same scores give the same cut and
the same retained set, which is what lets a restarted coordinator finish a round with the
result it would have had.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass

from freemask.shared.errors import InvalidInput

GLOBAL, PER_CLASS, PER_CLASS_AND_KIND = "global", "per_class", "per_class_and_kind"
SELECTIONS = (GLOBAL, PER_CLASS, PER_CLASS_AND_KIND)
DESCRIPTIONS = {
    GLOBAL: "top α of all scores",
    PER_CLASS: "top α of each class",
    PER_CLASS_AND_KIND: "top α of each class, single objects and composed scenes apart",
}


@dataclass(frozen=True)
class Selection:
    """A round's cut: the ids kept, best first, and the score each group had to reach."""

    retained: list[str]
    threshold: float  # global: the cut; otherwise the lowest of the group cuts (0 when nothing is kept)
    group_cuts: dict[str, float]  # empty under global: group -> the lowest score kept in it (absent: none kept)


def group_of(how: str, class_name: str, kind: str) -> str:
    """The group a sample of `class_name` and slot `kind` is ranked in under selection `how`."""
    return f"{class_name}/{kind}" if how == PER_CLASS_AND_KIND else class_name


def score_threshold(scores: Mapping[str, float], alpha: float) -> float:
    """The α cut of `scores` (sample id -> S(x)); 0 keeps everything when there is nothing to cut."""
    _check_alpha(alpha)
    if not scores:
        return 0.0
    ranked = sorted(scores.values(), reverse=True)
    return ranked[math.ceil(alpha * len(ranked)) - 1]


def retained(scores: Mapping[str, float], alpha: float) -> tuple[float, list[str]]:
    """The global cut and the ids at or above it, best first (ties by id, so the order is stable)."""
    cut = score_threshold(scores, alpha)
    return cut, _best_first(scores, [sample_id for sample_id, score in scores.items() if score >= cut])


def select(scores: Mapping[str, float], groups: Mapping[str, str], alpha: float, how: str) -> Selection:
    """The round's cut, `how` being one of SELECTIONS; `groups` names each scored sample's group (group_of)."""
    _check_alpha(alpha)
    if how not in SELECTIONS:
        raise InvalidInput(f"unknown selection {how!r}; choose one of {', '.join(SELECTIONS)}")
    if not scores:
        return Selection([], 0.0, {})
    if how == GLOBAL:
        cut, kept = retained(scores, alpha)
        return Selection(kept, cut, {})
    kept = _within_groups(scores, groups, alpha)
    cuts: dict[str, float] = {}
    for sample_id in kept:  # best first: each group's last one is its lowest
        cuts[groups[sample_id]] = scores[sample_id]
    return Selection(kept, min(cuts.values()), dict(sorted(cuts.items())))


def _within_groups(scores: Mapping[str, float], groups: Mapping[str, str], alpha: float) -> list[str]:
    ascending: dict[str, list[float]] = {}
    for sample_id, score in scores.items():
        ascending.setdefault(groups[sample_id], []).append(score)
    for values in ascending.values():
        values.sort()
    # A sample's within-group rank is its mid-rank as a share of its group: those scoring better,
    # plus half of those scoring the same (itself included), over the group's size. The i-th best
    # of n ranks (i - 1/2) / n, so a cut at α keeps about α·n of every group, and tied samples
    # share one rank, so they are kept or dropped together, as under the global cut.
    # Samples of different groups can share a rank (every lone sample ranks 1/2); among them the
    # better score goes first. Kept together, they would make the round keep far more than α of
    # its samples whenever most groups are small, which is the usual case under
    # per_class_and_kind. Only samples equal in rank and score stand or fall together.
    order = {}
    for sample_id, score in scores.items():
        values = ascending[groups[sample_id]]
        below, not_above = bisect.bisect_left(values, score), bisect.bisect_right(values, score)
        order[sample_id] = ((len(values) - not_above + (not_above - below) / 2) / len(values), -score)
    cut = sorted(order.values())[math.ceil(alpha * len(order)) - 1]
    return _best_first(scores, [sample_id for sample_id, key in order.items() if key <= cut])


def _best_first(scores: Mapping[str, float], ids: list[str]) -> list[str]:
    return sorted(ids, key=lambda sample_id: (-scores[sample_id], sample_id))


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha <= 1.0:
        raise InvalidInput(f"alpha must be in (0, 1], got {alpha}")
