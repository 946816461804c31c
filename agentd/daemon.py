"""The orchestrator: owns the signals, the deadlines and the shutdown sequence.

``agentd run`` is :func:`run`. It loads the persisted buffer, listens on the control socket,
says ``READY=1``, and runs these tasks in one task group until SIGTERM or SIGINT:

* the agentapi tail (source -> ring buffer);
* persistence: the buffer written to the state directory at most once a second while it
  changes (and ``STATUS=`` for systemd);
* checkpoints: after a finished turn (agent ``running`` -> ``stable``), upload if the snapshot
  differs from the last one coderd acknowledged, at most once per ``checkpoint_interval``;
* the control socket (``agentd snapshot`` / ``agentd status``);
* the start-up probe (``AGENTD_STARTUP_PROBE``, :mod:`agentd.probe`): agentapi once, coderd's
  log-snapshot endpoint (a request that stores nothing) again with backoff until it answers
  definitively; one log line per problem, the verdict in ``agentd status`` and ``STATUS=``;
* the systemd watchdog.

On the first signal: ``STOPPING=1``, stop the tail and any checkpoint in flight, then
:meth:`Daemon.store` (final refresh, build, upload with retries) within ``shutdown_timeout``
seconds of the signal, then persist. Exit status: 0 stored or nothing to store (or coderd
already holds this exact body), 1 not stored. A second SIGTERM/SIGINT gives up at once (1).
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import httpx

from agentd import control, probe
from agentd import status as status_view
from agentd.agentapi import AgentAPIError, AgentAPITail, fetch_messages
from agentd.buffer import RingBuffer
from agentd.coderd import CoderdUploader, UploadOutcome
from agentd.logs import add_secret, get_logger
from agentd.sdnotify import Notifier
from agentd.settings import Settings
from agentd.snapshot import Snapshot, build_snapshot
from agentd.state import SavedState, StateStore, as_dict
from agentd.supervise import FORWARDED, Child, exit_status, reaper

log = get_logger("agentd.daemon")

EXIT_STORED = 0
EXIT_NOT_STORED = 1
EX_CANTCREAT = 73  # sysexits.h: another daemon holds the control socket
EX_NOINPUT_CHILD = 127  # as shells do: the command to supervise could not be executed

EMPTY_CONVERSATION = "the conversation is empty"
#: Final refresh timeout, seconds: short, and at most a quarter of the time left.
FINAL_REFRESH_TIMEOUT = 1.0
#: Seconds between state writes while the buffer changes.
PERSIST_INTERVAL = 1.0
#: Seconds a checkpoint upload may take, retries included.
CHECKPOINT_TIMEOUT = 30.0
#: Seconds the start-up probe gives agentapi to start listening before it looks why not.
AGENTAPI_PROBE_GRACE = 10.0

# Signals that arrived before the event loop could take them (see agentd.cli).
early_signals: list[int] = []


@dataclass(frozen=True, slots=True)
class StoreResult:
    """The outcome of one :meth:`Daemon.store`.

    ``result`` is ``stored``, ``unchanged`` (coderd already holds this exact body: nothing
    sent), ``nothing`` (empty conversation: nothing sent) or ``failed``.
    """

    result: str
    outcome: UploadOutcome | None = None
    snapshot: Snapshot | None = None
    reason: str = ""  # why not stored, when no upload was attempted

    @property
    def ok(self) -> bool:
        return self.result != "failed"

    def line(self) -> str:
        """One line for people: what was stored, or why not."""
        o, s = self.outcome, self.snapshot
        if self.result == "nothing":
            return f"nothing to store: {self.reason or 'the conversation is empty'}"
        if self.result == "unchanged":
            return f"stored: unchanged since the last upload ({len(s.message_ids)} messages, {s.size} bytes)"
        if self.result == "stored":
            return f"stored: {o.messages} messages, {o.bytes} bytes, {o.attempts} attempt{'s' * (o.attempts != 1)}"
        return f"not stored: {o.reason if o else self.reason or 'unknown'}"

    def as_dict(self) -> dict[str, Any]:
        return {"result": self.result, "line": self.line(), "outcome": as_dict(self.outcome)}


def fingerprint(snapshot: Snapshot) -> str:
    """sha256 of the body, hex: identifies what coderd acknowledged."""
    return hashlib.sha256(snapshot.body).hexdigest()


@dataclass
class Daemon:
    """The daemon's parts: source, buffer, sink, state. Shared by the lifecycle steps.

    Use as ``async with Daemon(settings) as daemon:``, which opens and closes its two HTTP
    clients (see :func:`agentapi_client` and :func:`coderd_client`).
    """

    settings: Settings
    notifier: Notifier = field(default_factory=Notifier)
    buffer: RingBuffer = field(init=False)
    tail: AgentAPITail = field(init=False)
    uploader: CoderdUploader = field(init=False)
    state: StateStore = field(init=False)
    acked: str | None = None
    last_upload: UploadOutcome | None = None
    started: float = field(default_factory=time.time)
    coderd_probe: probe.CoderdVerdict | None = None  # the start-up probe's latest verdict
    agentapi_probe: probe.AgentAPIReport | None = None

    def __post_init__(self) -> None:
        s = self.settings
        self.agentapi_client = agentapi_client(s.agentapi_url)
        self.coderd_client = coderd_client(s)
        self.buffer = RingBuffer(s.max_messages, max_chars=s.max_bytes)
        self.tail = AgentAPITail(self.agentapi_client, s.agentapi_url, self.buffer, on_status=self._on_agent_status)
        self.uploader = CoderdUploader(self.coderd_client, s.coderd_url, s.token, s.task_id)
        self.state = StateStore(s.state_dir, s.task_id)
        self._upload_lock = anyio.Lock()
        self._turn_finished = anyio.Event()
        self._saved_version = -1
        self._checkpoint: anyio.CancelScope | None = None  # the checkpoint upload in flight
        self.refresh_error: str | None = None  # why the last GET /messages failed

    async def __aenter__(self) -> Daemon:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.agentapi_client.aclose()
            await self.coderd_client.aclose()

    # -- state -----------------------------------------------------------------------------

    def load(self) -> None:
        """Restore the persisted buffer, acknowledged fingerprint and last upload."""
        saved = self.state.load()
        if saved.messages:
            self.buffer.restore(saved.messages, saved.offset)
            log.info("restored the persisted buffer", messages=len(saved.messages), newest_id=self.buffer.newest_id)
        self.acked, self.last_upload = saved.acked, saved.last_upload
        self._saved_version = self.buffer.version

    async def persist(self, force: bool = False) -> None:
        """Write the state if the buffer changed since the last write (always with ``force``)."""
        if not force and self.buffer.version == self._saved_version:
            return
        version = self.buffer.version
        snapshot = SavedState(self.buffer.messages(), self.acked, self.last_upload, self.buffer.offset)
        # A hung disk must not hold the daemon: on cancellation the write is abandoned. A failed
        # write is tried again at the next persist (the state store warns once per run of failures).
        if await anyio.to_thread.run_sync(self.state.save, snapshot, abandon_on_cancel=True):
            self._saved_version = version

    # -- storing -----------------------------------------------------------------------------

    async def refresh(self, timeout: float) -> None:
        """Merge one ``GET /messages`` into the buffer; on failure keep the buffer as it is."""
        try:
            view = await fetch_messages(self.agentapi_client, self.settings.agentapi_url, timeout)
        except AgentAPIError as exc:
            log.warning("refresh failed; using the buffer as it is", error=str(exc))
            self.refresh_error = str(exc)
            return
        self.refresh_error = None
        self.buffer.sync(view)

    def _why_nothing(self) -> str:
        """Why the snapshot is empty: agentapi not reached, or an empty conversation."""
        if self.refresh_error is None or self.tail.state in ("connected", "polling"):
            return EMPTY_CONVERSATION
        where = self.settings.agentapi_url.split("://", 1)[-1]
        return f"agentapi at {where} not reached ({self.refresh_error}) and no messages held"

    async def store(self, deadline: float, *, refresh: bool = True, why: str = "shutdown") -> StoreResult:
        """Refresh (optionally), build and upload by ``deadline`` (``anyio.current_time()``).

        Uploads are serialised; a body identical to the one coderd last acknowledged is not
        sent again. Never raises for agentapi's or coderd's failures.
        """
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())) as waiting:
            await self._upload_lock.acquire()
        if waiting.cancelled_caught:
            log.warning("another upload is still in progress; not stored", why=why)
            return StoreResult("failed", None, None, "another upload was still in progress at the deadline")
        try:
            if refresh:
                await self.refresh(min(FINAL_REFRESH_TIMEOUT, (deadline - anyio.current_time()) / 4))
            snapshot = build_snapshot(self.buffer.messages(), self.settings.max_bytes)
            if snapshot is None:
                reason = self._why_nothing()
                if reason == EMPTY_CONVERSATION:
                    log.info("nothing to store: the conversation is empty", why=why)
                else:
                    log.warning("nothing to store: agentapi not reached", why=why, reason=reason)
                return StoreResult("nothing", reason=reason)
            digest = fingerprint(snapshot)
            if digest == self.acked:
                log.info("snapshot unchanged since the last upload; not sent again", why=why, bytes=snapshot.size)
                return StoreResult("unchanged", self.last_upload, snapshot)
            outcome = await self.uploader.upload(snapshot, deadline)
            self.last_upload = outcome
            if outcome.stored:
                self.acked = digest
            with anyio.move_on_after(1.0):  # remember what coderd holds; bounded, never blocking
                await self.persist(force=True)
            return StoreResult("stored" if outcome.stored else "failed", outcome, snapshot)
        finally:
            self._upload_lock.release()

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``agentd status --json`` prints (see :func:`agentd.status.view`)."""
        probes = {
            "coderd": self.coderd_probe.as_dict() if self.coderd_probe else None,
            "agentapi": self.agentapi_probe.as_dict() if self.agentapi_probe else None,
        }
        return status_view.view(
            self.settings, self.buffer, self.tail, self.last_upload, started=self.started, persisted=self.state.enabled,
            probe=probes if self.settings.startup_probe else None,
        )

    def status_line(self) -> str:
        coderd = self.coderd_probe.short if self.coderd_probe else None
        return status_view.line(self.tail.state, len(self.buffer), self.last_upload, coderd)

    # -- background tasks --------------------------------------------------------------------

    async def probe_peers(self) -> None:
        """The start-up probe: agentapi once (once the tail connects, or after
        :data:`AGENTAPI_PROBE_GRACE` seconds), coderd until it answers definitively (see
        :func:`agentd.probe.watch_coderd`). Stores nothing; never raises for a peer's failure."""
        if not self.settings.startup_probe:
            return
        s = self.settings

        def on_verdict(verdict: probe.CoderdVerdict) -> None:
            self.coderd_probe = verdict
            self.notifier.status(self.status_line())

        async def agentapi_once() -> None:
            # agentapi may still be starting (supervise's child, a sidecar): give the tail a
            # grace period to connect before probing, so a normal start reports no problem.
            for _ in range(int(AGENTAPI_PROBE_GRACE / 0.1)):
                if self.tail.state in ("connected", "polling"):
                    break
                await anyio.sleep(0.1)
            report = await probe.probe_agentapi(
                self.agentapi_client, s.agentapi_url, max_messages=s.max_messages, max_bytes=s.max_bytes
            )
            self.agentapi_probe = report
            (log.info if report.ok else log.warning)(report.line, probe=report.code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(agentapi_once)
            tg.start_soon(lambda: probe.watch_coderd(self.coderd_client, s.coderd_url, s.token, s.task_id, on_verdict))

    def _on_agent_status(self, old: str | None, new: str) -> None:
        if old == "running" and new == "stable":
            self._turn_finished.set()

    async def persist_loop(self) -> None:
        while True:
            await anyio.sleep(PERSIST_INTERVAL)
            await self.persist()
            self.notifier.status(self.status_line())

    async def checkpoint_loop(self) -> None:
        interval = self.settings.checkpoint_interval
        if interval <= 0:
            return
        last = -float("inf")
        while True:
            await self._turn_finished.wait()
            await anyio.sleep(max(0.0, last + interval - anyio.current_time()))
            self._turn_finished = anyio.Event()
            last = anyio.current_time()
            with anyio.CancelScope() as self._checkpoint:
                result = await self.store(last + CHECKPOINT_TIMEOUT, refresh=False, why="checkpoint")
                log.info("checkpoint", result=result.result)
            self._checkpoint = None

    def _supersede_checkpoint(self) -> None:
        """A snapshot request does not wait behind a checkpoint (up to CHECKPOINT_TIMEOUT): it
        cancels it and uploads the fresher view itself, within its own timeout."""
        if self._checkpoint is not None:
            log.info("checkpoint in flight superseded by a snapshot request")
            self._checkpoint.cancel()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one control-socket request."""
        command = request.get("command")
        if command == "status":
            return {"ok": True, "status": self.status()}
        if command == "snapshot":
            timeout = request.get("timeout")
            if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 < timeout <= 3600):
                return {"ok": False, "error": "timeout must be a number of seconds in (0, 3600]"}
            self._supersede_checkpoint()
            result = await self.store(anyio.current_time() + timeout, why="snapshot request")
            return {"ok": True, **result.as_dict()}
        return {"ok": False, "error": f"unknown command {str(command)[:40]!r}"}


def agentapi_client(url: str) -> httpx.AsyncClient:
    """The client for agentapi, a local server: no proxies from the environment, and no CA
    bundle loaded (about 1 MiB and 15 ms) unless ``url`` is https."""
    return httpx.AsyncClient(trust_env=False, timeout=5.0, verify=url.startswith("https://"))


def coderd_client(settings: Settings) -> httpx.AsyncClient:
    """The client for coderd: honours ``HTTPS_PROXY``/``NO_PROXY`` and ``SSL_CERT_FILE`` as
    httpx does, and trusts ``AGENTD_CA_FILE`` when given."""
    verify: ssl.SSLContext | bool = True
    if settings.ca_file is not None:
        verify = ssl.create_default_context(cafile=str(settings.ca_file))
    return httpx.AsyncClient(verify=verify, trust_env=True, timeout=5.0)


async def run(settings: Settings, command: Sequence[str] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT, then store the snapshot. Returns the exit status.

    With ``command`` (``agentd supervise``) the daemon also starts it as its child, forwards
    SIGHUP and SIGUSR1 to it, and on SIGTERM/SIGINT stores the snapshot *while the child is
    still alive* (within ``shutdown_timeout - child_stop_timeout`` seconds), then forwards the
    signal, waits up to ``child_stop_timeout`` seconds and kills it if it must. If the child
    exits on its own the snapshot is stored too. Either way the exit status is the child's.
    """
    add_secret(settings.token)
    notifier = Notifier()
    wanted = (signal.SIGTERM, signal.SIGINT, *(FORWARDED if command else ()))
    with anyio.open_signal_receiver(*wanted) as signals:
        async with Daemon(settings, notifier) as daemon:
            daemon.load()
            listener: anyio.abc.Listener[Any] | None
            try:
                listener = await control.open_listener(settings.socket)
            except control.SocketInUse as exc:
                log.error("cannot start", error=str(exc))
                return EX_CANTCREAT
            except control.ControlError as exc:  # e.g. a read-only state dir: storing matters more
                log.warning("running without the control socket; agentd snapshot/status cannot reach this daemon", error=str(exc))
                listener = None
            child = None
            if command:
                try:
                    child = await Child.start(command)
                except OSError as exc:
                    log.error("cannot start the child", command=command[0], error=exc.strerror or str(exc))
                    if listener is not None:
                        await listener.aclose()
                        settings.socket.unlink(missing_ok=True)  # ours: leave no socket behind
                    return EX_NOINPUT_CHILD
            async with listener or contextlib.nullcontext(), anyio.create_task_group() as tg:
                running = anyio.CancelScope()

                async def background() -> None:
                    with running:
                        async with anyio.create_task_group() as inner:
                            inner.start_soon(daemon.tail.run)
                            inner.start_soon(daemon.persist_loop)
                            inner.start_soon(daemon.checkpoint_loop)
                            inner.start_soon(daemon.probe_peers)
                            if listener is not None:
                                inner.start_soon(control.serve, listener, daemon.handle)

                tg.start_soon(background)
                tg.start_soon(notifier.watchdog)
                tg.start_soon(reaper, child.process.pid if child else None)
                if child:
                    tg.start_soon(child.wait)
                notifier.notify("READY=1")
                notifier.status(daemon.status_line())
                log.info(
                    "agentd started",
                    agentapi=settings.agentapi_url,
                    coderd=settings.coderd_url,
                    task=str(settings.task_id),
                    socket=str(settings.socket),
                    max_messages=settings.max_messages,
                    max_bytes=settings.max_bytes,
                    shutdown_timeout=settings.shutdown_timeout,
                )
                signum = early_signals[0] if early_signals else await _wait_for_stop(signals, child)
                end = anyio.current_time() + settings.shutdown_timeout  # exit by then, whatever happens
                # The upload's deadline leaves room to write the state and exit, and in supervise
                # mode the child's stop time (settings check it is below the shutdown timeout).
                upload_deadline = end - min(0.25, settings.shutdown_timeout / 10)
                if child is not None and signum is not None:
                    upload_deadline = end - settings.child_stop_timeout
                notifier.notify("STOPPING=1")
                why = signal.Signals(signum).name if signum is not None else "child exited"
                log.info("shutting down", why=why, timeout=settings.shutdown_timeout)
                running.cancel()  # tail, checkpoints, control socket: the final upload owns coderd now
                status = await _shutdown(daemon, upload_deadline, end, signals, tg, child)
                with anyio.move_on_after(max(0.1, end - anyio.current_time())):
                    await daemon.persist()  # the buffer as it was at the stop, for the next start
                if child is not None:
                    if child.exited.is_set():
                        status = exit_status(child.returncode)
                    else:
                        left = max(0.1, end - anyio.current_time())
                        status = await child.stop(signum or signal.SIGTERM, min(settings.child_stop_timeout, left))
                tg.cancel_scope.cancel()
    if listener is not None:  # only the socket this daemon made
        try:
            settings.socket.unlink(missing_ok=True)
        except OSError:
            pass
    notifier.close()
    return status


async def _next_stop_signal(signals: Any, child: Child | None) -> int:
    """Wait for SIGTERM/SIGINT and return its number; SIGHUP/SIGUSR1 go on to the child."""
    async for signum in signals:
        if child is not None and signum in FORWARDED:
            child.send(signum)
            continue
        return signum
    raise RuntimeError("signal receiver closed")


async def _wait_for_stop(signals: Any, child: Child | None) -> int | None:
    """The stop signal's number, or None when the child exited first."""
    stop: int | None = None
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            nonlocal stop
            stop = await _next_stop_signal(signals, child)
            tg.cancel_scope.cancel()

        async def on_exit() -> None:
            assert child is not None
            await child.exited.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(on_signal)
        if child is not None:
            tg.start_soon(on_exit)
    return stop


async def _shutdown(
    daemon: Daemon, deadline: float, end: float, signals: Any, tg: anyio.abc.TaskGroup, child: Child | None
) -> int:
    """Store by ``deadline``; cut at ``end`` whatever happens; a second signal gives up at once."""
    gave_up = False
    with anyio.CancelScope() as scope:

        async def second_signal() -> None:
            nonlocal gave_up
            # Two stops during start-up (before the receiver existed) count as a second signal too.
            signum = early_signals[1] if len(early_signals) > 1 else await _next_stop_signal(signals, child)
            log.error("second signal: giving up on the snapshot", signal=signal.Signals(signum).name)
            gave_up = True
            scope.cancel()

        tg.start_soon(second_signal)
        with anyio.move_on_after(max(0.0, end - anyio.current_time())):
            result = await daemon.store(deadline)
            return EXIT_STORED if result.ok else EXIT_NOT_STORED
        log.error("snapshot not stored: shutdown deadline passed")
    if gave_up:
        log.error("snapshot not stored: gave up on a second signal")
    return EXIT_NOT_STORED


async def store_once(settings: Settings, timeout: float) -> StoreResult:
    """``agentd snapshot`` with no daemon: persisted buffer + ``GET /messages``, trimmed, uploaded.

    The state file is updated afterwards, so a daemon started later knows what coderd holds.
    """
    add_secret(settings.token)
    async with Daemon(settings) as daemon:
        daemon.load()
        return await daemon.store(anyio.current_time() + timeout, why="snapshot without daemon")
