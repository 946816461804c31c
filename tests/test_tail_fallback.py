"""The tail's choice between the event stream and polling, end to end through ``agentd run``.

A server with no usable event stream -- ``GET /events`` answers 405 or 501, or 200 with a body
that is not ``text/event-stream`` (HTML, JSON, no content type) -- must make the tail poll
``GET /messages``: retrying the stream there forever would hold no messages, and an agentapi
gone by the stop would leave nothing to store. A passing failure (500/502/503) must not: the
tail reconnects to the stream and is ``connected`` once ``/events`` works.

Every case runs the real daemon in-process (:func:`agentd.daemon.run` in a task, stopped by a
real SIGTERM) against a :class:`FakeCoderd` and a :class:`FakeAgentAPI` whose ``/events`` (or
``/messages``) is answered by a small handler of this module, all on 127.0.0.1, on asyncio and
trio. What the tail did is read from the control socket's status and the JSON log; what was
stored, from coderd.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import LONG_DEADLINE, WELL_BEFORE, assert_token_absent, daemon_in_task, daemon_status, wait_status, wait_until

from agentd.settings import load_settings
from agentd.testing import FakeAgentAPI, FakeCoderd, generic_conversation, serve
from agentd.testing.http import Exchange

pytestmark = pytest.mark.anyio

TOKEN = "agt-" + uuid.uuid4().hex  # distinctive: any leak into the log is unmistakable
TASK = str(uuid.uuid4())

Answer = Callable[[Exchange], Awaitable[None]]


# ---------------------------------------------------------------------------------------------
# servers


def plain(status: int, content_type: str | None, body: bytes) -> Answer:
    async def answer(ex: Exchange) -> None:
        headers = [("content-type", content_type)] if content_type else []
        await ex.respond(status, headers, body)

    return answer


class Overridden:
    """``api``'s handler, except that ``path`` is answered by ``answer`` for its first ``times``
    requests (None: always). ``hits`` counts the requests for ``path``."""

    def __init__(self, api: FakeAgentAPI, path: str, answer: Answer, times: int | None = None) -> None:
        self.api, self.path, self.answer, self.times = api, path, answer, times
        self.hits = 0

    async def handle(self, ex: Exchange) -> None:
        if ex.path == self.path:
            self.hits += 1
            if self.times is None or self.hits <= self.times:
                await self.answer(ex)
                return
        await self.api.handle(ex)


@asynccontextmanager
async def stoppable(handler: Callable[[Exchange], Awaitable[None]]) -> AsyncIterator[tuple[str, Callable[[], Awaitable[None]]]]:
    """Serve ``handler``; yields ``(url, stop)``: awaiting ``stop()`` closes the server
    (agentapi going away before the workspace stops)."""
    stop, closed = anyio.Event(), anyio.Event()
    url: list[str] = []

    async def serving(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with serve(handler) as server:
                url.append(server.url)
                task_status.started()
                await stop.wait()
        finally:
            closed.set()

    async def stop_server() -> None:
        stop.set()
        with anyio.fail_after(30):
            await closed.wait()

    async with anyio.create_task_group() as tg:
        await tg.start(serving)
        try:
            yield url[0], stop_server
        finally:
            stop.set()


# ---------------------------------------------------------------------------------------------
# the daemon, in-process


class Daemon:
    def __init__(self, sock: Path, log_stream: io.StringIO) -> None:
        self.sock = sock
        self.log_stream = log_stream
        self.done = anyio.Event()
        self.status: int | None = None
        self.signalled: float | None = None
        self.exited: float | None = None

    async def sigterm_and_wait(self, timeout: float = 10.0) -> int:
        assert not self.done.is_set(), "no SIGTERM to pytest once the daemon's receiver is gone"
        self.signalled = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        await wait_until(self.done.is_set, timeout, "the daemon to return")
        assert self.status is not None
        return self.status

    @property
    def stop_seconds(self) -> float:
        assert self.signalled is not None and self.exited is not None
        return self.exited - self.signalled

    def output(self) -> str:
        return self.log_stream.getvalue()

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)  # strict: a broken log line fails the test
                if entry.get("event") == name:
                    out.append(entry)
        return out


@pytest.fixture
def agentd(short_dir: Path, log_stream: io.StringIO):
    """``start(coderd_url, agentapi_url)``: ``agentd.daemon.run`` in a task of the test's loop."""

    @asynccontextmanager
    async def start(coderd_url: str, agentapi_url: str) -> AsyncIterator[Daemon]:
        sock = short_dir / "agentd.sock"
        settings = load_settings(
            coderd_url=coderd_url,
            agent_token=TOKEN,
            task_id=TASK,
            agentapi_url=agentapi_url,
            state_dir=str(short_dir / "state"),
            socket=str(sock),
            shutdown_timeout=LONG_DEADLINE,
            checkpoint_interval=0,  # only the stop uploads
            log_format="json",
            log_level="info",
        )
        handle = Daemon(sock, log_stream)
        # "agentd started" is logged once the control socket listens (its file appears a little
        # earlier: bound, not yet listening) and the signal receiver is in place, so from then
        # on SIGTERM is the daemon's and the status can be asked.
        async with daemon_in_task(settings, handle, lambda: '"agentd started"' in handle.output(), "agentd's start line"):
            yield handle
        assert_token_absent(TOKEN, handle.output())

    return start


