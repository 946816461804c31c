"""The agentapi tail against the real agentapi's ways (the stand-in's defaults) and against
hostile peers.

* The SSE reader per the WHATWG ``text/event-stream`` rules (BOM, CR/LF/CRLF, ``retry:``,
  blocks without data, caps), including any split of the bytes (hypothesis).
* :class:`AgentAPITail` in-process against :class:`FakeAgentAPI` on loopback, both backends:
  an idle stream stays (no reconnect, no warning) while ``GET /status`` answers; a hung
  agentapi is found and the stream dropped; agentapi's Host check is said once and kept in
  ``tail.problem``; replayed ``agent_error`` events are logged once; agentapi's stop is an info
  line, a stream cut inside an event a warning; ``GET /messages`` keeps only what the buffer
  holds and refuses compressed answers.
* Hostile peers against a real ``agentd run`` process, with small raw-socket servers in place
  of agentapi: an SSE line that never ends, ``data:`` lines with no blank line, a gzip'd
  ``/messages``, and a long conversation's ``/messages`` of hundreds of MB. Peak RSS
  (``VmHWM``) must stay under :data:`PEAK_RSS_LIMIT`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import clean_env, json_lines, wait_until

from agentd.agentapi import AgentAPIError, AgentAPITail, SSEParser, StreamLimitError, fetch_messages
from agentd.buffer import RingBuffer
from agentd.testing import FakeAgentAPI, FakeCoderd, generic_conversation
from agentd.testing.hostile import LONG_CONVERSATION, RawServer, hostile_events, hostile_messages
from agentd.testing.http import Exchange, serve

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Peak resident memory (VmHWM) a real ``agentd run`` may reach under any hostile case here.
#: Idle it is about 47 MiB; the SSE line/event cap is 32 MiB.
PEAK_RSS_LIMIT = 128 * 2**20


# ---------------------------------------------------------------------------------------------
# the SSE reader (WHATWG rules)


def parse(chunks: list[bytes], **caps: int) -> tuple[list[tuple[str, bytes, str, int | None]], bool]:
    parser = SSEParser(**caps)
    out = []
    for chunk in chunks:
        out += [(e.event, e.data, e.id, e.retry) for e in parser.feed(chunk)]
    return out, parser.pending


def test_sse_leading_bom_is_skipped_even_split() -> None:
    stream = b"\xef\xbb\xbfevent: message_update\ndata: {}\n\n"
    for cut in range(len(stream) + 1):
        assert parse([stream[:cut], stream[cut:]]) == ([("message_update", b"{}", "", None)], False)
    # Only at the very start: a BOM later is part of a line (an unknown field here).
    assert parse([b"data: 1\n\n\xef\xbb\xbfevent: x\ndata: 2\n\n"])[0] == [
        ("message", b"1", "", None), ("message", b"2", "", None)]


def test_sse_line_ends_cr_lf_crlf_and_split_crlf() -> None:
    stream = b"event: a\rdata: 1\r\n\r\nevent: b\ndata: 2\n\nevent: c\r\ndata: 3\r\r"
    want = [("a", b"1", "", None), ("b", b"2", "", None), ("c", b"3", "", None)]
    assert parse([stream]) == (want, False)
    for cut in range(len(stream) + 1):  # a CRLF split between two reads is one line end
        assert parse([stream[:cut], stream[cut:]]) == (want, False), cut


def test_sse_retry_id_comment_and_blocks_without_data() -> None:
    events, pending = parse([
        b": a comment\n\n",
        b"retry: 3000\n\n",  # retry alone: no event (and never an error)
        b"retry: soon\n\n",  # not digits: ignored
        b"id: 7\n\n",  # id alone: no event
        b"event: status_change\n\n",  # no data: no event
        b"event: message_update\nretry: 10\ndata: {\"a\":1}\n\n",
        b"data\n\n",  # "data" with no colon: an empty data line, dispatched
        b"data:x\ndata: y\ndata:  z\n\n",  # lines joined with LF; one leading space dropped
        b"datax: 1\ndata: w\n\n",  # unknown field ignored
    ])
    assert events == [
        ("message_update", b'{"a":1}', "7", 10),
        ("message", b"", "7", None),
        ("message", b"x\ny\n z", "7", None),
        ("message", b"w", "7", None),
    ]
    assert not pending


def test_sse_end_inside_an_event_is_pending() -> None:
    assert parse([b"event: a\ndata: 1\n\nevent: b\n"])[1] is True
    assert parse([b"event: a\ndata: 1\n\ndata: 2"])[1] is True
    assert parse([b"event: a\ndata: 1\n\n"])[1] is False


def test_sse_caps_a_line_and_an_event_in_bytes() -> None:
    with pytest.raises(StreamLimitError, match="line"):
        parse([b"data: " + b"x" * 200], max_line=100)
    with pytest.raises(StreamLimitError, match="line"):
        parse([b"data: " + b"x" * 60, b"x" * 60], max_line=100)  # across reads
    with pytest.raises(StreamLimitError, match="event"):
        parse([b"data: 1234567890\n" * 20], max_line=100, max_event=100)
    # Under the caps, and the event count starts again after each event.
    assert len(parse([b"data: 1234567890\n\n" * 20], max_line=100, max_event=100)[0]) == 20


_FIELD = st.sampled_from([b"event: message_update", b"event: status_change", b"data: {\"id\": 1}", b"data:x",
                          b"id: 4", b"retry: 100", b": comment", b"data", b"\xe2\x94\x80 junk"])


@settings(max_examples=200, deadline=None)
@given(blocks=st.lists(st.lists(_FIELD, max_size=4), max_size=6),
       ends=st.sampled_from([b"\n", b"\r", b"\r\n"]), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_sse_any_split_gives_the_same_events(blocks: list[list[bytes]], ends: bytes, cuts: list[int]) -> None:
    stream = b"".join(ends.join(block) + ends + ends for block in blocks)
    whole = parse([stream])
    points = sorted({min(c, len(stream)) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert parse(pieces) == whole


# ---------------------------------------------------------------------------------------------
# the tail in-process against the stand-in


class Tail:
    """An :class:`AgentAPITail` running in a task, its log captured."""

    def __init__(self, tail: AgentAPITail, stream: io.StringIO) -> None:
        self.tail, self.stream = tail, stream

    def logs(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = json_lines(self.stream.getvalue())
        return [x for x in lines if event is None or x.get("event") == event]

    def levels(self, level: str) -> list[dict[str, Any]]:
        return [x for x in self.logs() if x.get("level") == level]


@asynccontextmanager
async def tailing(url: str, log_stream: io.StringIO, **options: Any) -> AsyncIterator[Tail]:
    buffer = RingBuffer(10, 65_536)
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        tail = AgentAPITail(client, url, buffer, **options)
        async with anyio.create_task_group() as tg:
            tg.start_soon(tail.run)
            try:
                yield Tail(tail, log_stream)
            finally:
                tg.cancel_scope.cancel()


class Overridden:
    """``api``'s handler, but ``path`` answered by ``answer`` while ``active()``."""

    def __init__(self, api: FakeAgentAPI, path: str, answer: Callable[[Exchange], Awaitable[None]]) -> None:
        self.api, self.path, self.answer = api, path, answer
        self.active = True
        self.hits = 0

    async def handle(self, ex: Exchange) -> None:
        if ex.path == self.path and self.active:
            self.hits += 1
            await self.answer(ex)
            return
        await self.api.handle(ex)


