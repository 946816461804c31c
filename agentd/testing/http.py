"""A small HTTP/1.1 server for the test stand-ins: anyio listeners + h11.

The stand-ins (:mod:`agentd.testing.fake_agentapi`, :mod:`agentd.testing.fake_coderd`) need an
HTTP server that real clients (httpx, curl, agentd itself) can talk to over loopback, that runs
on both asyncio and trio, and that can misbehave on purpose. This module is that server. HTTP
framing is done by h11 (sans-IO); nothing here parses HTTP by hand.

Usage::

    async def handler(ex: Exchange) -> None:
        body = await ex.read_body(limit=65_536)      # raises BodyTooLarge past 65 536 bytes
        await ex.respond(200, [("content-type", "text/plain")], b"ok")

    async with serve(handler, port=0) as server:
        ...  # server.url == "http://127.0.0.1:<port>"

One task per connection runs inside a task group owned by :func:`serve`; leaving the ``async
with`` block closes the listener and cancels every connection. Keep-alive is supported: after a
handler finishes, any unread request body is drained (bounded by :data:`DRAIN_LIMIT` bytes and
:data:`DRAIN_TIMEOUT` seconds) and the connection waits for the next request.

Fault injection, all on :class:`Exchange`:

* :meth:`Exchange.hang` -- never answer; returns when the client goes away.
* :meth:`Exchange.abort` -- close the TCP connection now (optionally with an RST), e.g. in the
  middle of a streamed body.
* :meth:`Exchange.send_raw` -- write raw bytes to the socket, bypassing h11 (the connection is
  closed after the handler returns, since its framing is no longer trustworthy).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import anyio
import h11
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.tls import TLSListener

__all__ = [
    "DRAIN_LIMIT",
    "DRAIN_TIMEOUT",
    "BodyTooLarge",
    "ConnectionClosed",
    "Exchange",
    "Handler",
    "Served",
    "Server",
    "StreamingResponse",
    "serve",
]

log = logging.getLogger(__name__)

#: Bytes asked from the socket per receive call.
READ_SIZE = 65_536
#: After a handler returns without reading the whole request body, at most this many further
#: body bytes are read and discarded so the client sees the response instead of a TCP reset.
DRAIN_LIMIT = 16 * 1024 * 1024
#: ... and for at most this many seconds. Past either bound the connection is closed.
DRAIN_TIMEOUT = 2.0

_CLOSED_ERRORS: tuple[type[BaseException], ...] = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    ssl.SSLError,
    OSError,
)

Headers = Iterable[tuple[str, str]] | Mapping[str, str]
Handler = Callable[["Exchange"], Awaitable[None]]


class ConnectionClosed(Exception):
    """The peer went away, or the connection was closed by a fault injection.

    Raised by every write on :class:`Exchange` / :class:`StreamingResponse` once the connection
    is gone. Handlers may let it propagate: the server treats it as a normal end of connection.
    """


class BodyTooLarge(Exception):
    """The request body is longer than the ``limit`` given to :meth:`Exchange.read_body`.

    Like Go's ``http.MaxBytesReader``: at most ``limit + 1`` bytes were read, which is how the
    reader knows the body is over the limit. ``partial`` holds exactly those ``limit + 1`` bytes;
    the rest of the body was not read (the server drains it after the response).
    """

    def __init__(self, limit: int, partial: bytes) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit
        self.partial = partial


def _header_list(headers: Headers | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return [(str(k), str(v)) for k, v in headers.items()]
    return [(str(k), str(v)) for k, v in headers]


def _only_connection_closed(exc: BaseException) -> bool:
    """True if ``exc`` is a ConnectionClosed, possibly wrapped in (nested) exception groups."""
    if isinstance(exc, ConnectionClosed):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_connection_closed(e) for e in exc.exceptions)
    return False


class _Connection:
    """One accepted connection: the byte stream plus its h11 state machine."""

    def __init__(self, stream: ByteStream, server: Server) -> None:
        self.stream = stream
        self.server = server
        self.h11 = h11.Connection(h11.SERVER)
        self.closed = False
        #: Set once raw bytes bypassed h11: the connection must close after the handler.
        self.tainted = False
        self._eof = False

    async def receive_into_h11(self) -> None:
        """Read once from the socket and feed the bytes (or EOF) to h11."""
        if self._eof:
            raise ConnectionClosed("peer closed the connection")
        try:
            data = await self.stream.receive(READ_SIZE)
        except anyio.EndOfStream:
            data = b""
        except _CLOSED_ERRORS as exc:
            self.closed = True
            raise ConnectionClosed(str(exc) or type(exc).__name__) from exc
        if not data:
            self._eof = True
        self.h11.receive_data(data)

    async def next_event(self) -> Any:
        """The next h11 event, reading from the socket as needed (never returns NEED_DATA)."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                if self._eof:
                    # h11 already knows about EOF; it answers ConnectionClosed or raises.
                    raise ConnectionClosed("peer closed the connection")
                await self.receive_into_h11()
                continue
            return event

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionClosed("connection already closed")
        if not data:
            return
        try:
            await self.stream.send(data)
        except _CLOSED_ERRORS as exc:
            self.closed = True
            raise ConnectionClosed(str(exc) or type(exc).__name__) from exc

    async def send(self, event: Any) -> None:
        if self.closed:
            raise ConnectionClosed("connection already closed")
        try:
            data = self.h11.send(event)
        except h11.LocalProtocolError:
            # Our own state machine refused (e.g. writing after an abort): treat as closed.
            self.closed = True
            raise
        if data:
            await self.write(data)

    async def close(self, reset: bool = False) -> None:
        """Close the transport (idempotent); ``reset`` sends a TCP RST instead of a FIN."""
        self.closed = True
        if reset:
            sock = self.stream.extra(SocketAttribute.raw_socket, None)
            if sock is not None:
                with suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await anyio.aclose_forcefully(self.stream)


