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

import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from agentd.logs import get_logger
from agentd.paths import SOCKET_NAME, SYSTEMD_SOCKET, default_socket_path  # noqa: F401 - re-exported

log = get_logger("agentd.control")

MAX_REQUEST = 64 * 1024  # bytes: a request line is tiny; anything longer is refused


class ControlError(Exception):
    """The control socket could not be used; the text names the path and why."""


class NoDaemon(ControlError):
    """Nothing listens on the control socket (no file, or connection refused)."""


class NoAnswer(ControlError):
    """A daemon accepted the request but did not answer in time, or answered garbage."""


class SocketInUse(ControlError):
    """Another daemon answers on the control socket."""


def _alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


async def open_listener(path: Path) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    """Listen on ``path`` (mode 0600), replacing a stale socket.

    Raises :class:`SocketInUse` if another daemon answers there, :class:`ControlError` if the
    path cannot be bound (its directory cannot be made, a read-only disk, ...).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists() or path.is_symlink():
            if _alive(path):
                raise SocketInUse(f"another agentd is already listening on {path}")
            path.unlink()
            log.info("replaced a stale control socket", path=str(path))
    except OSError as exc:
        raise ControlError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    old_umask = os.umask(0o177)
    try:
        listener = await anyio.create_unix_listener(path)
    except OSError as exc:
        raise ControlError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return listener


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def serve(listener: anyio.abc.Listener[anyio.abc.SocketStream], handler: Handler) -> None:
    """Answer requests on ``listener`` with ``handler`` until cancelled."""

    async def connection(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(5):
                    line = await _read_line(stream)
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("request is not an object")
            except (ValueError, RecursionError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                await _send(stream, {"ok": False, "error": f"bad request: {type(exc).__name__}: {exc}"[:200]})
                return
            try:
                answer = await handler(request)
            except Exception as exc:  # a bad request must never take the daemon down
                log.exception("control request failed", command=str(request.get("command"))[:40])
                answer = {"ok": False, "error": f"request failed: {type(exc).__name__}"}
            await _send(stream, answer)

    await listener.serve(connection)


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
    try:
        await stream.send(json.dumps(payload, separators=(",", ":")).encode() + b"\n")
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass


async def _read_line(stream: anyio.abc.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data:
        data += await stream.receive()
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]
