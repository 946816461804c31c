"""The ``agentd`` command's entry point (``[project.scripts]``, and ``python -m agentd``).

The first thing it does is take SIGTERM, SIGINT and SIGHUP: until the daemon's event loop
installs its own handlers, a stop that arrives during start-up is remembered instead of killing
the process, so the snapshot is still stored. Only the interpreter's own start-up stays
uncovered. Then it imports the command line (:mod:`agentd.cli`, whose imports are lazy), runs
it with those early signals, and exits without the interpreter's teardown.

Everything process-wide lives here, not in :func:`agentd.cli.main`, so that tests calling
``main([...])`` run the same code as production:

* on asyncio, ``trio`` is kept from being imported (httpcore imports it eagerly whenever it is
  installed: about 45 ms and 5 MiB for a backend agentd will not use);
* before the daemon starts, everything imported so far is frozen out of the garbage collector
  (``gc.freeze``: it lives as long as the process; collections no longer walk it);
* the exit is ``os._exit`` once output is flushed (the teardown took 60 to 100 ms).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Signals whose default action would end the process but that mean no stop to agentd
#: (agentd.signals.SNAPSHOT and IGNORED, named here to keep this module's imports minimal):
#: ignored from the first instant; the daemon's own handlers take them over once it runs.
QUIET_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR")
    if hasattr(signal, name)
)


class EarlySignals(list[int]):
    """The stop signals (numbers) that arrived before the daemon's handlers took over, in order;
    ``at`` holds the ``time.monotonic()`` at which each was seen (a deadline counts from it).

    Python runs a handler once for any number of deliveries of one signal between two of its
    bytecodes (two SIGTERMs 10 ms apart during a long import are one call), so each delivery is
    also counted through a wakeup pipe, into which the C-level handler writes a byte per
    delivery: two quick SIGTERMs stay two, each with its time, and the daemon's signal policy
    (:mod:`agentd.signals`) decides what they mean (within a second of each other: one stop).
    """

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []
        self._calls: dict[int, int] = {}
        self._bytes: dict[int, int] = {}
        self._pipe = -1

    def timed(self) -> TimedSignals:
        """A view yielding ``(signal, time.monotonic())`` pairs, read when it is iterated."""
        return TimedSignals(self)

    def install(self) -> EarlySignals:
        """Remember SIGTERM, SIGINT and SIGHUP from now on, instead of dying; ignore
        :data:`QUIET_SIGNALS` (SIGUSR1, SIGUSR2, SIGALRM, ...) until the daemon takes them."""
        import os

        try:
            self._pipe, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        except (OSError, ValueError):  # no pipe, or not the main thread: count handler calls only
            self._pipe = -1
        for signum in STOP_SIGNALS:
            # A signal ignored by whoever started agentd stays ignored (``nohup agentd run &``
            # ignores SIGHUP on purpose); the daemon then leaves it ignored too.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._remember)
        for signum in QUIET_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        return self

    def _remember(self, signum: int, _frame: object) -> None:
        self._calls[signum] = self._calls.get(signum, 0) + 1
        self._count()

    def release_wakeup(self) -> None:
        """Stop counting through the pipe (just before the event loop starts: trio wants the
        wakeup fd free); handler calls are still counted."""
        if self._pipe >= 0:
            import os

            self._count()
            write = signal.set_wakeup_fd(-1)
            for fd in (self._pipe, write):
                if fd >= 0:
                    os.close(fd)
            self._pipe = -1

    def _count(self) -> None:
        if self._pipe >= 0:
            import os

            try:
                for byte in os.read(self._pipe, 256):
                    self._bytes[byte] = self._bytes.get(byte, 0) + 1
            except OSError:  # empty (BlockingIOError): the bytes were read by an earlier call
                pass
        now = time.monotonic()
        for sig in STOP_SIGNALS:  # deliveries: bytes seen, or handler calls if more (pipe replaced)
            for _ in range(max(self._bytes.get(sig, 0), self._calls.get(sig, 0)) - self.count(sig)):
                self.at.append(now)
                self.append(int(sig))

    def restore_defaults(self) -> None:
        """For commands that are not daemons: the signals stop them as they stop any command."""
        self.release_wakeup()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        for signum in QUIET_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)


class TimedSignals:
    """Iterates an :class:`EarlySignals` as ``(signal, time.monotonic())`` pairs, as they are
    when iterated (a daemon reads them once its own handlers are in place)."""

    def __init__(self, signals: EarlySignals) -> None:
        self.signals = signals

    def __iter__(self) -> Iterator[tuple[int, float]]:
        return iter(list(zip(self.signals, self.signals.at, strict=False)))


def main() -> None:
    """Run ``agentd`` with ``sys.argv``; never returns."""
    early = EarlySignals().install()
    import os

    _open_standard_streams(os)

    if os.environ.get("AGENTD_ASYNC_BACKEND", "asyncio").strip().lower() in ("", "asyncio"):
        sys.modules.setdefault("trio", None)  # type: ignore[arg-type]  # `import trio` -> ImportError
    import gc

    from agentd import cli

    def before_daemon() -> None:
        early.release_wakeup()
        gc.freeze()

    try:
        status = cli.main(sys.argv[1:], early_signals=early, before_daemon=before_daemon)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    _quick_exit(status)


def _open_standard_streams(os: Any) -> None:
    """A closed stdin, stdout or stderr (``agentd status >&-``) becomes /dev/null: results and
    log lines are dropped, as for a closed pipe, and no file opened later lands on fd 1 or 2."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:  # Python found the fd closed at start
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 - lives as long as the process


def _quick_exit(status: int) -> None:
    import contextlib
    import os

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(status)
