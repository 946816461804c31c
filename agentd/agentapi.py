"""The source: tailing agentapi's conversation into the ring buffer.

``GET /events`` (Server-Sent Events) replays the whole state on connect (a ``message_update``
per message, then a ``status_change``, then the stored ``agent_error`` events) and then streams
changes. The replay is collected and merged as one full view (:meth:`RingBuffer.sync`), so
reconnecting never duplicates messages. Live ``message_update`` events are applied one by one;
``status_change`` is tracked; ``agent_error`` is logged once per distinct error (agentapi keeps
up to 100 and replays them on every connect).

**Reading the stream.** The raw bytes of the response (``Accept-Encoding: identity`` asked, any
other ``Content-Encoding`` refused) go through :class:`SSEParser`: a bounded line splitter over
bytes (CR, LF and CRLF line ends, a leading BOM skipped, per the WHATWG ``text/event-stream``
rules) feeding httpx-sse's :class:`~httpx_sse.SSEDecoder` for the field semantics. A line or an
event longer than ``max_event_bytes`` drops the stream with a warning (then reconnects), so a
peer cannot grow agentd's memory without bound. ``retry:`` fields are ignored (agentd keeps its
own backoff); a block without ``data`` dispatches nothing.

**Idle is healthy.** agentapi sends no heartbeats: an idle agent is a silent stream for hours,
so there is no read timeout. A dead agentapi is found three ways: its process ending closes the
connection (the stream ends at once); TCP keepalive on the socket (idle 60 s, then 3 probes
10 s apart) finds a peer that vanished without closing; and after ``idle_probe`` seconds of
silence a cheap ``GET /status`` asks whether agentapi still answers; if it does not, the stream
is dropped and reconnected.

**Ending and failing.** agentapi's stop ends the chunked body abruptly, and a subscriber that
falls behind is dropped with a clean end: either way, at an event boundary, that is the info
line "agentapi closed the stream" and an immediate reconnect. A stream cut inside an event, a
failed connect, a timeout or a 5xx is a warning ("agentapi disconnected") and a reconnect with
capped exponential backoff and full jitter (:mod:`agentd.backoff`). A server with no usable
event stream (``/events`` answers 404, 405 or 501, or a 2xx that is not ``text/event-stream``;
or a 3xx/4xx three times in a row) is polled with ``GET /messages`` about once a second for the
rest of the run. agentapi's Host check (400 "Invalid host header" for a Host other than
``localhost``, ``127.0.0.1`` or ``[::1]``) is said once as an error naming agentapi's
``--allowed-hosts`` / ``AGENTAPI_ALLOWED_HOSTS``, kept in :attr:`AgentAPITail.problem` for
``agentd status``, and retried quietly at the backoff cap until agentapi accepts it.

**Bounded input.** Every answer is read through a byte cap: ``GET /status`` and error bodies
at :data:`MAX_SMALL_BODY`; ``GET /messages`` incrementally (ijson), each message capped at
``max_event_bytes`` and only the newest ``buffer.max_messages`` kept (clipped as the buffer
would), so a body of hundreds of MB from a long conversation is read in bounded memory.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

import anyio
import httpx
import ijson  # type: ignore[import-untyped]
from httpx_sse._decoders import SSEDecoder  # the WHATWG field rules; httpx-sse keeps it in _decoders

from agentd.backoff import full_jitter
from agentd.buffer import RingBuffer
from agentd.logs import get_logger
from agentd.messages import InvalidMessage, Message, parse_message

log = get_logger("agentd.agentapi")

SourceState = Literal["connecting", "connected", "polling", "disconnected"]

#: Largest SSE line or event, and largest single message in ``GET /messages``, bytes. agentapi
#: sends a message's full content in every update and one message can pass a megabyte in a long
#: turn (CONTRACT.md §2); 32 MiB leaves room for that and bounds a hostile peer.
MAX_EVENT_BYTES = 32 * 1024 * 1024
#: Largest ``GET /status`` answer or error body read, bytes (agentapi's are under 200 bytes).
MAX_SMALL_BODY = 64 * 1024
#: Deepest JSON nesting read in a ``GET /messages`` body (agentapi's is 3 deep).
MAX_DEPTH = 64
#: Seconds of silence on the event stream before a ``GET /status`` asks whether agentapi lives.
IDLE_PROBE = 60.0
#: Longest one poll's ``GET /messages`` may take, seconds (a long conversation can be hundreds
#: of MB; each wait for more of it is bounded by ``connect_timeout``).
POLL_DEADLINE = 120.0
#: TCP keepalive on the event stream's socket: idle seconds, probe interval, probes.
KEEPALIVE = (60, 10, 3)
#: What agentd asks of agentapi: no compression (a gzip'd answer could be a bomb).
REQUEST_HEADERS = {"accept-encoding": "identity"}
#: The same for the event stream.
EVENTS_HEADERS = {**REQUEST_HEADERS, "accept": "text/event-stream", "cache-control": "no-store"}
#: agentapi's answer to a Host outside its allow-list (400, text/plain).
_INVALID_HOST = b"Invalid host header"
_BOM = b"\xef\xbb\xbf"


class AgentAPIError(Exception):
    """agentapi could not be reached or answered something unusable.

    ``status`` is the HTTP status when agentapi answered one (else None); ``host_refused`` is
    True when that answer was agentapi's Host check (400 "Invalid host header").
    """

    def __init__(self, message: str, status: int | None = None, *, host_refused: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.host_refused = host_refused


class StreamLimitError(AgentAPIError):
    """An SSE line or event, or one message of ``GET /messages``, is over its byte cap."""


def host_problem(base_url: str) -> str:
    """The one line that explains agentapi's Host check for ``base_url``'s host name."""
    host = urlsplit(base_url).hostname or base_url
    return (
        f"agentapi refused the Host header {host!r} (400 Invalid host header): start agentapi with "
        f"--allowed-hosts {host} (or AGENTAPI_ALLOWED_HOSTS={host}), or set AGENTD_AGENTAPI_URL to "
        "http://localhost:<port>"
    )


# ---------------------------------------------------------------------------------------------
# bounded reading


def _check_encoding(response: httpx.Response, what: str) -> None:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise AgentAPIError(f"{what} answered with Content-Encoding {encoding[:40]!r}; agentd asks for identity and refuses it")


async def read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    """The raw body of a streamed ``response``, at most ``limit`` bytes.

    Raises :class:`AgentAPIError` if it is longer or compressed (``Content-Encoding`` other than
    identity: agentd never decompresses, so a small answer cannot grow in memory).
    """
    _check_encoding(response, what)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise AgentAPIError(f"{what} answered more than {limit} bytes", response.status_code)
        chunks.append(chunk)
    return b"".join(chunks)


async def _refusal(response: httpx.Response, what: str, base_url: str) -> AgentAPIError:
    """The error for a non-200 answer, telling agentapi's Host check apart."""
    try:
        body = await read_capped(response, 4096, what)
    except (AgentAPIError, httpx.HTTPError):
        body = b""
    if response.status_code == 400 and _INVALID_HOST in body:
        return AgentAPIError(host_problem(base_url), 400, host_refused=True)
    return AgentAPIError(f"{what} answered {response.status_code}", response.status_code)


