"""Fault suite (issue 5): agentd as a real process against the stand-ins on loopback.

Every case runs ``python -m agentd run`` as a child process, on the same anyio backend as the
test (``AGENTD_ASYNC_BACKEND``), against :class:`FakeAgentAPI` / :class:`FakeCoderd` served
in-process by the test (or as processes where a process must be killed or restarted). Each case
asserts what must hold: the snapshot stored (or the documented outcome), the exit status, a
bounded wall time, no traceback, and the agent token never printed.

Wall times are printed as ``FAULT-TIMING <case> <seconds>`` (see them with ``-s``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from support import EXIT_SLACK, LONG_DEADLINE, WELL_BEFORE, AgentdChild, clean_env, free_port, make_short_dir, small_conversation

from agentd import control
from agentd.signals import REPEAT_WINDOW
from agentd.testing import Exchange, FakeAgentAPI, FakeCoderd, serve

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TOKEN = "fault-token-" + secrets.token_hex(12)
TASK = str(uuid.uuid4())
REPO_ROOT = Path(__file__).resolve().parents[1]

#: Seconds any single wait in this file may take before the test fails (generous: CI is a busy
#: 2-core machine; a wait ends as soon as its event happens).
WAIT = 30.0


def timing(case: str, seconds: float) -> None:
    print(f"FAULT-TIMING {case} {seconds:.3f}")


def stored_messages(coderd: FakeCoderd) -> list[dict[str, Any]]:
    snap = coderd.stored.get(TASK)
    assert snap is not None, "nothing stored"
    return snap.messages


def snapshot_body_size(messages: list[dict[str, Any]]) -> int:
    """Bytes of the compact UTF-8 JSON body for ``messages`` (when nothing is trimmed; empty
    messages are left out, as the trimming policy does)."""
    body = {"messages": [{"id": m["id"], "content": m["content"], "role": m["role"], "time": m["time"]} for m in messages if m["content"]]}
    return len(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


class Agentd(AgentdChild):
    """One ``python -m agentd run`` child process, its output in files."""

    def __init__(self, backend: str, workdir: Path, env: dict[str, str]) -> None:
        self.backend = backend
        self.workdir = workdir
        self.sock_dir = make_short_dir("agentd-f-")
        self.socket = self.sock_dir / "agentd.sock"
        defaults = {
            "AGENTD_ASYNC_BACKEND": backend,
            "AGENTD_LOG_FORMAT": "json",
            "AGENTD_LOG_LEVEL": "debug",
            "AGENTD_TASK_ID": TASK,
            "CODER_AGENT_TOKEN": TOKEN,
            "AGENTD_STATE_DIR": str(workdir / "state"),
            "AGENTD_SOCKET": str(self.socket),
            "AGENTD_CHECKPOINT_INTERVAL": "0",
        }
        self.env = clean_env(**{**defaults, **env})
        self.out_path = workdir / "agentd.out"
        self.err_path = workdir / "agentd.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned = 0.0
        self.signalled: float | None = None
        self.preexec: Callable[[], None] | None = None  # run in the child before exec (limits, umask)

    def start(self) -> None:
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.spawned = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentd", "run"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=self.env, cwd=self.workdir,
                preexec_fn=self.preexec,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # -- output --------------------------------------------------------------------------------

    def output(self) -> str:
        text = ""
        for path in (self.out_path, self.err_path):
            if path.exists():
                text += path.read_bytes().decode("utf-8", "replace")
        return text

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        if self.err_path.exists():
            for line in self.err_path.read_bytes().decode("utf-8", "replace").splitlines():
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    lines.append({"event": "<not json>", "raw": line})
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logs() if line.get("event") == name]

    async def wait_log(self, name: str, count: int = 1, timeout: float = WAIT) -> dict[str, Any]:
        """Wait until the ``count``-th log line with event ``name``; return it."""
        with anyio.fail_after(timeout):
            while True:
                found = self.events(name)
                if len(found) >= count:
                    return found[count - 1]
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"agentd exited ({self.proc.returncode}) before {name!r}:\n{self.output()}")
                await anyio.sleep(0.01)

    async def wait_started(self) -> None:
        await self.wait_log("agentd started")

    def assert_clean(self) -> None:
        """No traceback, no internal error, every line a JSON log line, the token never shown."""
        text = self.output()
        assert TOKEN not in text, "the agent token was printed"
        assert "Traceback" not in text, text[-3000:]
        for line in self.logs():
            assert line.get("event") != "<not json>", f"stray output: {line['raw'][:300]}"
            assert "exception" not in line, f"exception logged: {json.dumps(line)[:2000]}"
            assert line.get("event") != "internal error", line

    # -- control -------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        try:
            answer = await control.request(self.socket, {"command": "status"}, 3.0)
        except control.ControlError as exc:
            with anyio.move_on_after(2):
                while self.proc is not None and self.proc.poll() is None:
                    await anyio.sleep(0.05)
            raise AssertionError(f"{exc}; agentd exit status {self.proc and self.proc.poll()}:\n{self.output()[-5000:]}") from None
        assert answer.get("ok"), answer
        return answer["status"]

    async def wait_status(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = WAIT) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            while True:
                status = await self.status()
                if predicate(status):
                    return status
                await anyio.sleep(0.02)

    # -- signals and exit ----------------------------------------------------------------------

    async def wait_exit(self, timeout: float) -> tuple[int, float]:
        """Exit status and seconds from the first signal (or spawn) to exit."""
        status = await self.wait_exited(timeout)
        ended = time.monotonic()
        return status, ended - (self.signalled if self.signalled is not None else self.spawned)

    def rss_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

@asynccontextmanager
async def agentd(backend: str, workdir: Path, *, start: bool = True, **env: str) -> AsyncIterator[Agentd]:
    """Start agentd (``env`` on top of the defaults); always kill leftovers."""
    proc = Agentd(backend, workdir, env)
    if start:
        proc.start()
    try:
        yield proc
    finally:
        proc.kill()


def coderd_env(url: str) -> dict[str, str]:
    return {"CODER_AGENT_URL": url}


def assert_same_conversation(stored: list[dict[str, Any]], api: FakeAgentAPI) -> None:
    assert [(m["id"], m["role"], m["content"], m["time"]) for m in stored] == [
        (m.id, m.role, m.content, m.time) for m in api.messages
    ]


class AgentAPIProcess:
    """``python -m agentd.testing.fake_agentapi`` as a child process on a fixed port."""

    def __init__(self, workdir: Path, port: int, *args: str) -> None:
        self.workdir = workdir
        self.port = port
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *args: str) -> None:
        log = open(self.workdir / f"agentapi.{time.monotonic_ns()}.out", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentd.testing.fake_agentapi", "--port", str(self.port), *self.args, *args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=clean_env(),
        )
        log.close()
        with anyio.fail_after(WAIT):
            while True:
                try:
                    stream = await anyio.connect_tcp("127.0.0.1", self.port)
                except OSError:
                    assert self.proc.poll() is None, "fake agentapi exited at start"
                    await anyio.sleep(0.02)
                else:
                    await stream.aclose()
                    return

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait_exit(self, timeout: float = WAIT) -> int:
        assert self.proc is not None
        with anyio.fail_after(timeout):
            while self.proc.poll() is None:
                await anyio.sleep(0.01)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# ---------------------------------------------------------------------------------------------
# coderd faults


async def test_coderd_refuses_then_comes_up_two_seconds_later(anyio_backend: str, tmp_path: Path) -> None:
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    port = free_port()
    async with api.serve(), agentd(
        anyio_backend, tmp_path, CODER_AGENT_URL=f"http://127.0.0.1:{port}",
        AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT="6",
    ) as d:
        await d.wait_started()
        await api.wait_for_subscribers(1)
        d.signal(signal.SIGTERM)
        await anyio.sleep(2.0)
        async with coderd.serve(port=port):
            rc, took = await d.wait_exit(6 + EXIT_SLACK)
        d.assert_clean()
    timing(f"coderd-down-2s[{anyio_backend}]", took)
    assert rc == 0, d.output()[-3000:]
    assert 2.0 <= took <= 6.0 + EXIT_SLACK
    assert_same_conversation(stored_messages(coderd), api)
    stored = d.events("snapshot stored")
    assert len(stored) == 1 and stored[0]["attempts"] >= 2


async def test_coderd_accepts_and_never_answers(anyio_backend: str, tmp_path: Path) -> None:
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, hang=True)
    timeout = 1.5
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT=str(timeout),
        **coderd_env(coderd.url),
    ) as d:
        await d.wait_started()
        await api.wait_for_subscribers(1)
        d.signal(signal.SIGTERM)
        rc, took = await d.wait_exit(timeout + EXIT_SLACK + 2.0)
        d.assert_clean()
    timing(f"coderd-hang[{anyio_backend}]", took)
    assert rc == 1
    assert took <= timeout + EXIT_SLACK
    assert TASK not in coderd.stored
    assert coderd.requests, "no upload was attempted"
    (line,) = d.events("snapshot not stored")
    assert "deadline" in line["reason"]


async def test_coderd_429_retry_after_beyond_the_deadline(anyio_backend: str, tmp_path: Path) -> None:
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, script=[(429, {"Retry-After": "30"})])
    timeout = LONG_DEADLINE
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT=str(timeout),
        **coderd_env(coderd.url),
    ) as d:
        await d.wait_started()
        await api.wait_for_subscribers(1)
        d.signal(signal.SIGTERM)
        rc, took = await d.wait_exit(timeout + EXIT_SLACK + 2.0)
        d.assert_clean()
    timing(f"coderd-429-retry-after[{anyio_backend}]", took)
    assert rc == 1
    # It gives up at once: waiting out a Retry-After it cannot honour would only burn the budget.
    assert took < WELL_BEFORE
    assert len(coderd.requests) == 1 and coderd.requests[0].status == 429
    assert TASK not in coderd.stored
    (line,) = d.events("snapshot not stored")
    assert line["status"] == 429
    assert re.search(r"retry after 30(\.0)? s", line["reason"]), line["reason"]
    assert "left before the deadline" in line["reason"], line["reason"]


async def test_coderd_400_body_too_large_is_not_retried(anyio_backend: str, tmp_path: Path) -> None:
    api = FakeAgentAPI()
    small_conversation(api)
    detail = "http: request body too large"
    coderd = FakeCoderd(
        token=TOKEN, tasks={TASK},
        script=[(400, {}, {"message": "Failed to decode request payload.", "detail": detail, "validations": []})],
    )
    timeout = LONG_DEADLINE
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT=str(timeout),
        **coderd_env(coderd.url),
    ) as d:
        await d.wait_started()
        await api.wait_for_subscribers(1)
        d.signal(signal.SIGTERM)
        rc, took = await d.wait_exit(timeout + EXIT_SLACK + 2.0)
        d.assert_clean()
    timing(f"coderd-400[{anyio_backend}]", took)
    assert rc == 1
    assert took < WELL_BEFORE
    assert len(coderd.requests) == 1, [r.status for r in coderd.requests]
    (line,) = d.events("snapshot not stored")
    assert line["status"] == 400 and line["attempts"] == 1
    assert detail in line["reason"] and "Failed to decode request payload." in line["reason"]


async def test_coderd_transient_failures_then_stored(anyio_backend: str, tmp_path: Path) -> None:
    """Closed without an answer, reset, 503, 502 (Retry-After 0), then stored: every failure
    retried, one upload stored, well within the deadline."""
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, script=["close", "reset", 503, (502, {"Retry-After": "0"})])
    timeout = LONG_DEADLINE
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT=str(timeout),
        **coderd_env(coderd.url),
    ) as d:
        await d.wait_started()
        await api.wait_for_subscribers(1)
        d.signal(signal.SIGTERM)
        rc, took = await d.wait_exit(timeout + EXIT_SLACK)
        d.assert_clean()
    timing(f"coderd-transient[{anyio_backend}]", took)
    assert rc == 0, d.output()[-3000:]
    assert took < WELL_BEFORE
    assert len(coderd.requests) == 5 and coderd.requests[-1].status == 204
    assert coderd.upserts[TASK] == 1
    (line,) = d.events("snapshot stored")
    assert line["attempts"] == 5
    assert_same_conversation(stored_messages(coderd), api)


# ---------------------------------------------------------------------------------------------
# agentapi faults


async def test_agentapi_killed_before_sigterm_buffer_is_stored(anyio_backend: str, tmp_path: Path) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    agentapi = AgentAPIProcess(tmp_path, free_port(), "--script", "static", "--backend", anyio_backend)
    try:
        await agentapi.start()
        async with coderd.serve(), agentd(
            anyio_backend, tmp_path, AGENTD_AGENTAPI_URL=agentapi.url, AGENTD_SHUTDOWN_TIMEOUT=str(LONG_DEADLINE),
            **coderd_env(coderd.url),
        ) as d:
            await d.wait_started()
            await d.wait_log("agentapi connected")
            before = await d.status()
            agentapi.signal(signal.SIGKILL)
            assert await agentapi.wait_exit() == -signal.SIGKILL
            await d.wait_log("agentapi disconnected")
            d.signal(signal.SIGTERM)
            rc, took = await d.wait_exit(LONG_DEADLINE + EXIT_SLACK)
            d.assert_clean()
    finally:
        agentapi.kill()
    timing(f"agentapi-killed[{anyio_backend}]", took)
    assert rc == 0, d.output()[-3000:]
    assert took < WELL_BEFORE
    stored = stored_messages(coderd)
    # The static script is 13 messages; the buffer keeps the newest 10 and the body is trimmed
    # to 65 536 bytes from the newest end: the newest message is always there.
    assert before["messages"] == 10 and before["newest_id"] == 12
    ids = [m["id"] for m in stored]
    assert ids == sorted(set(ids)) and ids[-1] == 12
    assert len(coderd.stored[TASK].body) <= 65_536
    assert d.events("refresh failed; using the buffer as it is")


@pytest.mark.parametrize("saved_state", [True, False], ids=["with-state", "without-state"])
async def test_agentapi_restarted_on_the_same_port(anyio_backend: str, tmp_path: Path, saved_state: bool) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    state_file = tmp_path / "agentapi-state.json"
    port = free_port()
    first = AgentAPIProcess(tmp_path, port, "--messages", "5", "--state-file", str(state_file))
    second = AgentAPIProcess(tmp_path, port, *(["--state-file", str(state_file)] if saved_state else ["--messages", "2"]))
    try:
        await first.start()
        async with coderd.serve(), agentd(
            anyio_backend, tmp_path, AGENTD_AGENTAPI_URL=first.url, AGENTD_SHUTDOWN_TIMEOUT=str(LONG_DEADLINE),
            **coderd_env(coderd.url),
        ) as d:
            await d.wait_started()
            await d.wait_log("agentapi connected")
            status = await d.wait_status(lambda s: s["messages"] == 5)
            assert status["source"]["state"] == "connected"
            first.signal(signal.SIGUSR1)  # agentapi saves its state...
            with anyio.fail_after(WAIT):
                while not state_file.exists():
                    await anyio.sleep(0.01)
            saved = json.loads(state_file.read_text())
            first.signal(signal.SIGKILL)  # ...and then dies without a clean stop
            await first.wait_exit()
            if not saved_state:
                state_file.unlink()
            await d.wait_log("agentapi disconnected")
            assert (await d.status())["source"]["state"] != "connected"
            restarted = time.monotonic()
            await second.start()
            await d.wait_log("agentapi connected", count=2)
            reconnect = time.monotonic() - restarted
            status = await d.wait_status(lambda s: s["messages"] == (5 if saved_state else 7))
            assert status["source"]["state"] == "connected"
            async with httpx.AsyncClient(trust_env=False) as client:
                now_serving = (await client.get(f"{second.url}/messages", timeout=WAIT)).json()["messages"]
            d.signal(signal.SIGTERM)
            rc, took = await d.wait_exit(LONG_DEADLINE + EXIT_SLACK)
            d.assert_clean()
    finally:
        first.kill()
        second.kill()
    timing(f"agentapi-restart-{'with' if saved_state else 'without'}-state[{anyio_backend}] reconnect", reconnect)
    timing(f"agentapi-restart-{'with' if saved_state else 'without'}-state[{anyio_backend}]", took)
    assert rc == 0, d.output()[-3000:]
    assert took < WELL_BEFORE
    stored = stored_messages(coderd)
    ids = [m["id"] for m in stored]
    assert len(ids) == len(set(ids)), f"duplicate ids: {ids}"
    assert ids == sorted(ids)
    earlier = [(m["id"], m["role"], m["message"], m["time"]) for m in saved["messages"]]
    assert len(earlier) == 5
    if saved_state:
        # The same conversation came back: the same ids, nothing doubled.
        assert [(m["id"], m["role"], m["content"], m["time"]) for m in stored] == earlier
    else:
        # A conversation that started over: the earlier messages are kept, the new ones follow.
        assert [(m["id"], m["role"], m["content"], m["time"]) for m in stored[:5]] == earlier
        assert ids == [0, 1, 2, 3, 4, 5, 6]
        assert [m["id"] for m in now_serving] == [0, 1]
        assert [(m["role"], m["content"], m["time"]) for m in stored[5:]] == [
            (m["role"], m["content"], m["time"]) for m in now_serving
        ]
        assert d.events("agentapi conversation started over; keeping the earlier messages before it")


# ---------------------------------------------------------------------------------------------
# a misbehaving event stream

RFC3339 = "2026-01-01T00:00:00.5Z"


def _update_frame(data: bytes) -> bytes:
    return b"event: message_update\ndata: " + data + b"\n\n"


def _fault_frames(api: FakeAgentAPI, fault: str) -> bytes | None:
    last = api.messages[-1].id
    if fault == "invalid-json":
        return _update_frame(b'{"id": ' + str(last).encode() + b', "role": "agent", "message": "unterminated')
    if fault == "deeply-nested-json":
        return _update_frame(b"[" * 100_000)
    if fault == "unknown-event":
        return b'event: tool_call\ndata: {"tool": "bash", "args": ["ls"]}\n\n'
    if fault == "non-utf8":
        head = b'{"id": ' + str(last).encode() + b', "role": "agent", "message": "bad bytes \xff\xfe\xc3 here", "time": "'
        return _update_frame(head + RFC3339.encode() + b'"}')
    if fault == "20-mib-event":
        content = ("y" * 1023 + "\n") * (20 * 1024)
        data = {"id": last, "role": "agent", "message": content, "time": RFC3339}
        frame = _update_frame(json.dumps(data).encode())
        assert len(frame) > 20 * 1024 * 1024
        return frame
    assert fault == "cut-mid-event"
    return None


SSE_FAULTS = ["cut-mid-event", "invalid-json", "deeply-nested-json", "unknown-event", "non-utf8", "20-mib-event"]


@pytest.mark.parametrize("fault", SSE_FAULTS)
async def test_event_stream_fault_then_later_events_apply(anyio_backend: str, tmp_path: Path, fault: str) -> None:
    api = FakeAgentAPI()
    small_conversation(api, 5)  # agent first (agentapi's message 0) and last: the agent's message is rewritten
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT="4",
        **coderd_env(coderd.url),
    ) as d:
        await d.wait_started()
        await d.wait_status(lambda s: s["source"]["state"] == "connected" and s["messages"] == 5)
        frames = _fault_frames(api, fault)
        injected = time.monotonic()
        if frames is None:
            api.cut_streams_mid_event()
            await d.wait_log("agentapi disconnected")
        else:
            api.inject_raw(frames)
        later = "the later update ─ applied after the fault " + "z" * 321
        api.update_last(later)
        expected = snapshot_body_size([m.as_message() for m in api.messages])
        status = await d.wait_status(lambda s: s["bytes"] == expected, timeout=WAIT)
        applied = time.monotonic() - injected
        assert status["source"]["state"] == "connected" and status["newest_id"] == api.messages[-1].id
        assert d.proc is not None and d.proc.poll() is None  # still running
        if fault == "cut-mid-event":
            assert api.subscribers_total >= 2  # it reconnected (the replay brought the update or it came live)
        else:
            assert api.subscribers_total == 1  # skipped in stream: no reconnect needed
        d.signal(signal.SIGTERM)
        rc, took = await d.wait_exit(4 + EXIT_SLACK)
        d.assert_clean()
    timing(f"sse-{fault}[{anyio_backend}] applied", applied)
    timing(f"sse-{fault}[{anyio_backend}]", took)
    assert rc == 0, d.output()[-3000:]
    stored = stored_messages(coderd)
    assert stored[-1]["content"] == later
    assert_same_conversation(stored, api)
    if fault in ("invalid-json", "deeply-nested-json"):
        assert d.events("malformed agentapi event skipped")
    if fault == "unknown-event":
        assert d.events("unknown agentapi event skipped")


@pytest.mark.parametrize(
    "garbage", [b"[" * 100_000, b"\xff\xfe not json", b'{"messages": 5}', None],
    ids=["deeply-nested", "binary", "wrong-shape", "no-answer"],
)
async def test_final_refresh_gets_garbage_buffer_is_stored(anyio_backend: str, tmp_path: Path, garbage: bytes | None) -> None:
    """agentapi's ``GET /messages`` answers junk (or never answers) at the stop: the tail's
    buffer is stored, and the refresh costs at most its own 1 s timeout."""
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    poisoned = False

    async def handler(ex: Exchange) -> None:
        if poisoned and ex.path == "/messages":
            api.requests[ex.path] += 1
            if garbage is None:
                await ex.hang()
            else:
                await ex.respond(200, [("content-type", "application/json")], garbage)
            return
        await api.handle(ex)

    async with serve(handler) as server, coderd.serve(), agentd(
        anyio_backend, tmp_path, AGENTD_AGENTAPI_URL=server.url, AGENTD_SHUTDOWN_TIMEOUT=str(LONG_DEADLINE),
        **coderd_env(coderd.url),
    ) as d:
        await d.wait_started()
        await d.wait_status(lambda s: s["source"]["state"] == "connected" and s["messages"] == 4)
        poisoned = True
        d.signal(signal.SIGTERM)
        rc, took = await d.wait_exit(LONG_DEADLINE + EXIT_SLACK)
        d.assert_clean()
    timing(f"refresh-garbage-{(garbage or b'no answer')[:8]!r}[{anyio_backend}]", took)
    assert rc == 0, d.output()[-3000:]
    assert took < WELL_BEFORE
    assert api.requests["/messages"] >= 1
    assert d.events("refresh failed; using the buffer as it is")
    assert_same_conversation(stored_messages(coderd), api)


# ---------------------------------------------------------------------------------------------
# a firehose: agentapi rewrites one message faster than agentd reads

#: The bound on agentd's resident memory while it is flooded, MiB.
FLOOD_RSS_BOUND_MIB = 150
FLOOD_UPDATES = 5_000


async def test_flood_of_updates_memory_bounded_newest_wins(anyio_backend: str, tmp_path: Path) -> None:
    api = FakeAgentAPI()
    api.add_message("agent", "╭─ agent ready ─╮")  # the agent's first screen: agentapi's PTY message 0
    api.add_message("user", "Write the whole module, please.")
    api.add_message("agent", "⏺ Starting…")
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    filler = ("│ " + "all work and no play makes the agent a dull typist ─╮ " * 2 + "\n") * 1_000
    assert len(filler) >= 64 * 1024
    # Growing from ~8 KiB to ~60 KiB of UTF-8, so the newest whole message still fits the body.
    lengths = [8_000 + (i * 48_000) // FLOOD_UPDATES for i in range(FLOOD_UPDATES)]
    contents = [f"update {i:05d}\n" + filler[: lengths[i]] for i in range(FLOOD_UPDATES)]
    assert 56 * 1024 < len(contents[-1].encode()) < 62 * 1024
    peak_kib = 0
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT="4",
        **coderd_env(coderd.url),
    ) as d:
        await d.wait_started()
        await d.wait_status(lambda s: s["source"]["state"] == "connected" and s["messages"] == len(api.messages))
        baseline_kib = d.rss_kib()
        done = False

        async def sample() -> None:
            nonlocal peak_kib
            while not done:
                peak_kib = max(peak_kib, d.rss_kib())
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            api.set_status("running")
            flood_started = time.monotonic()
            for content in contents:
                api.update_last(content)
                await anyio.lowlevel.checkpoint()
            flood_seconds = time.monotonic() - flood_started
            api.set_status("stable")
            expected = snapshot_body_size([m.as_message() for m in api.messages])
            status = await d.wait_status(lambda s: s["bytes"] == expected, timeout=30)
            caught_up = time.monotonic() - flood_started
            done = True
        hwm_kib = d.rss_kib("VmHWM")
        assert status["newest_id"] == 2 and status["source"]["state"] == "connected"
        d.signal(signal.SIGTERM)
        rc, took = await d.wait_exit(4 + EXIT_SLACK)
        d.assert_clean()
    timing(f"flood[{anyio_backend}] emit", flood_seconds)
    timing(f"flood[{anyio_backend}] caught-up", caught_up)
    timing(f"flood[{anyio_backend}] shutdown", took)
    print(
        f"FAULT-FLOOD[{anyio_backend}] updates={FLOOD_UPDATES} rate={FLOOD_UPDATES / flood_seconds:.0f}/s "
        f"baseline_rss={baseline_kib / 1024:.1f}MiB peak_rss={peak_kib / 1024:.1f}MiB hwm={hwm_kib / 1024:.1f}MiB "
        f"dropped_subscribers={api.dropped_subscribers} subscriptions={api.subscribers_total}"
    )
    assert rc == 0, d.output()[-3000:]
    assert hwm_kib < FLOOD_RSS_BOUND_MIB * 1024, f"peak RSS {hwm_kib / 1024:.1f} MiB"
    stored = stored_messages(coderd)
    assert [m["id"] for m in stored] == [0, 1, 2]
    assert stored[-1]["content"] == contents[-1]


# ---------------------------------------------------------------------------------------------
# signals at awkward moments


def _in_mask(pid: int, field: str, signum: int) -> bool:
    """True once ``signum`` is in the process's ``field`` mask of /proc/<pid>/status (``SigCgt``:
    a handler is in place; ``SigIgn``: ignored)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return False


