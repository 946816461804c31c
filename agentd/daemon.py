"""The orchestrator: owns the signals, the deadlines and the shutdown sequence.

``agentd run`` is :func:`run`: start the agentapi tail, wait for SIGTERM or SIGINT, then

1. stop the tail;
2. final refresh: one ``GET /messages`` with a short timeout, merged into the buffer (if
   agentapi is already gone, the buffer is the truth);
3. build the snapshot (an empty conversation is never uploaded);
4. upload it with retries, all within ``shutdown_timeout`` seconds of the signal.

Exit status: 0 stored or nothing to store, 1 not stored. A second SIGTERM/SIGINT during the
shutdown gives up at once (exit 1).
"""

from __future__ import annotations

import signal
import ssl
from dataclasses import dataclass, field

import anyio
import httpx

from agentd.agentapi import AgentAPIError, AgentAPITail, fetch_messages
from agentd.buffer import RingBuffer
from agentd.coderd import CoderdUploader, UploadOutcome
from agentd.logs import add_secret, get_logger
from agentd.settings import Settings
from agentd.snapshot import build_snapshot

log = get_logger("agentd.daemon")

EXIT_STORED = 0
EXIT_NOT_STORED = 1

#: Final refresh timeout, seconds: short, and at most a quarter of the shutdown budget.
FINAL_REFRESH_TIMEOUT = 1.0

# Signals that arrived before the event loop could take them (see agentd.cli).
early_signals: list[int] = []


@dataclass
class Daemon:
    """The running daemon's parts, shared by the lifecycle steps (and, later, the control socket)."""

    settings: Settings
    client: httpx.AsyncClient
    buffer: RingBuffer = field(init=False)
    tail: AgentAPITail = field(init=False)
    uploader: CoderdUploader = field(init=False)
    last_upload: UploadOutcome | None = None

    def __post_init__(self) -> None:
        s = self.settings
        self.buffer = RingBuffer(s.max_messages, max_chars=s.max_bytes)
        self.tail = AgentAPITail(self.client, s.agentapi_url, self.buffer)
        self.uploader = CoderdUploader(self.client, s.coderd_url, s.token, s.task_id)

    async def refresh(self, timeout: float) -> None:
        """Merge one ``GET /messages`` into the buffer; on failure keep the buffer as it is."""
        try:
            view = await fetch_messages(self.client, self.settings.agentapi_url, timeout)
        except AgentAPIError as exc:
            log.warning("final refresh failed; storing the buffer as it is", error=str(exc))
            return
        self.buffer.sync(view)

    async def store(self, deadline: float) -> UploadOutcome | None:
        """Refresh, build and upload by ``deadline`` (``anyio.current_time()``).

        Returns None when there was nothing to store.
        """
        left = deadline - anyio.current_time()
        await self.refresh(min(FINAL_REFRESH_TIMEOUT, left / 4))
        snapshot = build_snapshot(self.buffer.messages(), self.settings.max_bytes)
        if snapshot is None:
            log.info("nothing to store: the conversation is empty")
            return None
        self.last_upload = await self.uploader.upload(snapshot, deadline)
        return self.last_upload


def http_client(settings: Settings) -> httpx.AsyncClient:
    """The shared HTTP client. Trusts ``AGENTD_CA_FILE`` (or ``SSL_CERT_FILE``) when given."""
    verify: ssl.SSLContext | bool = True
    cafile = settings.ca_file
    if cafile is None:
        import os

        cafile = os.environ.get("SSL_CERT_FILE") or None
    if cafile is not None:
        verify = ssl.create_default_context(cafile=str(cafile))
    return httpx.AsyncClient(verify=verify, trust_env=False, timeout=5.0)


async def run(settings: Settings) -> int:
    """Run the daemon until SIGTERM/SIGINT, then store the snapshot. Returns the exit status."""
    add_secret(settings.token)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with http_client(settings) as client, anyio.create_task_group() as tg:
            daemon = Daemon(settings, client)
            log.info(
                "agentd started",
                agentapi=settings.agentapi_url,
                coderd=settings.coderd_url,
                task=str(settings.task_id),
                max_messages=settings.max_messages,
                max_bytes=settings.max_bytes,
                shutdown_timeout=settings.shutdown_timeout,
            )
            tail_scope = anyio.CancelScope()

            async def tail() -> None:
                with tail_scope:
                    await daemon.tail.run()

            tg.start_soon(tail)
            if early_signals:
                signum = early_signals[0]
            else:
                signum = await signals.__anext__()
            deadline = anyio.current_time() + settings.shutdown_timeout
            log.info("shutting down", signal=signal.Signals(signum).name, timeout=settings.shutdown_timeout)
            tail_scope.cancel()
            status = await _shutdown(daemon, deadline, signals, tg)
            tg.cancel_scope.cancel()
    return status


async def _shutdown(daemon: Daemon, deadline: float, signals, tg: anyio.abc.TaskGroup) -> int:
    gave_up = False
    with anyio.CancelScope() as scope:

        async def second_signal() -> None:
            nonlocal gave_up
            async for signum in signals:
                log.error("second signal: giving up on the snapshot", signal=signal.Signals(signum).name)
                gave_up = True
                scope.cancel()
                return

        tg.start_soon(second_signal)
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time()) + 0.5):
            outcome = await daemon.store(deadline)
            return EXIT_STORED if outcome is None or outcome.stored else EXIT_NOT_STORED
        log.error("snapshot not stored: shutdown deadline passed")
    if gave_up:
        log.error("snapshot not stored: gave up on a second signal")
    return EXIT_NOT_STORED