_NOT_AN_OBJECT = "message is not an object"
_FIELDS = frozenset({"id", "content", "role", "time"})


class _MessagesReader:
    """Incremental reader of a ``GET /messages`` body: ``{"messages": [{...}, ...], ...}``.

    Fed raw bytes (:meth:`feed`), parsed by ijson's C parser into basic events (no prefixes:
    their cost grows with the square of the nesting depth); the nesting is tracked here and
    capped at :data:`MAX_DEPTH`. Each item of the top-level ``messages`` array becomes a dict of
    its scalar fields (nested values of the fields agentd reads make the item invalid; others
    are skipped), validated with :func:`parse_message`, clipped with ``clip`` and kept if among
    the newest ``keep`` ids. Memory: the kept messages plus at most ``max_item`` bytes of the
    item being read. Raises :class:`StreamLimitError` past those caps.
    """

    def __init__(self, keep: int | None, clip: Callable[[Message], Message], max_item: int) -> None:
        self.keep, self.clip, self.max_item = keep, clip, max_item
        self.kept: dict[int, Message] = {}
        self.problems = 0
        self.first_problem: str | None = None
        self.saw_list = False
        self._events: Any = ijson.sendable_list()
        self._coro = ijson.basic_parse_coro(self._events)
        self._depth = 0  # containers open
        self._top_key: str | None = None  # the key being read in the top-level object
        self._in_list = False  # inside the top-level "messages" array (at depth 2)
        self._item: dict[str, Any] | None = None  # the message being read (depth 3)
        self._bad: str | None = None  # why the current item is unusable
        self._key: str | None = None  # its field being read
        self._skip_to = 0  # skipping a nested value until the depth falls back to this
        self._pending = 0  # bytes fed since the last finished item or top-level event

    def feed(self, chunk: bytes) -> None:
        self._pending += len(chunk)
        if self._pending > self.max_item:
            raise StreamLimitError(f"GET /messages: one message (or value) is over {self.max_item} bytes")
        self._coro.send(chunk)
        self._drain()

    def close(self) -> None:
        self._coro.close()  # raises if the body ended early
        self._drain()

    def _drain(self) -> None:
        events = self._events
        for event, value in events:
            self._event(event, value)
        del events[:]

    def _event(self, event: str, value: Any) -> None:
        opens = event in ("start_map", "start_array")
        closes = event in ("end_map", "end_array")
        if opens:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise StreamLimitError(f"GET /messages: JSON nested deeper than {MAX_DEPTH}")
        if self._skip_to:
            if closes:
                self._depth -= 1
                if self._depth == self._skip_to:
                    self._skip_to = 0
                    if self._item is not None and self._depth == 2:  # an array where a message should be
                        self._problem(self._bad or _NOT_AN_OBJECT)
                        self._item = None
            return
        if closes:
            self._depth -= 1
        if self._item is not None:
            self._in_item(event, value, opens)
        elif self._in_list:
            self._in_messages(event, opens)
        else:
            self._top(event, value, opens)

    def _top(self, event: str, value: Any, opens: bool) -> None:
        if self._depth == 1 and event == "map_key":
            self._top_key = value
        elif self._depth == 2 and event == "start_array" and self._top_key == "messages":
            self.saw_list = self._in_list = True
        elif opens and self._depth >= 2:  # another key's container: skipped
            self._skip_to = self._depth - 1
        self._pending = 0

    def _in_messages(self, event: str, opens: bool) -> None:
        if event == "end_array" and self._depth == 1:
            self._in_list = False
            self._pending = 0
        elif event == "start_map":
            self._item, self._bad, self._key = {}, None, None
        elif opens:  # an array where a message should be: skipped, then counted
            self._item, self._bad, self._skip_to = {}, _NOT_AN_OBJECT, 2
        else:
            self._problem(f"message is {event}, not an object")

    def _in_item(self, event: str, value: Any, opens: bool) -> None:
        assert self._item is not None
        if event == "map_key":
            self._key = value
        elif event == "end_map" and self._depth == 2:
            self._finish()
        elif opens:  # skipped; a message field agentd reads makes it invalid, another is ignored
            self._skip_to = self._depth - 1
            if self._key in _FIELDS:
                self._bad = self._bad or f"message field {self._key!r} is not a scalar"
        else:
            self._item[str(self._key)] = value

    def _finish(self) -> None:
        item, bad = self._item, self._bad
        self._item, self._bad, self._key, self._pending = None, None, None, 0
        if bad is not None or item is None:
            self._problem(bad or _NOT_AN_OBJECT)
            return
        try:
            message = self.clip(parse_message(item))
        except InvalidMessage as exc:
            self._problem(str(exc))
            return
        self.kept[message.id] = message
        if self.keep is not None and len(self.kept) > self.keep:
            del self.kept[min(self.kept)]

    def _problem(self, text: str) -> None:
        self.problems += 1
        if self.first_problem is None:
            self.first_problem = text


