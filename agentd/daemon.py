"""The orchestrator: owns the signals, the deadlines and the shutdown sequence.

``agentd run`` is :func:`run`. It loads the persisted buffer, listens on the control socket,
says ``READY=1``, and runs these tasks in one task group until a stop signal:

* the agentapi tail (source -> ring buffer);
* persistence: the buffer written to the state directory at most once a second while it
  changes (and ``STATUS=`` for systemd);
* checkpoints: after a finished turn (agent ``running`` -> ``stable``), upload if the snapshot
  differs from the last one coderd acknowledged, at most once per ``checkpoint_interval``;
* the control socket (``agentd snapshot`` / ``agentd status``, :mod:`agentd.control`);
* the start-up probe (``AGENTD_STARTUP_PROBE``, :mod:`agentd.probe`): agentapi once, coderd's
  log-snapshot endpoint (a request that stores nothing) again with backoff until it answers
  definitively; one log line per problem, the verdict in ``agentd status`` and ``STATUS=``;
* the systemd watchdog.

Signals (:mod:`agentd.signals`): SIGTERM, SIGINT and SIGHUP stop; SIGUSR1 stores now and keeps
running; SIGUSR2, SIGALRM and the like are logged and ignored; the same signal twice within a
second counts once.

The stop, in order: ``STOPPING=1``; the tail (its ``/events`` stream closed), any checkpoint in
flight and the control socket stop; :meth:`Daemon.store` uploads by the upload deadline
(:mod:`agentd.deadlines`); the state is written; under ``supervise`` the child is signalled,
waited for and killed if it must. Exit status: 0 stored or nothing to store (or coderd already
holds this exact body), 1 not stored; under ``supervise`` the child's. A deliberate second stop
signal (a second or more after the first) gives up on the snapshot at once (1).
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx

from agentd import control, probe
from agentd import status as status_view
from agentd.agentapi import AgentAPIError, AgentAPITail, fetch_messages
from agentd.buffer import RingBuffer
from agentd.coderd import CoderdUploader
from agentd.deadlines import FINAL_REFRESH_TIMEOUT, StopDeadlines, refresh_timeout, step_timeout, stop_deadlines
from agentd.logs import add_secret, add_url_secrets, get_logger
from agentd.outcome import UploadOutcome, as_json
from agentd.sdnotify import Notifier
from agentd.settings import Settings
from agentd.signals import GIVE_UP_HINT, HANDLED, STOP, Action, SignalPolicy, name
from agentd.snapshot import Snapshot, build_snapshot
from agentd.state import SavedState, StateStore
from agentd.supervise import Child, finish, reaper

log = get_logger("agentd.daemon")

EXIT_STORED = 0
EXIT_NOT_STORED = 1
EX_CANTCREAT = 73  # sysexits.h: another daemon holds the control socket
EX_NOINPUT_CHILD = 127  # as shells do: the command to supervise could not be executed

EMPTY_CONVERSATION = "the conversation is empty"
__all__ = ["FINAL_REFRESH_TIMEOUT", "Daemon", "StoreResult", "run", "store_once"]

#: Seconds between state writes while the buffer changes.
PERSIST_INTERVAL = 1.0
#: Seconds a checkpoint upload may take, retries included.
CHECKPOINT_TIMEOUT = 30.0
#: Seconds the start-up probe gives agentapi to start listening before it looks why not.
AGENTAPI_PROBE_GRACE = 10.0
#: Seconds the stop waits for the tail, checkpoints and control socket to wind down.
WIND_DOWN_TIMEOUT = 1.0

#: Signals that arrived before the event loop could take them, for callers that do not pass
#: ``early_signals`` to :func:`run` (agentd.cli until it does).
early_signals: list[int] = []

#: One early signal: its number, or its number and ``time.monotonic()`` when it arrived.
EarlySignal = int | tuple[int, float]


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
        if self.result == "unchanged" and s is not None:
            return f"stored: unchanged since the last upload ({len(s.message_ids)} messages, {s.size} bytes)"
        if self.result == "stored" and o is not None:
            return f"stored: {o.messages} message{'s' * (o.messages != 1)}, {o.bytes} bytes, {o.attempts} attempt{'s' * (o.attempts != 1)}"
        return f"not stored: {o.reason if o else self.reason or 'unknown'}"

    def as_dict(self) -> dict[str, Any]:
        return {"result": self.result, "line": self.line(), "outcome": as_json(self.outcome)}


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

    async def refresh(self, within: float) -> None:
        """Merge one ``GET /messages`` (``within`` seconds) into the buffer; on failure keep the
        buffer as it is."""
        try:
            view = await fetch_messages(self.agentapi_client, self.settings.agentapi_url, within, buffer=self.buffer)
        except AgentAPIError as exc:
            log.warning("refresh failed; using the buffer as it is", error=str(exc))
            self.refresh_error = str(exc)
            return
        self.refresh_error = None
        self.buffer.sync(view)

    def _why_nothing(self) -> str:
        """Why the snapshot is empty: agentapi refuses agentd (its Host allow-list, a URL that
        serves neither endpoint), agentapi not reached, or an empty conversation."""
        if self.tail.problem:
            return f"no messages held: {self.tail.problem}"
        if self.refresh_error is None or self.tail.state in ("connected", "polling"):
            return EMPTY_CONVERSATION
        where = self.settings.agentapi_url.split("://", 1)[-1]
        return f"agentapi at {where} not reached ({self.refresh_error}) and no messages held"

    async def store(self, deadline: float, *, refresh: bool = True, why: str = "shutdown") -> StoreResult:
        """Build and upload the freshest snapshot by ``deadline`` (``anyio.current_time()``).

        With ``refresh``, the final view: when the tail is live and caught up (its ``/events``
        stream connected, the replay merged: agentapi pushes every change on it) the buffer is
        uploaded at once, then one ``GET /messages`` confirms it and a changed view is uploaded
        again; otherwise (polling, disconnected, reconnecting, no tail) ``GET /messages`` comes
        first. Uploads are serialised; a body identical to the one coderd last acknowledged is
        not sent again. Never raises for agentapi's or coderd's failures.
        """
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())) as waiting:
            await self._upload_lock.acquire()
        if waiting.cancelled_caught:
            log.warning("another upload is still in progress; not stored", why=why)
            return StoreResult("failed", None, None, "another upload was still in progress at the deadline")
        try:
            live = refresh and self.tail.state == "connected"  # a cancelled tail keeps its last state
            if refresh and not live:
                await self.refresh(refresh_timeout(anyio.current_time(), deadline))
            result = await self._upload_buffer(deadline, why)
            if live and result.ok:
                result = await self._confirm(result, deadline, why)
            return result
        finally:
            self._upload_lock.release()

    async def _upload_buffer(self, deadline: float, why: str) -> StoreResult:
        """Build the snapshot from the buffer and upload it unless empty or already stored."""
        snapshot = build_snapshot(self.buffer.messages(), self.settings.max_bytes)
        if snapshot is None:
            reason = self._why_nothing()
            if reason == EMPTY_CONVERSATION:
                log.info("nothing to store: the conversation is empty", why=why)
            else:
                log.warning("nothing to store: agentapi not reached or refusing agentd", why=why, reason=reason)
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

    async def _confirm(self, first: StoreResult, deadline: float, why: str) -> StoreResult:
        """After uploading a live tail's buffer: one ``GET /messages``; if it shows what the
        stream had not delivered yet (an update in flight at the stop), upload again."""
        await self.refresh(refresh_timeout(anyio.current_time(), deadline))
        snapshot = build_snapshot(self.buffer.messages(), self.settings.max_bytes)
        if snapshot is None or (first.snapshot is not None and snapshot.body == first.snapshot.body):
            return first
        log.info("the final GET /messages held more than the stream; uploading again", why=why)
        second = await self._upload_buffer(deadline, why)
        return first if second.result == "unchanged" else second

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
            if report.code == "host_refused":  # the tail says it (once) and keeps it for status: one line
                log.debug(report.line, probe=report.code)
            else:
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

    def supersede_checkpoint(self) -> None:
        """Cancel the checkpoint upload in flight, if any (a fresher store is about to run)."""
        if self._checkpoint is not None:
            log.info("checkpoint in flight superseded by a snapshot request")
            self._checkpoint.cancel()


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


def socket_path(settings: Settings) -> Path:
    """The control socket's path (settings fill it in when not given)."""
    assert settings.socket is not None
    return settings.socket