def _sigterm_caught(pid: int) -> bool:
    """True once the process has a handler for SIGTERM."""
    return _in_mask(pid, "SigCgt", signal.SIGTERM)


@pytest.mark.parametrize("when", ["50ms", "first-handler"])
async def test_sigterm_during_startup_still_stores(anyio_backend: str, tmp_path: Path, when: str) -> None:
    """SIGTERM before agentd has read any event: the final refresh fetches the conversation.

    ``50ms`` signals 50 ms after spawn (agentd is still importing); ``first-handler`` signals
    the instant the process can take a signal at all (SIGTERM shows up in ``SigCgt``), long
    before it prints anything. Before the fix in agentd.cli the handler came only after the
    daemon's imports (~0.2 s) and both cases died of the signal with nothing stored.
    """
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, start=False, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT=str(LONG_DEADLINE),
        **coderd_env(coderd.url),
    ) as d:
        d.start()
        # Never before the handler is in place: a signal during the interpreter's own start-up
        # (~20-40 ms here) meets the default action, as for any program, and is not a case.
        with anyio.fail_after(WAIT):
            while not _sigterm_caught(d.pid):
                await anyio.lowlevel.checkpoint()
        if when == "50ms":
            await anyio.sleep(max(0.0, d.spawned + 0.05 - time.monotonic()))
        printed = d.output()
        d.signal(signal.SIGTERM)
        signalled_after = d.signalled - d.spawned if d.signalled else 0.0
        rc, took = await d.wait_exit(LONG_DEADLINE + EXIT_SLACK + 2.0)
        d.assert_clean()
    timing(f"sigterm-startup-{when}[{anyio_backend}] signalled-after-spawn", signalled_after)
    timing(f"sigterm-startup-{when}[{anyio_backend}]", took)
    assert printed == "", "the signal was meant to arrive before agentd printed anything"
    assert api.subscribers_total == 0 or when == "50ms"
    assert rc == 0, f"exit {rc}: {d.output()[-3000:]}"
    assert took < WELL_BEFORE
    assert_same_conversation(stored_messages(coderd), api)
    assert d.events("shutting down")[0]["why"] == "SIGTERM"


