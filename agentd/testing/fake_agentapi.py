"""FakeAgentAPI: an in-process stand-in for agentapi (CONTRACT.md §2).

Shapes follow agentapi's OpenAPI spec (agentapi 0.12.x) and its event emitter:

* ``GET /messages`` -> 200 ``{"$schema": ..., "messages": [{"id", "content", "role", "time"}]}``
  (``id`` is the message's index 0, 1, 2, ...; ``time`` RFC 3339 with up to 9 fractional digits,
  Go's RFC3339Nano: trailing zeros trimmed). agentapi's framework (huma) adds the ``$schema``
  link to every JSON body, so clients must ignore unknown keys; pass ``schema_links=False`` to
  drop it.
* ``GET /status`` -> 200 ``{"$schema": ..., "status": "running"|"stable", "agent_type": ...,
  "transport": "pty"}``.
* ``GET /events`` -> 200 ``text/event-stream``. On connect: one ``message_update`` per message
  (data ``{"id", "role", "message", "time"}`` -- ``message``, not ``content``), then one
  ``status_change`` (data ``{"status", "agent_type"}``); then live changes as they happen,
  including ``agent_error`` (data ``{"message", "level", "time"}``). Framing:
  ``event: NAME\\ndata: JSON\\n\\n``, chunked, each event flushed on its own.
  With ``events=False`` the route answers 404 like older agentapi builds.
* A subscriber whose queue reaches ``max_queue`` events (agentapi: 1 024) is dropped: its queue
  is closed, the events already queued are still written, then the stream ends normally.
  A subscriber whose one write blocks more than ``write_timeout`` seconds (agentapi: 5) is
  dropped with its connection closed. Reconnecting replays the whole state again.

What agentapi 0.12.1 does that a simple stub does not, all on by default (CONTRACT.md §2):

* **PTY start**: message 0 (agent, empty content) exists from the start and the status is
  ``running``. The agent's first screen fills that message in place: :meth:`add_message` with
  role ``agent`` while message 0 is still the untouched placeholder updates it (same id 0).
* **Host allow-list**: a request whose ``Host`` (port aside) is not in ``allowed_hosts``
  (default ``localhost``, ``127.0.0.1``, ``[::1]``; ``"*"`` allows all) gets 400 ``text/plain``
  "Invalid host header" (agentapi's ``--allowed-hosts`` / ``AGENTAPI_ALLOWED_HOSTS``).
* **agent_error** events are kept (the newest 100) and replayed after the ``status_change`` on
  every connect.
* **No heartbeats**: an idle stream is silent.
* **Late state load**: :meth:`restore_state` replaces the placeholder with saved messages (their
  own ids and times), re-sent as ``message_update`` for ids 0..N. The process mode does it
  ``--state-load-delay`` seconds after start, as agentapi does once the agent's screen is ready.
* **Stop**: leaving :meth:`FakeAgentAPI.serve` (or SIGTERM in the process mode) stops accepting
  connections, waits up to ``shutdown_wait`` seconds (agentapi: 5) for open streams to close,
  then closes them without ending the chunked body (abruptly), as agentapi's exit does.
* **ACP transport** (``transport="acp"``): no messages at start, status ``stable``;
  :meth:`send_prompt` adds the user's message and the agent's placeholder, :meth:`fail_prompt`
  removes that placeholder with no event, leaving a gap in the ids.

Everything that changes state is a plain synchronous method, to be called from the test's own
task: :meth:`FakeAgentAPI.add_message`, :meth:`~FakeAgentAPI.update_last`,
:meth:`~FakeAgentAPI.set_status`, :meth:`~FakeAgentAPI.agent_error`, :meth:`~FakeAgentAPI.restore_state`,
:meth:`~FakeAgentAPI.send_prompt`, :meth:`~FakeAgentAPI.fail_prompt`; fault injection:
:meth:`~FakeAgentAPI.drop_subscribers`, :meth:`~FakeAgentAPI.inject_raw`,
:meth:`~FakeAgentAPI.cut_streams_mid_event`.

Process mode (a real agentapi-like process for stop-path tests)::

    python -m agentd.testing.fake_agentapi --port P [--messages N] [--state-file F]
        [--signal-log F] [--pid-file F] [--no-events] [--script demo|static|none]
        [--transport pty|acp] [--allowed-hosts H,...] [--state-load-delay S] [--shutdown-wait S]

prints ``agentapi listening on http://127.0.0.1:P`` once listening. SIGUSR1 saves the state to
``--state-file`` (agentapi's saved-state shape) and appends ``SIGUSR1 <time.time()>`` to
``--signal-log``; SIGTERM/SIGINT/SIGHUP append ``SIGTERM <time.time()>`` (the signal's name),
save the state too (agentapi does on shutdown), stop accepting, wait up to ``--shutdown-wait``
seconds for open streams, then exit 0, ending any stream still open abruptly. An existing state
file is loaded ``--state-load-delay`` seconds after start (the placeholder shows until then).
See ``--help``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import conversations
from .http import ConnectionClosed, Exchange, Served, Server, serve

__all__ = ["FakeAgentAPI", "format_rfc3339_nano", "main"]

#: agentapi's per-subscriber buffer (``NewEventEmitter(1024)``), events.
DEFAULT_MAX_QUEUE = 1024
#: agentapi drops a subscriber whose one write blocks longer than this, seconds.
DEFAULT_WRITE_TIMEOUT = 5.0
#: agentapi's HTTP server shutdown waits this long for open connections, seconds.
DEFAULT_SHUTDOWN_WAIT = 5.0
#: Host names agentapi accepts by default (``--allowed-hosts``).
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "[::1]")
#: agent_error events agentapi keeps and replays on connect.
MAX_STORED_ERRORS = 100


def format_rfc3339_nano(ns: int, utc_offset_minutes: int = 0) -> str:
    """Format ``ns`` (nanoseconds since the Unix epoch) like Go's ``time.RFC3339Nano``.

    Fractional seconds have up to 9 digits with trailing zeros trimmed (none at all when
    zero); the zone is ``Z`` for offset 0, else ``+hh:mm``/``-hh:mm``.
    Example: ``2026-01-01T00:00:00.123456789Z``, ``2025-01-01T00:00:00.5Z``.
    """
    seconds, frac = divmod(ns, 1_000_000_000)
    tz = timezone(timedelta(minutes=utc_offset_minutes))
    dt = datetime.fromtimestamp(seconds, tz)
    out = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        out += "." + f"{frac:09d}".rstrip("0")
    if utc_offset_minutes == 0:
        return out + "Z"
    sign = "+" if utc_offset_minutes > 0 else "-"
    hours, minutes = divmod(abs(utc_offset_minutes), 60)
    return f"{out}{sign}{hours:02d}:{minutes:02d}"


def _sse(event: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n".encode()


@dataclass
class _Cut:
    """Queue item: write ``data`` (half an event) then close the connection."""

    data: bytes


@dataclass(eq=False)
class _Subscriber:
    ident: int
    send: MemoryObjectSendStream[Any]
    receive: MemoryObjectReceiveStream[Any]
    dropped: bool = False
    aborted: bool = False  # the server stops: end the stream without the terminating chunk


class _WriteBlocked(Exception):
    """A write to a subscriber blocked longer than ``write_timeout``."""


@dataclass
class Message:
    """One conversation message: ``id`` (int, its index), ``role`` ("user"/"agent", but any
    string is kept so tests can inject bad roles), ``content`` (str), ``time`` (RFC 3339 str)."""

    id: int
    role: str
    content: str
    time: str

    def as_message(self) -> dict[str, Any]:
        """Shape of one item of ``GET /messages``."""
        return {"id": self.id, "content": self.content, "role": self.role, "time": self.time}

    def as_update(self) -> dict[str, Any]:
        """Shape of a ``message_update`` event's data."""
        return {"id": self.id, "role": self.role, "message": self.content, "time": self.time}