class _CannotStart(Exception):
    """The daemon cannot start; ``status`` is the exit status (the reason is logged)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def run(
    settings: Settings, command: Sequence[str] | None = None, *, early_signals: Sequence[EarlySignal] | None = None
) -> int:
    """Run the daemon until a stop signal, then store the snapshot. Returns the exit status.

    ``early_signals`` are signals that arrived before this function could take them (the CLI
    records them from the interpreter's first moments): handled first, as if just received.
    With ``command`` (``agentd supervise``) the daemon also starts it as its child; on a stop
    signal it stores the snapshot *while the child is still alive* (within ``shutdown_timeout
    - child_stop_timeout`` seconds), then sends the child that signal, waits up to
    ``child_stop_timeout`` seconds and kills it if it must. SIGUSR1 is stored, then forwarded.
    If the child exits on its own the snapshot is stored too. Either way the exit status is
    the child's.
    """
    add_secret(settings.token)
    for url in (settings.agentapi_url, settings.coderd_url):
        add_url_secrets(url)
    notifier = Notifier()
    listener: anyio.abc.SocketListener | None = None
    before = _handlers()
    try:
        with anyio.open_signal_receiver(*_taken(before)) as receiver:
            early = list(globals()["early_signals"] if early_signals is None else early_signals)  # complete now
            async with Daemon(settings, notifier) as daemon:
                daemon.load()
                listener = await _open_control(settings)
                child = await _start_child(command, listener)
                status = await _Run(daemon, notifier, listener, child).main(receiver, early)
    except _CannotStart as exc:
        return exc.status
    finally:
        _restore(before)
        if listener is not None:  # only the socket this daemon made
            with contextlib.suppress(OSError):
                socket_path(settings).unlink(missing_ok=True)
    notifier.close()
    return status


Handlers = dict[int, Any]


def _taken(before: Handlers) -> tuple[signal.Signals, ...]:
    """The :data:`HANDLED` signals the daemon takes: all but those its starter ignores on
    purpose (``nohup agentd run &`` leaves SIGHUP ignored; the entry shim keeps it so)."""
    return tuple(
        signal.Signals(signum) for signum in HANDLED if before.get(signum) is not signal.SIG_IGN or signum not in STOP
    )


def _handlers() -> Handlers:
    """The Python-level handlers of :data:`HANDLED` signals now (main thread only, else none)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.getsignal(signum) for signum in HANDLED}


