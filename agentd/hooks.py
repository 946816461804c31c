"""Stop-time hooks: ``agentd snapshot``, ``agentd status`` and ``agentd shutdown-hook``.

``snapshot`` asks a running daemon (over the control socket) to refresh and upload now; with
no daemon it does the job itself from the persisted buffer and agentapi. ``shutdown-hook`` is a
drop-in for the Coder registry module's bash stop script: SIGUSR1 to agentapi (state save, only
when asked), the snapshot, then SIGTERM to agentapi and a bounded wait for it to exit. Every
step's failure is reported and never blocks the next one.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from agentd import control
from agentd.logs import get_logger
from agentd.settings import ConfigError, Settings

log = get_logger("agentd.hooks")

EXIT_NO_DAEMON = 3


async def snapshot(socket: Path, timeout: float, load_settings: Callable[[], Settings]) -> tuple[int, str]:
    """Store the snapshot now; returns ``(exit status, one line)``.

    Exit 0 stored (or nothing to store, or coderd already holds it), 1 not stored. Raises
    :class:`ConfigError` only when there is no daemon and the settings are incomplete.
    """
    from agentd.daemon import store_once

    try:
        # The daemon stores within `timeout`; a little more for the answer to come back.
        answer = await control.request(socket, {"command": "snapshot", "timeout": timeout}, timeout + 0.5)
    except control.NoDaemon as exc:
        log.info("no daemon answered; storing the snapshot directly", reason=str(exc))
        result = await store_once(load_settings(), timeout)
        return (0 if result.ok else 1), result.line()
    except control.NoAnswer as exc:  # a live daemon owns the upload: never a second uploader
        return 1, f"not stored: {exc}"
    if not answer.get("ok"):
        return 1, f"not stored: {answer.get('error', 'the daemon refused the request')}"
    return (0 if answer.get("result") != "failed" else 1), str(answer.get("line"))


async def status(socket: Path, as_json: bool) -> tuple[int, str]:
    """The daemon's status; ``(0, text)`` when it answered, ``(3, reason)`` when none did."""
    try:
        answer = await control.request(socket, {"command": "status"}, 3.0)
    except control.ControlError as exc:
        return EXIT_NO_DAEMON, json.dumps({"error": str(exc)}) if as_json else str(exc)
    data: dict[str, Any] = answer.get("status") or {}
    if as_json:
        return 0, json.dumps(data, indent=2)
    upload = data.get("last_upload")
    last = "none" if not upload else f"{upload['outcome']} at {upload['time']} ({upload['bytes']} bytes, HTTP {upload['http_status']})"
    source = data.get("source") or {}
    lines = [
        f"task:          {data.get('task_id')}",
        f"messages:      {data.get('messages')} (newest id {data.get('newest_id')}), {data.get('bytes')} bytes to send",
        f"agent:         {data.get('agent_status')}",
        f"agentapi:      {source.get('state')} since {source.get('since')} ({source.get('url')})",
        f"last upload:   {last}",
    ]
    coderd = (data.get("probe") or {}).get("coderd")
    if coderd:  # the start-up probe's verdict (agentd.probe)
        lines.append(f"coderd:        {coderd.get('sentence')}")
    return 0, "\n".join(lines)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file``, or None (logged) when it is missing or unreadable."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError) as exc:
        log.warning("cannot read the agentapi pid file", path=str(pid_file), error=str(exc)[:100])
        return None
    return pid if pid > 0 else None


async def shutdown_hook(
    *,
    pid_file: Path | None,
    save_state: bool,
    socket: Path,
    timeout: float,
    stop_timeout: float,
    load_settings: Callable[[], Settings],
    have_task: bool,
) -> tuple[int, str]:
    """Run the stop sequence; returns ``(exit status, one line)``.

    Exit 0 when the snapshot was stored, there was nothing to store, or no task id is set
    (there is no task to store for, as the registry script does); 1 when it was not stored.
    """
    pid = read_pid(pid_file) if pid_file else None
    if pid is not None and save_state:
        try:
            os.kill(pid, signal.SIGUSR1)
            log.info("asked agentapi to save its state", pid=pid)
            await anyio.sleep(0.5)
        except OSError as exc:
            log.warning("cannot signal agentapi", pid=pid, error=exc.strerror)
    if have_task:
        try:
            status, line = await snapshot(socket, timeout, load_settings)
        except ConfigError as exc:
            status, line = 1, f"not stored: {exc}"
        except Exception as exc:  # a stop hook never lets one step keep agentapi from stopping
            log.exception("snapshot step failed")
            status, line = 1, f"not stored: internal error ({type(exc).__name__})"
    else:
        status, line = 0, "no task id (AGENTD_TASK_ID): nothing to store"
    log.info("snapshot step done", outcome=line)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
            log.info("stopping agentapi", pid=pid)
            end = time.monotonic() + stop_timeout
            while _alive(pid) and time.monotonic() < end:
                await anyio.sleep(0.05)
            if _alive(pid):
                log.warning("agentapi did not exit in time", pid=pid, waited=stop_timeout)
            else:
                log.info("agentapi exited", pid=pid)
        except ProcessLookupError:
            log.info("agentapi already gone", pid=pid)
        except OSError as exc:
            log.warning("cannot stop agentapi", pid=pid, error=exc.strerror)
    return status, line