def _sigusr1_ignored(pid: int) -> bool:
    """True once the process ignores SIGUSR1: the entry shim's first act, before any import."""
    return _in_mask(pid, "SigIgn", signal.SIGUSR1)


async def test_stray_signals_during_startup_do_not_kill(anyio_backend: str, tmp_path: Path) -> None:
    """SIGUSR1, SIGUSR2 and SIGALRM while agentd is still importing (their default action would
    end it): ignored until the daemon takes them over; it starts, and SIGTERM stores."""
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, start=False, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT=str(LONG_DEADLINE),
        **coderd_env(coderd.url),
    ) as d:
        d.start()
        with anyio.fail_after(WAIT):
            while not _sigusr1_ignored(d.pid):
                await anyio.lowlevel.checkpoint()
        printed = d.output()
        for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
            os.kill(d.pid, signum)
        await d.wait_started()
        await api.wait_for_subscribers(1)
        d.signal(signal.SIGTERM)
        rc, _ = await d.wait_exit(LONG_DEADLINE + EXIT_SLACK)
        d.assert_clean()
    assert printed == "", "the signals were meant to arrive before agentd printed anything"
    assert rc == 0, f"exit {rc}: {d.output()[-3000:]}"
    assert_same_conversation(stored_messages(coderd), api)


@pytest.mark.parametrize("when", ["upload-in-flight", "during-startup"])
async def test_second_sigterm_gives_up_at_once(anyio_backend: str, tmp_path: Path, when: str) -> None:
    """A repeat within a second counts once; a deliberate second SIGTERM later gives up at once."""
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, hang=True)
    timeout = LONG_DEADLINE
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, start=False, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT=str(timeout),
        **coderd_env(coderd.url),
    ) as d:
        d.start()
        if when == "upload-in-flight":
            await d.wait_started()
            await api.wait_for_subscribers(1)
            d.signal(signal.SIGTERM)
            await coderd.wait_for(lambda: len(coderd.requests) >= 1, WAIT)
        else:
            with anyio.fail_after(WAIT):
                while not _sigterm_caught(d.pid):
                    await anyio.lowlevel.checkpoint()
            d.signal(signal.SIGTERM)
        await anyio.sleep(0.01)
        d.signal(signal.SIGTERM)  # the same signal again at once: counted once
        await coderd.wait_for(lambda: len(coderd.requests) >= 1, WAIT)
        await d.wait_log("shutting down")
        # Deliberate: a second after the first signal and after the daemon took it (signals
        # that came during start-up may carry no time of arrival: they count from then).
        counted = time.monotonic()
        assert d.proc is not None and d.signalled is not None
        await anyio.sleep(max(0.0, max(d.signalled, counted) + REPEAT_WINDOW + 0.05 - time.monotonic()))
        assert d.proc.poll() is None, "a repeat within a second must not give up"
        second = time.monotonic()
        d.signal(signal.SIGTERM)
        rc, _ = await d.wait_exit(timeout + EXIT_SLACK + 2.0)
        took = time.monotonic() - second
        d.assert_clean()
    timing(f"sigterm-twice-{when}[{anyio_backend}] second-to-exit", took)
    assert rc == 1, d.output()[-3000:]
    assert took < WELL_BEFORE, f"{took:.2f} s after the second SIGTERM"
    assert TASK not in coderd.stored
    if when == "upload-in-flight":  # during start-up Python may run the handler once for both
        assert d.events("signal repeated within a second: counted once")
    assert d.events("second signal: giving up on the snapshot")


@pytest.mark.parametrize("when", ["startup", "running"])
async def test_sigint_twice_within_milliseconds_counts_once(anyio_backend: str, tmp_path: Path, when: str) -> None:
    """``timeout -s INT`` or a shell signalling its process group delivers SIGINT twice within
    milliseconds: one stop, stored, exit 0 (issue 9 row 7)."""
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, start=False, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT="4",
        **coderd_env(coderd.url),
    ) as d:
        d.start()
        if when == "running":
            await d.wait_started()
            await api.wait_for_subscribers(1)
        else:
            with anyio.fail_after(WAIT):
                while not _sigterm_caught(d.pid):
                    await anyio.lowlevel.checkpoint()
        d.signal(signal.SIGINT)
        d.signal(signal.SIGINT)
        rc, _ = await d.wait_exit(4 + EXIT_SLACK + WAIT)
        d.assert_clean()
    assert rc == 0, d.output()[-3000:]
    assert_same_conversation(stored_messages(coderd), api)
    assert not d.events("second signal: giving up on the snapshot")
    assert d.events("shutting down")[0]["why"] == "SIGINT"


async def test_sighup_stores_and_exits_sigusr1_stores_and_runs_others_ignored(anyio_backend: str, tmp_path: Path) -> None:
    """Issue 9 row 5: ``agentd run &`` in a terminal that closes gets SIGHUP; SIGUSR1 is
    ``agentd snapshot``; SIGUSR2 and SIGALRM would kill a process without a handler."""
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT="4", **coderd_env(coderd.url),
    ) as d:
        await d.wait_started()
        await d.wait_status(lambda s: s["source"]["state"] == "connected" and s["messages"] == 4)
        for signum in (signal.SIGUSR2, signal.SIGALRM):
            d.signal(signum)
            await d.wait_log("signal ignored", count=1 if signum == signal.SIGUSR2 else 2)
        d.signal(signal.SIGUSR1)
        line = await d.wait_log("snapshot on signal")
        assert line["result"] == "stored" and line["signal"] == "SIGUSR1"
        assert len(coderd.answered(204)) == 1
        assert_same_conversation(stored_messages(coderd), api)
        api.add_message("agent", "⏺ One more line after the SIGUSR1 snapshot ✅")
        await d.wait_status(lambda s: s["messages"] == 5)
        assert d.proc is not None and d.proc.poll() is None, "agentd keeps running after SIGUSR1/SIGUSR2/SIGALRM"
        d.signal(signal.SIGHUP)
        rc, _ = await d.wait_exit(4 + EXIT_SLACK + WAIT)
        d.assert_clean()
    assert rc == 0, d.output()[-3000:]
    assert [line["signal"] for line in d.events("signal ignored")] == ["SIGUSR2", "SIGALRM"]
    assert d.events("shutting down")[0]["why"] == "SIGHUP"
    assert len(coderd.answered(204)) == 2
    assert_same_conversation(stored_messages(coderd), api)


#: Runs of the SIGTERM-at-a-random-moment loop, per backend.
RANDOM_SIGTERM_RUNS = 30


async def test_sigterm_at_random_offsets_after_start(anyio_backend: str, tmp_path: Path) -> None:
    """SIGTERM 0-300 ms after spawn, 30 runs: every run whose process could take a signal
    (SIGTERM in ``SigCgt``) when it was sent stores and exits 0; before that the interpreter
    is still starting and the default action ends it, as for any program. The window (spawn to
    handler) is printed as FAULT-TIMING."""
    import random

    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    windows: list[float] = []
    outcomes: dict[str, int] = {"stored": 0, "before-handler": 0}
    async with api.serve(), coderd.serve():
        for run in range(RANDOM_SIGTERM_RUNS):
            workdir = tmp_path / f"run{run}"
            workdir.mkdir()
            offset = random.uniform(0.0, 0.3)
            async with agentd(anyio_backend, workdir, start=False, AGENTD_AGENTAPI_URL=api.url,
                              AGENTD_SHUTDOWN_TIMEOUT="4", **coderd_env(coderd.url)) as d:
                d.start()
                seen: float | None = None
                while time.monotonic() < d.spawned + offset:
                    if seen is None and _sigterm_caught(d.pid):
                        seen = time.monotonic() - d.spawned
                    await anyio.sleep(0.001)
                caught = _sigterm_caught(d.pid)
                if seen is None and caught:
                    seen = time.monotonic() - d.spawned
                if seen is not None:
                    windows.append(seen)
                before = len(coderd.answered(204))
                d.signal(signal.SIGTERM)
                rc, _ = await d.wait_exit(4 + EXIT_SLACK + WAIT)
                if not caught and rc == -signal.SIGTERM:
                    outcomes["before-handler"] += 1
                    continue
                d.assert_clean()
                assert rc == 0, f"run {run}, SIGTERM {offset * 1000:.0f} ms after spawn: exit {rc}\n{d.output()[-3000:]}"
                assert len(coderd.answered(204)) == before + 1, f"run {run}: nothing stored"
                assert d.events("shutting down")[0]["why"] == "SIGTERM"
                outcomes["stored"] += 1
    windows.sort()
    if windows:
        timing(f"sigterm-random[{anyio_backend}] spawn-to-handler-median", windows[len(windows) // 2])
        timing(f"sigterm-random[{anyio_backend}] spawn-to-handler-max", windows[-1])
    print(f"FAULT-COUNT sigterm-random[{anyio_backend}] {outcomes}")
    assert outcomes["stored"] >= 1


async def test_sigterm_while_a_checkpoint_upload_hangs(anyio_backend: str, tmp_path: Path) -> None:
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, script=["hang"])  # the first request hangs, then normal
    timeout = LONG_DEADLINE
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT=str(timeout),
        AGENTD_CHECKPOINT_INTERVAL="1", **coderd_env(coderd.url),
    ) as d:
        await d.wait_started()
        await d.wait_status(lambda s: s["source"]["state"] == "connected" and s["messages"] == 4)
        api.set_status("running")
        api.add_message("agent", "⏺ Done: the turn that triggers a checkpoint.")
        api.set_status("stable")  # running -> stable: a finished turn, a checkpoint upload
        await coderd.wait_for(lambda: len(coderd.requests) >= 1, WAIT)
        assert coderd.requests[0].status is None  # in flight, unanswered
        api.add_message("user", "One more thing before you stop…")
        d.signal(signal.SIGTERM)
        rc, took = await d.wait_exit(timeout + EXIT_SLACK)
        d.assert_clean()
    timing(f"sigterm-during-checkpoint[{anyio_backend}]", took)
    assert rc == 0, d.output()[-3000:]
    assert took < WELL_BEFORE
    # The stop uploads the live tail's buffer, then a second time if the confirming GET /messages
    # held the message added just before SIGTERM that the stream had not delivered yet.
    assert 2 <= len(coderd.requests) <= 3 and all(r.status == 204 for r in coderd.requests[1:])
    assert_same_conversation(stored_messages(coderd), api)


# ---------------------------------------------------------------------------------------------
# coderd behind TLS with a certificate from a private CA


def _make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key)."""
    ca_pem, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key = directory / "server.pem", directory / "server.key"
    try:
        from cryptography import x509  # noqa: F401
    except ImportError:
        pass
    else:
        return _make_certificates_cryptography(directory)
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the cryptography package nor the openssl command is on this machine")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30)

    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_pem), "-days", "2",
        "-subj", "/CN=agentd fault-suite CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    csr = directory / "server.csr"
    run("req", "-new", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext = directory / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_pem), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca_pem, cert, key


def _make_certificates_cryptography(directory: Path) -> tuple[Path, Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agentd fault-suite CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return _make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("trust", ["none", "AGENTD_CA_FILE", "SSL_CERT_FILE"])
async def test_coderd_behind_tls_with_a_private_ca(
    anyio_backend: str, tmp_path: Path, certificates: tuple[Path, Path, Path], trust: str
) -> None:
    ca_pem, cert, key = certificates
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    timeout = 1.0 if trust == "none" else 4.0
    env = {} if trust == "none" else {trust: str(ca_pem)}
    async with api.serve(), coderd.serve(ssl_context=server_ctx), agentd(
        anyio_backend, tmp_path, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT=str(timeout),
        **coderd_env(coderd.url), **env,
    ) as d:
        assert coderd.url.startswith("https://127.0.0.1:")
        await d.wait_started()
        await api.wait_for_subscribers(1)
        d.signal(signal.SIGTERM)
        rc, took = await d.wait_exit(timeout + EXIT_SLACK + 2.0)
        d.assert_clean()
    timing(f"tls-{trust}[{anyio_backend}]", took)
    assert took <= timeout + EXIT_SLACK
    if trust == "none":
        assert rc == 1
        assert TASK not in coderd.stored
        assert not coderd.requests, "a request got through an unverified TLS connection"
        (line,) = d.events("snapshot not stored")
        assert "certificate verify failed" in line["reason"].lower(), line["reason"]
        assert line["attempts"] == 1, "an untrusted certificate is final: no retries"
        assert "AGENTD_CA_FILE" in line["reason"]
    else:
        assert rc == 0, d.output()[-3000:]
        assert_same_conversation(stored_messages(coderd), api)


# ---------------------------------------------------------------------------------------------
# the control socket under attack (issue 9 row 3)


async def _status_once_free(d: Agentd, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """``status`` once the flood is gone: connections made while agentd still holds its cap of
    them (or has not accepted the backlog yet) are closed at once, so retry within the bound."""
    with anyio.fail_after(WAIT + 5):
        while True:
            try:
                answer = await control.request(d.socket, {"command": "status"}, 3.0)
            except control.ControlError:
                answer = {}
            if answer.get("ok") and predicate(answer["status"]):
                return answer["status"]
            await anyio.sleep(0.05)


def _open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _idle_connections(path: Path, n: int) -> list[Any]:
    """Up to ``n`` idle connections to the Unix socket ``path`` (those the backlog takes)."""
    import socket as sockets

    held = []
    for _ in range(n):
        s = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except OSError:  # EAGAIN: the backlog is full
            s.close()
            continue
        held.append(s)
    return held


async def test_control_socket_survives_emfile_and_caps_connections(anyio_backend: str, tmp_path: Path) -> None:
    """1 000 idle connections with agentd's fd limit at 64: accept fails with EMFILE, agentd
    backs off (one warning), keeps tailing, answers ``status`` again once they are gone, and
    stores on SIGTERM (exit 0, not 70)."""
    import resource

    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, start=False, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT="4",
        **coderd_env(coderd.url),
    ) as d:
        d.preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        d.start()
        await d.wait_started()
        await d.wait_status(lambda s: s["source"]["state"] == "connected" and s["messages"] == 4)
        base = _open_fds(d.pid)
        held: list[Any] = []
        try:
            for _ in range(10):  # the backlog refills as agentd accepts
                held += _idle_connections(d.socket, 100)
                await anyio.sleep(0.05)
            await d.wait_log("control socket cannot accept; backing off")
            assert d.proc is not None and d.proc.poll() is None, "EMFILE must not end the daemon"
            assert _open_fds(d.pid) <= 64
            api.add_message("agent", "⏺ Written while the control socket was flooded ✅")
        finally:
            for s in held:
                s.close()
        status = await _status_once_free(d, lambda s: s["messages"] == 5)
        assert status["source"]["state"] == "connected"
        assert _open_fds(d.pid) <= base + 2
        d.signal(signal.SIGTERM)
        rc, _ = await d.wait_exit(4 + EXIT_SLACK + WAIT)
        d.assert_clean()
    assert rc == 0, d.output()[-3000:]
    assert len(d.events("control socket cannot accept; backing off")) == 1, "logged once per run of failures"
    assert len(held) > 64
    assert_same_conversation(stored_messages(coderd), api)


async def test_control_socket_caps_connections_and_times_out_idle_ones(anyio_backend: str, tmp_path: Path) -> None:
    """200 idle connections: at most 64 are held (the rest closed at once), an idle one gets a
    one-line error and is closed after the read deadline; ``status`` answers once they are gone;
    the socket is 0600 under umask 000 and agentd's umask is never changed."""
    import os

    from agentd.control import MAX_CONNECTIONS, READ_TIMEOUT

    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, start=False, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT="4",
        **coderd_env(coderd.url),
    ) as d:
        d.preexec = lambda: os.umask(0)
        d.start()
        await d.wait_started()
        await d.wait_status(lambda s: s["source"]["state"] == "connected" and s["messages"] == 4)
        assert d.socket.stat().st_mode & 0o777 == 0o600
        umask = [ln for ln in Path(f"/proc/{d.pid}/status").read_text().splitlines() if ln.startswith("Umask:")]
        assert umask == ["Umask:\t0000"], umask
        base = _open_fds(d.pid)
        held: list[Any] = []
        try:
            for _ in range(4):
                held += _idle_connections(d.socket, 50)
                await anyio.sleep(0.1)
            await anyio.sleep(0.5)
            assert _open_fds(d.pid) <= base + MAX_CONNECTIONS + 2
            # The first connection: a one-line error after the read deadline, then EOF.
            first = held[0]
            first.setblocking(True)
            first.settimeout(READ_TIMEOUT + WAIT)
            answer = b""
            while chunk := first.recv(4096):
                answer += chunk
            assert json.loads(answer)["ok"] is False and "TimeoutError" in json.loads(answer)["error"]
        finally:
            for s in held:
                s.close()
        await _status_once_free(d, lambda s: s["messages"] == 4)
        d.signal(signal.SIGTERM)
        rc, _ = await d.wait_exit(4 + EXIT_SLACK + WAIT)
        d.assert_clean()
    assert rc == 0, d.output()[-3000:]
    assert len(held) > MAX_CONNECTIONS
    assert_same_conversation(stored_messages(coderd), api)


# ---------------------------------------------------------------------------------------------
# secrets in URLs (issue 9 row 13)


async def test_url_userinfo_is_never_shown(anyio_backend: str, tmp_path: Path) -> None:
    """``https://user:password@…`` in either URL: the password is in no log line, in no
    ``status --json`` answer and in no error, like the agent token."""
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, script=[503])
    api_secret, coderd_secret = "apipw-" + secrets.token_hex(6), "coderdpw-" + secrets.token_hex(6)
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, start=False, AGENTD_AGENTAPI_URL=f"http://tail-user:{api_secret}@127.0.0.1:{api.port}",
        CODER_AGENT_URL=coderd.url.replace("http://", f"http://coder-user:{coderd_secret}@"),
        AGENTD_SHUTDOWN_TIMEOUT="4",
    ) as d:
        d.start()
        await d.wait_started()
        await d.wait_status(lambda s: s["source"]["state"] == "connected" and s["messages"] == 4)
        status = await d.status()
        assert status["source"]["url"].startswith("http://[REDACTED]@127.0.0.1:")
        cli = subprocess.run(
            [sys.executable, "-m", "agentd", "status", "--json", "--socket", str(d.socket)],
            capture_output=True, env=clean_env(), timeout=WAIT * 3, check=False,
        )
        shown = cli.stdout.decode() + cli.stderr.decode()
        assert cli.returncode == 0, shown
        assert "[REDACTED]@127.0.0.1" in shown
        d.signal(signal.SIGTERM)
        rc, _ = await d.wait_exit(4 + EXIT_SLACK + WAIT)
        d.assert_clean()
    assert rc == 0, d.output()[-3000:]
    assert [r.status for r in coderd.requests] == [503, 204]
    started = d.events("agentd started")[0]
    assert "[REDACTED]@" in started["agentapi"] and "[REDACTED]@" in started["coderd"]
    for text in (d.output(), shown):
        for secret in (api_secret, coderd_secret, "tail-user", "coder-user"):
            assert secret not in text, f"{secret} was shown"


# ---------------------------------------------------------------------------------------------
# shutdown as fast as one POST (issue 13): a live tail's buffer first, then one GET to confirm


@pytest.mark.parametrize("size", ["short", "1MiB"])
async def test_last_update_just_before_sigterm_is_not_lost(anyio_backend: str, tmp_path: Path, size: str) -> None:
    """The tail is live and caught up, so the buffer is uploaded at once (before any
    ``GET /messages``); an update agentapi sends just before SIGTERM, which the stream may not
    have delivered yet, is still stored: one ``GET /messages`` confirms the upload, and a view
    that differs is uploaded again. Five stops in a row."""
    for run in range(5):
        api = FakeAgentAPI()
        small_conversation(api)
        fetched: list[float] = []

        async def handler(ex: Exchange, api: FakeAgentAPI = api, fetched: list[float] = fetched) -> None:
            if ex.path == "/messages":
                fetched.append(time.monotonic())
            await api.handle(ex)

        coderd = FakeCoderd(token=TOKEN, tasks={TASK})
        workdir = tmp_path / f"run{run}"
        workdir.mkdir()
        async with serve(handler) as server, coderd.serve(), agentd(
            anyio_backend, workdir, AGENTD_AGENTAPI_URL=server.url, AGENTD_SHUTDOWN_TIMEOUT="6",
            **coderd_env(coderd.url),
        ) as d:
            await d.wait_started()
            await d.wait_status(lambda s: s["source"]["state"] == "connected" and s["messages"] == 4)
            final = f"⏺ Run {run}: the reply's last words ─ sent just before the stop ✅ " + (
                "" if size == "short" else "╭─ box ─╮ │ " * (1024 * 1024 // 30)
            )
            api.add_message("agent", final[: len(final) // 2])
            await d.wait_status(lambda s: s["messages"] == 5)
            api.update_last(final)  # on its way over the stream...
            d.signal(signal.SIGTERM)  # ...as the stop arrives
            rc, _ = await d.wait_exit(6 + EXIT_SLACK + WAIT)
            d.assert_clean()
        assert rc == 0, d.output()[-3000:]
        stored = stored_messages(coderd)
        assert stored[-1]["content"] == final or (size == "1MiB" and final.endswith(stored[-1]["content"][-20_000:]))
        ids = [m["id"] for m in stored]
        assert ids == sorted(ids) and ids[-1] == 4 and (size == "1MiB" or ids == [0, 1, 2, 3, 4])
        assert len(fetched) == 1, "one GET /messages, to confirm"
        assert coderd.requests[0].monotonic < fetched[0], "the live buffer went first, not after a GET"
        assert 1 <= len(coderd.requests) <= 2
        timing(f"last-update-{size}[{anyio_backend}] run{run} uploads", len(coderd.requests))