class StreamingResponse:
    """A response body sent in pieces with chunked transfer encoding (e.g. Server-Sent Events).

    Obtained from :meth:`Exchange.start_stream`. Every :meth:`send` is written to the socket at
    once (no buffering), so each chunk reaches the client as soon as it is sent.
    """

    def __init__(self, exchange: Exchange) -> None:
        self._ex = exchange
        self.ended = False

    async def send(self, data: bytes) -> None:
        """Send one chunk of body bytes (empty ``data`` is ignored). Raises ConnectionClosed."""
        if self.ended:
            raise RuntimeError("stream already ended")
        if data:
            await self._ex._conn.send(h11.Data(data=bytes(data)))

    async def end(self) -> None:
        """Finish the body properly (the terminating zero-length chunk); keep-alive continues."""
        if self.ended:
            return
        self.ended = True
        await self._ex._conn.send(h11.EndOfMessage())

    async def abort(self, reset: bool = False) -> None:
        """Close the connection without finishing the body: the client sees a truncated body."""
        self.ended = True
        await self._ex.abort(reset=reset)


class Exchange:
    """One request and the means to answer it; passed to the handler.

    Attributes: ``method`` (str, e.g. "POST"), ``target`` (the raw request target, e.g.
    "/a/b?x=1"), ``path`` (raw, still percent-encoded, without the query), ``query`` (raw query
    string without "?", "" if none), ``headers`` (list of (name, value), names lower-cased,
    in arrival order), ``http_version`` ("1.1"), ``client`` ((host, port) of the peer).
    """

    def __init__(self, conn: _Connection, request: h11.Request) -> None:
        self._conn = conn
        self.method: str = request.method.decode("ascii", "replace")
        self.target: str = request.target.decode("ascii", "replace")
        path, sep, query = self.target.partition("?")
        self.path: str = path
        self.query: str = query if sep else ""
        self.headers: list[tuple[str, str]] = [
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in request.headers
        ]
        self.http_version: str = request.http_version.decode("ascii", "replace")
        self.client: tuple[str, int] | None = None
        with suppress(Exception):  # pragma: no cover - unusual transports
            address = conn.stream.extra(SocketAttribute.remote_address)
            self.client = address if isinstance(address, tuple) else None  # a Unix socket's is a str
        self._body = bytearray()
        self._body_done = False
        self.responded = False
        self._stream: StreamingResponse | None = None

    # -- request ---------------------------------------------------------------------------

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``default``."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    async def read_body(self, limit: int | None = None) -> bytes:
        """Read the request body and return it (bytes).

        With ``limit`` (bytes), behaves like Go's ``http.MaxBytesReader``: reads at most
        ``limit + 1`` bytes; if the body has more than ``limit`` bytes, raises
        :class:`BodyTooLarge` carrying the first ``limit + 1`` bytes. Calling again after a
        complete read returns the same bytes. Raises ConnectionClosed if the client goes away.
        """
        if not self._body_done and self._conn.h11.they_are_waiting_for_100_continue:
            # curl sends "Expect: 100-continue" for bodies over 1 KiB and waits up to 1 s.
            await self._conn.send(h11.InformationalResponse(status_code=100, headers=[]))
        while not self._body_done:
            if limit is not None and len(self._body) > limit:
                raise BodyTooLarge(limit, bytes(self._body[: limit + 1]))
            try:
                event = await self._conn.next_event()
            except h11.RemoteProtocolError as exc:  # e.g. EOF in the middle of the body
                self._conn.closed = True
                raise ConnectionClosed(f"bad request body: {exc}") from exc
            if isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._body_done = True
            elif isinstance(event, h11.ConnectionClosed):
                self._conn.closed = True
                raise ConnectionClosed("peer closed the connection before the body ended")
            else:  # pragma: no cover - h11 only yields the above while their_state is SEND_BODY
                raise ConnectionClosed(f"unexpected event {event!r}")
        if limit is not None and len(self._body) > limit:
            raise BodyTooLarge(limit, bytes(self._body[: limit + 1]))
        return bytes(self._body)

    # -- normal responses ----------------------------------------------------------------------

    async def respond(self, status: int, headers: Headers | None = None, body: bytes = b"") -> None:
        """Send a complete response: ``status``, ``headers`` and ``body`` (bytes).

        ``Content-Length`` is added unless given. For 1xx/204/304 and HEAD no body is sent.
        """
        if self.responded:
            raise RuntimeError("response already started")
        hdrs = _header_list(headers)
        no_body = status in (204, 304) or 100 <= status < 200 or self.method == "HEAD"
        if not any(k.lower() == "content-length" for k, _ in hdrs) and not no_body:
            hdrs.append(("content-length", str(len(body))))
        self.responded = True
        await self._conn.send(h11.Response(status_code=status, headers=hdrs))
        if body and not no_body:
            await self._conn.send(h11.Data(data=body))
        await self._conn.send(h11.EndOfMessage())

    async def respond_json(self, status: int, obj: Any, headers: Headers | None = None) -> None:
        """Send ``obj`` as a JSON body (UTF-8, ``application/json``)."""
        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        hdrs = [("content-type", "application/json"), *_header_list(headers)]
        await self.respond(status, hdrs, body)

    async def start_stream(self, status: int = 200, headers: Headers | None = None) -> StreamingResponse:
        """Send the status line and headers now; the body follows in chunks.

        No ``Content-Length`` is sent, so h11 uses chunked transfer encoding (for HTTP/1.0
        clients it streams raw and closes at the end). Returns a :class:`StreamingResponse`.
        """
        if self.responded:
            raise RuntimeError("response already started")
        hdrs = [(k, v) for k, v in _header_list(headers) if k.lower() != "content-length"]
        self.responded = True
        await self._conn.send(h11.Response(status_code=status, headers=hdrs))
        self._stream = StreamingResponse(self)
        return self._stream

    # -- fault injection -----------------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        """Write ``data`` to the socket as is, bypassing h11 framing.

        The connection is closed when the handler returns (its framing is no longer known).
        Works before or after a response was started. Raises ConnectionClosed.
        """
        self._conn.tainted = True
        self.responded = True
        await self._conn.write(bytes(data))

    async def abort(self, reset: bool = False) -> None:
        """Close the connection now, whatever was sent so far.

        ``reset=True`` sets ``SO_LINGER`` to zero first so the peer gets a TCP RST instead of
        an orderly FIN. Further writes raise ConnectionClosed.
        """
        self.responded = True
        await self._conn.close(reset=reset)

    async def wait_closed(self) -> None:
        """Return when the client closes its side of the connection (EOF or error).

        Meant for long responses (SSE) so the handler notices a vanished client while idle.
        Bytes that arrive meanwhile are kept for h11 (pipelined requests are not lost).
        Do not call it while also calling :meth:`read_body` from another task.
        """
        while not self._conn.closed and not self._conn._eof:
            try:
                await self._conn.receive_into_h11()
            except ConnectionClosed:
                return

    async def hang(self) -> None:
        """Never answer: wait until the client goes away, then close the connection."""
        self.responded = True
        await self.wait_closed()
        await self._conn.close()


@dataclass
class Server:
    """A running server from :func:`serve`.

    ``host`` (str), ``port`` (int, the bound port), ``url`` ("http://127.0.0.1:PORT" or
    "https://..."), ``connections_total`` (accepted connections so far), ``connections_open``.
    """

    host: str
    port: int
    scheme: str
    connections_total: int = 0
    connections_open: int = 0
    _conns: set[_Connection] = field(default_factory=set, repr=False)
    _listener: Any = field(default=None, repr=False)
    _accepting: anyio.CancelScope | None = field(default=None, repr=False)
    _accept_done: anyio.Event = field(default_factory=anyio.Event, repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def close_connections(self, reset: bool = False) -> None:
        """Close every open connection now (the listener stays open)."""
        for conn in list(self._conns):
            await conn.close(reset=reset)

    async def stop_accepting(self) -> None:
        """Close the listener now (new connections are refused); open connections go on."""
        if self._accepting is not None:
            self._accepting.cancel()
            with anyio.move_on_after(5):
                await self._accept_done.wait()  # then close: an accept must not see a closed listener
        if self._listener is not None:
            await anyio.aclose_forcefully(self._listener)


class Served:
    """What a stand-in that runs a :class:`Server` offers: ``url``, ``port`` and ``wait_for``.

    The class using it sets ``self.server`` (a :class:`Server`, or None while not serving).
    """

    server: Server | None

    @property
    def url(self) -> str:
        """Base URL of the running server ("http://127.0.0.1:PORT")."""
        if self.server is None:
            raise RuntimeError("not serving; use `async with ....serve():`")
        return self.server.url

    @property
    def port(self) -> int:
        """Bound port of the running server."""
        if self.server is None:
            raise RuntimeError("not serving; use `async with ....serve():`")
        return self.server.port

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Poll ``predicate`` every 10 ms until true; raises TimeoutError after ``timeout`` s."""
        with anyio.fail_after(timeout):
            while not predicate():  # noqa: ASYNC110 - a predicate over the stand-in's state, polled for tests
                await anyio.sleep(0.01)


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"the test server binds loopback addresses only, not {host!r}")