def assert_same(stored: list[dict[str, Any]], api: FakeAgentAPI) -> None:
    got = [(m["id"], m["role"], m["content"], m["time"]) for m in stored]
    want = [(m.id, m.role, m.content, m.time) for m in api.messages]
    assert got == want


# ---------------------------------------------------------------------------------------------
# no usable event stream: poll


NO_STREAM = {
    "405": (plain(405, "application/problem+json", b'{"title":"Method Not Allowed","status":405}'), "405"),
    "501": (plain(501, "text/plain; charset=utf-8", b"Not Implemented\n"), "501"),
    "200 html": (plain(200, "text/html; charset=utf-8", b"<!doctype html><title>agentapi</title><p>chat UI</p>"), "text/html"),
    "200 json": (plain(200, "application/json", b'{"messages":[]}'), "application/json"),
    "200 no type": (plain(200, None, b"no events here\n"), "without a content type"),
}


@pytest.mark.parametrize("case", list(NO_STREAM))
async def test_no_usable_event_stream_is_polled_and_stored_after_agentapi_is_gone(case: str, agentd, short_dir: Path) -> None:
    answer, reason = NO_STREAM[case]
    api = FakeAgentAPI()
    api.load(generic_conversation(6))
    server = Overridden(api, "/events", answer)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve(), stoppable(server.handle) as (url, stop_api):
        async with agentd(coderd.url, url) as daemon:
            status = await wait_status(daemon.sock, lambda s: s["messages"] == 6)
            assert status["source"]["state"] == "polling"
            # It keeps following the conversation by polling.
            api.add_message("agent", "written while the tail polls")
            await wait_status(daemon.sock, lambda s: s["messages"] == 7 and s["newest_id"] == 6)
            polls = api.requests["/messages"]
            await stop_api()  # agentapi stops first: the final refresh cannot help
            assert await daemon.sigterm_and_wait() == 0, daemon.output()
    assert polls >= 2
    assert server.hits == 1, "the stream was asked for once, then never retried"
    snap = coderd.stored.get(TASK)
    assert snap is not None, daemon.output()
    assert_same(snap.messages, api)
    assert len(snap.messages) == 7
    [polling] = daemon.events("agentapi polling")
    assert reason in polling["reason"], polling
    assert daemon.events("agentapi disconnected") == [], "it retried the stream"
    assert daemon.events("agentapi connected") == []
    assert len(daemon.events("refresh failed; using the buffer as it is")) == 1  # agentapi was gone
    assert daemon.events("snapshot stored")[0]["messages"] == 7
    assert daemon.stop_seconds < WELL_BEFORE


