"""Which scored samples a round keeps: the top α of Algorithm 1.

Two ways to take the cut (`coordinator.selection`):

- ``global`` (the paper's): the cut is the score of the ⌈α·n⌉-th best sample, and every
  sample scoring at or above it is retained, so ties at the cut are kept together (a few
  more than α·n may pass, never fewer).
- ``per_class``: each sample is ranked only against the samples drawn for its own class,
  and the same top-α cut is taken over those within-class ranks, so every class keeps
  about α·n of its n samples, rounded to the nearest (a lone sample ranks in the middle of
  its class, not at its bottom). An early f_t knows a few classes well and scores the rest
  near 0; a global cut then keeps mostly the classes it already knows, and each round
  narrows D_{t+1} towards them.

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

GLOBAL, PER_CLASS = "global", "per_class"
SELECTIONS = (GLOBAL, PER_CLASS)


@dataclass(frozen=True)
class Selection:
    """A round's cut: the ids kept, best first, and the score each class had to reach."""

    retained: list[str]
    threshold: float  # global: the cut; per_class: the lowest of the class cuts (0 when nothing is kept)
    class_cuts: dict[str, float]  # per_class only: class -> the lowest score kept in it (absent: none kept)


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


def select(scores: Mapping[str, float], classes: Mapping[str, str], alpha: float, how: str) -> Selection:
    """The round's cut, `how` being GLOBAL or PER_CLASS; `classes` names each scored sample's class."""
    _check_alpha(alpha)
    if not scores:
        return Selection([], 0.0, {})
    if how == GLOBAL:
        cut, kept = retained(scores, alpha)
        return Selection(kept, cut, {})
    if how != PER_CLASS:
        raise InvalidInput(f"unknown selection {how!r}; choose one of {', '.join(SELECTIONS)}")
    kept = _per_class(scores, classes, alpha)
    cuts: dict[str, float] = {}
    for sample_id in kept:  # best first: each class's last one is its lowest
        cuts[classes[sample_id]] = scores[sample_id]
    return Selection(kept, min(cuts.values()), dict(sorted(cuts.items())))


def _per_class(scores: Mapping[str, float], classes: Mapping[str, str], alpha: float) -> list[str]:
    ascending: dict[str, list[float]] = {}
    for sample_id, score in scores.items():
        ascending.setdefault(classes[sample_id], []).append(score)
    for values in ascending.values():
        values.sort()
    # A sample's within-class rank is its mid-rank as a share of its class: those scoring better,
    # plus half of those scoring the same (itself included), over the class's size. The i-th best
    # of n ranks (i - 1/2) / n, so a cut at α keeps about α·n of every class, and tied samples
    # share one rank, so they are kept or dropped together, as under the global cut.
    rank = {}
    for sample_id, score in scores.items():
        values = ascending[classes[sample_id]]
        below, not_above = bisect.bisect_left(values, score), bisect.bisect_right(values, score)
        rank[sample_id] = (len(values) - not_above + (not_above - below) / 2) / len(values)
    ranks = sorted(rank.values())
    cut = ranks[math.ceil(alpha * len(ranks)) - 1]
    return _best_first(scores, [sample_id for sample_id, value in rank.items() if value <= cut])


def _best_first(scores: Mapping[str, float], ids: list[str]) -> list[str]:
    return sorted(ids, key=lambda sample_id: (-scores[sample_id], sample_id))


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha <= 1.0:
        raise InvalidInput(f"alpha must be in (0, 1], got {alpha}")
