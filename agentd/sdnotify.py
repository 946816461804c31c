"""sd_notify: tell systemd (or anything listening on ``$NOTIFY_SOCKET``) how the daemon is.

Messages are datagrams on the Unix socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for
the abstract namespace), as sd_notify(3) describes: ``READY=1``, ``STATUS=...``,
``STOPPING=1``, ``WATCHDOG=1``. Without ``$NOTIFY_SOCKET`` every call does nothing.

The watchdog interval comes from ``$WATCHDOG_USEC`` (microseconds; honoured only when
``$WATCHDOG_PID`` is unset or ours); pings go out at half of it from the event loop itself,
so a blocked loop misses them and systemd restarts the daemon.
"""

from __future__ import annotations

import os
import socket

import anyio

from agentd.logs import get_logger

log = get_logger("agentd.sdnotify")


class Notifier:
    """Sends sd_notify messages; a no-op when ``$NOTIFY_SOCKET`` is not set."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_ok = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        #: Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None without a watchdog.
        self.watchdog_interval = int(usec) / 2e6 if watchdog_ok else None

    def notify(self, message: str) -> None:
        """Send one message (newline-separated assignments). Failures are logged once, not raised."""
        if not self.address:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode("utf-8"), self.address)
        except OSError as exc:
            log.warning("sd_notify failed; not notifying any more", error=exc.strerror or str(exc))
            self.address = ""

    def status(self, text: str) -> None:
        """``STATUS=text``, sent only when it changes."""
        if text != self._last_status:
            self._last_status = text
            self.notify(f"STATUS={text}")

    async def watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` until cancelled (returns at once without a watchdog)."""
        if self.watchdog_interval is None or not self.address:
            return
        while True:
            self.notify("WATCHDOG=1")
            await anyio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
