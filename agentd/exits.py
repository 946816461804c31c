"""agentd's exit statuses, in one place (the README's table is this one), and the one error
every command turns into an exit status of its own: :class:`ConfigError`.

Plain Python only: the client commands import it without the daemon's stack.

====  =====================================================================================
0     stored (or nothing to store, or coderd already holds it); ``status``: a daemon answered;
      ``check``: the snapshot would be stored
1     not stored (the line on stdout says why); ``check``: it would not be
2     usage: an unknown command or flag, a missing argument (argparse)
3     no daemon answered on the control socket (``status``)
70    internal error (EX_SOFTWARE; logged with the token redacted)
73    another daemon already listens on the control socket (EX_CANTCREAT)
78    bad configuration (EX_CONFIG): one line per setting on stderr, no traceback
127   ``supervise``: the command could not be started (as shells do)
128+n stopped by signal n before it could finish (130 for SIGINT, 143 for SIGTERM)
====  =====================================================================================

``supervise`` otherwise exits with its child's status.
"""

from __future__ import annotations

EXIT_STORED = 0
EXIT_NOT_STORED = 1
EX_USAGE = 2
EXIT_NO_DAEMON = 3
EX_SOFTWARE = 70  # sysexits.h: internal software error
EX_CANTCREAT = 73  # sysexits.h: another daemon holds the control socket
EX_CONFIG = 78  # sysexits.h: configuration error


class ConfigError(Exception):
    """Missing or bad settings; ``problems`` holds one line per setting, each naming the
    environment variable and the flag. ``str()`` is all of them on one line."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)
