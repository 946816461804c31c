"""The supervised child for ``agentd supervise -- COMMAND``: start, signal, wait, reap.

The orchestrator (:mod:`agentd.daemon`) decides *when*; this module knows *how*:

* the child (typically ``agentapi server -- claude``) inherits stdin, stdout and stderr, so its
  output passes straight through;
* the child runs in a session (and so a process group) of its own: a terminal's Ctrl-C (SIGINT
  to the foreground process group, e.g. ``docker run -it``), a shell's ``kill -- -PGID`` or a
  hang-up reach agentd only, which stores the snapshot first and then forwards the signal. In
  its own session the child has no controlling terminal, and that is what lets it keep using
  the inherited one: reading or writing a terminal that is not your controlling terminal is
  never stopped by job control (SIGTTIN/SIGTTOU), whereas a child in a background process
  group of agentd's session would be stopped the moment it read its stdin. What it gives up:
  opening ``/dev/tty``, and terminal-generated signals (SIGINT, SIGQUIT, SIGTSTP, SIGWINCH),
  which come from agentd or not at all. agentapi needs neither: it runs the agent in a
  terminal of its own;
* :meth:`Child.stop` forwards a signal, waits up to a bound (seconds) and SIGKILLs if it must;
  :func:`finish` does so unless the child has exited already. Which signal reaches the child
  and when is the daemon's: the stop signal (SIGTERM, SIGINT or SIGHUP, which agentapi all
  treats as shutdown) after the snapshot is stored; SIGUSR1 after a snapshot too;
* :func:`exit_status` mirrors the child's status the way shells do (128 + signal number for a
  signalled child);
* as PID 1 (a container without an init) :func:`reap_orphans` reaps re-parented grandchildren
  without stealing the direct child's exit status (``waitid`` with ``WNOWAIT`` peeks first).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence

import anyio
import anyio.abc

from agentd.logs import get_logger

log = get_logger("agentd.supervise")

def exit_status(returncode: int) -> int:
    """The status to exit with for a child's ``returncode`` (negative: killed by that signal)."""
    return 128 - returncode if returncode < 0 else returncode


class Child:
    """One supervised process. ``exited`` is set once it has exited; ``returncode`` then holds its status."""

    def __init__(self, process: anyio.abc.Process, command: Sequence[str]) -> None:
        self.process = process
        self.command = list(command)
        self.exited = anyio.Event()
        self.returncode: int | None = None

    @classmethod
    async def start(cls, command: Sequence[str]) -> Child:
        """Start ``command`` with inherited stdio, in a session of its own (see the module's
        docstring). Raises OSError if it cannot be executed."""
        process = await anyio.open_process(list(command), stdin=None, stdout=None, stderr=None, start_new_session=True)
        log.info("child started", pid=process.pid, command=command[0])
        return cls(process, command)

    async def wait(self) -> None:
        """Wait for the child to exit and record its status (run as a task)."""
        self.returncode = await self.process.wait()
        self.exited.set()
        log.info("child exited", pid=self.process.pid, status=exit_status(self.returncode))

    def send(self, signum: int) -> None:
        """Send ``signum`` unless the child has already exited."""
        if self.exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.Signals(signum))

    async def stop(self, signum: int, grace: float) -> int:
        """Send ``signum``, wait up to ``grace`` seconds, then SIGKILL. Returns the exit status."""
        self.send(signum)
        with anyio.move_on_after(grace):
            await self.exited.wait()
        if not self.exited.is_set():
            log.warning("child did not exit in time; killing it", pid=self.process.pid, waited=grace)
            self.send(signal.SIGKILL)
            with contextlib.suppress(OSError):  # and what it left in its session (its own group)
                os.killpg(self.process.pid, signal.SIGKILL)
            with anyio.move_on_after(1):  # SIGKILL is immediate unless the child is stuck in the kernel
                await self.exited.wait()
        return exit_status(self.returncode if self.returncode is not None else -signal.SIGKILL)


async def finish(child: Child, signum: int, grace: float) -> int:
    """The child's exit status: at once if it has exited, else after :meth:`Child.stop`
    (``signum``, up to ``grace`` seconds, then SIGKILL)."""
    if child.exited.is_set() and child.returncode is not None:
        return exit_status(child.returncode)
    return await child.stop(signum, grace)


def reap_orphans(child_pid: int | None) -> int:
    """Reap exited processes other than ``child_pid``; returns how many. For PID 1 only."""
    reaped = 0
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if info is None or info.si_pid == 0 or info.si_pid == child_pid:
            return reaped  # nothing exited, or only our own child (its waiter collects it)
        try:
            os.waitpid(info.si_pid, os.WNOHANG)
            reaped += 1
        except ChildProcessError:
            pass


async def reaper(child_pid: int | None, interval: float = 0.5) -> None:
    """Reap orphans every ``interval`` seconds when this process is PID 1, until cancelled."""
    if os.getpid() != 1:
        return
    while True:
        count = reap_orphans(child_pid)
        if count:
            log.debug("reaped orphans", count=count)
        await anyio.sleep(interval)
