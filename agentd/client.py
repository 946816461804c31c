"""The client commands: ``agentd status`` and ``agentd snapshot``, talking to a running daemon.

One JSON line each way on the control socket (see :mod:`agentd.control`), over a plain
blocking :mod:`socket` with deadlines: a probe (a Docker HEALTHCHECK, a Kubernetes exec probe
with its 1 s default timeout, Coder's dashboard metadata) imports no settings library, no HTTP
stack, no logging stack and no event loop. Only ``agentd snapshot`` with no daemon listening
loads the settings and stores the snapshot itself (:func:`agentd.daemon.store_once`).

The functions here return text; the CLI prints results on stdout and errors on stderr.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

from agentd.exits import EXIT_NO_DAEMON, EXIT_NOT_STORED, EXIT_STORED

TYPE_CHECKING = False  # typing's own costs an import on the probe path; mypy reads this one too
if TYPE_CHECKING:
    from typing import Any

    from agentd.settings import Settings

#: Bytes of an answer read at most (a status with a thousand messages' first and last lines fits).
MAX_ANSWER = 8 * 1024 * 1024
#: Seconds a connection to the control socket may take.
CONNECT_TIMEOUT = 2.0
#: Seconds ``agentd status`` waits for the daemon's answer.
STATUS_TIMEOUT = 3.0


class ClientError(Exception):
    """The daemon could not be asked; the text names the socket and the cause."""


class NoDaemon(ClientError):
    """Nothing listens on the control socket (no such file, or connection refused)."""


class NoAnswer(ClientError):
    """A daemon accepted the request but did not answer in time, or answered garbage."""


def _cause(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such socket"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (a socket left by a daemon that is gone)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return (exc.strerror or "cannot connect").lower()


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(min(timeout, CONNECT_TIMEOUT))
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise NoDaemon(f"no agentd answered on {path}: {_cause(exc)}") from None
    return sock


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError
        data += chunk
        if len(data) > MAX_ANSWER:
            raise ValueError("answer too long")
    return data.split(b"\n", 1)[0]


def request(path: Path, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request to the daemon at ``path``; its answer (a JSON object).

    Raises :class:`NoDaemon` when nothing listens there, :class:`NoAnswer` when the daemon does
    not answer within ``timeout`` seconds or answers something that is not a JSON object.
    """
    deadline = time.monotonic() + timeout
    with _connect(path, timeout) as sock:
        try:
            sock.sendall(json.dumps(payload, separators=(",", ":")).encode() + b"\n")
            line = _read_line(sock, deadline)
        except TimeoutError:
            raise NoAnswer(f"the agentd on {path} did not answer within {timeout:g} s") from None
        except EOFError:
            raise NoAnswer(f"the agentd on {path} closed the connection without an answer") from None
        except (OSError, ValueError) as exc:
            raise NoAnswer(f"the agentd on {path} could not be asked: {exc}") from None
    try:
        answer = json.loads(line)
    except (ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict):
        raise NoAnswer(f"unreadable answer from the agentd on {path}")
    return answer


# -- agentd snapshot ----------------------------------------------------------------------------


def snapshot_answer(answer: dict[str, Any]) -> tuple[int, str]:
    """The daemon's answer to a snapshot request as ``(exit status, one line)``."""
    if not answer.get("ok"):
        return EXIT_NOT_STORED, f"not stored: {answer.get('error') or 'the daemon refused the request'}"
    line = str(answer.get("line") or answer.get("result") or "no answer from the daemon")
    return (EXIT_NOT_STORED if answer.get("result") == "failed" else EXIT_STORED), line


def snapshot_via_daemon(path: Path, timeout: float) -> tuple[int, str]:
    """Ask the daemon at ``path`` to store the snapshot within ``timeout`` seconds.

    Raises :class:`NoDaemon` when none listens (the caller may then store it alone). A daemon
    that does not answer in time owns the upload: never a second uploader, exit 1.
    """
    try:
        # The daemon stores within `timeout`; a little more for the answer to come back.
        answer = request(path, {"command": "snapshot", "timeout": timeout}, timeout + 0.5)
    except NoAnswer as exc:
        return EXIT_NOT_STORED, f"not stored: {exc}"
    return snapshot_answer(answer)