@pytest.mark.anyio
async def test_an_idle_stream_stays_without_warning_while_agentapi_answers(log_stream: io.StringIO) -> None:
    api = FakeAgentAPI()
    api.load(generic_conversation(3))
    async with api.serve(), tailing(api.url, log_stream, idle_probe=0.2) as t:
        await wait_until(lambda: t.tail.state == "connected", 10, "connected")
        # agentapi sends nothing while the agent idles: the tail asks GET /status instead.
        await wait_until(lambda: api.requests["/status"] >= 3, 15, "three idle probes")
        assert api.subscribers_total == 1, "an idle stream was dropped"
        assert t.tail.state == "connected"
        api.add_message("user", "still followed after the silence")
        await wait_until(lambda: t.tail.buffer.newest_id == 3, 10, "the live update")
    assert t.levels("warning") == [] and t.levels("error") == [], t.logs()


@pytest.mark.anyio
async def test_a_hung_agentapi_is_found_by_the_idle_probe(log_stream: io.StringIO) -> None:
    api = FakeAgentAPI()
    api.load(generic_conversation(2))

    async def hang(ex: Exchange) -> None:
        await ex.hang()

    server = Overridden(api, "/status", hang)
    async with serve(server.handle) as srv:
        api.server = srv
        async with tailing(srv.url, log_stream, idle_probe=0.3, connect_timeout=0.5) as t:
            await wait_until(lambda: t.tail.state == "connected", 10, "connected")
            await wait_until(lambda: api.subscribers_total >= 2, 15, "a reconnect after the probe failed")
            [gone] = t.logs("agentapi disconnected")[:1]
            assert gone["level"] == "warning" and "does not answer" in gone["error"], gone
            server.active = False
            await wait_until(lambda: t.tail.state == "connected", 10, "connected again")
        api.server = None