async def _drain_request(conn: _Connection) -> bool:
    """Read and discard the rest of the current request body. True if it ended in bounds."""
    if conn.h11.they_are_waiting_for_100_continue:
        return False  # the client holds its body back until told to send it: just close
    drained = 0
    with anyio.move_on_after(DRAIN_TIMEOUT):
        while conn.h11.their_state is h11.SEND_BODY:
            event = await conn.next_event()
            if isinstance(event, h11.Data):
                drained += len(event.data)
                if drained > DRAIN_LIMIT:
                    return False
            elif isinstance(event, h11.ConnectionClosed):
                return False
        return True
    return False


async def _error_response(conn: _Connection, status: int, text: str) -> None:
    body = text.encode("utf-8")
    try:
        await conn.send(
            h11.Response(
                status_code=status,
                headers=[
                    ("content-type", "text/plain; charset=utf-8"),
                    ("content-length", str(len(body))),
                    ("connection", "close"),
                ],
            )
        )
        await conn.send(h11.Data(data=body))
        await conn.send(h11.EndOfMessage())
    except (ConnectionClosed, h11.LocalProtocolError):
        pass


async def _serve_connection(stream: ByteStream, handler: Handler, server: Server) -> None:
    conn = _Connection(stream, server)
    server.connections_total += 1
    server.connections_open += 1
    server._conns.add(conn)
    try:
        await _connection_loop(conn, handler)
    except ConnectionClosed:
        pass
    except Exception:  # never let one connection take the server down
        log.exception("test HTTP server: connection failed")
    finally:
        server._conns.discard(conn)
        server.connections_open -= 1
        await conn.close()


