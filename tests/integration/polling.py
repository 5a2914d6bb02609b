"""Reading counters that servers update a little after they answer."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def settled(read: Callable[[], T], other_than: T | None = None, interval_s: float = 0.2, timeout_s: float = 10.0) -> T:
    """`read()` once two reads `interval_s` apart agree (and differ from `other_than`).

    Triton, for one, counts a request in its statistics only after it has sent the
    response, so a count read right after a call (or after an earlier test's calls)
    can still move.
    """
    deadline = time.monotonic() + timeout_s
    last = read()
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        now = read()
        if now == last and now != other_than:
            return now
        last = now
    return last
