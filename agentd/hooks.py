"""``agentd shutdown-hook``, a stop-time hook (the client commands ``agentd snapshot`` and
``agentd status`` are in :mod:`agentd.client`).

``shutdown-hook`` is a drop-in for the Coder registry module's bash stop script: SIGUSR1 to
agentapi (state save, only when asked) and a bounded wait for its state file to change, the
snapshot (at the same time: never behind that wait), then SIGTERM to agentapi and a bounded
wait for it to exit. agentapi is signalled only once :mod:`agentd.agentapi_proc` has made sure
the pid file's pid is agentapi. Every step prints one line (results on stdout, errors on
stderr); a step's failure never blocks the next one.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from agentd.agentapi_proc import AgentAPIProcess, NotAgentAPI, file_version, find_agentapi, state_file_of
from agentd.client import snapshot
from agentd.logs import get_logger, redact
from agentd.settings import ConfigError, Settings

log = get_logger("agentd.hooks")

#: Default bound on the wait for agentapi's state file after SIGUSR1, seconds.
STATE_WAIT = 2.0


def say(line: str, error: bool = False) -> None:
    """One line of a hook's output: results on stdout, errors on stderr (secrets redacted)."""
    print(redact(line), file=sys.stderr if error else sys.stdout, flush=True)


async def shutdown_hook(
    *,
    pid_file: Path | None,
    save_state: bool,
    socket: Path,
    timeout: float,
    stop_timeout: float,
    load_settings: Callable[[], Settings],
    have_task: bool,
    state_file: Path | None = None,
    state_wait: float = STATE_WAIT,
) -> int:
    """Run the stop sequence, printing one line per step; returns the exit status.

    Steps: check the pid file's process is agentapi; SIGUSR1 (with ``save_state``) and, at the
    same time, wait up to ``state_wait`` seconds for ``state_file`` (default: agentapi's own
    ``--state-file``) to change, and store the snapshot within ``timeout`` seconds; then SIGTERM
    and up to ``stop_timeout`` seconds for agentapi to exit. Exit 0 when the snapshot was
    stored, there was nothing to store, or no task id is set (there is no task to store for,
    as the registry script does); 1 when it was not stored.
    """
    agentapi = _find(pid_file)
    try:
        status = 0
        async with anyio.create_task_group() as tg:
            if save_state and agentapi is not None:
                path = state_file or state_file_of(agentapi.pid)
                before = file_version(path) if path else None
                if _sigusr1(agentapi):
                    tg.start_soon(_wait_for_state, path, before, state_wait)
            else:
                say(f"SIGUSR1: skipped ({'no agentapi to signal' if save_state else 'no --save-state'})")

            async def store() -> None:
                nonlocal status
                status = await _snapshot_step(socket, timeout, load_settings, have_task)

            tg.start_soon(store)
        await _sigterm(agentapi, stop_timeout)
    finally:
        if agentapi is not None:
            agentapi.close()
    return status


def _find(pid_file: Path | None) -> AgentAPIProcess | None:
    """The checked agentapi process, or None (said why in one line)."""
    if pid_file is None:
        say("agentapi: no --pid-file given: nothing to signal")
        return None
    try:
        agentapi = find_agentapi(pid_file)
    except NotAgentAPI as exc:
        say(f"agentapi: {exc}", error=not exc.gone)
        return None
    say(f"agentapi: pid {agentapi.pid} ({agentapi.command})")
    return agentapi


def _sigusr1(agentapi: AgentAPIProcess) -> bool:
    """SIGUSR1 (agentapi saves its state); True when it was sent."""
    try:
        agentapi.send(signal.SIGUSR1)
    except ProcessLookupError:
        say(f"SIGUSR1: skipped: agentapi (pid {agentapi.pid}) has already exited")
        return False
    except OSError as exc:
        say(f"SIGUSR1: cannot signal agentapi (pid {agentapi.pid}): {exc.strerror or exc}", error=True)
        return False
    say(f"SIGUSR1: sent to agentapi (pid {agentapi.pid}) to save its state")
    return True


async def _wait_for_state(path: Path | None, before: tuple[int, int, int, int] | None, bound: float) -> None:
    """Wait up to ``bound`` seconds for agentapi's state file to change after SIGUSR1.

    agentapi saves synchronously in its SIGUSR1 handler, and only when the conversation
    changed since its last save: an unchanged file after the bound is said, not an error of
    ours. Runs beside the snapshot, never before it."""
    if path is None:
        say("state: not waiting for the save: agentapi's state file is unknown (give --state-file)")
        return
    start = time.monotonic()
    with anyio.move_on_after(bound):
        while file_version(path) == before:  # noqa: ASYNC110  # a file has no event to await here
            await anyio.sleep(0.02)
        say(f"state: saved ({path} changed {time.monotonic() - start:.2f} s after SIGUSR1)")
        return
    say(f"state: {path} unchanged {bound:g} s after SIGUSR1 (not saved, or nothing new to save); going on", error=True)


async def _snapshot_step(socket: Path, limit: float, load_settings: Callable[[], Settings], have_task: bool) -> int:
    """Store the snapshot; prints its line and returns the exit status (0 or 1)."""
    if not have_task:
        say("snapshot: skipped: no task id (AGENTD_TASK_ID), nothing to store")
        return 0
    try:
        status, line = await snapshot(socket, limit, load_settings)
    except ConfigError as exc:
        status, line = 1, f"not stored: {exc}"
    except Exception as exc:  # a stop hook never lets one step keep agentapi from stopping
        log.exception("snapshot step failed")
        status, line = 1, f"not stored: internal error ({type(exc).__name__})"
    say(f"snapshot: {line}", error=status != 0)
    return status


async def _sigterm(agentapi: AgentAPIProcess | None, stop_timeout: float) -> None:
    """SIGTERM, then up to ``stop_timeout`` seconds for agentapi to exit."""
    if agentapi is None:
        say("SIGTERM: skipped (no agentapi to signal)")
        return
    try:
        agentapi.send(signal.SIGTERM)
    except ProcessLookupError:
        say(f"SIGTERM: skipped: agentapi (pid {agentapi.pid}) has already exited")
        return
    except OSError as exc:
        say(f"SIGTERM: cannot signal agentapi (pid {agentapi.pid}): {exc.strerror or exc}", error=True)
        return
    say(f"SIGTERM: sent to agentapi (pid {agentapi.pid})")
    start = time.monotonic()
    with anyio.move_on_after(stop_timeout):
        await agentapi.wait_exited()
        say(f"agentapi: exited {time.monotonic() - start:.2f} s after SIGTERM")
        return
    say(f"agentapi: still running {stop_timeout:g} s after SIGTERM (--stop-timeout); leaving it", error=True)
