"""agentapi as a process, for ``agentd shutdown-hook``: find it by its pid file, make sure it is
agentapi, signal it without ever hitting another process, wait for its state file and its exit.

A pid file outlives its process: after a crash or a reboot its pid may belong to anything (the
hook often runs as root). :func:`find_agentapi` therefore trusts the pid only when

* the process's program is agentapi: the name ``agentapi`` appears in its executable's name,
  its ``argv[0]``, or (for an interpreter such as ``python -m agentd.testing.fake_agentapi``)
  the script or module it runs, read from ``/proc/<pid>/exe`` and ``/proc/<pid>/cmdline``;
* it started no later than the pid file was last written (``/proc/<pid>/stat`` field 22, in
  clock ticks since boot, against the file's mtime; :data:`START_SLACK` seconds of slack);

and it holds a pidfd (``pidfd_open``, Linux 5.3) from before those checks to the last signal,
so a pid reused in between can never receive one: a signal through the pidfd reaches the
checked process or nothing (``ProcessLookupError``). Where pidfds are unavailable, the checks
are repeated right before each ``kill()``.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

#: Seconds a process may appear to have started after its pid file's mtime: the two come from
#: different clocks (ticks since boot against wall time), and a pid file is normally written
#: just after the start.
START_SLACK = 1.0
#: An interpreter runs a script or module: the program's name is in its arguments.
_INTERPRETER = re.compile(r"(python[0-9.]*|pypy[0-9.]*|node|nodejs|bun|deno|ruby|perl|sh|bash|dash|env)")
_MAX_PID_FILE = 64  # bytes: a pid and a newline


class NotAgentAPI(Exception):
    """The pid file does not lead to a running agentapi; ``str()`` is one line saying why.

    ``gone`` is True when the pid is simply not running (agentapi already exited)."""

    def __init__(self, message: str, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


@dataclass
class AgentAPIProcess:
    """A checked agentapi process. Use :meth:`send`; :meth:`close` releases the pidfd."""

    pid: int
    command: str  # its command line, for people (cut to 80 characters)
    start_ticks: int  # when it started, clock ticks since boot: with the pid, its identity
    pidfd: int | None

    def send(self, signum: int) -> None:
        """Send ``signum`` to this process and no other.

        Raises ProcessLookupError when it has exited (also when, without a pidfd, its pid now
        belongs to another process), PermissionError when it is not ours to signal."""
        if self.pidfd is not None:
            signal.pidfd_send_signal(self.pidfd, signum)
            return
        if self.exited():  # no pidfd: the same pid and start time, as close to kill() as we can
            raise ProcessLookupError(self.pid)
        os.kill(self.pid, signum)

    def exited(self) -> bool:
        """True once the process has exited (a zombie counts: only its parent can reap it)."""
        if self.pidfd is not None:
            readable, _, _ = select.select([self.pidfd], [], [], 0)
            return bool(readable)
        try:
            fields = _stat_fields(self.pid)
        except OSError:
            return True
        return int(fields[19]) != self.start_ticks or fields[0] in ("Z", "X")

    async def wait_exited(self) -> None:
        """Return once the process has exited (the pidfd turns readable; without one, polled)."""
        if self.pidfd is not None:
            await anyio.wait_readable(self.pidfd)
            return
        while not self.exited():  # noqa: ASYNC110  # no pidfd: nothing to await but time
            await anyio.sleep(0.02)

    def close(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None


def read_pid_file(pid_file: Path) -> tuple[int, float]:
    """``(pid, mtime)`` from ``pid_file``. Raises NotAgentAPI (one line) when it is unusable."""
    try:
        with open(pid_file, "rb") as f:
            mtime = os.fstat(f.fileno()).st_mtime
            text = f.read(_MAX_PID_FILE + 1)
    except OSError as exc:
        raise NotAgentAPI(f"cannot read the pid file {pid_file}: {exc.strerror or exc}") from None
    try:
        if len(text) > _MAX_PID_FILE:
            raise ValueError
        pid = int(text.decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        raise NotAgentAPI(f"the pid file {pid_file} does not hold a pid ({text[:20]!r})") from None
    if pid <= 1:
        raise NotAgentAPI(f"the pid file {pid_file} holds pid {pid}, which is never agentapi")
    return pid, mtime


def find_agentapi(pid_file: Path) -> AgentAPIProcess:
    """The agentapi named by ``pid_file``, checked and held (see the module's docstring).

    Raises NotAgentAPI (one line, naming the pid and what it is) otherwise."""
    pid, mtime = read_pid_file(pid_file)
    pidfd = _pidfd_open(pid)  # first: whatever the checks see below is this process or none
    try:
        command, ticks = _check(pid, mtime)
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, 0)  # still alive: the /proc reads were about it
    except ProcessLookupError:
        _close(pidfd)
        raise NotAgentAPI(f"pid {pid} from {pid_file} is not running: agentapi already exited", gone=True) from None
    except BaseException:
        _close(pidfd)
        raise
    return AgentAPIProcess(pid, command, ticks, pidfd)


def _check(pid: int, pid_file_mtime: float) -> tuple[str, int]:
    """``(command line, start in clock ticks since boot)`` when ``pid`` is an agentapi started before its pid file
    was written. Raises ProcessLookupError (not running) or NotAgentAPI."""
    try:
        argv = [a.decode("utf-8", "replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        ticks = int(_stat_fields(pid)[19])  # field 22 of the whole line
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    except OSError as exc:
        raise NotAgentAPI(f"cannot inspect pid {pid}: {exc.strerror or exc}; signalling nothing") from None
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = ""  # not ours to read (another user's, or a kernel thread): argv decides
    command = " ".join(argv)[:80] or "(no command line)"
    if not is_agentapi(argv, exe):
        raise NotAgentAPI(f"pid {pid} is not agentapi ({command}); signalling nothing")
    started = _wall_clock(ticks)
    if started > pid_file_mtime + START_SLACK:
        late = started - pid_file_mtime
        raise NotAgentAPI(
            f"pid {pid} ({command}) started {late:.1f} s after the pid file was written: "
            "a reused pid, not the agentapi that wrote it; signalling nothing"
        )
    return command, ticks


def is_agentapi(argv: list[str], exe: str) -> bool:
    """True when the program (executable, ``argv[0]``, or an interpreter's script or module)
    is named agentapi."""
    names = [os.path.basename(exe.removesuffix(" (deleted)"))] if exe else []
    if argv:
        names.append(os.path.basename(argv[0]))
        if _INTERPRETER.fullmatch(os.path.basename(argv[0])) or _INTERPRETER.fullmatch(os.path.basename(exe)):
            names.extend(_script_of(argv[1:]))
    return any("agentapi" in name.lower() for name in names)


def _script_of(args: list[str]) -> list[str]:
    """The module (``-m M``) or script (first non-option argument) an interpreter runs."""
    for i, arg in enumerate(args):
        if arg == "-m":
            return args[i + 1 : i + 2]
        if arg.startswith("-m") and len(arg) > 2:
            return [arg[2:]]
        if not arg.startswith("-"):
            return [os.path.basename(arg.split()[0]) if arg.split() else arg]
    return []


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces and parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _wall_clock(ticks: int) -> float:
    """A start time in clock ticks since boot as wall-clock seconds (resolution one tick)."""
    since_boot = ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotAgentAPI(f"pid {pid} is not running: agentapi already exited", gone=True) from None
    except (AttributeError, OSError):
        return None  # no pidfds here (old kernel, seccomp): _check before every kill() instead


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def state_file_of(pid: int) -> Path | None:
    """agentapi's ``--state-file`` from its command line (or ``AGENTAPI_STATE_FILE`` in its
    environment, where readable), relative paths resolved against its working directory."""
    try:
        argv = [a.decode("utf-8", "surrogateescape") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return None
    value = None
    for i, arg in enumerate(argv):
        if arg in ("--state-file", "-state-file") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("--state-file=", "-state-file=")):
            value = arg.split("=", 1)[1]
    if value is None:
        value = _environ_of(pid).get("AGENTAPI_STATE_FILE")
    if not value:
        return None
    path = Path(value)
    if not path.is_absolute():
        try:
            path = Path(os.readlink(f"/proc/{pid}/cwd")) / path
        except OSError:
            return None
    return path


def _environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode("utf-8", "surrogateescape").split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key: value for key, value in pairs}


def file_version(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when ``path`` is rewritten (inode, size, mtime, ctime); None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