async def snapshot(path: Path, within: float, load_settings: Callable[[], Settings]) -> tuple[int, str]:
    """Store the snapshot now, from async code (``agentd shutdown-hook``, the demo);
    ``(exit status, one line)``.

    Through the daemon at ``path`` when one listens, else alone from the persisted buffer and
    agentapi (:func:`store_alone`), within ``within`` seconds. Exit 0 stored (or nothing to store, or coderd already holds
    it), 1 not stored. Raises :class:`~agentd.exits.ConfigError` only when there is no daemon
    and the settings are incomplete.
    """
    import anyio.to_thread

    try:
        return await anyio.to_thread.run_sync(snapshot_via_daemon, path, within, abandon_on_cancel=True)
    except NoDaemon as exc:
        return await store_alone(load_settings(), within, str(exc))


async def store_alone(settings: Settings, within: float, why: str) -> tuple[int, str]:
    """``agentd snapshot`` with no daemon: the persisted buffer and agentapi's ``GET /messages``,
    uploaded within ``within`` seconds; ``(exit status, one line)``."""
    from agentd.daemon import store_once
    from agentd.logs import get_logger

    get_logger("agentd.client").info("no daemon answered; storing the snapshot directly", reason=why)
    result = await store_once(settings, within)
    return (EXIT_STORED if result.ok else EXIT_NOT_STORED), result.line()


# -- agentd status ------------------------------------------------------------------------------


def status(path: Path) -> dict[str, Any]:
    """The daemon's status (what ``agentd status --json`` prints). Raises :class:`ClientError`."""
    answer = request(path, {"command": "status"}, STATUS_TIMEOUT)
    data = answer.get("status")
    if not answer.get("ok") or not isinstance(data, dict):
        raise NoAnswer(f"the agentd on {path} answered without a status: {answer.get('error') or 'no reason given'}")
    return data


def _clock(iso: Any) -> str:
    """``2026-12-01T07:00:01Z`` as ``2026-12-01 07:00:01 UTC``."""
    return str(iso).replace("T", " ").replace("Z", " UTC") if iso else "an unknown time"