async def _connection_loop(conn: _Connection, handler: Handler) -> None:
    while True:
        try:
            event = await conn.next_event()
        except h11.RemoteProtocolError as exc:
            await _error_response(conn, exc.error_status_hint, f"bad request: {exc}\n")
            return
        if isinstance(event, h11.ConnectionClosed):
            return
        if not isinstance(event, h11.Request):  # pragma: no cover
            return
        ex = Exchange(conn, event)
        try:
            await handler(ex)
        except BaseException as exc:
            if _only_connection_closed(exc):
                return
            if not isinstance(exc, Exception):
                raise  # cancellation
            log.exception("test HTTP server: handler failed for %s %s", ex.method, ex.target)
            if not ex.responded and not conn.closed:
                await _error_response(conn, 500, "handler failed\n")
            return
        if conn.closed or conn.tainted:
            return
        try:
            if not ex.responded:
                await ex.respond(500, [("content-type", "text/plain")], b"handler did not respond\n")
            elif ex._stream is not None and not ex._stream.ended:
                await ex._stream.end()
        except h11.RemoteProtocolError:
            return
        if conn.h11.their_state is h11.SEND_BODY:
            try:
                if not await _drain_request(conn):
                    return
            except h11.RemoteProtocolError:
                return
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
        else:
            return


