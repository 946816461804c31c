"""Shared pieces of the benchmarks: stand-ins in a thread, agentd processes, clocks, medians.

The stand-ins (``FakeAgentAPI``, ``FakeCoderd``) run on their own event loop in a thread of
the bench process (an anyio blocking portal), so they use the bench's CPU, not agentd's: agentd
is always a separate ``python -m agentd run`` process, measured from outside (wall clock with
``time.perf_counter``, CPU time and memory from ``/proc/<pid>``).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio.from_thread

from agentd.testing.fake_agentapi import FakeAgentAPI
from agentd.testing.fake_coderd import FakeCoderd

TOKEN = "bench-agent-token-3f1c9a7e5b2d4c6e"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(Exception):
    """A benchmark run did not do what it must (not stored, bad exit, token printed...)."""


# -- statistics ----------------------------------------------------------------------------------


@dataclass
class Series:
    """Repeated measurements of one figure (seconds, bytes, ...)."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def n(self) -> int:
        return len(self.values)


# -- /proc ---------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (seconds, clock-tick resolution) from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS``), bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait until ``proc`` exits; return ``time.perf_counter()`` at the moment it did.

    Uses a pidfd (readable when the process exits), so the exit is seen at once rather than
    at the next poll of ``Popen.wait``. Raises BenchError after ``timeout`` seconds.
    """
    fd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        now = time.perf_counter()
    finally:
        os.close(fd)
    if not ready:
        raise BenchError(f"pid {proc.pid} still running after {timeout:.0f} s")
    proc.wait(timeout=5)
    return now


# -- sd_notify -----------------------------------------------------------------------------------


class NotifySocket:
    """A datagram socket playing systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[str] = []

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> tuple[str, float]:
        """Receive until a message satisfies ``predicate``; return it and ``perf_counter()`` then."""
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError(f"no matching sd_notify message within {timeout:.0f} s; got {self.messages[-5:]}")
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            data = self.sock.recv(65536).decode("utf-8", "replace")
            now = time.perf_counter()
            self.messages.append(data)
            if predicate(data):
                return data, now

    def close(self) -> None:
        self.sock.close()


# -- stand-ins -----------------------------------------------------------------------------------


class Standins:
    """FakeAgentAPI and FakeCoderd serving on loopback from a thread with its own event loop.

    ``call(fn, *args)`` runs a synchronous or async function in that loop (the fakes' state
    changes must happen there).
    """

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.portal: anyio.from_thread.BlockingPortal
        self.api = FakeAgentAPI()
        self.coderd = FakeCoderd(token=TOKEN)

    def __enter__(self) -> Standins:
        self.portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal("asyncio"))
        self._stack.enter_context(self.portal.wrap_async_context_manager(self.api.serve()))
        self._stack.enter_context(self.portal.wrap_async_context_manager(self.coderd.serve()))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.portal.call(fn, *args)

    def reset_conversation(self, conversation: Sequence[tuple[str, str]]) -> None:
        """Replace agentapi's conversation (between daemons: a stream still open gets it as updates)."""

        def reset() -> None:
            self.api.messages.clear()
            self.api.load(list(conversation))

        self.call(reset)

    def new_task(self) -> str:
        return self.call(self.coderd.add_task, str(uuid.uuid4()))

    def stored(self, task: str) -> Any:
        return self.call(lambda: self.coderd.stored.get(task))


# -- agentd processes ----------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without AGENTD_*/CODER_*/NOTIFY_SOCKET/WATCHDOG_*, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AGENTD_", "CODER_", "WATCHDOG_")) and k not in ("NOTIFY_SOCKET", "PYTHONPROFILEIMPORTTIME")
    }
    env.update(extra)
    return env


@dataclass
class Agentd:
    """One running ``agentd run`` process and its files."""

    proc: subprocess.Popen[bytes]
    started: float  # perf_counter() just before the process was spawned
    workdir: Path
    notify: NotifySocket
    task: str
    signalled: float = 0.0

    def log_time(self, event: str) -> float | None:
        """Wall-clock time (``time.time()``) of agentd's last JSON log line with this event."""
        found = None
        for line in self.output().splitlines():
            if f'"{event}"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event and "timestamp" in record:
                found = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
        return found

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        out = (self.workdir / "stdout").read_text("utf-8", "replace")
        err = (self.workdir / "stderr").read_text("utf-8", "replace")
        return out + err

    def check_token_not_printed(self) -> None:
        if TOKEN in self.output():
            raise BenchError("the agent token appears in agentd's output")

    def wait_buffer(self, messages: int, timeout: float = 15.0) -> None:
        """Wait for ``STATUS=agentapi connected; <messages> messages`` (sent once a second)."""
        want = f"agentapi connected; {messages} messages"
        self.notify.wait_for(lambda m: want in m, timeout)


@contextmanager
def agentd_process(
    standins: Standins,
    *,
    extra_env: dict[str, str] | None = None,
    argv: Sequence[str] | None = None,
    agentapi_url: str | None = None,
    coderd_url: str | None = None,
) -> Iterator[Agentd]:
    """Start ``python -m agentd run`` against the stand-ins (fresh state dir and task); kill it after.

    ``agentapi_url`` / ``coderd_url`` put another server (a hostile one) in place of a stand-in."""
    workdir = Path(tempfile.mkdtemp(prefix="agentd-bench-", dir="/tmp"))
    notify = NotifySocket(workdir)
    task = standins.new_task()
    env = clean_env(
        CODER_AGENT_URL=coderd_url or standins.coderd.url,
        CODER_AGENT_TOKEN=TOKEN,
        AGENTD_TASK_ID=task,
        AGENTD_AGENTAPI_URL=agentapi_url or standins.api.url,
        AGENTD_STATE_DIR=str(workdir / "state"),
        AGENTD_SOCKET=str(workdir / "agentd.sock"),
        AGENTD_LOG_FORMAT="json",
        NOTIFY_SOCKET=str(notify.path),
        **(extra_env or {}),
    )
    stdout = open(workdir / "stdout", "wb")
    stderr = open(workdir / "stderr", "wb")
    argv = list(argv or [sys.executable, "-m", "agentd", "run"])
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    agentd = Agentd(proc=proc, started=started, workdir=workdir, notify=notify, task=task)
    try:
        yield agentd
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        stdout.close()
        stderr.close()
        notify.close()
        shutil.rmtree(workdir, ignore_errors=True)


def stop(agentd: Agentd, timeout: float = 30.0) -> tuple[float, int]:
    """SIGTERM ``agentd``; return (seconds from the signal to its exit, exit status).

    ``agentd.signalled`` is set to the wall-clock time of the signal (``time.time()``, the clock
    of agentd's log timestamps)."""
    agentd.signalled = time.time()
    sent = time.perf_counter()
    os.kill(agentd.pid, signal.SIGTERM)
    exited = wait_exit(agentd.proc, timeout)
    return exited - sent, agentd.proc.returncode


def require(condition: bool, what: str) -> None:
    if not condition:
        raise BenchError(what)