async def fetch_messages(
    client: httpx.AsyncClient,
    base_url: str,
    timeout: float,
    *,
    buffer: RingBuffer | None = None,
    max_item: int = MAX_EVENT_BYTES,
    idle_timeout: float | None = None,
) -> list[Message]:
    """``GET {base_url}/messages`` within ``timeout`` seconds; the valid messages, ids ascending.

    ``idle_timeout`` (default ``timeout``) bounds each step: connecting, and each wait for
    more of the body; ``timeout`` bounds the whole request.

    Read incrementally in bounded memory: with ``buffer``, only its newest
    ``buffer.max_messages`` messages are kept, each clipped with ``buffer.clip``; each message
    may be at most ``max_item`` bytes on the wire. Invalid messages are logged (one line: how
    many and the first reason) and left out. Raises :class:`AgentAPIError` on a connection
    error, a timeout, a non-200 answer (``host_refused`` for agentapi's Host check), a
    compressed or malformed body, a body without a ``messages`` list, or a message over the cap.
    """
    reader = _MessagesReader(
        buffer.max_messages if buffer is not None else None,
        buffer.clip if buffer is not None else (lambda m: m),
        max_item,
    )
    try:
        with anyio.fail_after(timeout):
            step = timeout if idle_timeout is None else min(idle_timeout, timeout)
            async with client.stream("GET", f"{base_url}/messages", headers=REQUEST_HEADERS, timeout=step) as response:
                if response.status_code != 200:
                    raise await _refusal(response, "GET /messages", base_url)
                _check_encoding(response, "GET /messages")
                async for chunk in response.aiter_raw():
                    reader.feed(chunk)
                reader.close()
    except (httpx.HTTPError, TimeoutError) as exc:
        raise AgentAPIError(f"GET /messages failed: {_short(exc)}") from None
    except (ijson.JSONError, ValueError, RecursionError) as exc:
        raise AgentAPIError(f"GET /messages body unusable: {str(exc)[:120]}") from None
    if not reader.saw_list:
        raise AgentAPIError("GET /messages body unusable: body has no 'messages' list")
    if reader.problems:
        log.warning("message skipped", reason=reader.first_problem, messages=reader.problems)
    return [reader.kept[i] for i in sorted(reader.kept)]


