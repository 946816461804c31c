"""The control socket: how ``agentd snapshot``, ``agentd status`` and hooks talk to the daemon.

A Unix stream socket (mode 0600) in ``$RUNTIME_DIRECTORY`` when systemd gives one, else in the
state directory; ``AGENTD_SOCKET`` / ``--socket`` overrides. One JSON line each way::

    -> {"command": "status"}
    <- {"ok": true, "status": {...}}
    -> {"command": "snapshot", "timeout": 8.0}
    <- {"ok": true, "result": "stored"|"unchanged"|"nothing"|"failed", "line": "...", "outcome": {...}|null}

A stale socket left by a crashed daemon is replaced; a live one belongs to another daemon and
is an error naming it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc

from agentd.backoff import backoff_window
from agentd.logs import get_logger, redact
from agentd.paths import SOCKET_NAME, SYSTEMD_SOCKET, default_socket_path  # noqa: F401 - re-exported

log = get_logger("agentd.control")

MAX_REQUEST = 64 * 1024  # bytes: a request line is tiny; anything longer is refused
MAX_TIMEOUT = 3600  # seconds: the longest snapshot request
MAX_CONNECTIONS = 64  # served at once; more are closed as soon as accepted
BACKLOG = 128  # connections the kernel queues before accept
READ_TIMEOUT = 5.0  # seconds for the request line to arrive
SEND_TIMEOUT = 5.0  # seconds for the client to take the answer
CONNECTION_DEADLINE = MAX_TIMEOUT + READ_TIMEOUT + SEND_TIMEOUT + 5.0  # seconds, whatever happens
ACCEPT_BACKOFF_BASE = 0.05  # seconds: first backoff window after accept fails (EMFILE)
ACCEPT_BACKOFF_MAX = 1.0  # seconds: largest backoff window


class ControlError(Exception):
    """The control socket could not be used; the text names the path and why."""


class NoDaemon(ControlError):
    """Nothing listens on the control socket (no file, or connection refused)."""


class NoAnswer(ControlError):
    """A daemon accepted the request but did not answer in time, or answered garbage."""


class SocketInUse(ControlError):
    """Another daemon answers on the control socket."""


async def _alive(path: Path) -> bool:
    """True if something accepts connections on the Unix socket ``path`` (within 0.5 s)."""
    try:
        with anyio.fail_after(0.5):
            stream = await anyio.connect_unix(path)
    except (OSError, TimeoutError):
        return False
    await stream.aclose()
    return True


def _bound_socket(path: Path) -> socket.socket:
    """A Unix stream socket bound to ``path``, mode 0600, not yet listening.

    The mode is set on the socket before ``bind`` (Linux creates the file with the socket's
    mode minus the umask) and again on the path after it, before ``listen``: nobody can
    connect to a socket that does not listen yet, and the process umask is never changed.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_listener(path: Path) -> anyio.abc.SocketListener:
    """Listen on ``path`` (mode 0600), replacing a stale socket.

    Raises :class:`SocketInUse` if another daemon answers there, :class:`ControlError` if the
    path cannot be bound (its directory cannot be made, a read-only disk, ...).
    """
    try:
        if _occupied(path):
            if await _alive(path):
                raise SocketInUse(f"another agentd is already listening on {path}")
            _remove_stale(path)
        sock = _bound_socket(path)
    except OSError as exc:
        raise ControlError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return await anyio.abc.SocketListener.from_socket(sock)


def _remove_stale(path: Path) -> None:
    """Remove a socket left by a daemon that is gone; anything else at ``path`` (a file of
    someone's, a directory) is not ours to delete: OSError naming it."""
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket (not removed)")
    path.unlink()
    log.info("replaced a stale control socket", path=str(path))


def _occupied(path: Path) -> bool:
    """Make ``path``'s directory (0700) if missing; True if something is at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path.exists() or path.is_symlink()


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Target(Protocol):
    """What the control socket asks of the daemon (:class:`agentd.daemon.Daemon`)."""

    def status(self) -> dict[str, Any]: ...

    def supersede_checkpoint(self) -> None: ...

    async def store(self, deadline: float, *, refresh: bool = True, why: str = "shutdown") -> Stored: ...


class Stored(Protocol):
    """A store's result as the ``snapshot`` answer shows it."""

    def as_dict(self) -> dict[str, Any]: ...


