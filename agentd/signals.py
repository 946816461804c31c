"""Which signal means what to ``agentd run`` / ``agentd supervise``, and when one counts.

Pure policy, no I/O: the daemon feeds every signal it receives, with a ``time.monotonic()``,
to :meth:`SignalPolicy.classify` and acts on the answer.

* **Stop** (:data:`STOP`): SIGTERM, SIGINT, SIGHUP. The first stores the snapshot and exits
  (SIGHUP is what ``agentd run &`` gets when its terminal closes; agentapi also stops on it).
* **Snapshot now** (:data:`SNAPSHOT`): SIGUSR1 stores the snapshot and keeps running, like
  ``agentd snapshot`` (agentapi saves its state on SIGUSR1 too; ``supervise`` forwards it after
  storing).
* **Ignored** (:data:`IGNORED`): the other signals whose default action would end the process
  (SIGUSR2, SIGALRM, ...) are logged and otherwise ignored. SIGPIPE stays ignored as Python
  sets it (a closed peer is an ``EPIPE`` error, not a death).
* **Repeats**: the same signal again within :data:`REPEAT_WINDOW` seconds of the one that
  counted is that one delivered twice (a shell signalling its whole process group, ``timeout
  -s INT``, a closing terminal's SIGHUP then SIGTERM) and counts once. After a stop, any stop
  signal within the window is a repeat; a stop signal later than that is a deliberate second
  one: give up on the snapshot and exit at once.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from enum import Enum

#: Signals that stop the daemon (store, then exit).
STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: The signal that stores the snapshot now and keeps running.
SNAPSHOT = signal.SIGUSR1
#: Signals that would end the process by default and mean nothing to agentd: logged, ignored.
IGNORED = tuple(
    getattr(signal, name)
    for name in ("SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR")
    if hasattr(signal, name)
)
#: Every signal the daemon takes over for its whole run.
HANDLED = (*STOP, SNAPSHOT, *IGNORED)
#: Seconds within which the same signal again is one delivery (counted once).
REPEAT_WINDOW = 1.0
#: What the console says once a stop has begun.
GIVE_UP_HINT = "press Ctrl-C again to give up"


class Action(Enum):
    """What one received signal asks of the daemon."""

    STOP = "stop"  # the first stop signal: store, then exit
    GIVE_UP = "give up"  # a deliberate second stop signal: give up on the snapshot now
    SNAPSHOT = "snapshot"  # store now, keep running
    REPEAT = "repeat"  # a signal counted already (within REPEAT_WINDOW)
    IGNORE = "ignore"  # means nothing to agentd


@dataclass
class SignalPolicy:
    """Classifies received signals; remembers what has counted so far.

    ``stop_signal`` is the signal that started the stop (None while running).
    """

    window: float = REPEAT_WINDOW
    stop_signal: int | None = None
    _stop_at: float | None = None
    _counted: dict[int, float] = field(default_factory=dict)  # signum -> when it last counted

    def classify(self, signum: int, now: float) -> Action:
        """The action for ``signum`` received at ``now`` (``time.monotonic()`` seconds)."""
        if signum in IGNORED:
            return Action.IGNORE
        last = self._counted.get(signum)
        if last is not None and now - last < self.window:
            return Action.REPEAT
        if signum not in STOP:
            self._counted[signum] = now
            return Action.SNAPSHOT if signum == SNAPSHOT else Action.IGNORE
        if self._stop_at is None:
            self._stop_at, self.stop_signal = now, signum
            self._counted[signum] = now
            return Action.STOP
        if now - self._stop_at < self.window:  # SIGHUP then SIGTERM from a closing terminal
            return Action.REPEAT
        self._counted[signum] = now
        return Action.GIVE_UP


def name(signum: int) -> str:
    """``SIGTERM`` for 15; ``signal 99`` for a number Python has no name for."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