async def fetch_status(client: httpx.AsyncClient, base_url: str, timeout: float) -> str | None:
    """``GET {base_url}/status`` within ``timeout`` seconds: the agent's status string, or None
    when the answer has none. Raises :class:`AgentAPIError` when agentapi does not answer 200."""
    try:
        with anyio.fail_after(timeout):
            async with client.stream("GET", f"{base_url}/status", headers=REQUEST_HEADERS, timeout=timeout) as response:
                if response.status_code != 200:
                    raise await _refusal(response, "GET /status", base_url)
                body = await read_capped(response, MAX_SMALL_BODY, "GET /status")
    except (httpx.HTTPError, TimeoutError) as exc:
        raise AgentAPIError(f"GET /status failed: {_short(exc)}") from None
    try:
        data = _json_loads(body)
    except ValueError:
        return None
    status = data.get("status") if isinstance(data, dict) else None
    return status if isinstance(status, str) else None


def _json_loads(data: bytes | str) -> Any:
    """``json.loads``; bytes are decoded first as UTF-8 with invalid sequences replaced (WHATWG
    decodes the event stream so; and decoding first is faster than ``json.loads(bytes)``, which
    decodes with an error handler: 0.14 against 0.21 s per 1 000 x 64 KiB here). Raises
    ValueError for anything that is not JSON, nested too deep included."""
    try:
        return json.loads(data.decode("utf-8", "replace") if isinstance(data, bytes) else data)
    except RecursionError:  # nested too deep: not agentapi's shape either
        raise ValueError("JSON nested too deep") from None


def _may_hold_surrogates(data: bytes) -> bool:
    """False when decoding the JSON ``data`` (bytes) cannot yield a lone surrogate or U+0000
    (what :func:`agentd.messages.clean_text` replaces): it holds no ``\\uD800``-``\\uDFFF``
    and no ``\\u0000`` escape. :func:`agentd.messages.may_hold_surrogates`' test, run on the
    bytes before decoding (screen text is full of ``\\n`` escapes, so a plain substring search
    for ``\\u`` is slower than this regex)."""
    return _NEEDS_CLEANING.search(data) is not None


_NEEDS_CLEANING = re.compile(rb"\\u(?:[dD][89a-fA-F]|0000)")


# ---------------------------------------------------------------------------------------------
# Server-Sent Events


class SSEvent(NamedTuple):
    """One dispatched Server-Sent Event: ``event`` type (``"message"`` when the block named
    none), ``data`` (the data buffer, UTF-8 bytes as sent, lines joined with LF), ``id`` (the
    last event id), ``retry`` (milliseconds, or None)."""

    event: str
    data: bytes
    id: str
    retry: int | None