def _restore(handlers: Handlers) -> None:
    """Put ``handlers`` back. asyncio resets a signal to its default action when its receiver
    closes; between then and the exit a late SIGTERM must meet the caller's handler (the CLI's,
    which records it), not the default action."""
    for signum, handler in handlers.items():
        if handler is not None:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, handler)


async def _open_control(settings: Settings) -> anyio.abc.SocketListener | None:
    """The control socket's listener; None (and a warning) when it cannot be made. Raises
    :class:`_CannotStart` when another daemon answers on it."""
    try:
        return await control.open_listener(socket_path(settings))
    except control.SocketInUse as exc:
        log.error("cannot start", error=str(exc))
        raise _CannotStart(EX_CANTCREAT) from None
    except control.ControlError as exc:  # e.g. a read-only state dir: storing matters more
        log.warning("running without the control socket; agentd snapshot/status cannot reach this daemon", error=str(exc))
        return None


async def _start_child(command: Sequence[str] | None, listener: anyio.abc.SocketListener | None) -> Child | None:
    """``agentd supervise``'s child, started; None without a command. Raises
    :class:`_CannotStart` (127) when it cannot be executed."""
    if not command:
        return None
    try:
        return await Child.start(command)
    except OSError as exc:
        log.error("cannot start the child", command=command[0], error=exc.strerror or str(exc))
        if listener is not None:
            await listener.aclose()
        raise _CannotStart(EX_NOINPUT_CHILD) from None