@dataclass
class FakeAgentAPI(Served):
    """In-process agentapi stand-in. See the module docstring for the wire shapes.

    Constructor: ``agent_type`` (str, ``/status`` and ``status_change``), ``transport``
    ("pty" or "acp"), ``status`` ("running"/"stable", initial; default ``running`` for pty,
    ``stable`` for acp), ``placeholder`` (pty: start with message 0, agent, empty; default
    True), ``events`` (False -> ``/events`` answers 404), ``max_queue`` (events a subscriber
    may fall behind before it is dropped), ``write_timeout`` (seconds one write may block
    before the subscriber is dropped), ``shutdown_wait`` (seconds leaving :meth:`serve` waits
    for open streams before closing them abruptly), ``allowed_hosts`` (Host names accepted;
    ``("*",)`` for any), ``clock`` (callable returning nanoseconds since the epoch, default
    :func:`time.time_ns`), ``utc_offset_minutes`` (zone of the emitted times; Go prints local
    time), ``schema_links`` (add huma's ``$schema`` key to JSON bodies).

    Read-back for assertions: ``messages`` (list of :class:`Message`), ``status``,
    ``requests`` (``Counter`` of request paths, e.g. ``requests["/messages"]``),
    ``host_refused`` (requests answered "Invalid host header"), ``errors`` (stored
    ``agent_error`` data), ``subscribers`` (number of open ``/events`` streams),
    ``subscribers_total``, ``dropped_subscribers`` (streams ended because they fell
    ``max_queue`` behind or a write blocked too long).
    """

    agent_type: str = "claude"
    transport: str = "pty"
    status: str | None = None
    placeholder: bool = True
    events: bool = True
    max_queue: int = DEFAULT_MAX_QUEUE
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    shutdown_wait: float = DEFAULT_SHUTDOWN_WAIT
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    clock: Callable[[], int] = time.time_ns
    utc_offset_minutes: int = 0
    schema_links: bool = True
    messages: list[Message] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    host_refused: int = 0
    errors: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_STORED_ERRORS))
    subscribers_total: int = 0
    dropped_subscribers: int = 0
    server: Server | None = field(default=None, repr=False)
    _subs: set[_Subscriber] = field(default_factory=set, repr=False)
    _next_id: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.transport not in ("pty", "acp"):
            raise ValueError(f"transport must be 'pty' or 'acp', not {self.transport!r}")
        if self.status is None:
            self.status = "running" if self.transport == "pty" else "stable"
        if self.transport == "pty" and self.placeholder and not self.messages:
            self.messages.append(Message(id=0, role="agent", content="", time=self.now()))
        self._next_id = max((m.id for m in self.messages), default=-1) + 1

    # -- state changes (synchronous; call from the test's task) --------------------------------

    def now(self) -> str:
        """The current time from ``clock`` as agentapi prints it (RFC 3339, nanoseconds)."""
        return format_rfc3339_nano(self.clock(), self.utc_offset_minutes)

    def _untouched_placeholder(self) -> bool:
        return (
            self.transport == "pty" and len(self.messages) == 1 and self.messages[0].id == 0
            and self.messages[0].role == "agent" and self.messages[0].content == ""
        )

    def add_message(self, role: str, content: str, time: str | None = None) -> int:
        """Append a message; returns its id. Emits ``message_update``.

        In pty mode an ``agent`` message while message 0 is still the empty placeholder fills
        that message in place (id 0), as the agent's first screen does. ``role`` is not
        validated, so tests can produce the bad roles the client must filter. ``time``
        defaults to now.
        """
        if role == "agent" and self._untouched_placeholder():
            msg = self.messages[0]
            msg.content, msg.time = content, time or self.now()
        else:
            # pty: the id is the index; acp: a counter, so a removed message leaves a gap.
            last = self.messages[-1].id + 1 if self.messages else 0
            next_id = len(self.messages) if self.transport == "pty" else max(self._next_id, last)
            msg = Message(id=next_id, role=role, content=content, time=time or self.now())
            self.messages.append(msg)
            self._next_id = next_id + 1
        self._broadcast(_sse("message_update", msg.as_update()))
        return msg.id

    def load(self, conversation: list[tuple[str, str]]) -> None:
        """Append every ``(role, content)`` of ``conversation`` (see :mod:`.conversations`)."""
        for role, content in conversation:
            self.add_message(role, content)

    def update_last(self, content: str) -> None:
        """Rewrite the last message in place: same id, full new ``content``, time now.

        Emits ``message_update`` with the full content, as agentapi does while the agent types.
        """
        if not self.messages:
            raise IndexError("no message to update")
        msg = self.messages[-1]
        msg.content = content
        msg.time = self.now()
        self._broadcast(_sse("message_update", msg.as_update()))

    def set_status(self, status: str) -> None:
        """Set ``running``/``stable``; emits ``status_change`` only when it changes."""
        if status == self.status:
            return
        self.status = status
        self._broadcast(self._status_frame())

    def agent_error(self, message: str, level: str = "error") -> None:
        """Emit ``agent_error`` with data ``{"message", "level", "time"}``; kept (the newest
        100) and replayed after the ``status_change`` on every later connect."""
        data = {"message": message, "level": level, "time": self.now()}
        self.errors.append(data)
        self._broadcast(_sse("agent_error", data))

    def restore_state(self, saved: list[Message]) -> None:
        """agentapi's late state load: the saved messages (own ids and times) replace the
        conversation, each re-sent as a ``message_update``, ids ascending."""
        self.messages[:] = [Message(id=m.id, role=m.role, content=m.content, time=m.time) for m in saved]
        self._next_id = max((m.id for m in self.messages), default=-1) + 1
        for msg in self.messages:
            self._broadcast(_sse("message_update", msg.as_update()))

    def send_prompt(self, content: str) -> int:
        """ACP: the user's prompt and the agent's (empty) placeholder reply; status running.
        Returns the placeholder's id."""
        self.add_message("user", content)
        self.set_status("running")
        return self.add_message("agent", "")

    def fail_prompt(self) -> None:
        """ACP: the prompt failed. agentapi removes the agent's placeholder (the last message)
        with no event announcing it, leaving a gap in the ids; status back to stable."""
        if self.messages and self.messages[-1].role == "agent":
            self.messages.pop()
        self.set_status("stable")

    # -- fault injection -------------------------------------------------------------------------

    def drop_subscribers(self) -> None:
        """End every ``/events`` stream (queued events are written first, then a clean end)."""
        for sub in list(self._subs):
            self._drop(sub, counted=False)

    def inject_raw(self, data: bytes) -> None:
        """Write ``data`` as is into every open event stream (for malformed-event tests)."""
        for sub in list(self._subs):
            self._enqueue(sub, bytes(data))

    def cut_streams_mid_event(self) -> None:
        """Write the first half of a ``message_update`` to every stream, then close the
        connection without ending the chunked body (the client sees a truncated stream)."""
        frame = _sse("message_update", self.messages[-1].as_update()) if self.messages else self._status_frame()
        half = frame[: max(1, len(frame) // 2)]
        for sub in list(self._subs):
            sub.send.send_nowait(_Cut(half))
            self._subs.discard(sub)
            sub.send.close()

    # -- waiting helpers -------------------------------------------------------------------------

    @property
    def subscribers(self) -> int:
        """Number of currently open ``/events`` subscriptions."""
        return len(self._subs)

    async def wait_for_subscribers(self, n: int = 1, timeout: float = 30.0) -> None:
        """Wait until at least ``n`` ``/events`` streams are open (``timeout`` seconds)."""
        await self.wait_for(lambda: self.subscribers >= n, timeout)

    # -- serving ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def serve(self, port: int = 0, host: str = "127.0.0.1", ssl_context: Any = None) -> AsyncIterator[FakeAgentAPI]:
        """Serve on ``host``:``port`` (0 = any free port; a fixed port can be reused right
        after a previous server closed, to simulate an agentapi restart). Yields ``self``
        (``api.url``, ``api.port``). Exiting closes the listener and every stream."""
        async with serve(self.handle, host=host, port=port, ssl_context=ssl_context) as server:
            self.server = server
            try:
                yield self
            finally:
                await self.stop()
                self.server = None

    async def stop_accepting(self, wait: float = 0.0) -> None:
        """Stop accepting connections (connects are refused), then wait up to ``wait`` seconds
        for the open ``/events`` streams to be closed by their clients."""
        if self.server is None:
            return
        await self.server.stop_accepting()
        with anyio.move_on_after(wait):
            while self._subs:  # noqa: ASYNC110 - streams end in their own tasks; polled like wait_for
                await anyio.sleep(0.01)

    async def stop(self) -> None:
        """What agentapi's stop does to its HTTP side: stop accepting connections, wait up to
        ``shutdown_wait`` seconds for open streams to be closed by their clients, then close
        every connection without ending its chunked body (the stream ends abruptly)."""
        if self.server is None:
            return
        await self.stop_accepting(wait=self.shutdown_wait)
        for sub in list(self._subs):
            sub.aborted = True
            self._drop(sub, counted=False)
        await self.server.close_connections()

    async def handle(self, ex: Exchange) -> None:
        """The HTTP handler (usable with :func:`agentd.testing.http.serve` directly)."""
        self.requests[ex.path] += 1
        if not self._host_allowed(ex.header("host") or ""):
            # Go's http.Error: text/plain, nosniff, the text and a newline.
            self.host_refused += 1
            await ex.respond(
                400,
                [("content-type", "text/plain; charset=utf-8"), ("x-content-type-options", "nosniff")],
                b"Invalid host header\n",
            )
            return
        if ex.path in ("/messages", "/status", "/events") and ex.method not in ("GET", "HEAD"):
            await ex.respond_json(
                405, self._problem(405, "Method Not Allowed", f"method {ex.method} not allowed"),
                [("allow", "GET")],
            )
            return
        if ex.path == "/messages":
            body: dict[str, Any] = {"messages": [m.as_message() for m in self.messages]}
            await self._json(ex, "MessagesResponseBody", body)
        elif ex.path == "/status":
            body = {"agent_type": self.agent_type, "status": self.status, "transport": self.transport}
            await self._json(ex, "StatusResponseBody", body)
        elif ex.path == "/events" and self.events:
            await self._events(ex)
        else:
            await ex.respond(404, [("content-type", "text/plain; charset=utf-8")], b"404 page not found\n")

    # -- internals ---------------------------------------------------------------------------------

    def _host_allowed(self, host: str) -> bool:
        if "*" in self.allowed_hosts:
            return True
        name = host.strip().lower()
        if name.startswith("["):
            name = name[: name.find("]") + 1] if "]" in name else name
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        allowed = {h.strip().lower().strip("[]") for h in self.allowed_hosts}
        return name.strip("[]") in allowed

    def _problem(self, status: int, title: str, detail: str) -> dict[str, Any]:
        return {"title": title, "status": status, "detail": detail}

    async def _json(self, ex: Exchange, schema: str, body: dict[str, Any]) -> None:
        headers: list[tuple[str, str]] = []
        if self.schema_links:
            host = ex.header("host") or "127.0.0.1"
            body = {"$schema": f"http://{host}/schemas/{schema}.json", **body}
            headers.append(("link", f'</schemas/{schema}.json>; rel="describedBy"'))
        await ex.respond_json(200, body, headers)

    async def _write(self, sub: _Subscriber, stream: Any, frame: bytes) -> None:
        """One write; blocked longer than ``write_timeout``: drop the subscriber, close the
        connection (agentapi's 5-second write deadline)."""
        with anyio.move_on_after(self.write_timeout) as blocked:
            await stream.send(frame)
        if blocked.cancelled_caught:
            if not sub.dropped:
                self.dropped_subscribers += 1
            self._drop(sub, counted=False)
            await stream.abort()
            raise _WriteBlocked

    def _status_frame(self) -> bytes:
        return _sse("status_change", {"status": self.status, "agent_type": self.agent_type})

    def _broadcast(self, frame: bytes) -> None:
        for sub in list(self._subs):
            self._enqueue(sub, frame)

    def _enqueue(self, sub: _Subscriber, item: Any) -> None:
        if sub.dropped:
            return
        if sub.send.statistics().current_buffer_used >= self.max_queue:
            self._drop(sub, counted=True)
            return
        sub.send.send_nowait(item)

    def _drop(self, sub: _Subscriber, counted: bool) -> None:
        if sub.dropped:
            return
        sub.dropped = True
        if counted:
            self.dropped_subscribers += 1
        self._subs.discard(sub)
        sub.send.close()

    async def _events(self, ex: Exchange) -> None:
        # Snapshot the state and subscribe in one synchronous step, like agentapi's Subscribe():
        # every later change lands in the queue, after the replay.
        replay = [_sse("message_update", m.as_update()) for m in self.messages]
        replay.append(self._status_frame())
        replay += [_sse("agent_error", data) for data in self.errors]
        send, receive = anyio.create_memory_object_stream[Any](math.inf)
        self.subscribers_total += 1
        sub = _Subscriber(ident=self.subscribers_total, send=send, receive=receive)
        self._subs.add(sub)
        try:
            stream = await ex.start_stream(
                200,
                [
                    ("content-type", "text/event-stream"),
                    ("cache-control", "no-cache, no-store, must-revalidate"),
                    ("pragma", "no-cache"),
                    ("expires", "0"),
                    ("x-accel-buffering", "no"),
                    ("connection", "keep-alive"),
                ],
            )
            async with anyio.create_task_group() as tg:

                async def watch_client() -> None:
                    await ex.wait_closed()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_client)
                try:
                    for frame in replay:
                        await self._write(sub, stream, frame)
                    async with receive:
                        async for item in receive:
                            if isinstance(item, _Cut):
                                await stream.send(item.data)
                                await stream.abort()
                                break
                            await self._write(sub, stream, item)
                        else:
                            if sub.aborted:
                                await stream.abort()
                            else:
                                await stream.end()
                except (ConnectionClosed, _WriteBlocked):
                    pass
                tg.cancel_scope.cancel()
        finally:
            self._drop(sub, counted=False)
            receive.close()


# ---------------------------------------------------------------------------------------------
# process mode

def _saved_state(api: FakeAgentAPI) -> dict[str, Any]:
    """agentapi's saved-state shape (reference/agentapi-saved-state.json)."""
    first_user = next((m.content for m in api.messages if m.role == "user"), "")
    return {
        "version": 1,
        "messages": [
            {"id": m.id, "message": m.content, "role": m.role, "time": m.time} for m in api.messages
        ],
        "initial_prompt": first_user,
        "initial_prompt_sent": True,
    }


def _write_atomic(path: str, data: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append_line(path: str | None, line: str) -> None:
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _load_state(path: str) -> list[Message]:
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    return [
        Message(id=m.get("id", i), role=m["role"], content=m["message"], time=m["time"])
        for i, m in enumerate(state.get("messages") or [])
    ]


async def _load_later(api: FakeAgentAPI, saved: list[Message], delay: float) -> None:
    await anyio.sleep(delay)  # agentapi waits until the agent's screen looks ready
    api.restore_state(saved)


SCRIPTS = ("none", "demo", "static")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m agentd.testing.fake_agentapi",
        description="Fake agentapi server for tests and the demo (127.0.0.1 only).",
    )
    p.add_argument("--port", type=int, default=3284, help="TCP port (0 = any free port)")
    p.add_argument("--messages", type=int, default=0, help="start with N short generic messages")
    p.add_argument(
        "--script", choices=SCRIPTS, default="none",
        help="built-in conversation: demo = 12-message session, then the agent types a reply "
        "past 64 KiB live (running -> stable); static = the same, already finished",
    )
    p.add_argument("--step-interval", type=float, default=0.05, help="seconds between typing steps (demo)")
    p.add_argument("--agent-type", default="claude")
    p.add_argument("--state-file", help="agentapi state file: loaded at start if present, saved on SIGUSR1/SIGTERM")
    p.add_argument("--signal-log", help="append 'SIGNAME <time.time()>' per signal received")
    p.add_argument("--pid-file", help="write the process id here")
    p.add_argument("--no-events", action="store_true", help="/events answers 404 (older agentapi)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE)
    p.add_argument("--exit-delay", type=float, default=0.1,
                   help="seconds the agent takes to stop after the HTTP server's shutdown (then exit)")
    p.add_argument("--shutdown-wait", type=float, default=DEFAULT_SHUTDOWN_WAIT,
                   help="seconds the HTTP shutdown waits for open streams before exit ends them abruptly (agentapi: 5)")
    p.add_argument("--transport", choices=("pty", "acp"), default="pty")
    p.add_argument("--allowed-hosts", default=os.environ.get("AGENTAPI_ALLOWED_HOSTS", ",".join(DEFAULT_ALLOWED_HOSTS)),
                   help="comma-separated Host names accepted (default AGENTAPI_ALLOWED_HOSTS or localhost,127.0.0.1,[::1]; * = any)")
    p.add_argument("--state-load-delay", type=float, default=1.0,
                   help="seconds after start before the saved state is loaded (the placeholder shows until then)")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return p.parse_args(argv)


async def _type_reply(api: FakeAgentAPI, interval: float) -> None:
    api.set_status("running")
    first = True
    for content in conversations.typing_steps():
        if first:
            api.add_message("agent", content)
            first = False
        else:
            api.update_last(content)
        await anyio.sleep(interval)
    api.set_status("stable")


async def _amain(args: argparse.Namespace) -> int:
    hosts = tuple(h.strip() for h in args.allowed_hosts.replace(" ", ",").split(",") if h.strip())
    api = FakeAgentAPI(agent_type=args.agent_type, transport=args.transport, events=not args.no_events,
                       max_queue=args.max_queue, allowed_hosts=hosts, shutdown_wait=args.shutdown_wait)
    saved: list[Message] | None = None
    if args.state_file and args.transport == "pty" and os.path.exists(args.state_file):  # noqa: ASYNC240 - once, at start
        saved = _load_state(args.state_file)
    elif args.script in ("demo", "static"):
        api.load(conversations.demo_session())
        if args.script == "static":
            api.add_message("agent", conversations.final_reply())
            api.status = "stable"
        else:
            api.status = "running"
    else:
        api.load(conversations.generic_conversation(args.messages))

    def save(_reason: str) -> None:
        if args.state_file and args.transport == "pty":
            _write_atomic(args.state_file, json.dumps(_saved_state(api), ensure_ascii=False))

    if args.pid_file:
        _write_atomic(args.pid_file, f"{os.getpid()}\n")

    wanted = [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
    with anyio.open_signal_receiver(*wanted) as signals:
        async with api.serve(port=args.port):
            print(f"agentapi listening on {api.url}", flush=True)
            async with anyio.create_task_group() as tg:
                if saved is not None:
                    tg.start_soon(_load_later, api, saved, args.state_load_delay)
                elif args.script == "demo":
                    tg.start_soon(_type_reply, api, args.step_interval)
                async for signum in signals:
                    name = signal.Signals(signum).name
                    _append_line(args.signal_log, f"{name} {time.time():.6f}")
                    save(name)
                    if signum == signal.SIGUSR1:
                        continue
                    await api.stop_accepting(wait=args.shutdown_wait)  # HTTP shutdown: up to 5 s for open streams
                    await anyio.sleep(args.exit_delay)  # the agent stops
                    api.shutdown_wait = 0.0  # then the process exits: open streams end abruptly
                    tg.cancel_scope.cancel()
                    break
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m agentd.testing.fake_agentapi``; returns the exit status."""
    args = _parse_args(argv)
    return anyio.run(_amain, args, backend=args.backend)


if __name__ == "__main__":
    sys.exit(main())