async def test_messages_404_too_is_logged_once_then_recovery(agentd, short_dir: Path) -> None:
    """``/events`` 404 and ``/messages`` 404: one clear error, not one per poll; once
    ``/messages`` answers, the tail recovers and the conversation is stored."""
    api = FakeAgentAPI(events=False)
    api.load(generic_conversation(4))
    server = Overridden(api, "/messages", plain(404, "text/plain; charset=utf-8", b"404 page not found\n"), times=3)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve(), stoppable(server.handle) as (url, stop_api):
        async with agentd(coderd.url, url) as daemon:
            await wait_until(lambda: server.hits >= 3, 6, "three polls answered 404")
            status = await daemon_status(daemon.sock)
            assert status["source"]["state"] == "polling" and status["messages"] == 0
            [error] = daemon.events("agentapi serves neither /events nor /messages: nothing to tail (check AGENTD_AGENTAPI_URL)")
            assert error["level"] == "error" and error["url"] == url
            assert "404" in error["events"] and "404" in error["error"]
            assert daemon.events("agentapi poll failed") == [], "the 404 is said once, clearly"
            await wait_status(daemon.sock, lambda s: s["messages"] == 4)
            [recovered] = daemon.events("agentapi poll recovered")
            assert recovered["failures"] == 3
            await stop_api()
            assert await daemon.sigterm_and_wait() == 0, daemon.output()
    assert len(daemon.events("agentapi serves neither /events nor /messages: nothing to tail (check AGENTD_AGENTAPI_URL)")) == 1
    snap = coderd.stored.get(TASK)
    assert snap is not None, daemon.output()
    assert_same(snap.messages, api)


# ---------------------------------------------------------------------------------------------
# a passing failure: reconnect to the stream


@pytest.mark.parametrize("code", [500, 502, 503])
async def test_a_5xx_from_events_reconnects_instead_of_polling(code: int, agentd, short_dir: Path) -> None:
    api = FakeAgentAPI()
    api.load(generic_conversation(5))
    server = Overridden(api, "/events", plain(code, "text/plain; charset=utf-8", b"agentapi is starting\n"), times=2)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve(), stoppable(server.handle) as (url, _stop_api):
        async with agentd(coderd.url, url) as daemon:
            status = await wait_status(daemon.sock, lambda s: s["source"]["state"] == "connected", timeout=8)
            assert status["messages"] == 5
            assert server.hits == 3, "two refused streams, then the working one"
            assert api.subscribers == 1
            # Live over the stream, not by polling.
            api.add_message("user", "and now over SSE")
            await wait_status(daemon.sock, lambda s: s["messages"] == 6)
            assert api.requests["/messages"] == 0, "it polled instead of reconnecting"
            assert await daemon.sigterm_and_wait() == 0, daemon.output()
    assert daemon.events("agentapi polling") == []
    [disconnected] = daemon.events("agentapi disconnected")  # a state change, logged once for both failures
    assert f"answered {code}" in disconnected["error"], disconnected
    [connected] = daemon.events("agentapi connected")
    assert connected["was"] == "disconnected"
    snap = coderd.stored.get(TASK)
    assert snap is not None
    assert_same(snap.messages, api)


# ---------------------------------------------------------------------------------------------
# a lasting refusal: poll after a few tries


@pytest.mark.parametrize("code", [400, 410, 302])
async def test_a_lasting_4xx_or_3xx_from_events_ends_in_polling(code: int, agentd, short_dir: Path) -> None:
    """Not a "no stream here" answer, but not a passing failure either: after three in a row
    the tail polls instead of holding no messages forever."""
    api = FakeAgentAPI()
    api.load(generic_conversation(5))
    server = Overridden(api, "/events", plain(code, "text/plain", b"refused\n"))
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve(), stoppable(server.handle) as (url, stop_api):
        async with agentd(coderd.url, url) as daemon:
            status = await wait_status(daemon.sock, lambda s: s["messages"] == 5, timeout=10)
            assert status["source"]["state"] == "polling"
            await stop_api()
            assert await daemon.sigterm_and_wait() == 0, daemon.output()
    assert server.hits == 3, "three tries at the stream, then polling"
    [polling] = daemon.events("agentapi polling")
    assert f"answered {code} 3 times in a row" in polling["reason"], polling
    snap = coderd.stored.get(TASK)
    assert snap is not None, daemon.output()
    assert_same(snap.messages, api)