class _Run:
    """One run of the daemon: the task group, the signals, and the stop sequence."""

    def __init__(self, daemon: Daemon, notifier: Notifier, listener: anyio.abc.SocketListener | None,
                 child: Child | None) -> None:
        self.daemon, self.settings, self.notifier = daemon, daemon.settings, notifier
        self.listener, self.child = listener, child
        self.policy = SignalPolicy()
        self.stop_now = anyio.Event()  # a stop signal, or the child exited
        self.give_up = anyio.Event()  # a deliberate second stop signal
        self.running = anyio.CancelScope()  # tail, persistence, checkpoints, control socket
        self.wound_down = anyio.Event()
        self.inner: anyio.abc.TaskGroup | None = None
        self.storing_on_signal = False

    async def main(self, receiver: Any, early: Sequence[EarlySignal]) -> int:
        async with anyio.create_task_group() as tg:
            await tg.start(self._background)
            tg.start_soon(self._signals, receiver, early)
            tg.start_soon(self.notifier.watchdog)
            tg.start_soon(reaper, self.child.process.pid if self.child else None)
            if self.child is not None:
                tg.start_soon(self._watch_child, self.child)
            self._started()
            await self.stop_now.wait()
            status = await self._stop(self.policy.stop_signal)
            tg.cancel_scope.cancel()
        if self.listener is not None:
            await self.listener.aclose()
        return status

    def _started(self) -> None:
        s = self.settings
        self.notifier.notify("READY=1")
        self.notifier.status(self.daemon.status_line())
        log.info(
            "agentd started",
            agentapi=s.agentapi_url,
            coderd=s.coderd_url,
            task=str(s.task_id),
            socket=str(s.socket),
            max_messages=s.max_messages,
            max_bytes=s.max_bytes,
            shutdown_timeout=s.shutdown_timeout,
        )

    async def _background(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.running:
                async with anyio.create_task_group() as inner:
                    self.inner = inner
                    inner.start_soon(self.daemon.tail.run)
                    inner.start_soon(self.daemon.persist_loop)
                    inner.start_soon(self.daemon.checkpoint_loop)
                    inner.start_soon(self.daemon.probe_peers)
                    if self.listener is not None:
                        inner.start_soon(control.serve, self.listener, control.handler(self.daemon))
                    task_status.started()
        finally:
            self.inner = None
            self.wound_down.set()

    async def _watch_child(self, child: Child) -> None:
        await child.wait()
        self.stop_now.set()

    # -- signals ---------------------------------------------------------------------------

    async def _signals(self, receiver: Any, early: Sequence[EarlySignal]) -> None:
        """Act on the early signals, then on each signal as it arrives, until cancelled."""
        now = time.monotonic()
        for entry in early:
            signum, at = entry if isinstance(entry, tuple) else (entry, now)
            self._deliver(signum, at)
        async for signum in receiver:
            self._deliver(signum, time.monotonic())

    def _deliver(self, signum: int, at: float) -> None:
        action = self.policy.classify(signum, at)
        if action is Action.STOP:
            self.stop_now.set()
        elif action is Action.GIVE_UP:
            log.error("second signal: giving up on the snapshot", signal=name(signum))
            self.give_up.set()
        elif action is Action.SNAPSHOT:
            self._snapshot_signal(signum)
        elif action is Action.REPEAT:
            log.info("signal repeated within a second: counted once", signal=name(signum),
                     hint=GIVE_UP_HINT if self.stop_now.is_set() else None)
        else:
            log.warning("signal ignored", signal=name(signum))

    def _snapshot_signal(self, signum: int) -> None:
        """SIGUSR1: store now, then forward it to the child; once stopping, only forward it."""
        if self.stop_now.is_set() or self.inner is None:
            if self.child is not None:
                self.child.send(signum)
            return
        if self.storing_on_signal:
            log.info("snapshot on signal already in progress", signal=name(signum))
            return
        self.storing_on_signal = True
        self.inner.start_soon(self._store_on_signal, signum)

    async def _store_on_signal(self, signum: int) -> None:
        try:
            self.daemon.supersede_checkpoint()
            result = await self.daemon.store(anyio.current_time() + self.settings.shutdown_timeout, why=name(signum))
            log.info("snapshot on signal", signal=name(signum), result=result.result, line=result.line())
        finally:
            self.storing_on_signal = False
            if self.child is not None:  # agentapi saves its state on SIGUSR1: after ours
                self.child.send(signum)

    # -- the stop --------------------------------------------------------------------------

    async def _stop(self, signum: int | None) -> int:
        """Store by the upload deadline, write the state, stop the child; the exit status."""
        s = self.settings
        now = anyio.current_time()
        room = s.child_stop_timeout if self.child is not None and signum is not None else None
        deadlines = stop_deadlines(now, s.shutdown_timeout, room)
        self.notifier.notify("STOPPING=1")
        why = name(signum) if signum is not None else "child exited"
        log.info("shutting down", why=why, timeout=s.shutdown_timeout, hint=GIVE_UP_HINT)
        self.running.cancel()  # the /events stream closes before the child is signalled
        with anyio.move_on_after(step_timeout(now, deadlines.end, WIND_DOWN_TIMEOUT)):
            await self.wound_down.wait()
        status = await self._store_or_give_up(deadlines)
        with anyio.move_on_after(step_timeout(anyio.current_time(), deadlines.end)):
            await self.daemon.persist()  # the buffer as it was at the stop, for the next start
        if self.child is not None:
            left = step_timeout(anyio.current_time(), deadlines.end, s.child_stop_timeout)
            status = await finish(self.child, signum or signal.SIGTERM, left)
        return status

    async def _store_or_give_up(self, deadlines: StopDeadlines) -> int:
        """Store by ``deadlines.upload``; cut at ``deadlines.end``, or at once on a second signal."""
        result: StoreResult | None = None
        async with anyio.create_task_group() as tg:

            async def give_up() -> None:
                await self.give_up.wait()
                tg.cancel_scope.cancel()

            async def store() -> None:
                nonlocal result
                with anyio.move_on_after(max(0.0, deadlines.end - anyio.current_time())):
                    result = await self.daemon.store(deadlines.upload)
                tg.cancel_scope.cancel()

            tg.start_soon(give_up)
            tg.start_soon(store)
        if result is not None:
            return EXIT_STORED if result.ok else EXIT_NOT_STORED
        if self.give_up.is_set():
            log.error("snapshot not stored: gave up on a second signal")
        else:
            log.error("snapshot not stored: shutdown deadline passed")
        return EXIT_NOT_STORED


async def store_once(settings: Settings, timeout: float) -> StoreResult:
    """``agentd snapshot`` with no daemon: persisted buffer + ``GET /messages``, trimmed, uploaded.

    The state file is updated afterwards, so a daemon started later knows what coderd holds.
    """
    add_secret(settings.token)
    async with Daemon(settings) as daemon:
        daemon.load()
        return await daemon.store(anyio.current_time() + timeout, why="snapshot without daemon")