@asynccontextmanager
async def serve(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Server]:
    """Serve ``handler`` on ``host``:``port`` until the ``async with`` block exits.

    ``host`` must be a loopback address (default 127.0.0.1). ``port=0`` picks a free port;
    a fixed port may be reused right after a previous server on it closed (SO_REUSEADDR).
    With ``ssl_context`` (a server-side :class:`ssl.SSLContext`) the server speaks HTTPS.
    Yields a :class:`Server`. On exit the listener is closed and every connection cancelled.
    """
    _check_loopback(host)
    listener: Any = await anyio.create_tcp_listener(local_host=host, local_port=port)
    bound_port = listener.extra(SocketAttribute.local_port)
    if ssl_context is not None:
        listener = TLSListener(listener, ssl_context, standard_compatible=False)
    server = Server(host=host, port=bound_port, scheme="https" if ssl_context else "http")
    server._listener = listener
    server._accepting = anyio.CancelScope()

    async def on_connection(stream: ByteStream) -> None:
        await _serve_connection(stream, handler, server)

    async def accept(tg: Any) -> None:
        assert server._accepting is not None
        try:
            with server._accepting:
                await listener.serve(on_connection, tg)
        finally:
            server._accept_done.set()

    error: Exception | None = None
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(accept, tg)
        try:
            yield server
        except Exception as exc:  # re-raised below, outside the task group: not wrapped
            error = exc
        finally:
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