@pytest.mark.anyio
async def test_host_check_is_explained_once_and_kept_for_status(log_stream: io.StringIO) -> None:
    api = FakeAgentAPI(allowed_hosts=("localhost",))  # agentd asks for 127.0.0.1
    api.load(generic_conversation(2))
    async with api.serve(), tailing(api.url, log_stream, backoff_max=0.1) as t:
        await wait_until(lambda: api.host_refused >= 5, 15, "several refused attempts")
        problem = t.tail.problem
        assert problem is not None
        assert "--allowed-hosts 127.0.0.1" in problem and "AGENTAPI_ALLOWED_HOSTS=127.0.0.1" in problem
        assert "localhost" in problem
        errors = t.levels("error")
        assert [e["event"] for e in errors] == [problem], "said once, not per attempt"
        assert t.tail.state == "disconnected" and api.requests["/messages"] == 0, "no silent poll of 400s"
        # agentapi restarted with the host allowed: the tail follows and the problem is gone.
        api.allowed_hosts = ("*",)
        await wait_until(lambda: t.tail.state == "connected" and len(t.tail.buffer) == 2, 10, "connected")
        assert t.tail.problem is None
        assert t.logs("agentapi problem solved")


@pytest.mark.anyio
async def test_fetch_messages_host_refusal_says_why() -> None:
    api = FakeAgentAPI(allowed_hosts=("localhost",))
    async with api.serve(), httpx.AsyncClient(trust_env=False) as client:
        with pytest.raises(AgentAPIError) as caught:
            await fetch_messages(client, api.url, 5)
    assert caught.value.host_refused and caught.value.status == 400
    assert "--allowed-hosts" in str(caught.value)


@pytest.mark.anyio
async def test_replayed_agent_errors_are_logged_once(log_stream: io.StringIO) -> None:
    api = FakeAgentAPI()
    api.load(generic_conversation(2))
    api.agent_error("the agent crashed", level="error")
    async with api.serve(), tailing(api.url, log_stream) as t:
        await wait_until(lambda: len(t.logs("agent error")) == 1, 10, "the stored error")
        api.agent_error("a second problem", level="warning")
        await wait_until(lambda: len(t.logs("agent error")) == 2, 10, "the live error")
        for n in (2, 3):  # each reconnect replays both
            api.drop_subscribers()
            await wait_until(lambda n=n: api.subscribers_total == n and api.subscribers == 1, 10, "a reconnect")
        api.add_message("user", "after the replays")
        await wait_until(lambda: t.tail.buffer.newest_id == 2, 10, "a later update")
    assert [e["message"] for e in t.logs("agent error")] == ["the agent crashed", "a second problem"]


@pytest.mark.anyio
async def test_agentapi_stop_is_an_info_line_a_cut_event_a_warning(log_stream: io.StringIO) -> None:
    api = FakeAgentAPI(shutdown_wait=0.2)
    api.load(generic_conversation(2))
    async with api.serve():
        url = api.url
        async with tailing(url, log_stream) as t:
            await wait_until(lambda: t.tail.state == "connected", 10, "connected")
            api.cut_streams_mid_event()
            await wait_until(lambda: t.logs("agentapi disconnected"), 10, "the cut")
            [cut] = t.logs("agentapi disconnected")
            assert cut["level"] == "warning" and "inside an event" in cut["error"]
            await wait_until(lambda: t.tail.state == "connected", 10, "connected again")
            closed_before = len(t.logs("agentapi closed the stream"))
            await api.stop()  # agentapi's stop: the chunked body ends abruptly at an event boundary
            await wait_until(lambda: len(t.logs("agentapi closed the stream")) > closed_before, 10, "the close")
    [closed] = t.logs("agentapi closed the stream")
    assert closed["level"] == "info"
    assert not [x for x in t.logs() if "protocol" in json.dumps(x).lower()]