def handler(target: Target) -> Handler:
    """The request handler for ``target``: ``status`` and ``snapshot`` (see the module doc)."""

    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command == "status":
            return {"ok": True, "status": target.status()}
        if command == "snapshot":
            timeout = request.get("timeout")
            if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 < timeout <= MAX_TIMEOUT):
                return {"ok": False, "error": f"timeout must be a number of seconds in (0, {MAX_TIMEOUT}]"}
            # A snapshot request does not wait behind a checkpoint (up to its own 30 s): it
            # cancels it and uploads the fresher view itself, within its own timeout.
            target.supersede_checkpoint()
            result = await target.store(anyio.current_time() + timeout, why="snapshot request")
            return {"ok": True, **result.as_dict()}
        return {"ok": False, "error": f"unknown command {str(command)[:40]!r}"}

    return handle


async def serve(listener: anyio.abc.SocketListener, handle: Handler,
                max_connections: int = MAX_CONNECTIONS) -> None:
    """Answer requests on ``listener`` with ``handle`` until cancelled. Never raises for a
    client's behaviour or a passing shortage of file descriptors.

    At most ``max_connections`` are served at once; more are closed as soon as accepted.
    A request line must arrive within :data:`READ_TIMEOUT` seconds and the answer be taken
    within :data:`SEND_TIMEOUT`; a whole connection lasts at most :data:`CONNECTION_DEADLINE`.
    ``accept`` failing (EMFILE: no file descriptor left) backs off up to
    :data:`ACCEPT_BACKOFF_MAX` seconds and tries again, logged once per run of failures.
    """
    active = 0
    failures = 0
    async with anyio.create_task_group() as tg:

        async def serve_one(stream: anyio.abc.SocketStream) -> None:
            nonlocal active
            try:
                with anyio.move_on_after(CONNECTION_DEADLINE):
                    await _connection(stream, handle)
            finally:
                active -= 1
                await anyio.aclose_forcefully(stream)

        while True:
            try:
                stream = await listener.accept()
            except (anyio.BrokenResourceError, OSError) as exc:  # anyio wraps accept's OSError
                failures += 1
                if failures == 1:
                    log.warning("control socket cannot accept; backing off", error=_os_error(exc))
                await anyio.sleep(backoff_window(failures, ACCEPT_BACKOFF_BASE, ACCEPT_BACKOFF_MAX))
                continue
            if failures:
                log.info("control socket accepts again", failures=failures)
                failures = 0
            if active >= max_connections:
                await anyio.aclose_forcefully(stream)
                continue
            active += 1
            tg.start_soon(serve_one, stream)


def _os_error(exc: BaseException) -> str:
    """The ``strerror`` of the OSError behind ``exc`` (EMFILE: "Too many open files")."""
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    if isinstance(cause, OSError):
        return cause.strerror or str(cause)
    return type(exc).__name__


async def _connection(stream: anyio.abc.SocketStream, handle: Handler) -> None:
    try:
        with anyio.fail_after(READ_TIMEOUT):
            line = await _read_line(stream)
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("request is not an object")
    except (ValueError, RecursionError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        await _send(stream, {"ok": False, "error": f"bad request: {type(exc).__name__}: {exc}"[:200]})
        return
    try:
        answer = await handle(request)
    except Exception as exc:  # a bad request must never take the daemon down
        log.exception("control request failed", command=str(request.get("command"))[:40])
        answer = {"ok": False, "error": f"request failed: {type(exc).__name__}"}
    await _send(stream, answer)


async def request(path: Path, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request to the daemon at ``path`` and return its answer.

    Raises :class:`NoDaemon` when nothing listens there, :class:`NoAnswer` when the daemon does
    not answer within ``timeout`` seconds.
    """
    try:
        with anyio.fail_after(min(timeout, 2.0)):
            stream = await anyio.connect_unix(path)
    except (OSError, TimeoutError) as exc:
        raise NoDaemon(f"no agentd answered on {path}: {type(exc).__name__}") from None
    try:
        with anyio.fail_after(timeout):
            async with stream:
                await _send(stream, payload)
                line = await _read_line(stream)
    except (OSError, TimeoutError, ValueError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        raise NoAnswer(f"the agentd on {path} did not answer within {timeout:.0f} s ({type(exc).__name__})") from None
    try:
        answer = json.loads(line)
    except (ValueError, RecursionError):
        raise NoAnswer(f"unreadable answer from {path}") from None
    if not isinstance(answer, dict):
        raise NoAnswer(f"unreadable answer from {path}")
    return answer


async def _send(stream: anyio.abc.SocketStream, payload: dict[str, Any]) -> None:
    """One JSON line, secrets redacted (the agent token, passwords in URLs); a peer that does
    not take it within :data:`SEND_TIMEOUT` seconds or has gone away is given up on."""
    line = redact(json.dumps(payload, separators=(",", ":"))).encode() + b"\n"
    with anyio.move_on_after(SEND_TIMEOUT), contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await stream.send(line)


async def _read_line(stream: anyio.abc.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data:
        data += await stream.receive()
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]
