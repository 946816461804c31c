"""The stop's deadline arithmetic, pure: seconds on one monotonic clock in, deadlines out.

On a stop signal at ``now`` the daemon must exit by ``now + shutdown_timeout`` whatever
happens (systemd's ``TimeoutStopSec``, Docker's 10 s, Kubernetes' grace period come after).
Within that budget:

* the upload (retries included) must end early enough to write the state and exit: a tenth of
  the budget, at most 0.25 s, is kept back;
* under ``agentd supervise`` stopped by a signal, the child's stop comes after the upload, so
  the upload ends ``child_stop_timeout`` seconds before the end (settings check that it is
  below ``shutdown_timeout``); a child that exited on its own needs no such room;
* the final ``GET /messages`` gets at most :data:`FINAL_REFRESH_TIMEOUT`, and at most a
  quarter of the time left before the upload's deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Seconds the final ``GET /messages`` may take at most.
FINAL_REFRESH_TIMEOUT = 1.0
#: Seconds kept back from the shutdown budget for the state write and the exit, at most.
EXIT_RESERVE = 0.25
#: Seconds any bounded step gets even when its deadline has passed (a state write, a kill).
MIN_STEP = 0.1


@dataclass(frozen=True, slots=True)
class StopDeadlines:
    """Deadlines of one stop, on the clock ``now`` was read from (seconds)."""

    upload: float  # the snapshot's upload, retries included, is over by then
    end: float  # the process exits by then, whatever happens


def stop_deadlines(now: float, shutdown_timeout: float, child_stop_timeout: float | None = None) -> StopDeadlines:
    """Deadlines for a stop that begins at ``now``.

    ``child_stop_timeout`` is given when a supervised child is still to be stopped after the
    upload. ``shutdown_timeout`` > 0 seconds.
    """
    end = now + shutdown_timeout
    if child_stop_timeout is not None:
        return StopDeadlines(upload=end - child_stop_timeout, end=end)
    return StopDeadlines(upload=end - min(EXIT_RESERVE, shutdown_timeout / 10), end=end)


def refresh_timeout(now: float, deadline: float) -> float:
    """Seconds the final ``GET /messages`` may take: short, and at most a quarter of the time
    left until ``deadline`` (never negative)."""
    return min(FINAL_REFRESH_TIMEOUT, max(0.0, deadline - now) / 4)


def step_timeout(now: float, end: float, cap: float | None = None) -> float:
    """Seconds for a step that must end by ``end``: what is left, at least :data:`MIN_STEP`,
    at most ``cap``."""
    left = max(MIN_STEP, end - now)
    return left if cap is None else min(cap, left)
