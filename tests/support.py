"""Test harness shared by the test files: clean environments, short socket directories, free
ports, JSON log parsing, bounded waits, the control socket's ``status`` over a raw JSON line
(no agentd client code), token-absence checks and the in-process daemon runner.

The pytest fixtures built on these (``short_dir``, ``log_stream``) are registered in
``tests/conftest.py``. Nothing here mocks agentd: helpers start, wait for and read real things.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import anyio
import structlog

#: A shutdown timeout long enough that "well before the deadline" cannot be mistaken for "at the
#: deadline", however busy the machine (CI is a shared 2-core machine): tests that prove agentd
#: does not wait for its deadline use it, and never assert a speed.
LONG_DEADLINE = 20.0
#: What a stop that does not wait for :data:`LONG_DEADLINE` stays under, seconds.
WELL_BEFORE = LONG_DEADLINE / 2
#: Seconds allowed past a deadline agentd promises (its shutdown timeout, a --timeout) for the
#: process to be seen exiting on a busy machine: scheduling, the final state write, the exit.
EXIT_SLACK = 5.0

#: Environment names a child agentd must not inherit from the test runner: agentd's and Coder's
#: settings, systemd's (notify socket, watchdog, directories, credentials) and the TLS trust
#: settings. Prefixes.
INHERITED_DROP = (
    "AGENTD_", "CODER_", "SSL_CERT_", "NOTIFY_SOCKET", "WATCHDOG_", "RUNTIME_DIRECTORY", "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
)


#: The harness turns agentd run's start-up probe off unless a test sets it: the probe's request
#: would take a scripted answer meant for an upload and add to the stand-in's request counts.
#: tests/test_probe.py and tests/test_check.py test the probe.
HARNESS_DEFAULTS = {"AGENTD_STARTUP_PROBE": "false"}


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without agentd's, Coder's, systemd's or the TLS trust settings, plus
    :data:`HARNESS_DEFAULTS` and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_DROP)}
    env.update(HARNESS_DEFAULTS)
    env.update(extra)
    return env


def drop_inherited(monkeypatch: Any) -> None:
    """Remove the :data:`INHERITED_DROP` names from this process's environment (in-process runs),
    then set :data:`HARNESS_DEFAULTS`."""
    for key in list(os.environ):
        if key.startswith(INHERITED_DROP):
            monkeypatch.delenv(key)
    for key, value in HARNESS_DEFAULTS.items():
        monkeypatch.setenv(key, value)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_short_dir(prefix: str = "agentd-") -> Path:
    """A new short directory under /tmp (Unix socket paths must stay under 108 bytes); the caller
    removes it."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@contextmanager
def short_dir_context(prefix: str = "agentd-") -> Iterator[Path]:
    path = make_short_dir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON object lines of ``text`` (a JSON log); other lines are passed over."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def assert_token_absent(token: str, *texts: str) -> None:
    """The agent token appears in none of ``texts`` (agentd's stdout, stderr, log)."""
    for text in texts:
        assert token not in text, "the agent token leaked into agentd's output"


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition",
                     interval: float = 0.01) -> None:
    """Poll ``predicate`` until it holds; an AssertionError after ``timeout`` seconds."""
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def daemon_status(sock: Path, timeout: float = 15.0) -> dict[str, Any]:
    """Ask the daemon's control socket for its status (a raw JSON line, no agentd client code)."""
    with anyio.fail_after(timeout):
        async with await anyio.connect_unix(str(sock)) as stream:
            await stream.send(b'{"command":"status"}\n')
            data = b""
            while not data.endswith(b"\n"):
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
    answer = json.loads(data)
    assert answer["ok"] is True, answer
    return answer["status"]


async def wait_status(sock: Path, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
    """Poll the daemon's status (:func:`daemon_status`) until ``predicate`` holds; return it."""
    status: dict[str, Any] = {}
    try:
        with anyio.fail_after(timeout):
            while True:
                status = await daemon_status(sock)
                if predicate(status):
                    return status
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"the daemon's status never matched; last: {status}") from None


# ---------------------------------------------------------------------------------------------
# the daemon in-process


@contextmanager
def captured_log(monkeypatch: Any) -> Iterator[io.StringIO]:
    """agentd's JSON log for in-process runs, captured; the environment cleaned (monkeypatch
    restores it) and structlog's configuration restored after."""
    from agentd import logs

    drop_inherited(monkeypatch)
    saved = structlog.get_config()
    stream = io.StringIO()
    logs.configure("json", "info", stream=stream)
    try:
        yield stream
    finally:
        structlog.configure(**saved)


class InProcessHandle(Protocol):
    status: int | None
    exited: float | None
    done: anyio.Event

    def output(self) -> str: ...


@asynccontextmanager
async def daemon_in_task(settings: Any, handle: InProcessHandle, ready: Callable[[], bool], what: str,
                         timeout: float = 30.0) -> AsyncIterator[None]:
    """Run ``agentd.daemon.run(settings)`` in a task of the test's event loop; ``handle`` gets its
    exit status, exit time and ``done``. Returns from entering once ``ready()`` holds (the
    daemon's signal receiver must be in place by then: SIGTERM goes to the daemon, not to
    pytest); on leaving, a daemon still running is cancelled. Asserts that no SIGTERM missed the
    daemon's receiver."""
    from agentd import daemon as daemon_mod

    daemon_mod.early_signals.clear()
    async with anyio.create_task_group() as tg:

        async def go() -> None:
            try:
                handle.status = await daemon_mod.run(settings)
            finally:
                handle.exited = time.monotonic()
                handle.done.set()

        tg.start_soon(go)
        await wait_until(lambda: ready() or handle.done.is_set(), timeout, what)
        assert not handle.done.is_set(), f"the daemon returned {handle.status} at start:\n{handle.output()}"
        try:
            yield
        finally:
            if not handle.done.is_set():
                tg.cancel_scope.cancel()
    assert daemon_mod.early_signals == [], "a SIGTERM missed the daemon's receiver"


def small_conversation(api: Any, n: int = 4) -> None:
    """``n`` short messages (agent first, as agentapi's PTY message 0, then alternating) with box
    drawing, added to ``api``."""
    for i in range(n):
        api.add_message("agent" if i % 2 == 0 else "user", f"message {i}: ╭─ box ─╮ {'x' * 40}")


class AgentdChild:
    """The signal/exit plumbing of a test's ``python -m agentd`` child (``proc``) with its short
    socket directory (``sock_dir``): subclasses start it and read its output their own way."""

    proc: Any = None  # subprocess.Popen once started
    sock_dir: Path
    signalled: float | None = None  # time.monotonic() of the first signal sent

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` (SIGTERM by default); the first one's time is kept in ``signalled``."""
        assert self.proc is not None
        if self.signalled is None:
            self.signalled = time.monotonic()
        self.proc.send_signal(signum)

    async def wait_exited(self, timeout: float) -> int:
        """Wait (bounded) until the child has exited; its exit status."""
        assert self.proc is not None
        with anyio.fail_after(timeout):
            while self.proc.poll() is None:
                await anyio.sleep(0.005)
        return self.proc.returncode

    def kill(self) -> None:
        """Kill the child if it is still running; remove the socket directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def fill(path: Path) -> Path:
    """Fill the filesystem at ``path`` until it is full; the filler file."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler
