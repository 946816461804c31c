"""``agentd run`` end to end (issue 2): SIGTERM, final refresh, trimming, upload, exit status.

Every case runs the real daemon code against a :class:`FakeCoderd` that enforces CONTRACT.md §1
and a :class:`FakeAgentAPI` (CONTRACT.md §2), both serving on 127.0.0.1, and stops it with a
real SIGTERM:

* in-process: :func:`agentd.daemon.run` in a task, ``os.kill(os.getpid(), SIGTERM)`` taken by
  the daemon's anyio signal receiver; on asyncio and trio (the anyio plugin);
* as a real ``python -m agentd run`` process (cases 1, 7, 8 and the real agent screens), one of
  them with ``AGENTD_ASYNC_BACKEND=trio``.

Each case checks what coderd stored, the exit status and how long the stop took.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from support import (
    LONG_DEADLINE,
    WELL_BEFORE,
    assert_token_absent,
    clean_env,
    daemon_in_task,
    daemon_status,
    json_lines,
    wait_status,
    wait_until,
)

from agentd.messages import ROLES, InvalidMessage, parse_message
from agentd.settings import load_settings
from agentd.signals import REPEAT_WINDOW
from agentd.snapshot import TRUNCATION_MARKER
from agentd.testing import FakeAgentAPI, FakeCoderd, demo_session, generic_conversation, serve, typing_steps, utf8_len
from agentd.testing.http import Exchange

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
LIMIT = 65_536
TOKEN = "agt-" + uuid.uuid4().hex  # distinctive: any leak into the output is unmistakable
TASK = str(uuid.uuid4())

_MARKER = re.compile(re.escape(TRUNCATION_MARKER).replace(re.escape("{n}"), r"(\d+)"))


# ---------------------------------------------------------------------------------------------
# helpers


def snapshot_requests(coderd: FakeCoderd) -> list:
    return [r for r in coderd.requests if r.path.endswith("/log-snapshot")]


def stored(coderd: FakeCoderd, task: str = TASK):
    return coderd.stored.get(task)


def assert_tail_intact(stored_content: str, full: str) -> int:
    """The stored content is the marker naming n cut characters, then exactly ``full[n:]``."""
    m = _MARKER.match(stored_content)
    assert m is not None, f"no truncation marker at the start: {stored_content[:80]!r}"
    n = int(m.group(1))
    assert 0 < n < len(full)
    assert stored_content[m.end():] == full[n:], "the kept tail differs from the end of agentapi's message"
    return len(full) - n


def assert_same(stored_messages: list[dict], api_messages: list) -> None:
    """coderd holds exactly these agentapi messages: ids, roles, contents, time strings."""
    got = [(m["id"], m["role"], m["content"], m["time"]) for m in stored_messages]
    want = [(m.id, m.role, m.content, m.time) for m in api_messages]
    assert got == want


@asynccontextmanager
async def stoppable(api: FakeAgentAPI) -> AsyncIterator[Callable[[], Any]]:
    """Serve ``api`` until the yielded ``stop()`` is awaited (agentapi going away mid-test)."""
    stop, closed = anyio.Event(), anyio.Event()

    async def serving(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with api.serve():
                task_status.started()
                await stop.wait()
        finally:
            closed.set()

    async def stop_api() -> None:
        stop.set()
        await closed.wait()

    async with anyio.create_task_group() as tg:
        await tg.start(serving)
        try:
            yield stop_api
        finally:
            stop.set()


@dataclass
class Setup:
    """Where one daemon runs: its peers, its directory, its stop budget."""

    coderd_url: str
    agentapi_url: str
    dir: Path
    token: str = TOKEN
    task: str = TASK
    shutdown_timeout: float = LONG_DEADLINE
    max_messages: int = 10

    @property
    def socket(self) -> Path:
        return self.dir / "agentd.sock"

    def settings(self):
        return load_settings(
            coderd_url=self.coderd_url,
            agent_token=self.token,
            task_id=self.task,
            agentapi_url=self.agentapi_url,
            state_dir=str(self.dir / "state"),
            socket=str(self.socket),
            shutdown_timeout=self.shutdown_timeout,
            max_messages=self.max_messages,
            checkpoint_interval=0,  # only the stop path uploads: exact request counts
            log_format="json",
            log_level="info",
        )

    def env(self, backend: str) -> dict[str, str]:
        return clean_env(
            CODER_AGENT_URL=self.coderd_url,
            CODER_AGENT_TOKEN=self.token,
            AGENTD_TASK_ID=self.task,
            AGENTD_AGENTAPI_URL=self.agentapi_url,
            AGENTD_STATE_DIR=str(self.dir / "state"),
            AGENTD_SOCKET=str(self.socket),
            AGENTD_SHUTDOWN_TIMEOUT=str(self.shutdown_timeout),
            AGENTD_MAX_MESSAGES=str(self.max_messages),
            AGENTD_CHECKPOINT_INTERVAL="0",
            AGENTD_LOG_FORMAT="json",
            AGENTD_LOG_LEVEL="info",
            AGENTD_ASYNC_BACKEND=backend,
        )


class Agentd:
    """A started daemon, in-process or a real process."""

    mode = ""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.signalled: list[float] = []  # time.monotonic() of each SIGTERM sent
        self.exited: float | None = None
        self.status: int | None = None

    def _kill(self) -> None:
        raise NotImplementedError

    async def sigterm(self) -> None:
        self.signalled.append(time.monotonic())
        self._kill()

    async def wait(self, timeout: float = 15.0) -> int:
        raise NotImplementedError

    def output(self) -> str:
        raise NotImplementedError

    def log(self) -> list[dict[str, Any]]:
        return json_lines(self.output())

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.log() if line.get("event") == name]

    @property
    def stop_seconds(self) -> float:
        """From the first SIGTERM to exit."""
        assert self.exited is not None and self.signalled
        return self.exited - self.signalled[0]

    def assert_token_hidden(self) -> None:
        assert_token_absent(self.setup.token, self.output())


class InProcess(Agentd):
    mode = "in-process"

    def __init__(self, setup: Setup, log_stream: io.StringIO) -> None:
        super().__init__(setup)
        self.log_stream = log_stream
        self.done = anyio.Event()

    def _kill(self) -> None:
        assert not self.done.is_set(), "no SIGTERM to this process once the daemon's receiver is gone"
        os.kill(os.getpid(), signal.SIGTERM)

    async def wait(self, timeout: float = 15.0) -> int:
        await wait_until(self.done.is_set, timeout, "the daemon to return")
        assert self.status is not None
        return self.status

    def output(self) -> str:
        return self.log_stream.getvalue()


class RealProcess(Agentd):
    mode = "process"

    def __init__(self, setup: Setup, proc: subprocess.Popen, out: Path, err: Path) -> None:
        super().__init__(setup)
        self.proc = proc
        self.out, self.err = out, err

    def _kill(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 15.0) -> int:
        await wait_until(lambda: self.proc.poll() is not None, timeout, "agentd to exit")
        self.exited = self.exited or time.monotonic()
        self.status = self.proc.returncode
        return self.status

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")


@pytest.fixture
def in_process(log_stream: io.StringIO):
    """``start(setup)``: run ``agentd.daemon.run`` in a task of the test's event loop."""

    @asynccontextmanager
    async def start(setup: Setup) -> AsyncIterator[InProcess]:
        settings = setup.settings()
        handle = InProcess(setup, log_stream)
        # The control socket is opened after the signal receiver: once it exists, SIGTERM
        # goes to the daemon, not to pytest.
        async with daemon_in_task(settings, handle, setup.socket.exists, "the control socket"):
            yield handle

    return start


@pytest.fixture
def real_process(tmp_path: Path):
    """``start(setup, backend)``: ``python -m agentd run`` with a clean environment."""

    @asynccontextmanager
    async def start(setup: Setup, backend: str = "asyncio") -> AsyncIterator[RealProcess]:
        n = len(list(tmp_path.glob("agentd-*.out")))
        out, err = tmp_path / f"agentd-{n}.out", tmp_path / f"agentd-{n}.err"
        with open(out, "wb") as fout, open(err, "wb") as ferr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agentd", "run"],
                env=setup.env(backend), cwd=REPO, stdout=fout, stderr=ferr, stdin=subprocess.DEVNULL,
            )
        handle = RealProcess(setup, proc, out, err)
        try:
            await wait_until(
                lambda: proc.poll() is not None or '"agentd started"' in err.read_text(errors="replace"),
                20, "agentd's start line",
            )
            assert proc.poll() is None, f"agentd exited {proc.returncode} at start:\n{handle.output()}"
            yield handle
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)

    return start


@asynccontextmanager
async def peers(api: FakeAgentAPI | None = None, coderd: FakeCoderd | None = None) -> AsyncIterator[tuple[FakeAgentAPI, FakeCoderd]]:
    api = api or FakeAgentAPI()
    coderd = coderd or FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve(), api.serve():
        yield api, coderd


# ---------------------------------------------------------------------------------------------
# the eight cases of issue 2, as scenarios run in-process and/or as a process


async def case_1_streamed_reply(start, short_dir: Path, **kw) -> None:
    """12 messages; the last one is typed live over SSE past 64 KiB of box drawing."""
    api = FakeAgentAPI(status="running")
    api.load(demo_session())  # ids 0..11 (the welcome screen is agentapi's message 0); the user's report request is the newest so far
    steps = list(typing_steps())
    async with peers(api) as (api, coderd):
        async with start(Setup(coderd.url, api.url, short_dir), **kw) as agentd:
            await api.wait_for_subscribers(1)
            reply_id = api.add_message("agent", steps[0])
            assert reply_id == 12
            seen_streaming = False
            for i, content in enumerate(steps[1:]):
                api.update_last(content)
                await anyio.sleep(0.005)
                if i == len(steps) // 2:  # half way through, the daemon is tailing this message
                    status = await daemon_status(short_dir / "agentd.sock")
                    seen_streaming = status["newest_id"] == 12 and status["source"]["state"] == "connected"
            full = api.messages[-1].content
            assert full == steps[-1] and utf8_len(full) > LIMIT
            await agentd.sigterm()
            assert await agentd.wait() == 0, agentd.output()
        snap = stored(coderd)
        assert snap is not None
        assert seen_streaming, "the daemon was not tailing the growing message over SSE"
        assert len(snap.body) <= LIMIT
        assert snap.messages[-1]["id"] == 12 and snap.messages[-1]["role"] == "agent"
        kept = assert_tail_intact(snap.messages[-1]["content"], full)
        assert kept > 10_000  # box drawing is 3 bytes a character: ~20 000 characters fit
        assert "╰" in snap.messages[-1]["content"] and "🚀" in snap.messages[-1]["content"]
        assert len(snap.body) >= 0.9 * LIMIT
        assert len(snapshot_requests(coderd)) == 1
        assert agentd.stop_seconds < WELL_BEFORE
        agentd.assert_token_hidden()


async def case_7_retries(start, short_dir: Path, **kw) -> None:
    """coderd answers 503, 502, 503 + Retry-After: 1, then 204."""
    api = FakeAgentAPI()
    api.load(generic_conversation(4))
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, script=[503, 502, (503, {"Retry-After": "1"})])
    async with peers(api, coderd):
        async with start(Setup(coderd.url, api.url, short_dir, shutdown_timeout=LONG_DEADLINE), **kw) as agentd:
            await api.wait_for_subscribers(1)
            await agentd.sigterm()
            assert await agentd.wait() == 0, agentd.output()
    reqs = snapshot_requests(coderd)
    assert [r.status for r in reqs] == [503, 502, 503, 204]
    snap = stored(coderd)
    assert snap is not None and snap.body == reqs[3].body, "the 4th request is the stored one"
    assert_same(snap.messages, api.messages)
    gap = reqs[3].monotonic - reqs[2].monotonic
    assert gap >= 1.0, f"Retry-After: 1 not honoured ({gap:.3f} s)"
    busy = agentd.events("coderd busy")
    assert [(e["status"], e["retry_after"]) for e in busy] == [(503, None), (502, None), (503, 1.0)]
    assert 1.0 <= agentd.stop_seconds < WELL_BEFORE, agentd.stop_seconds
    # The upload outcome line: status, attempts, bytes, messages.
    [line] = agentd.events("snapshot stored")
    assert line["status"] == 204 and line["attempts"] == 4
    assert line["bytes"] == len(snap.body) and line["messages"] == len(snap.messages) == 4
    assert line["level"] == "info"
    agentd.assert_token_hidden()


async def case_8_wrong_token(start, short_dir: Path, **kw) -> None:
    """coderd refuses the token: one request, exit 1, the token nowhere in the output."""
    api = FakeAgentAPI()
    api.load(generic_conversation(3))
    coderd = FakeCoderd(token="the-right-token-" + uuid.uuid4().hex, tasks={TASK})
    async with peers(api, coderd):
        async with start(Setup(coderd.url, api.url, short_dir), **kw) as agentd:
            await api.wait_for_subscribers(1)
            await agentd.sigterm()
            assert await agentd.wait() == 1, agentd.output()
    assert len(coderd.requests) == 1, "a refused token is final: no retry"
    assert coderd.requests[0].status == 401 and coderd.requests[0].auth == "invalid"
    assert coderd.stored == {}
    assert agentd.stop_seconds < WELL_BEFORE
    agentd.assert_token_hidden()
    [line] = agentd.events("snapshot not stored")
    assert line["status"] == 401 and line["attempts"] == 1 and line["level"] == "error"
    assert line["messages"] == 3 and line["bytes"] > 0
    assert "Workspace agent not authorized." in line["reason"], line


async def test_case_1_streamed_past_64k_in_process(in_process, short_dir: Path) -> None:
    await case_1_streamed_reply(in_process, short_dir)


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_case_1_streamed_past_64k_process(real_process, short_dir: Path) -> None:
    await case_1_streamed_reply(real_process, short_dir, backend="asyncio")


async def test_case_2_one_message_of_30000_box_chars(in_process, short_dir: Path) -> None:
    api = FakeAgentAPI()
    full = "─" * 30_000
    api.add_message("agent", full)
    async with peers(api) as (api, coderd):
        async with in_process(Setup(coderd.url, api.url, short_dir)) as agentd:
            await api.wait_for_subscribers(1)
            await agentd.sigterm()
            assert await agentd.wait() == 0
    snap = stored(coderd)
    assert snap is not None and [m["id"] for m in snap.messages] == [0]
    assert 0.9 * LIMIT <= len(snap.body) <= LIMIT
    assert_tail_intact(snap.messages[0]["content"], full)
    assert agentd.stop_seconds < WELL_BEFORE


async def test_case_3_twelve_ascii_messages_use_the_budget(in_process, short_dir: Path) -> None:
    api = FakeAgentAPI()
    for i in range(12):
        line = f"message {i:02d}: " + "abcdefghijklmnopqrstuvwxyz0123456789 " * 2
        api.add_message("agent" if i % 2 == 0 else "user", (line + "\n") * (20_000 // (len(line) + 1)) + "x" * (20_000 % (len(line) + 1)))
    assert all(len(m.content) == 20_000 for m in api.messages)
    async with peers(api) as (api, coderd):
        async with in_process(Setup(coderd.url, api.url, short_dir)) as agentd:
            await api.wait_for_subscribers(1)
            await agentd.sigterm()
            assert await agentd.wait() == 0
    snap = stored(coderd)
    assert snap is not None
    assert 0.9 * LIMIT <= len(snap.body) <= LIMIT, len(snap.body)
    ids = [m["id"] for m in snap.messages]
    assert ids == list(range(ids[0], 12)) and len(ids) >= 3
    assert_same(snap.messages[1:], api.messages[ids[1]:])  # whole ones, exact
    assert_tail_intact(snap.messages[0]["content"], api.messages[ids[0]].content)
    assert agentd.stop_seconds < WELL_BEFORE


async def test_case_4_three_messages_of_20000_escapes(in_process, short_dir: Path) -> None:
    api = FakeAgentAPI()
    for _ in range(3):
        api.add_message("agent", "\x1b" * 20_000)
    async with peers(api) as (api, coderd):
        async with in_process(Setup(coderd.url, api.url, short_dir)) as agentd:
            await api.wait_for_subscribers(1)
            await agentd.sigterm()
            assert await agentd.wait() == 0
    snap = stored(coderd)
    assert snap is not None and len(snap.body) <= LIMIT
    assert len(snap.body) >= 0.9 * LIMIT, len(snap.body)  # \u001b is 6 bytes: the cut must count that
    assert snap.messages[-1]["id"] == 2
    assert_tail_intact(snap.messages[-1]["content"], "\x1b" * 20_000)
    assert agentd.stop_seconds < WELL_BEFORE


async def test_case_5_fifteen_short_messages_keep_the_last_ten(in_process, short_dir: Path) -> None:
    api = FakeAgentAPI()
    api.load(generic_conversation(15))
    async with peers(api) as (api, coderd):
        async with in_process(Setup(coderd.url, api.url, short_dir)) as agentd:
            await api.wait_for_subscribers(1)
            await agentd.sigterm()
            assert await agentd.wait() == 0
    snap = stored(coderd)
    assert snap is not None
    assert [m["id"] for m in snap.messages] == list(range(5, 15))
    assert_same(snap.messages, api.messages[5:])
    assert agentd.stop_seconds < WELL_BEFORE


async def test_case_6_agentapi_without_events_is_polled(in_process, short_dir: Path) -> None:
    """No ``/events``: the tail polls ``/messages``; what it polled is stored even with agentapi
    gone before the stop (so the snapshot cannot come from the final refresh)."""
    api = FakeAgentAPI(events=False)
    api.load(generic_conversation(6))
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve(), stoppable(api) as stop_api:
        async with in_process(Setup(coderd.url, api.url, short_dir)) as agentd:
            await wait_until(lambda: api.requests["/messages"] >= 2, 30, "two polls")
            assert api.requests["/events"] >= 1  # it asked, got 404, and switched
            status = await wait_status(short_dir / "agentd.sock", lambda s: s["messages"] == 6)
            assert status["source"]["state"] == "polling"
            polls = api.requests["/messages"]
            await stop_api()  # agentapi stops first; then the workspace stops
            await agentd.sigterm()
            assert await agentd.wait() == 0, agentd.output()
    assert polls >= 2, "it was polling, not only taking the final refresh"
    snap = stored(coderd)
    assert snap is not None
    assert_same(snap.messages, api.messages)
    assert agentd.stop_seconds < WELL_BEFORE


@pytest.mark.slow
async def test_case_7_retries_then_stored_in_process(in_process, short_dir: Path) -> None:
    await case_7_retries(in_process, short_dir)


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_case_7_retries_then_stored_process_on_trio(real_process, short_dir: Path) -> None:
    await case_7_retries(real_process, short_dir, backend="trio")


async def test_case_8_wrong_token_in_process(in_process, short_dir: Path) -> None:
    await case_8_wrong_token(in_process, short_dir)


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_case_8_wrong_token_process(real_process, short_dir: Path) -> None:
    await case_8_wrong_token(real_process, short_dir, backend="asyncio")


# ---------------------------------------------------------------------------------------------
# the stop path's other promises


async def test_final_refresh_takes_what_the_stream_missed(in_process, short_dir: Path) -> None:
    """The SSE stream is cut mid-event and cannot come back; an update made after that reaches
    coderd only because shutdown takes one last ``GET /messages``."""
    api = FakeAgentAPI()
    api.load(generic_conversation(3))
    blocked: list[int] = []

    async def handler(ex: Exchange) -> None:
        if blocked and ex.path == "/events":
            blocked.append(1)
            await ex.hang()  # the reconnect never gets an answer
            return
        await api.handle(ex)

    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve(), serve(handler) as server:
        async with in_process(Setup(coderd.url, server.url, short_dir)) as agentd:
            await api.wait_for_subscribers(1)
            sock = short_dir / "agentd.sock"
            status = await wait_status(short_dir / "agentd.sock", lambda s: s["messages"] == 3 and s["source"]["state"] == "connected")
            before = status["bytes"]
            blocked.append(0)
            api.cut_streams_mid_event()
            final = api.messages[-1].content + "\n⏺ Done. The last line ─ only the final refresh saw it ✅"
            api.update_last(final)
            await wait_until(lambda: len(blocked) >= 2, 30, "the tail's reconnect")
            status = await daemon_status(sock)
            assert status["bytes"] == before, "the update reached the daemon some other way"
            assert api.requests["/messages"] == 0
            await agentd.sigterm()
            assert await agentd.wait() == 0, agentd.output()
    assert api.requests["/messages"] == 1, "exactly one final GET /messages"
    snap = stored(coderd)
    assert snap is not None
    assert snap.messages[-1]["content"] == final
    assert_same(snap.messages, api.messages)
    assert agentd.stop_seconds < WELL_BEFORE


async def test_agentapi_gone_at_sigterm_stores_the_buffer(in_process, short_dir: Path) -> None:
    """In a sidecar agentd gets SIGTERM after agentapi is gone: the buffer is the truth."""
    api = FakeAgentAPI()
    api.load(demo_session())
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve(), stoppable(api) as stop_api:
        async with in_process(Setup(coderd.url, api.url, short_dir)) as agentd:
            await api.wait_for_subscribers(1)
            await wait_status(short_dir / "agentd.sock", lambda s: s["messages"] == 10 and s["source"]["state"] == "connected")
            port = api.port
            await stop_api()
            with pytest.raises(OSError):
                await anyio.connect_tcp("127.0.0.1", port)
            await agentd.sigterm()
            assert await agentd.wait() == 0, agentd.output()
    snap = stored(coderd)
    assert snap is not None
    assert_same(snap.messages, api.messages[2:])
    assert any(e["event"] == "refresh failed; using the buffer as it is" for e in agentd.log())
    assert agentd.stop_seconds < WELL_BEFORE


async def test_empty_conversation_is_never_uploaded(in_process, short_dir: Path) -> None:
    """Uploading nothing would replace a good stored snapshot: no request at all, exit 0."""
    async with peers() as (api, coderd):
        async with in_process(Setup(coderd.url, api.url, short_dir)) as agentd:
            await api.wait_for_subscribers(1)
            await agentd.sigterm()
            assert await agentd.wait() == 0, agentd.output()
        assert api.requests["/messages"] == 1, "the final refresh was taken, and was empty too"
    assert coderd.requests == [] and coderd.stored == {}
    assert agentd.events("nothing to store: the conversation is empty")
    assert agentd.stop_seconds < WELL_BEFORE


async def test_bad_roles_are_kept_out_and_read_back_works(in_process, short_dir: Path) -> None:
    """coderd stores any role but its read-back fails with 500 on anything but user/agent."""
    api = FakeAgentAPI()
    api.add_message("agent", "╭─ Claude Code ─╮ ready")  # the agent's first screen: message 0
    api.add_message("user", "Fix the flaky test, please.")
    api.add_message("system", "╭─ system prompt ─╮ (not a conversation role)")
    api.add_message("agent", "⏺ On it ─ reading tests/test_upload.py")
    api.add_message("tool", "tool output")
    api.add_message("agent", "⏺ Fixed ✅")
    async with peers(api) as (api, coderd):
        async with in_process(Setup(coderd.url, api.url, short_dir)) as agentd:
            await api.wait_for_subscribers(1)
            await agentd.sigterm()
            assert await agentd.wait() == 0, agentd.output()
        snap = stored(coderd)
        assert snap is not None
        assert [m["id"] for m in snap.messages] == [0, 1, 3, 5]  # 0: the agent's first screen
        assert {m["role"] for m in snap.messages} <= ROLES
        assert_same(snap.messages, [m for m in api.messages if m.role in ROLES])
        coderd.complete_stop_build()  # the workspace has stopped: read-back serves the snapshot
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{coderd.url}/api/v2/tasks/me/{TASK}/logs", timeout=5)
        assert response.status_code == 200, response.text
        assert [entry["type"] for entry in response.json()["logs"]] == ["output", "input", "output", "output"]
    skipped = [e for e in agentd.log() if "skipped" in e.get("event", "")]
    assert skipped, "the bad messages are logged as left out"


async def test_second_sigterm_during_a_hanging_upload_gives_up_at_once(in_process, short_dir: Path) -> None:
    api = FakeAgentAPI()
    api.load(generic_conversation(4))
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, script=["hang"])
    async with peers(api, coderd):
        async with in_process(Setup(coderd.url, api.url, short_dir, shutdown_timeout=LONG_DEADLINE)) as agentd:
            await api.wait_for_subscribers(1)
            await agentd.sigterm()
            await wait_until(lambda: len(snapshot_requests(coderd)) == 1, 30, "the upload to start")
            # The same signal again within a second (a shell signalling its process group): one stop.
            await agentd.sigterm()
            await wait_until(lambda: bool(agentd.events("signal repeated within a second: counted once")), 30,
                             "the repeat to be noticed")
            assert not agentd.done.is_set(), "a repeat within a second must not give up"
            # A deliberate second signal, later than that: give up at once.
            await anyio.sleep(max(0.0, agentd.signalled[0] + REPEAT_WINDOW + 0.05 - time.monotonic()))
            assert not agentd.done.is_set()
            await agentd.sigterm()
            assert await agentd.wait() == 1, agentd.output()
    gave_up_after = agentd.exited - agentd.signalled[2]
    assert gave_up_after < WELL_BEFORE / 2, f"took {gave_up_after:.2f} s after the second signal"
    assert coderd.stored == {} and len(snapshot_requests(coderd)) == 1
    [gave_up] = agentd.events("second signal: giving up on the snapshot")
    assert gave_up["signal"] == "SIGTERM"
    [stopping] = agentd.events("shutting down")
    assert stopping["hint"] == "press Ctrl-C again to give up"
    agentd.assert_token_hidden()


def _agent_screens() -> list[tuple[str, str]]:
    screens = REFERENCE / "agent-screens"
    if not screens.is_dir():
        pytest.skip(f"{screens} is absent (the shared reference data is not on this machine)")
    files = sorted(screens.glob("*.txt"))
    chosen: list[tuple[str, str]] = []
    size = 0
    for path in files:  # as many as fit whole in one body, leaving room for the envelopes
        text = path.read_bytes().decode("utf-8")
        cost = len(json.dumps(text, ensure_ascii=False).encode()) + 100
        if size + cost <= LIMIT - 2_000:
            chosen.append((path.name, text))
            size += cost
    return chosen


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_real_agent_screens_stored_exactly_by_a_real_process(real_process, short_dir: Path) -> None:
    screens = _agent_screens()
    assert len(screens) >= 10 and any("─" in text or "│" in text for _, text in screens)
    api = FakeAgentAPI()
    for i, (_name, text) in enumerate(screens):
        api.add_message("user" if i % 2 else "agent", text)  # agent first: agentapi's PTY message 0
    async with peers(api) as (api, coderd):
        setup = Setup(coderd.url, api.url, short_dir, max_messages=len(screens))
        async with real_process(setup) as agentd:
            await api.wait_for_subscribers(1)
            await agentd.sigterm()
            assert await agentd.wait() == 0, agentd.output()
    snap = stored(coderd)
    assert snap is not None and len(snap.body) <= LIMIT
    assert_same(snap.messages, api.messages)
    for (name, text), message in zip(screens, snap.messages, strict=True):
        assert message["content"] == text, f"{name} was altered"
    assert agentd.stop_seconds < WELL_BEFORE
    agentd.assert_token_hidden()


def test_reference_openapi_message_schema_matches_validation() -> None:
    """agentapi's own spec: the fields and roles agentd requires are the ones agentapi sends."""
    spec_path = REFERENCE / "agentapi-openapi.json"
    if not spec_path.is_file():
        pytest.skip(f"{spec_path} is absent (the shared reference data is not on this machine)")
    schemas = json.loads(spec_path.read_text())["components"]["schemas"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        return schemas[ref.rsplit("/", 1)[-1]] if ref else node

    for name, content_key in (("Message", "content"), ("MessageUpdateBody", "message")):
        schema = schemas[name]
        props = schema["properties"]
        assert set(schema["required"]) == {"id", content_key, "role", "time"}, name
        assert set(resolve(props["role"])["enum"]) == ROLES, name
        assert props["id"]["type"] == "integer" and props["id"]["format"] == "int64"
        assert props["time"]["format"] == "date-time" and props[content_key]["type"] == "string"
        good = {"id": 3, content_key: "╭─╮ hi", "role": "agent", "time": "2026-01-01T00:00:00.123456789Z"}
        for role in resolve(props["role"])["enum"]:
            assert parse_message({**good, "role": role}, content_key=content_key).role == role
        for field in schema["required"]:  # every required field is required by agentd too
            with pytest.raises(InvalidMessage):
                parse_message({k: v for k, v in good.items() if k != field}, content_key=content_key)
        for bad in ({"role": "system"}, {"id": 2**63}, {"id": "3"}, {"time": "yesterday"}, {content_key: None}):
            with pytest.raises(InvalidMessage):
                parse_message({**good, **bad}, content_key=content_key)
        assert parse_message({**good, "id": 2**63 - 1}, content_key=content_key).id == 2**63 - 1
