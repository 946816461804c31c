"""Hostile peers on raw sockets (issue 9), shared by the tests and ``python -m bench hostile``.

Not the friendly stand-ins: small HTTP/1.1 servers on loopback that send bytes no real agentapi
or coderd would.

* agentapi: :func:`hostile_events` (an SSE line that never ends, ``data:`` lines with no blank
  line, both streamed as fast as the reader takes them) and :func:`hostile_messages` (no event
  stream; a gzip'd ``/messages``, or a long conversation's ``/messages`` of about 300 MB),
  served by :class:`RawServer`.
* coderd: :class:`HostileCoderd` answers the first requests with raw bytes (:func:`nested_503`,
  :func:`superscript_retry_after_503`, :func:`gzip_bomb_503`, :func:`html_200`), then 204.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

Send = Callable[[bytes], Awaitable[None]]
Respond = Callable[[str, Send], Awaitable[None]]

#: The ``time`` of every message the hostile agentapi sends (RFC 3339).
T0 = "2026-01-01T00:00:00Z"
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
#: Messages in the long conversation of :func:`hostile_messages` (about 64 KiB each: ~300 MB).
LONG_CONVERSATION = 4600


# ---------------------------------------------------------------------------------------------
# agentapi


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk of ``data`` (chunked transfer coding)."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


class RawServer:
    """A minimal HTTP/1.1 server on a raw socket: reads a request head, hands ``(path, send)``
    to ``respond`` and closes. Counts requests per path in ``hits``."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.hits: dict[str, int] = {}
        self.url = ""

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[RawServer]:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.url = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"

        async def one(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                head = b""
                with anyio.move_on_after(10):
                    while b"\r\n\r\n" not in head:
                        head += await stream.receive()
                path = head.split(b" ", 2)[1].decode("latin-1") if head.count(b" ") >= 2 else "?"
                self.hits[path] = self.hits.get(path, 0) + 1
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    await self.respond(path, stream.send)

        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, one)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()


def hostile_events(attack: str) -> Respond:
    """agentapi whose ``/events`` replays one message ("hello"), then sends, as fast as the
    reader takes it and forever, an SSE line that never ends (``attack="endless-line"``) or
    ``data:`` lines with no blank line (``"data-without-blank-line"``). Other paths: 503."""
    if attack not in ("endless-line", "data-without-blank-line"):
        raise ValueError(f"unknown attack {attack!r}")
    piece = b"x" * 262_144 if attack == "endless-line" else (b"data: " + b"y" * 1000 + b"\n") * 64

    async def respond(path: str, send: Send) -> None:
        if path != "/events":
            await send(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            return
        replay = b'event: message_update\ndata: {"id":0,"role":"agent","message":"hello","time":"' + T0.encode() + b'"}\n\n'
        replay += b'event: status_change\ndata: {"status":"stable","agent_type":"claude"}\n\n'
        await send(SSE_HEAD + chunk(replay + (b"data: " if attack == "endless-line" else b"")))
        while True:  # as fast as agentd reads, forever
            await send(chunk(piece))

    return respond


def hostile_messages(case: str, total: int = LONG_CONVERSATION) -> Respond:
    """agentapi with no event stream (404): ``/messages`` is a gzip'd answer (``case="gzip-bomb"``,
    256 MiB of ``0`` in about 256 KiB) or a long conversation of ``total`` messages of about
    64 KiB of box drawing each (``"long-conversation"``, ~300 MB chunked). ``/status``: stable."""
    if case not in ("gzip-bomb", "long-conversation"):
        raise ValueError(f"unknown case {case!r}")
    content = "─" * 21_800  # ~64 KiB of box drawing in UTF-8
    bomb = gzip.compress(b"0" * (256 << 20), compresslevel=9) if case == "gzip-bomb" else b""
    items: list[bytes] = []  # the conversation's items, built once

    async def respond(path: str, send: Send) -> None:
        if path == "/events":
            await send(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        elif path == "/messages" and case == "gzip-bomb":
            await send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
                       b"content-length: %d\r\n\r\n" % len(bomb) + bomb)
        elif path == "/messages":
            await send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
            await send(chunk(b'{"$schema":"x","messages":['))
            if not items:
                for i in range(total):
                    role = "agent" if i % 2 == 0 else "user"
                    item = json.dumps({"id": i, "content": f"{i} {content}", "role": role, "time": T0}, ensure_ascii=False)
                    items.append(item.encode() + (b"," if i < total - 1 else b""))
            for start in range(0, total, 16):
                await send(chunk(b"".join(items[start : start + 16])))
            await send(chunk(b"]}") + b"0\r\n\r\n")
        else:
            await send(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n{"status":"stable"} ')

    return respond


# ---------------------------------------------------------------------------------------------
# coderd (raw HTTP/1.1 answers)


def answer(status: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer (``Connection: close``), bytes."""
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + body


def nested_503(depth: int = 100_000, retry_after: str | None = None) -> bytes:
    """A 503 whose JSON body is ``depth`` arrays deep: ``json.loads`` raises RecursionError."""
    headers = {"Content-Type": "application/json"}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return answer("503 Service Unavailable", headers, b"[" * depth + b"]" * depth)


def superscript_retry_after_503() -> bytes:
    """``Retry-After: ²`` (UTF-8 on the wire; ``"²".isdigit()`` is True, ``int("²")`` fails)."""
    return answer("503 Service Unavailable", {"Content-Type": "application/json", "Retry-After": "²"},
                  b'{"message":"busy"}')


@functools.cache
def gzip_bomb(mib: int = 1024) -> bytes:
    """A valid gzip member of ``mib`` MiB of zeros in about 1 KiB per MiB: the same raw deflate
    block (full flush: no back-references across it) repeated, then the CRC and size."""
    zeros = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + block * mib + deflate.flush() + struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF)


def gzip_bomb_503() -> bytes:
    """A 503 with ``Content-Encoding: gzip`` whose body inflates to 1 GiB (about 1 MiB sent)."""
    return answer("503 Service Unavailable", {"Content-Type": "application/json", "Content-Encoding": "gzip"}, gzip_bomb())


HTML = b"<!doctype html><html><head><title>Sign in</title></head><body>Sign in to continue</body></html>"


def html_200() -> bytes:
    """What a proxy's login page or captive portal answers instead of coderd's 204."""
    return answer("200 OK", {"Content-Type": "text/html; charset=utf-8"}, HTML)


NO_CONTENT = answer("204 No Content", {})


@dataclass
class HostileCoderd:
    """Answers the n-th request with ``answers[n]`` (raw bytes), every later one with 204 and
    keeps that request's body in ``stored``. ``requests``: (request line, body) in order."""

    answers: list[bytes]
    always: bytes | None = None  # answer every request with this instead (never 204)
    requests: list[tuple[str, bytes]] = field(default_factory=list)
    stored: list[bytes] = field(default_factory=list)
    url: str = ""

    async def _read_request(self, stream: anyio.abc.ByteStream) -> tuple[str, bytes] | None:
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > 64 * 1024:
                return None
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        while len(body) < length:
            try:
                body += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None
        return lines[0], body[:length]

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = await self._read_request(stream)
            if request is None:
                return
            n = len(self.requests)
            self.requests.append(request)
            if self.always is not None:
                raw = self.always
            elif n < len(self.answers):
                raw = self.answers[n]
            else:
                raw = NO_CONTENT
                self.stored.append(request[1])
            try:
                for start in range(0, len(raw), 64 * 1024):
                    await stream.send(raw[start : start + 64 * 1024])
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # agentd read what it wanted and closed: as it should

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[HostileCoderd]:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self.url = f"http://127.0.0.1:{port}"
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, self._handle)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    def stored_messages(self) -> list[dict[str, Any]]:
        """The messages of the last body stored (AssertionError when none was)."""
        assert self.stored, f"nothing stored; requests: {[line for line, _ in self.requests]}"
        messages: list[dict[str, Any]] = json.loads(self.stored[-1])["messages"]
        return messages