class SSEParser:
    """Bytes of a ``text/event-stream`` in, dispatched events out, memory bounded.

    :meth:`feed` takes raw body bytes in any pieces and returns the :class:`SSEvent` they
    complete. Per the WHATWG rules: lines end with CR, LF or CRLF; a UTF-8 BOM at the very start
    is skipped; a blank line dispatches the event if the block had a ``data`` field (an empty
    data buffer dispatches nothing, so a block of only ``retry:`` or ``id:`` is no event).
    ``data`` lines are kept as bytes (the value after ``data:`` and one optional space), so the
    JSON decoder reads them once; every other line is decoded as UTF-8 (invalid bytes replaced)
    and handed to httpx-sse's :class:`~httpx_sse.SSEDecoder` for the field rules (``event``,
    ``id``, ``retry``, comments, unknown fields). Raises :class:`StreamLimitError` when a line is
    longer than ``max_line`` bytes or an event's lines add up to more than ``max_event`` bytes.
    :attr:`pending` tells whether the stream stopped inside an event.
    """

    def __init__(self, max_line: int = MAX_EVENT_BYTES, max_event: int = MAX_EVENT_BYTES) -> None:
        self.max_line = max_line
        self.max_event = max_event
        self._partial = bytearray()  # the unfinished line
        self._head: bytes | None = b""  # bytes held at the start until the BOM is ruled out
        self._cr = False  # the previous piece ended with CR: a LF first in the next is its pair
        self._decoder = SSEDecoder()
        self._event_bytes = 0
        self._data: list[bytes] | None = None  # the data lines of this block (None: none yet)
        self._fields = False  # a field line since the last blank line

    @property
    def pending(self) -> bool:
        """True when the bytes so far end inside an event (a partial line or undispatched fields)."""
        return bool(self._partial) or self._fields

    def feed(self, chunk: bytes) -> list[SSEvent]:
        if self._head is not None:
            chunk = self._head + chunk
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._head = chunk
                return []
            self._head = None
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
        if self._cr:
            self._cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[SSEvent] = []
        start, find = 0, chunk.find
        while (end := find(b"\n", start)) >= 0:
            self._check(len(self._partial) + end - start)
            if self._partial:
                self._partial += memoryview(chunk)[start:end]
                line = bytes(self._partial)
                self._partial = bytearray()
            else:
                line = chunk[start:end]
            self._event_bytes += len(line)
            self._line(line, events)
            start = end + 1
        if start < len(chunk):
            self._check(len(self._partial) + len(chunk) - start)
            self._partial += memoryview(chunk)[start:]
        return events

    def _check(self, line_bytes: int) -> None:
        if line_bytes > self.max_line:
            raise StreamLimitError(f"an SSE line is over {self.max_line} bytes")
        if self._event_bytes + line_bytes > self.max_event:
            raise StreamLimitError(f"an SSE event is over {self.max_event} bytes")

    def _line(self, line: bytes, events: list[SSEvent]) -> None:
        if not line:
            self._dispatch(events)
        elif line.startswith(b"data") and (len(line) == 4 or line[4] == 0x3A):  # "data" or "data:..."
            self._fields = True
            value = line[6:] if line.startswith(b"data: ") else line[5:]
            if self._data is None:
                self._data = [value]
            else:
                self._data.append(value)
        else:
            self._fields = True
            self._decoder.decode(line.decode("utf-8", "replace"))

    def _dispatch(self, events: list[SSEvent]) -> None:
        sse = self._decoder.decode("")  # the decoder's event type, id and retry; it resets them
        if self._data is not None:
            data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
            if sse is None:
                events.append(SSEvent("message", data, "", None))
            else:
                events.append(SSEvent(sse.event, data, sse.id, sse.retry))
        self._event_bytes, self._data, self._fields = 0, None, False


# ---------------------------------------------------------------------------------------------
# the tail


class _StreamDead(Exception):
    """The idle probe found agentapi not answering: drop the stream."""