@pytest.mark.anyio
async def test_fetch_messages_keeps_only_what_the_buffer_holds() -> None:
    api = FakeAgentAPI()
    api.load(generic_conversation(30))
    api.update_last("─" * 100_000)  # longer than the buffer keeps of one message
    buffer = RingBuffer(4, 1000)
    async with api.serve(), httpx.AsyncClient(trust_env=False) as client:
        view = await fetch_messages(client, api.url, 5, buffer=buffer)
        assert [m.id for m in view] == [26, 27, 28, 29]
        assert len(view[-1].content) == 1000 and view[-1].elided == 99_000
        with pytest.raises(AgentAPIError, match="over 1000 bytes"):
            await fetch_messages(client, api.url, 5, buffer=buffer, max_item=1000)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "headers", "error"),
    [
        (gzip.compress(b'{"messages":[]}'), [("content-encoding", "gzip")], "Content-Encoding 'gzip'"),
        (b'{"error":"not agentapi"}', [], "no 'messages' list"),
        (b'{"messages":[{"id":0,', [], "unusable"),
        (b"[" * 100_000, [], "nested deeper than 64"),
    ],
    ids=["gzip", "no-list", "truncated", "deep"],
)
async def test_fetch_messages_refuses_what_it_cannot_trust(body: bytes, headers: list[tuple[str, str]], error: str) -> None:
    async def answer(ex: Exchange) -> None:
        await ex.respond(200, [("content-type", "application/json"), *headers], body)

    async with serve(answer) as srv, httpx.AsyncClient(trust_env=False) as client:
        with pytest.raises(AgentAPIError, match=error):
            await fetch_messages(client, srv.url, 5)


@pytest.mark.anyio
async def test_fetch_messages_skips_bad_items_and_unknown_keys(log_stream: io.StringIO) -> None:
    t = "2026-01-01T00:00:00Z"
    body = json.dumps({"$schema": "x", "extra": {"nested": [1, 2]}, "messages": [
        {"id": 0, "content": "a", "role": "agent", "time": t, "more": {"x": [1]}},
        None, [1, [2]], {"id": 1, "content": {"no": 1}, "role": "user", "time": t},
        {"id": 2, "content": "b", "role": "system", "time": t},
        {"id": 3, "content": "c\ud83d\ude00", "role": "user", "time": t},
    ]}).encode()

    async def answer(ex: Exchange) -> None:
        await ex.respond(200, [("content-type", "application/json")], body)

    async with serve(answer) as srv, httpx.AsyncClient(trust_env=False) as client:
        view = await fetch_messages(client, srv.url, 5)
    assert [(m.id, m.content) for m in view] == [(0, "a"), (3, "c😀")]
    [skipped] = [x for x in json_lines(log_stream.getvalue()) if x.get("event") == "message skipped"]
    assert skipped["messages"] == 4


# ---------------------------------------------------------------------------------------------
# hostile peers against a real `agentd run` process (raw-socket servers)

TOKEN = "hostile-" + uuid.uuid4().hex
TASK = str(uuid.uuid4())


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key}")


@asynccontextmanager
async def agentd_process(agentapi_url: str, coderd_url: str, short_dir: Path) -> AsyncIterator[subprocess.Popen[bytes]]:
    env = clean_env(
        CODER_AGENT_URL=coderd_url, CODER_AGENT_TOKEN=TOKEN, AGENTD_TASK_ID=TASK,
        AGENTD_AGENTAPI_URL=agentapi_url, AGENTD_STATE_DIR=str(short_dir / "state"),
        AGENTD_SOCKET=str(short_dir / "agentd.sock"), AGENTD_LOG_FORMAT="json", AGENTD_SHUTDOWN_TIMEOUT="5",
        PYTHONPATH=str(REPO_ROOT),
    )
    out = open(short_dir / "out", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentd", "run"], env=env, stdout=out, stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        out.close()


async def _stop(proc: subprocess.Popen[bytes], short_dir: Path) -> tuple[int, str, int]:
    """SIGTERM; (exit status, output, peak RSS bytes read just before the signal)."""
    peak = _status_kib(proc.pid, "VmHWM")
    proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: proc.poll() is not None, 20, "agentd to exit")
    text = (short_dir / "out").read_text("utf-8", "replace")
    assert TOKEN not in text and "Traceback" not in text, text[-3000:]
    return proc.returncode, text, peak


def _report(case: str, peak: int) -> None:
    print(f"PEAK-RSS {case} {peak / 2**20:.1f} MiB")


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("attack", ["endless-line", "data-without-blank-line"])
async def test_hostile_event_stream_is_capped(attack: str, short_dir: Path, anyio_backend: str) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("a real process; its backend is agentd's default")
    respond = hostile_events(attack)

    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    agentapi = RawServer(respond)
    async with coderd.serve(), agentapi.serve(), agentd_process(agentapi.url, coderd.url, short_dir) as proc:
        await wait_until(lambda: agentapi.hits.get("/events", 0) >= 3, 60, "two capped streams and a reconnect")
        code, text, peak = await _stop(proc, short_dir)
    _report(attack, peak)
    assert code == 0, text[-3000:]
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
    dropped = [x for x in json_lines(text) if x.get("event") == "agentapi disconnected"]
    assert dropped and "over 33554432 bytes" in dropped[0]["error"], dropped
    snap = coderd.stored.get(TASK)
    assert snap is not None and [m["content"] for m in snap.messages] == ["hello"], "the replay before it is kept"


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("case", ["gzip-bomb", "long-conversation"])
async def test_hostile_or_huge_messages_in_bounded_memory(case: str, short_dir: Path, anyio_backend: str) -> None:
    """No event stream (404): agentd polls ``GET /messages``. A gzip'd answer (a bomb: 1 GiB of
    zeros in 1 MiB) is refused unread; a long conversation of about 300 MB is read in bounded
    memory and the newest 10 messages kept."""
    if anyio_backend != "asyncio":
        pytest.skip("a real process; its backend is agentd's default")
    total = LONG_CONVERSATION  # messages of ~64 KiB: ~300 MB
    respond = hostile_messages(case, total)

    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    agentapi = RawServer(respond)
    async with coderd.serve(), agentapi.serve(), agentd_process(agentapi.url, coderd.url, short_dir) as proc:
        sock = short_dir / "agentd.sock"
        if case == "gzip-bomb":
            await wait_until(lambda: agentapi.hits.get("/messages", 0) >= 3, 60, "three refused polls")
        else:
            from support import daemon_status

            async def holds_the_newest() -> bool:
                try:
                    return (await daemon_status(sock))["newest_id"] == total - 1
                except Exception:
                    return False

            with anyio.fail_after(240):
                while not await holds_the_newest():
                    await anyio.sleep(0.5)
        code, text, peak = await _stop(proc, short_dir)
    _report(case, peak)
    assert code == 0, text[-3000:]
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
    logs = json_lines(text)
    if case == "gzip-bomb":
        failed = [x for x in logs if x.get("event") == "agentapi poll failed"]
        assert failed and "Content-Encoding 'gzip'" in failed[0]["error"], failed
        assert TASK not in coderd.stored  # nothing to store
    else:
        snap = coderd.stored.get(TASK)
        assert snap is not None, text[-3000:]
        ids = [m["id"] for m in snap.messages]
        assert ids[-1] == total - 1 and ids == sorted(ids) and len(ids) <= 10


def test_peak_rss_limit_is_above_idle() -> None:
    """The limit means something only if an idle agentd is well under it (VmHWM of this
    interpreter with agentd imported is a floor for the daemon's)."""
    code = "import agentd.cli, agentd.daemon; print(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), check=True).stdout
    hwm = next(int(line.split()[1]) * 1024 for line in out.splitlines() if line.startswith("VmHWM:"))
    assert hwm < PEAK_RSS_LIMIT / 2
