"""Exponential backoff with full jitter: the one schedule agentd waits by.

Pure (the random draw is passed in). Used by the agentapi tail between reconnects and by the
coderd uploader between retries, so a fleet of workspaces that failed at the same moment does
not come back in the same instant (full jitter, as in AWS's "Exponential Backoff And Jitter").
"""

from __future__ import annotations

import random
from collections.abc import Callable

#: 2**62 is far past any cap; beyond it the float arithmetic would only overflow.
_MAX_EXPONENT = 62


def backoff_window(failures: int, base: float, cap: float) -> float:
    """Upper bound of the wait after ``failures`` failed attempts in a row, seconds.

    ``min(cap, base * 2**(failures - 1))``: ``base`` after the first failure, doubling up to
    ``cap``; 0.0 when nothing has failed yet (``failures <= 0``).
    """
    if failures <= 0:
        return 0.0
    return min(cap, base * 2.0 ** min(failures - 1, _MAX_EXPONENT))


def full_jitter(
    failures: int,
    base: float,
    cap: float,
    *,
    floor: float = 0.0,
    room: float = float("inf"),
    draw: Callable[[float, float], float] = random.uniform,
) -> float:
    """The wait after ``failures`` failures, seconds: ``floor + draw(0, window)``.

    ``window`` is :func:`backoff_window` (at least ``floor``, so a server's ``Retry-After`` of
    ``floor`` seconds spreads a fleet over ``[floor, 2 * floor]``), and never takes the wait past
    ``room`` seconds. ``floor`` above ``room`` is the caller's to refuse; here it is returned as is.
    """
    window = max(backoff_window(failures, base, cap), floor)
    return floor + draw(0.0, max(0.0, min(window, room - floor)))