class AgentAPITail:
    """Keeps ``buffer`` up to date with the agentapi at ``base_url`` until cancelled.

    ``on_status(old, new)`` is called on every agent status change (``running``/``stable``);
    it must be quick and must not raise. Changes to the buffer show in ``buffer.version``.
    For ``agentd status``: ``state``/``state_since`` (a ``time.time()``), ``agent_status``, and
    ``problem``: one line saying what keeps agentd from following the conversation and what to do
    about it (agentapi's Host check, a URL that serves neither endpoint), or None.

    Timing (seconds): ``poll_interval`` between polls without ``/events``; reconnect backoff
    is full jitter over ``min(backoff_max, backoff_base * 2**(n-1))`` after the n-th failure in
    a row; ``connect_timeout`` bounds connecting and each request's answer (the event stream's
    headers included); ``idle_probe`` is the silence after which ``GET /status`` is asked.
    ``max_event_bytes`` caps an SSE line, an SSE event and one message of ``GET /messages``.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        buffer: RingBuffer,
        *,
        on_status: Callable[[str | None, str], None] | None = None,
        poll_interval: float = 1.0,
        backoff_base: float = 0.25,
        backoff_max: float = 5.0,
        connect_timeout: float = 3.0,
        idle_probe: float = IDLE_PROBE,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self.client = client
        self.base_url = base_url
        self.buffer = buffer
        self._on_status = on_status or (lambda old, new: None)
        self.poll_interval = poll_interval
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.idle_probe = idle_probe
        self.max_event_bytes = max_event_bytes
        self.state: SourceState = "connecting"
        self.state_since = time.time()
        self.agent_status: str | None = None
        self.problem: str | None = None
        self._errors_seen: OrderedDict[tuple[str, Any, Any], None] = OrderedDict()
        self._last_seen = time.monotonic()  # last bytes on the event stream
        self._stream_scope: anyio.CancelScope | None = None
        self._dead: str | None = None

    # -- state ---------------------------------------------------------------------------

    def _set_state(self, state: SourceState, event: str | None = None, *, quiet: bool = False, **fields: Any) -> None:
        if state == self.state:
            return
        was, self.state, self.state_since = self.state, state, time.time()
        level = log.warning if state == "disconnected" and not quiet else log.info
        level(event or f"agentapi {state}", was=was, url=self.base_url, **fields)

    def _set_problem(self, problem: str | None) -> None:
        if problem == self.problem:
            return
        if problem is not None:
            log.error(problem, url=self.base_url)
        elif self.problem is not None:
            log.info("agentapi problem solved", was=self.problem[:120])
        self.problem = problem

    def _set_agent_status(self, status: Any) -> None:
        if status not in ("running", "stable") or status == self.agent_status:
            return
        old, self.agent_status = self.agent_status, status
        log.debug("agent status", status=status, was=old)
        self._on_status(old, status)

    def _merge(self, view: list[Message]) -> None:
        resets = self.buffer.resets
        self.buffer.sync(view)
        if self.buffer.resets != resets:
            log.warning("agentapi conversation started over; keeping the earlier messages before it")

    def _agent_error(self, data: Any) -> None:
        fields = data if isinstance(data, dict) else {"message": data}
        key = (str(fields.get("message"))[:500], fields.get("level"), fields.get("time"))
        if key in self._errors_seen:  # agentapi replays its stored errors on every connect
            return
        self._errors_seen[key] = None
        if len(self._errors_seen) > 256:  # agentapi keeps 100
            self._errors_seen.popitem(last=False)
        log.warning("agent error", message=key[0], agent_level=key[1], time=key[2])

    # -- main loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Tail until cancelled. Never raises for agentapi's failures; they are logged."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_idle)
            await self._follow()

    async def _follow(self) -> None:
        failures = 0
        refused = 0  # GET /events answered a 3xx/4xx (not the Host check) this many times in a row
        while True:
            started = time.monotonic()
            try:
                closed = await self._stream_events()
            except _NoEvents as exc:
                await self._poll(str(exc))  # until cancelled
            except (httpx.HTTPError, AgentAPIError, TimeoutError, _StreamDead) as exc:
                refused = self._failed(exc, refused)
                if refused >= _REFUSALS_BEFORE_POLLING:  # a lasting refusal, not a hiccup: poll instead
                    await self._poll(f"GET /events answered {getattr(exc, 'status', None)} {refused} times in a row")
            except Exception as exc:  # a bug reading what agentapi sent: this attempt's failure only
                log.error("agentapi stream failed unexpectedly", error=_short(exc))
                self._set_state("disconnected", error=_short(exc), quiet=True)
            else:
                refused = 0
                if closed:
                    self._set_state("connecting", "agentapi closed the stream")
            # A stream that lived a while was healthy: reconnect at once (a replay is cheap).
            failures = 0 if time.monotonic() - started > 5.0 else failures + 1
            if self.problem is not None and self.state != "connected":
                failures = max(failures, 64)  # a refusal that lasts: retry at the cap, quietly
            if failures:
                await anyio.sleep(full_jitter(failures, self.backoff_base, self.backoff_max))

    def _failed(self, exc: BaseException, refused: int) -> int:
        """Log a failed attempt (state changes only); the new count of refusals in a row."""
        host_refused = isinstance(exc, AgentAPIError) and exc.host_refused
        if host_refused:
            self._set_problem(str(exc))
            self._set_state("disconnected", quiet=True, error="Host header refused")
            return 0
        self._set_state("disconnected", error=_short(exc))
        status = getattr(exc, "status", None)
        return refused + 1 if status is not None and status < 500 else 0

    async def _stream_events(self) -> bool:
        """One connection to ``/events``. True when agentapi closed the stream at an event
        boundary (its stop, or a slow subscriber dropped); raises for everything else."""
        request = self.client.build_request(
            "GET", f"{self.base_url}/events", headers=EVENTS_HEADERS, timeout=httpx.Timeout(self.connect_timeout, read=None)
        )
        with anyio.fail_after(self.connect_timeout):  # the headers come at once from a live agentapi
            response = await self.client.send(request, stream=True)
        try:
            await self._check_events_response(response)
            _keepalive(response)
            _larger_reads(response)
            self._dead = None
            with anyio.CancelScope() as scope:
                self._stream_scope = scope
                closed = await self._read_stream(response)
            self._stream_scope = None
            if scope.cancelled_caught and self._dead is not None:
                raise _StreamDead(self._dead)
            return closed
        finally:
            self._stream_scope = None
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _check_events_response(self, response: httpx.Response) -> None:
        status = response.status_code
        if status in _NO_EVENT_STREAM:
            raise _NoEvents(f"GET /events answered {status}")
        content_type = response.headers.get("content-type", "").partition(";")[0].strip()
        if 200 <= status < 300 and content_type != "text/event-stream":
            raise _NoEvents(f"GET /events answered {status} {content_type or 'without a content type'}"[:120])
        if status != 200:
            raise await _refusal(response, "GET /events", self.base_url)
        _check_encoding(response, "GET /events")

    async def _read_stream(self, response: httpx.Response) -> bool:
        parser = SSEParser(self.max_event_bytes, self.max_event_bytes)
        replay: dict[int, Message] | None = {}  # by id; None once the replay is over
        self._last_seen = time.monotonic()
        try:
            async for chunk in response.aiter_raw():
                self._last_seen = time.monotonic()
                for event in parser.feed(chunk):
                    replay = self._event(event, replay)
        except httpx.RemoteProtocolError:
            if parser.pending:
                raise AgentAPIError("the event stream was cut inside an event") from None
            return True  # agentapi's stop ends the chunked body abruptly: not a protocol error
        if parser.pending:
            raise AgentAPIError("the event stream ended inside an event")
        return True

    def _event(self, event: SSEvent, replay: dict[int, Message] | None) -> dict[int, Message] | None:
        """Handle one event; returns the replay collection (None once the replay is merged)."""
        kind = event.event
        try:
            data = _json_loads(event.data)
            if kind == "message_update":
                message = parse_message(data, content_key="message", clean=_may_hold_surrogates(event.data))
                if replay is None:
                    self.buffer.apply(message)
                else:  # keep only what the buffer could hold: memory stays bounded
                    replay[message.id] = self.buffer.clip(message)
                    if len(replay) > self.buffer.max_messages:
                        del replay[min(replay)]
            elif kind == "status_change":
                if replay is not None:  # the replay ends with the first status_change
                    self._merge([replay[i] for i in sorted(replay)])
                    replay = None
                    self._set_problem(None)
                    self._set_state("connected")
                self._set_agent_status(data.get("status") if isinstance(data, dict) else None)
            elif kind == "agent_error":
                self._agent_error(data)
            else:
                log.debug("unknown agentapi event skipped", sse_event=kind[:60])
        except (ValueError, InvalidMessage, AttributeError) as exc:
            log.warning("malformed agentapi event skipped", sse_event=kind[:60], reason=_short(exc))
        return replay

    async def _watch_idle(self) -> None:
        """While a stream is open and silent for ``idle_probe`` seconds, ask ``GET /status``;
        if agentapi does not answer, drop the stream (the tail reconnects)."""
        while True:
            wait = self._last_seen + self.idle_probe - time.monotonic()
            if wait > 0:
                await anyio.sleep(wait)
                continue
            scope = self._stream_scope
            if scope is not None:
                await self._probe(scope)
            self._last_seen = time.monotonic()

    async def _probe(self, scope: anyio.CancelScope) -> None:
        try:
            await fetch_status(self.client, self.base_url, self.connect_timeout)
        except AgentAPIError as exc:
            if self._stream_scope is scope:
                self._dead = f"no event for {self.idle_probe:g} s and agentapi does not answer: {exc}"
                scope.cancel()
        else:
            log.debug("event stream idle; agentapi answers", seconds=round(time.monotonic() - self._last_seen))

    async def _poll(self, reason: str) -> None:
        if self.state != "polling":
            self._set_state("polling", reason=f"no usable event stream: {reason}")
        failures = 0
        while True:
            try:
                view = await fetch_messages(
                    self.client, self.base_url, POLL_DEADLINE, buffer=self.buffer, idle_timeout=self.connect_timeout,
                    max_item=self.max_event_bytes,
                )
            except AgentAPIError as exc:
                failures += 1
                self._poll_failed(exc, reason, failures)
            else:
                if failures:
                    log.info("agentapi poll recovered", failures=failures)
                failures = 0
                self._set_problem(None)
                self._merge(view)
                await self._poll_status()
            await anyio.sleep(self.poll_interval)

    def _poll_failed(self, exc: AgentAPIError, reason: str, failures: int) -> None:
        if exc.host_refused:
            self._set_problem(str(exc))
        elif exc.status == 404:
            if self.problem is None or not self.problem.startswith(_NEITHER):
                log.error(_NEITHER, url=self.base_url, events=reason, error=str(exc))
            self.problem = f"{_NEITHER} (GET /events: {reason}; GET /messages answered 404)"
        elif failures == 1:
            log.warning("agentapi poll failed", error=str(exc))

    async def _poll_status(self) -> None:
        with contextlib.suppress(AgentAPIError):  # the status only drives checkpoints; the messages matter
            self._set_agent_status(await fetch_status(self.client, self.base_url, self.connect_timeout))


def _larger_reads(response: httpx.Response) -> None:
    """Read the event stream's socket 256 KiB at a time instead of httpcore's 64 KiB: a 64 KiB
    ``message_update`` then costs one pass through httpx, httpcore and h11 instead of two or
    three (``make bench``: ingest about 8 % less CPU). httpcore reads ``READ_NUM_BYTES`` per
    receive, a class attribute; it is set on this one connection, found through the response's
    stream wrappers. Best effort: if httpx or httpcore change those, nothing happens."""
    stream: Any = response.stream
    for name in ("_stream", "_httpcore_stream", "_stream", "_connection"):
        stream = getattr(stream, name, None)
    if stream is not None and isinstance(getattr(stream, "READ_NUM_BYTES", None), int):
        stream.READ_NUM_BYTES = 256 * 1024


def _keepalive(response: httpx.Response) -> None:
    """TCP keepalive on the stream's socket (Linux options where present), best effort."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if not isinstance(sock, socket.socket):
        return
    idle, interval, count = KEEPALIVE
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        pass


_NEITHER = "agentapi serves neither /events nor /messages: nothing to tail (check AGENTD_AGENTAPI_URL)"

#: ``GET /events`` statuses that mean "this server has no event stream" (not "not now").
_NO_EVENT_STREAM = frozenset({404, 405, 501})


#: Consecutive 3xx/4xx answers from GET /events (other than the no-stream ones) before polling.
_REFUSALS_BEFORE_POLLING = 3


class _NoEvents(Exception):
    """``GET /events`` gives no usable event stream (see :data:`_NO_EVENT_STREAM`, or a 2xx
    that is not ``text/event-stream``): poll instead. The message says what it answered."""


def _short(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