def _ago(iso: Any, now: float | None = None) -> str:
    try:
        then = time.strptime(str(iso), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return "at an unknown time"
    # Both UTC, both read by mktime the same way (no DST): their difference is exact.
    seconds = max(0, int(time.mktime((*time.gmtime(now)[:8], 0)) - time.mktime((*then[:8], 0))))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def _bytes(n: Any) -> str:
    return f"{int(n or 0):,}".replace(",", " ") + " bytes"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _source_text(source: dict[str, Any], agent: Any) -> str:
    state, since, url = source.get("state"), _clock(source.get("since")), source.get("url") or "agentapi"
    text = {
        "connected": f"connected since {since} ({url})",
        "polling": f"polling {url}/messages since {since} (no event stream)",
        "disconnected": f"unreachable since {since} ({url})",
    }.get(str(state), f"not reached yet, trying since {since} ({url})")
    text = f"{text}, agent {agent}" if agent else text
    return f"{text}; {source['problem']}" if source.get("problem") else text


def _upload_text(upload: dict[str, Any] | None) -> str:
    if not upload:
        return "none yet"
    facts = [_plural(int(upload.get("messages") or 0), "message"), _bytes(upload.get("bytes"))]
    if upload.get("http_status"):
        facts.append(f"HTTP {upload['http_status']}")
    facts.append(_plural(int(upload.get("attempts") or 0), "attempt"))
    text = f"{upload.get('outcome', 'unknown')} at {_clock(upload.get('time'))}: {', '.join(facts)}"
    return f"{text}; {upload['reason']}" if upload.get("reason") else text


def _messages_text(data: dict[str, Any]) -> str:
    held, to_send = int(data.get("messages") or 0), int(data.get("to_send") or 0)
    if not held:
        return "none held"
    snap = data.get("snapshot") or {}
    text = f"{held} held"
    if data.get("newest_id") is not None:
        text += f" (newest id {data['newest_id']})"
    text += f"; {to_send} would be sent now, {_bytes(data.get('bytes'))}"
    if snap.get("cut_id") is not None:
        text += f", message {snap['cut_id']} cut"
    return text


def _probe_lines(probe: Any) -> list[str]:
    """The start-up probe's verdict on coderd (its sentence names the fix), when there is one."""
    coderd = probe.get("coderd") if isinstance(probe, dict) else None
    if not isinstance(coderd, dict):
        return ["coderd:        not probed yet"] if isinstance(probe, dict) else []
    return [f"coderd:        {coderd.get('sentence') or coderd.get('code') or 'no verdict'}"]


def status_text(data: dict[str, Any]) -> str:
    """``agentd status``: a few lines for people."""
    head = f"agentd pid {data.get('pid', '?')}, running since {_clock(data.get('started'))}"
    lines = [
        head + (f", task {data['task_id']}" if data.get("task_id") else ""),
        f"agentapi:      {_source_text(data.get('source') or {}, data.get('agent_status'))}",
        *_probe_lines(data.get("probe")),
        f"messages:      {_messages_text(data)}",
        f"last upload:   {_upload_text(data.get('last_upload'))}",
    ]
    if data.get("persisted") is False:
        lines.append("state:         not persisted (the state directory is not writable): a restart loses the buffer")
    return "\n".join(lines)


def status_short(data: dict[str, Any], now: float | None = None) -> str:
    """``agentd status --short``: one line for Coder's dashboard (messages held, last upload)."""
    upload = data.get("last_upload")
    last = "none yet" if not upload else f"{upload.get('outcome', 'unknown')} {_ago(upload.get('time'), now)}"
    text = f"{_plural(int(data.get('messages') or 0), 'message')} held; last upload {last}"
    source = data.get("source") or {}
    if source.get("problem"):
        return f"agentapi problem; {text}"
    if source.get("state") == "disconnected":
        return f"agentapi unreachable; {text}"
    return text


def _message_lines(item: dict[str, Any]) -> list[str]:
    head = f"  #{item.get('id')}  {item.get('role', '?')!s:<6} {_bytes(item.get('bytes')):>14}"
    if item.get("cut"):
        head += f"  cut: the first {item['cut']:,} characters left out".replace(",", " ")
    lines = [head]
    first, last = item.get("first_line") or "", item.get("last_line") or ""
    if not first:
        lines.append("      (empty)")
    elif first == last:
        lines.append(f"      {first}")
    else:
        lines += [f"      first: {first}", f"      last:  {last}"]
    return lines


def status_body(data: dict[str, Any]) -> str:
    """``agentd status --body``: what would be sent now, message by message."""
    snap = data.get("snapshot") or {}
    messages = snap.get("messages") or []
    held = int(data.get("messages") or 0)
    if not messages:
        return f"nothing would be sent now: {'no messages held' if not held else 'no message fits'}"
    head = (
        f"would send {len(messages)} of {_plural(held, 'message')} held, "
        f"{_bytes(snap.get('bytes'))} of {_bytes(snap.get('max_bytes'))}"
    )
    left_out = snap.get("left_out") or []
    if left_out:
        head += f" (left out, older: {', '.join(str(i) for i in left_out)})"
    lines = [head]
    for item in messages:
        lines += _message_lines(item)
    return "\n".join(lines)


def status_command(path: Path, view: str) -> tuple[int, str, str]:
    """``agentd status`` in one of the views ``text``, ``json``, ``short``, ``body``;
    ``(exit status, stdout, stderr)``: 0 when a daemon answered, 3 when none did."""
    try:
        data = status(path)
    except ClientError as exc:
        return EXIT_NO_DAEMON, "", str(exc)
    render: dict[str, Callable[[dict[str, Any]], str]] = {
        "json": lambda d: json.dumps(d, indent=2, ensure_ascii=False),
        "short": status_short,
        "body": status_body,
        "text": status_text,
    }
    return 0, render[view](data), ""
