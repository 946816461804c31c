"""Where agentd keeps its files: the state directory and the control socket.

Plain standard library only (``os``, ``pathlib``): the client commands (``agentd status``,
``agentd snapshot``) find the socket without importing the daemon's stack.
"""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_NAME = "agentd.sock"

#: Where the systemd unit's daemon listens ($RUNTIME_DIRECTORY=/run/agentd).
SYSTEMD_SOCKET = Path("/run/agentd") / SOCKET_NAME


def default_state_dir() -> Path:
    """systemd's ``$STATE_DIRECTORY`` (first entry), else ``$XDG_STATE_HOME/agentd``, else
    ``~/.local/state/agentd``."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME")
    return Path(xdg) / "agentd" if xdg else Path.home() / ".local" / "state" / "agentd"


def default_socket_path(state_dir: Path) -> Path:
    """``$AGENTD_SOCKET``, else ``$RUNTIME_DIRECTORY/agentd.sock``, else ``state_dir/agentd.sock``.

    A client (``agentd status``/``snapshot``) outside the unit also finds the systemd unit's
    daemon at ``/run/agentd/agentd.sock`` when nothing else is set and that socket exists.
    """
    explicit = os.environ.get("AGENTD_SOCKET")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0]) / SOCKET_NAME
    path = Path(state_dir) / SOCKET_NAME
    if not path.exists() and "AGENTD_STATE_DIR" not in os.environ and SYSTEMD_SOCKET.exists():
        return SYSTEMD_SOCKET
    return path


def client_socket(socket: str | None, state_dir: str | None) -> Path:
    """The control socket a client command talks to: ``--socket``, else the default for
    ``--state-dir`` (else ``$AGENTD_STATE_DIR``, else :func:`default_state_dir`)."""
    if socket:
        return Path(socket)
    state = state_dir or os.environ.get("AGENTD_STATE_DIR")
    return default_socket_path(Path(state) if state else default_state_dir())
