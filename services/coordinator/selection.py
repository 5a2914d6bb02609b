"""Which scored samples a round keeps: the top α of Algorithm 1.

The cut is the score of the ⌈α·n⌉-th best sample, and every sample scoring at or above
it is retained, so ties at the cut are kept together (a few more than α·n may pass,
never fewer). The order of arrival does not matter: the same scores give the same cut
and the same retained set, which is what lets a restarted coordinator finish a round
with the result it would have had.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from freemask.shared.errors import InvalidInput


def score_threshold(scores: Mapping[str, float], alpha: float) -> float:
    """The α cut of `scores` (sample id -> S(x)); 0 keeps everything when there is nothing to cut."""
    if not 0.0 < alpha <= 1.0:
        raise InvalidInput(f"alpha must be in (0, 1], got {alpha}")
    if not scores:
        return 0.0
    ranked = sorted(scores.values(), reverse=True)
    return ranked[math.ceil(alpha * len(ranked)) - 1]


def retained(scores: Mapping[str, float], alpha: float) -> tuple[float, list[str]]:
    """The cut and the ids at or above it, best first (ties by id, so the order is stable)."""
    cut = score_threshold(scores, alpha)
    kept = sorted((sample_id for sample_id, score in scores.items() if score >= cut),
                  key=lambda sample_id: (-scores[sample_id], sample_id))
    return cut, kept
