"""Issue 3 end to end: `agentd snapshot` / `status` / `shutdown-hook`, the persisted buffer,
checkpoints and the control socket, with real agentd processes against the stand-ins on loopback.

The stand-ins (FakeAgentAPI, FakeCoderd) run in the test's own event loop, on both anyio
backends; the daemon runs as a process on the same backend (``AGENTD_ASYNC_BACKEND``). Nothing
of agentd's own code is imported: every check goes through its command line, its control
socket's wire format, its state file or what coderd received.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import EXIT_SLACK, assert_token_absent, clean_env, free_port, wait_until

from agentd.testing import FakeAgentAPI, FakeCoderd, conversations

pytestmark = pytest.mark.anyio

TOKEN = "tok-hooks-" + "9f8e7d6c5b4a3210" * 2
WRONG_TOKEN = "tok-someone-else-0123456789"
TASK = str(uuid.uuid4())
STARTUP = 10.0  # seconds: a daemon's start, generous for a loaded 2-core machine


# -- processes ---------------------------------------------------------------------------------


class Proc:
    """A process whose stdout and stderr go to files (read back with :meth:`output`)."""

    def __init__(self, argv: list[str], env: dict[str, str], logdir: Path, name: str) -> None:
        self.out_path = logdir / f"{name}.out"
        self.err_path = logdir / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def wait(self, timeout: float) -> int:
        with anyio.fail_after(timeout):
            while self.proc.poll() is None:
                await anyio.sleep(0.02)
        return self.proc.returncode

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def output(self) -> str:
        return self.stdout() + self.stderr()

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines (AGENTD_LOG_FORMAT=json) on stderr."""
        return parse_logs(self.stderr())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def parse_logs(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            lines.append(item)
    return lines


def warnings_of(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [item for item in logs if item.get("level") == "warning"]


@pytest.fixture
def procs():
    """Processes started by the test; whatever is left is killed at the end."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


class World:
    """Paths and environment for one test's agentd processes."""

    def __init__(self, tmp_path: Path, short_dir: Path, backend: str, procs: list[Proc]) -> None:
        self.tmp = tmp_path
        self.state_dir = tmp_path / "state"
        self.socket = short_dir / "agentd.sock"
        self.backend = backend
        self.procs = procs
        self.count = 0

    def env(self, coderd_url: str, agentapi_url: str, **extra: str | None) -> dict[str, str]:
        env = clean_env()
        env.update(
            CODER_AGENT_URL=coderd_url,
            CODER_AGENT_TOKEN=TOKEN,
            AGENTD_TASK_ID=TASK,
            AGENTD_AGENTAPI_URL=agentapi_url,
            AGENTD_STATE_DIR=str(self.state_dir),
            AGENTD_SOCKET=str(self.socket),
            AGENTD_LOG_FORMAT="json",
            AGENTD_SHUTDOWN_TIMEOUT="4",
            AGENTD_ASYNC_BACKEND=self.backend,
        )
        for key, value in extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def client_env(self, **extra: str) -> dict[str, str]:
        """Only the socket: a client that fell back to working alone would fail (no settings)."""
        env = clean_env()
        env.update(AGENTD_SOCKET=str(self.socket), AGENTD_ASYNC_BACKEND=self.backend, **extra)
        return env

    def start(self, env: dict[str, str], *args: str, argv: list[str] | None = None) -> Proc:
        self.count += 1
        argv = argv or [sys.executable, "-m", "agentd", "run", *args]
        proc = Proc(argv, env, self.tmp, f"agentd-{self.count}")
        self.procs.append(proc)
        return proc

    def state_file(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state_dir / "state.json").read_bytes())
        except (OSError, ValueError):
            return None


@pytest.fixture
def world(tmp_path, short_dir, anyio_backend, procs):
    return World(tmp_path, short_dir, anyio_backend, procs)


async def agentd(*args: str, env: dict[str, str], timeout: float = 20.0) -> tuple[int, str, str]:
    """Run an agentd client command to completion; ``(exit status, stdout, stderr)``."""
    with anyio.fail_after(timeout):
        result = await anyio.run_process([sys.executable, "-m", "agentd", *args], env=env, check=False)
    return result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")


# -- the control socket's wire format (CONTROL: one JSON line each way) -------------------------


async def ask(sock: Path, payload: dict[str, Any], timeout: float = 3.0) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        stream = await anyio.connect_unix(sock)
        async with stream:
            await stream.send(json.dumps(payload).encode() + b"\n")
            data = b""
            while b"\n" not in data:
                data += await stream.receive()
    return json.loads(data.split(b"\n", 1)[0])


async def wait_status(sock: Path, predicate, timeout: float = STARTUP, proc: Proc | None = None) -> dict[str, Any]:
    """Poll the daemon's status until ``predicate(status)``; returns that status."""
    last: Any = None
    try:
        with anyio.fail_after(timeout):
            while True:
                if proc is not None and not proc.alive():
                    raise AssertionError(f"daemon exited {proc.proc.returncode}: {proc.output()[-2000:]}")
                try:
                    answer = await ask(sock, {"command": "status"})
                    last = answer.get("status")
                    if last is not None and predicate(last):
                        return last
                except (OSError, anyio.EndOfStream, anyio.BrokenResourceError, ValueError, TimeoutError):
                    pass
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"status never matched; last: {last}") from None


# -- expectations, computed independently of agentd ---------------------------------------------


def wire(api: FakeAgentAPI, first: int = 0) -> list[tuple[int, str, str, str]]:
    return [(m.id, m.role, m.content, m.time) for m in api.messages[first:]]


def stored_wire(coderd: FakeCoderd) -> list[tuple[int, str, str, str]]:
    snap = coderd.stored[TASK]
    return [(m["id"], m["role"], m["content"], m["time"]) for m in snap.messages]


def expected_body(messages: list[tuple[int, str, str, str]]) -> bytes:
    """The body agentapi's own ``GET /messages`` shape gives for these (untrimmed) messages."""
    items = [{"id": i, "content": c, "role": r, "time": t} for i, r, c, t in messages]
    return json.dumps({"messages": items}, ensure_ascii=False, separators=(",", ":")).encode()


def snapshot_posts(coderd: FakeCoderd) -> list:
    return [r for r in coderd.requests if r.path.endswith("/log-snapshot")]


def assert_no_token(*texts: str) -> None:
    assert_token_absent(TOKEN, *texts)


def parse_iso(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def one_line(stdout: str) -> str:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {stdout!r}"
    return lines[0]


@asynccontextmanager
async def servers(messages: int = 3, token: str = TOKEN, **api_options: Any):
    api = FakeAgentAPI(**api_options)
    api.load(conversations.generic_conversation(messages))
    if "status" not in api_options:
        api.set_status("stable")  # agentapi starts `running`; the agent has settled since
    coderd = FakeCoderd(token=token, tasks={TASK})
    async with coderd.serve(), api.serve():
        yield api, coderd


def finished_turn(api: FakeAgentAPI, n: int) -> None:
    """One agent turn as agentapi shows it: user asks, agent types (running), then stable."""
    api.add_message("user", f"turn {n}: please do step {n}")
    api.set_status("running")
    api.add_message("agent", f"⏺ turn {n}: working ─")
    api.update_last(f"⏺ turn {n}: working ─ done ✅")
    api.set_status("stable")


# -- agentd snapshot ------------------------------------------------------------------------------


async def test_snapshot_through_running_daemon_stores_and_leaves_it_running(world):
    async with servers(3) as (api, coderd):
        daemon = world.start(world.env(coderd.url, api.url))
        await wait_status(world.socket, lambda s: s["messages"] == 3 and s["source"]["state"] == "connected", proc=daemon)
        assert stat.S_IMODE(os.lstat(world.socket).st_mode) == 0o600, "the control socket is private"

        code, out, err = await agentd("snapshot", "--timeout", "5", env=world.client_env())
        assert code == 0, out + err
        body = expected_body(wire(api))
        assert one_line(out) == f"stored: 3 messages, {len(body)} bytes, 1 attempt"
        assert stored_wire(coderd) == wire(api)
        assert coderd.stored[TASK].body == body
        assert len(snapshot_posts(coderd)) == 1

        assert daemon.alive(), "the daemon keeps running after a snapshot request"
        upload = (await ask(world.socket, {"command": "status"}))["status"]["last_upload"]
        assert (upload["outcome"], upload["http_status"], upload["bytes"]) == ("stored", 204, len(body))

        code, out2, err2 = await agentd("snapshot", "--timeout", "5", env=world.client_env())
        assert code == 0, out2 + err2
        assert "unchanged" in one_line(out2)
        assert len(snapshot_posts(coderd)) == 1, "an unchanged conversation is not sent again"

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(10) == 0
        assert len(snapshot_posts(coderd)) == 1, "shutdown with the acknowledged body sends nothing"
    assert_no_token(daemon.output(), out, err, out2, err2)


async def test_snapshot_through_daemon_with_coderd_refusing_the_token_exits_1_and_says_why(world):
    async with servers(2, token=WRONG_TOKEN) as (api, coderd):
        daemon = world.start(world.env(coderd.url, api.url))
        await wait_status(world.socket, lambda s: s["messages"] == 2, proc=daemon)

        code, out, err = await agentd("snapshot", "--timeout", "5", env=world.client_env())
        assert code == 1, out + err
        line = one_line(out)
        assert line.startswith("not stored:") and "401" in line and "Workspace agent not authorized." in line, line
        assert [r.status for r in snapshot_posts(coderd)] == [401], "401 is final: no retry"
        assert coderd.requests[0].auth == "invalid"
        assert TASK not in coderd.stored

        assert daemon.alive()
        status = await wait_status(world.socket, lambda s: s["last_upload"] is not None)
        assert (status["last_upload"]["outcome"], status["last_upload"]["http_status"]) == ("failed", 401)

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(10) == 1, "still not stored at shutdown: exit 1"
    assert_no_token(daemon.output(), out, err)


async def test_snapshot_without_daemon_and_agentapi_up_stores_and_remembers(world):
    async with servers(4) as (api, coderd):
        env = world.env(coderd.url, api.url)
        code, out, err = await agentd("snapshot", "--timeout", "5", env=env)
        assert code == 0, out + err
        body = expected_body(wire(api))
        assert one_line(out) == f"stored: 4 messages, {len(body)} bytes, 1 attempt"
        assert coderd.stored[TASK].body == body
        assert api.requests["/messages"] == 1

        # The state file now knows what coderd holds: the same conversation is not sent again.
        code, out2, err2 = await agentd("snapshot", "--timeout", "5", env=env)
        assert code == 0, out2 + err2
        assert "unchanged" in one_line(out2)
        assert len(snapshot_posts(coderd)) == 1
    assert_no_token(out, err, out2, err2)


async def test_snapshot_without_daemon_and_agentapi_down_stores_the_persisted_buffer(world):
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    api = FakeAgentAPI()
    api.load(conversations.generic_conversation(5))
    async with coderd.serve():
        async with api.serve():
            daemon = world.start(world.env(coderd.url, api.url))
            await wait_status(world.socket, lambda s: s["messages"] == 5, proc=daemon)
            await wait_until(lambda: len((world.state_file() or {}).get("messages", [])) == 5, 30, "the state file")
            daemon.signal(signal.SIGKILL)
            await daemon.wait(5)
            api_url = api.url
        assert not snapshot_posts(coderd)
        code, out, err = await agentd("snapshot", "--timeout", "3", env=world.env(coderd.url, api_url))
        assert code == 0, out + err
        assert one_line(out).startswith("stored: 5 messages")
        assert stored_wire(coderd) == wire(api)
    assert_no_token(daemon.output(), out, err)


# -- crash safety ---------------------------------------------------------------------------------


async def test_kill9_then_restart_with_agentapi_down_stores_the_pre_crash_messages(world):
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    api = FakeAgentAPI()
    api.load(conversations.generic_conversation(4))
    async with coderd.serve():
        async with api.serve():
            env = world.env(coderd.url, api.url)
            first = world.start(env)
            await wait_status(world.socket, lambda s: s["messages"] == 4, proc=first)

            # A second daemon on the same socket refuses to start and names it; the first lives on.
            second = world.start(env)
            assert await second.wait(STARTUP) == 73
            named = [line for line in second.stderr().splitlines() if str(world.socket) in line]
            assert len(named) == 1 and "another agentd" in named[0], second.output()
            assert first.alive()
            await wait_status(world.socket, lambda s: s["pid"] == first.pid)

            await wait_until(lambda: len((world.state_file() or {}).get("messages", [])) == 4, 30, "the state file")
            assert stat.S_IMODE(os.stat(world.state_dir / "state.json").st_mode) == 0o600, "the state file is private"
            first.signal(signal.SIGKILL)
            await first.wait(5)
        # agentapi is gone now; the crashed daemon left its socket file behind.
        assert world.socket.exists()
        with pytest.raises(ConnectionRefusedError):
            await ask(world.socket, {"command": "status"})

        third = world.start(env)
        status = await wait_status(world.socket, lambda s: s["pid"] == third.pid, proc=third)
        assert status["messages"] == 4 and status["newest_id"] == 3, status
        assert status["source"]["state"] in ("connecting", "disconnected")
        third.signal(signal.SIGTERM)
        assert await third.wait(10) == 0
        assert stored_wire(coderd) == wire(api), "the pre-crash conversation is stored"
    assert_no_token(first.output(), second.output(), third.output())


@pytest.mark.parametrize("damage", ["garbage", "unreadable"])
async def test_corrupt_or_unreadable_state_file_is_moved_aside_and_the_daemon_stores(world, damage):
    world.state_dir.mkdir(mode=0o700)
    garbage = b"\x00\xff\xfe garbage \x80\x81{\"version\": 1, \"messages\": [" + os.urandom(64)
    if damage == "garbage":
        (world.state_dir / "state.json").write_bytes(garbage)
    else:  # reading fails with EISDIR (root reads any file, so no chmod here)
        (world.state_dir / "state.json").mkdir()
    async with servers(3) as (api, coderd):
        daemon = world.start(world.env(coderd.url, api.url))
        await wait_status(world.socket, lambda s: s["messages"] == 3, proc=daemon)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(10) == 0
        assert stored_wire(coderd) == wire(api)
    warnings = warnings_of(daemon.logs())
    word = "corrupt" if damage == "garbage" else "unreadable"
    assert len(warnings) == 1 and word in warnings[0]["event"] and "moved aside" in warnings[0]["event"], warnings
    aside = [p for p in world.state_dir.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert len(aside) == 1, "the damaged file is kept aside"
    if damage == "garbage":
        assert aside[0].read_bytes() == garbage, "untouched"
    assert len(world.state_file()["messages"]) == 3, "a fresh state file is written"
    assert_no_token(daemon.output())


def _ro_mount_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = tempfile.mkdtemp(prefix="agh-ro-", dir="/tmp")
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs -o ro tmpfs "$0" && ! touch "$0/x" 2>/dev/null', probe],
            capture_output=True, timeout=10,
        )
        return result.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


@pytest.mark.parametrize("variant", ["parent-is-a-file", "read-only-mount"])
async def test_unwritable_state_dir_degrades_to_memory_only_and_stores(world, variant):
    """As root chmod stops nothing, so: a state dir under a regular file (with the default
    socket there too, so the control socket is unavailable as well), or a read-only tmpfs
    mounted over it in a private mount namespace (with the socket elsewhere)."""
    async with servers(3) as (api, coderd):
        if variant == "parent-is-a-file":
            blocker = world.tmp / "blocker"
            blocker.write_text("a regular file, not a directory")
            world.state_dir = blocker / "state"
            env = world.env(coderd.url, api.url, AGENTD_SOCKET=None)
            daemon = world.start(env)
            await wait_until(lambda: not daemon.alive() or any(
                i.get("event") == "agentd started" for i in daemon.logs()), STARTUP, "agentd started")
            assert daemon.alive(), daemon.output()[-3000:]
            await api.wait_for_subscribers(1, timeout=STARTUP)
            await wait_until(lambda: any("memory only" in w["event"] for w in warnings_of(daemon.logs())),
                             STARTUP, "the failed state write")
        else:
            if not _ro_mount_works():
                pytest.skip("cannot mount a read-only tmpfs in a private mount namespace here")
            world.state_dir.mkdir()
            env = world.env(coderd.url, api.url)
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', str(world.state_dir),
                    sys.executable, "-m", "agentd", "run"]
            daemon = world.start(env, argv=argv)
            status = await wait_status(world.socket, lambda s: s["messages"] == 3 and s["persisted"] is False, proc=daemon)
            # More writes follow (at the upload and at exit): still one warning.
            api.add_message("user", "one more after the first failed write")
            status = await wait_status(world.socket, lambda s: s["messages"] == 4, proc=daemon)
            assert status["persisted"] is False
        assert daemon.alive()
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(10) == 0, daemon.output()[-3000:]
        assert stored_wire(coderd) == wire(api)
    state_warnings = [w for w in warnings_of(daemon.logs()) if w.get("component") == "agentd.state"]
    assert len(state_warnings) == 1, state_warnings
    assert "memory only" in state_warnings[0]["event"]
    others = [w for w in warnings_of(daemon.logs()) if w.get("component") != "agentd.state"]
    if variant == "read-only-mount":
        assert others == [], others
        assert not (world.state_dir / "state.json").exists(), "the mount hid nothing: writes never landed"
    else:
        assert [w["component"] for w in others] == ["agentd.daemon"], others  # the control socket
    assert_no_token(daemon.output())


# -- checkpoints ------------------------------------------------------------------------------------


async def test_finished_turn_uploads_a_checkpoint_and_unchanged_shutdown_sends_nothing(world):
    async with servers(2) as (api, coderd):
        daemon = world.start(world.env(coderd.url, api.url, AGENTD_CHECKPOINT_INTERVAL="1"))
        await wait_status(world.socket, lambda s: s["messages"] == 2 and s["agent_status"] == "stable", proc=daemon)
        assert snapshot_posts(coderd) == [], "no checkpoint without a finished turn"  # and none later: see the end

        finished_turn(api, 1)
        turn_done = time.monotonic()
        await wait_until(lambda: len(snapshot_posts(coderd)) == 1, 30, "a checkpoint")
        post = snapshot_posts(coderd)[0]
        # At once after the finished turn (the interval only spaces checkpoints apart).
        assert post.status == 204 and post.monotonic - turn_done <= 1.0 + EXIT_SLACK
        assert stored_wire(coderd) == wire(api) and len(wire(api)) == 4

        status = await wait_status(world.socket, lambda s: s["last_upload"] is not None)
        assert status["last_upload"]["outcome"] == "stored"
        await anyio.sleep(0.3)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(10) == 0
        assert len(snapshot_posts(coderd)) == 1, "the acknowledged conversation is not sent again at shutdown"
    assert_no_token(daemon.output())


async def test_checkpoints_are_rate_limited_and_a_later_change_is_sent_at_shutdown(world):
    async with servers(2) as (api, coderd):
        daemon = world.start(world.env(coderd.url, api.url, AGENTD_CHECKPOINT_INTERVAL="1"))
        await wait_status(world.socket, lambda s: s["messages"] == 2 and s["agent_status"] == "stable", proc=daemon)
        start = time.monotonic()
        for n in range(10):  # ten finished turns within about a second
            finished_turn(api, n)
            await anyio.sleep(0.1)
        burst_end = time.monotonic()
        # The last turn's conversation is checkpointed, at most one interval later.
        await wait_until(lambda: coderd.stored.get(TASK) is not None and stored_wire(coderd) == wire(api, 12),
                         30, "the checkpoint of the last turn")
        await anyio.sleep(0.5)
        posts = snapshot_posts(coderd)
        times = [p.monotonic for p in posts]
        assert all(p.status == 204 for p in posts)
        # One at once, then at most one an interval (1 s) for as long as the burst lasted.
        most = 3 + int(burst_end - start)
        assert 2 <= len(posts) <= most, f"{len(posts)} checkpoints for 10 turns in {burst_end - start:.2f} s"
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(g >= 0.9 for g in gaps), f"checkpoints closer than the interval: {gaps}"

        api.add_message("user", "a change after the last checkpoint")
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(10) == 0
        assert len(snapshot_posts(coderd)) == len(posts) + 1
        assert stored_wire(coderd)[-1][2] == "a change after the last checkpoint"
        assert stored_wire(coderd) == wire(api, len(api.messages) - 10)
    assert_no_token(daemon.output())


async def test_checkpoint_interval_zero_sends_nothing_until_shutdown(world):
    async with servers(2) as (api, coderd):
        daemon = world.start(world.env(coderd.url, api.url, AGENTD_CHECKPOINT_INTERVAL="0"))
        await wait_status(world.socket, lambda s: s["messages"] == 2 and s["agent_status"] == "stable", proc=daemon)
        finished_turn(api, 1)
        await wait_status(world.socket, lambda s: s["messages"] == 4)
        assert snapshot_posts(coderd) == []  # and none until the stop: one request in all, below
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(10) == 0
        assert len(snapshot_posts(coderd)) == 1 and stored_wire(coderd) == wire(api)
    assert_no_token(daemon.output())


# -- never an emptier view ----------------------------------------------------------------------------


async def test_agentapi_restarted_with_fewer_messages_never_empties_the_stored_snapshot(world):
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    first = FakeAgentAPI()
    first.load(conversations.generic_conversation(3))
    async with coderd.serve():
        async with first.serve():
            port = first.port
            daemon = world.start(world.env(coderd.url, first.url))
            await wait_status(world.socket, lambda s: s["messages"] == 3, proc=daemon)
            code, out, err = await agentd("snapshot", "--timeout", "5", env=world.client_env())
            assert code == 0, out + err
            before = stored_wire(coderd)
            assert before == wire(first)
        # agentapi comes back on the same port having lost its state: the agent's new screen at
        # id 0 (as agentapi 0.12's PTY conversation starts), then a question at id 1.
        second = FakeAgentAPI()
        second.add_message("agent", "╭─ agent ready after the restart ─╮")
        second.add_message("user", "after the restart: a new question")
        async with second.serve(port=port):
            status = await wait_status(world.socket, lambda s: s["messages"] == 5 and s["source"]["state"] == "connected")
            assert status["newest_id"] == 4
            second.add_message("agent", "⏺ new work after the restart ─ done")
            await wait_status(world.socket, lambda s: s["messages"] == 6)
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait(10) == 0
        stored = stored_wire(coderd)
        assert stored[:3] == before, "the earlier messages are still in the stored snapshot"
        assert [m[0] for m in stored] == [0, 1, 2, 3, 4, 5], "the new ones follow with ascending ids"
        assert [m[1:] for m in stored[3:]] == [m[1:] for m in wire(second)]
    assert_no_token(daemon.output(), out, err)


async def test_agentapi_restarted_empty_then_agentd_killed_and_restarted_keeps_one_numbering(world):
    """agentapi loses its state (an empty view: nothing is replaced, a snapshot request finds it
    unchanged); new messages are numbered after the old ones; then agentd is killed and
    restarted while that agentapi still runs: its replay is the same conversation, not a third
    one, so nothing is duplicated."""
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    first = FakeAgentAPI()
    first.load(conversations.generic_conversation(3))
    async with coderd.serve():
        async with first.serve():
            port = first.port
            env = world.env(coderd.url, first.url)
            daemon = world.start(env)
            await wait_status(world.socket, lambda s: s["messages"] == 3, proc=daemon)
            answer = await ask(world.socket, {"command": "snapshot", "timeout": 5}, timeout=8)
            assert answer["result"] == "stored", answer
            before = stored_wire(coderd)
        second = FakeAgentAPI()  # only agentapi's empty placeholder (PTY start): nothing to read
        async with second.serve(port=port):
            await second.wait_for_subscribers(1, timeout=STARTUP)
            await wait_status(world.socket, lambda s: s["source"]["state"] == "connected")
            code, out, err = await agentd("snapshot", "--timeout", "5", env=world.client_env())
            assert code == 0 and "unchanged" in one_line(out), out + err
            assert len(snapshot_posts(coderd)) == 1 and stored_wire(coderd) == before

            second.add_message("agent", "╭─ agent ready after the restart ─╮")  # its screen fills message 0
            second.add_message("user", "after the restart: question")
            second.add_message("agent", "after the restart: answer ─ done")
            await wait_status(world.socket, lambda s: s["messages"] == 6, proc=daemon)
            await wait_until(lambda: len((world.state_file() or {}).get("messages", [])) == 6, 30, "the state file")
            daemon.signal(signal.SIGKILL)
            await daemon.wait(5)

            again = world.start(env)
            status = await wait_status(
                world.socket, lambda s: s["pid"] == again.pid and s["source"]["state"] == "connected", proc=again
            )
            assert status["messages"] == 6 and status["newest_id"] == 5, status
            second.add_message("user", "one more")
            await wait_status(world.socket, lambda s: s["messages"] == 7, proc=again)
            again.signal(signal.SIGTERM)
            assert await again.wait(10) == 0
        stored = stored_wire(coderd)
        assert stored[:3] == before
        assert [m[0] for m in stored] == list(range(7))
        assert [m[2] for m in stored[3:]] == [m.content for m in second.messages]
    assert_no_token(daemon.output(), again.output(), out, err)


# -- agentd status -----------------------------------------------------------------------------------


async def test_status_json_reports_the_daemon_and_exit_3_without_one(world):
    code, out, err = await agentd("status", "--json", env=world.client_env())
    # An error, even with --json: on stderr, naming the socket; nothing on stdout.
    assert code == 3 and out == "" and str(world.socket) in err and "no such socket" in err, out + err

    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    api = FakeAgentAPI()
    api.load(conversations.generic_conversation(3))
    api.set_status("stable")  # agentapi starts `running`; the agent has settled since
    async with coderd.serve():
        async with api.serve():
            port = api.port
            daemon_started = time.time()
            daemon = world.start(world.env(coderd.url, api.url, AGENTD_CHECKPOINT_INTERVAL="0"))
            await wait_status(world.socket, lambda s: s["messages"] == 3 and s["source"]["state"] == "connected", proc=daemon)
            code, out, err = await agentd("status", "--json", env=world.client_env())
            assert code == 0, out + err
            s = json.loads(out)
            assert s["messages"] == 3 and s["newest_id"] == 2
            assert s["bytes"] == len(expected_body(wire(api)))
            assert s["agent_status"] == "stable"
            assert s["source"]["state"] == "connected"
            connected_since = parse_iso(s["source"]["since"])
            assert daemon_started - 1 <= connected_since <= time.time() + 1
            assert s["last_upload"] is None

            api.set_status("running")
            api.add_message("user", "a fourth message ─ with box drawing")
            s = await wait_status(world.socket, lambda s: s["agent_status"] == "running" and s["messages"] == 4)
            assert (s["agent_status"], s["messages"], s["newest_id"]) == ("running", 4, 3)
            assert s["bytes"] == len(expected_body(wire(api)))

            before = time.time()
            answer = await ask(world.socket, {"command": "snapshot", "timeout": 5}, timeout=8)
            assert answer["result"] == "stored", answer
            code, out, _ = await agentd("status", "--json", env=world.client_env())
            assert code == 0
            upload = json.loads(out)["last_upload"]
            assert upload["outcome"] == "stored" and upload["http_status"] == 204
            assert upload["bytes"] == len(coderd.stored[TASK].body) == s["bytes"]
            assert before - 1 <= parse_iso(upload["time"]) <= time.time() + 1

        # agentapi is gone: disconnected, since a later time.
        s = await wait_status(world.socket, lambda s: s["source"]["state"] == "disconnected")
        assert parse_iso(s["source"]["since"]) >= connected_since
        assert s["messages"] == 4 and s["last_upload"]["outcome"] == "stored"

        # An agentapi without /events comes back on the same port: polled.
        old = FakeAgentAPI(events=False)
        old.messages = list(api.messages)
        async with old.serve(port=port):
            s = await wait_status(world.socket, lambda s: s["source"]["state"] == "polling")
            assert s["messages"] == 4
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait(10) == 0
    assert_no_token(daemon.output(), out)


# -- agentd shutdown-hook -------------------------------------------------------------------------------


class AgentAPIProcess:
    """The stand-in agentapi as a process: pid file, signal log, state file."""

    def __init__(self, world: World, messages: int = 3) -> None:
        self.pid_file = world.tmp / "agentapi.pid"
        self.signal_log = world.tmp / "agentapi.signals"
        self.state_file = world.tmp / "agentapi.state.json"
        argv = [sys.executable, "-m", "agentd.testing.fake_agentapi", "--port", "0", "--messages", str(messages),
                "--pid-file", str(self.pid_file), "--signal-log", str(self.signal_log),
                "--state-file", str(self.state_file), "--backend", world.backend]
        self.proc = Proc(argv, clean_env(), world.tmp, "agentapi")
        world.procs.append(self.proc)
        self.url = ""

    async def ready(self) -> str:
        def listening() -> bool:
            return "listening on" in self.proc.stdout() and self.pid_file.exists()

        await wait_until(lambda: listening() or not self.proc.alive(), STARTUP, "agentapi to listen")
        assert self.proc.alive(), self.proc.output()
        self.url = self.proc.stdout().split("listening on", 1)[1].split()[0]
        return self.url

    def signals(self) -> list[tuple[str, float]]:
        if not self.signal_log.exists():
            return []
        return [(name, float(t)) for name, t in (line.split() for line in self.signal_log.read_text().splitlines())]


def hook_env(world: World, coderd_url: str, agentapi_url: str, **extra: str | None) -> dict[str, str]:
    # No daemon listens on world.socket: the hook does the job itself.
    return world.env(coderd_url, agentapi_url, **extra)


STEPS = ("agentapi", "SIGUSR1", "state", "snapshot", "SIGTERM")


def steps(out: str, err: str) -> dict[str, list[tuple[str, str]]]:
    """The hook's lines by step: ``{"SIGTERM": [("out", "sent to agentapi (pid 7)")], ...}``.
    Every line of stdout and stderr must be one of a step (JSON log lines aside)."""
    found: dict[str, list[tuple[str, str]]] = {}
    for stream, text in (("out", out), ("err", err)):
        for line in text.splitlines():
            if line.startswith("{"):
                continue
            step, _, rest = line.partition(": ")
            assert step in STEPS, f"not a step's line on std{stream}: {line!r}"
            found.setdefault(step, []).append((stream, rest))
    return found


def step(found: dict[str, list[tuple[str, str]]], name: str, stream: str | None = None) -> str:
    """The one line of step ``name`` (on ``stream`` when given)."""
    lines = found.get(name, [])
    assert len(lines) == 1, f"{name}: {lines}"
    if stream is not None:
        assert lines[0][0] == stream, f"{name} on std{lines[0][0]}, expected std{stream}: {lines[0][1]}"
    return lines[0][1]


async def test_shutdown_hook_orders_sigusr1_upload_sigterm(world):
    agentapi = AgentAPIProcess(world, messages=3)
    url = await agentapi.ready()
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve():
        started = time.monotonic()
        code, out, err = await agentd(
            "shutdown-hook", "--pid-file", str(agentapi.pid_file), "--save-state", "--timeout", "5", "--stop-timeout", "3",
            env=hook_env(world, coderd.url, url),
        )
        took = time.monotonic() - started
    assert code == 0, out + err
    found = steps(out, err)
    (first, last) = found["agentapi"]
    assert first[0] == "out" and first[1].startswith(f"pid {agentapi.proc.pid} (") and "fake_agentapi" in first[1], first
    assert last[0] == "out" and last[1].startswith("exited ") and last[1].endswith(" s after SIGTERM"), last
    assert step(found, "SIGUSR1", "out").startswith("sent to agentapi")
    # Its state file came from agentapi's own command line (--state-file), and changed.
    assert step(found, "state", "out").startswith(f"saved ({agentapi.state_file} changed")
    assert step(found, "snapshot", "out").startswith("stored: 3 messages")
    assert step(found, "SIGTERM", "out") == f"sent to agentapi (pid {agentapi.proc.pid})"
    assert [m["content"] for m in coderd.stored[TASK].messages] == [c for _, c in conversations.generic_conversation(3)]
    assert await agentapi.proc.wait(2) == 0, "agentapi was stopped"
    signals = agentapi.signals()
    assert [name for name, _ in signals] == ["SIGUSR1", "SIGTERM"], signals
    (post,) = snapshot_posts(coderd)
    assert signals[0][1] < post.time < signals[1][1], (signals, post.time)
    saved = json.loads(agentapi.state_file.read_text())
    assert len(saved["messages"]) == 3
    assert took < 0.5 + 5 + 3 + EXIT_SLACK, took
    assert_no_token(out, err)


async def test_shutdown_hook_still_stops_agentapi_when_coderd_is_down(world):
    agentapi = AgentAPIProcess(world, messages=2)
    url = await agentapi.ready()
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    code, out, err = await agentd(
        "shutdown-hook", "--pid-file", str(agentapi.pid_file), "--save-state", "--timeout", "1", "--stop-timeout", "3",
        env=hook_env(world, dead, url),
    )
    took = time.monotonic() - started
    assert code == 1, out + err
    line = step(steps(out, err), "snapshot", "err")
    assert line.startswith("not stored:") and "cannot reach coderd" in line, line
    assert await agentapi.proc.wait(2) == 0
    assert [name for name, _ in agentapi.signals()] == ["SIGUSR1", "SIGTERM"]
    # The state wait (2 s at most) runs beside the snapshot's bound (1 s), then agentapi's exit.
    assert took < 2 + 3 + EXIT_SLACK, took
    assert_no_token(out, err)


async def test_shutdown_hook_without_task_id_exits_0_and_still_stops_agentapi(world):
    agentapi = AgentAPIProcess(world, messages=2)
    url = await agentapi.ready()
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve():
        code, out, err = await agentd(
            "shutdown-hook", "--pid-file", str(agentapi.pid_file), "--timeout", "2", "--stop-timeout", "3",
            env=hook_env(world, coderd.url, url, AGENTD_TASK_ID=None),
        )
    assert code == 0, out + err
    found = steps(out, err)
    line = step(found, "snapshot", "out")
    assert "no task id" in line and "AGENTD_TASK_ID" in line, line
    assert step(found, "SIGUSR1", "out") == "skipped (no --save-state)"
    assert "state" not in found
    assert found["agentapi"][-1][0] == "out" and found["agentapi"][-1][1].startswith("exited "), "agentapi's exit: a line"
    assert coderd.requests == []
    assert await agentapi.proc.wait(2) == 0
    assert [name for name, _ in agentapi.signals()] == ["SIGTERM"], "no SIGUSR1 unless asked"
    assert_no_token(out, err)


async def test_snapshot_request_is_not_held_up_by_a_hanging_checkpoint(world):
    """The checkpoint's upload hangs (coderd never answers it); a snapshot request arriving
    meanwhile supersedes it and stores within its own --timeout."""
    async with servers(2) as (api, coderd):
        coderd.script = ["hang"]  # the first request (the checkpoint) hangs; later ones are answered
        daemon = world.start(world.env(coderd.url, api.url, AGENTD_CHECKPOINT_INTERVAL="1"))
        await wait_status(world.socket, lambda s: s["messages"] == 2 and s["agent_status"] == "stable", proc=daemon)
        finished_turn(api, 1)
        await wait_until(lambda: len(coderd.requests) == 1, 30, "the checkpoint (which hangs)")
        started = time.monotonic()
        code, out, err = await agentd("snapshot", "--timeout", "2", env=world.client_env())
        took = time.monotonic() - started
        assert code == 0, out + err
        assert one_line(out).startswith("stored: 4 messages")
        assert took < 2 + EXIT_SLACK, f"agentd snapshot --timeout 2 took {took:.2f} s"
        assert stored_wire(coderd) == wire(api)
        assert daemon.alive()
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(10) == 0
        assert len(snapshot_posts(coderd)) == 2, "nothing re-sent at shutdown"
    assert_no_token(daemon.output(), out, err)


async def test_shutdown_hook_with_a_bad_setting_reports_it_and_still_stops_agentapi(world):
    agentapi = AgentAPIProcess(world, messages=2)
    url = await agentapi.ready()
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve():
        code, out, err = await agentd(
            "shutdown-hook", "--pid-file", str(agentapi.pid_file), "--timeout", "2", "--stop-timeout", "3",
            env=hook_env(world, coderd.url, url, AGENTD_CA_FILE=str(world.tmp / "missing-ca.pem")),
        )
    assert code == 1, out + err
    line = step(steps(out, err), "snapshot", "err")
    assert line.startswith("not stored:") and "AGENTD_CA_FILE" in line, line
    assert "Traceback" not in err
    assert coderd.requests == []
    assert await agentapi.proc.wait(2) == 0, "agentapi is stopped all the same"
    assert [name for name, _ in agentapi.signals()] == ["SIGTERM"]
    assert_no_token(out, err)


# -- shutdown-hook never signals the wrong process (issue 14) ---------------------------------------


def start_sleeper(argv0: str | os.PathLike[str] = "sleep") -> subprocess.Popen[bytes]:
    """``sleep 1000``, returned once it runs (exec'd: its command line is sleep's)."""
    proc = subprocess.Popen([str(argv0), "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    end = time.monotonic() + 20
    while b"1000" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < end, "sleep never started"
        time.sleep(0.005)
    return proc


def stale_pid_file(path: Path, pid: int, age: float = 30.0) -> None:
    """``pid`` in ``path``, the file's mtime ``age`` seconds ago: a pid file left from an earlier
    agentapi whose pid the kernel has handed to another process since."""
    path.write_text(f"{pid}\n")
    then = time.time() - age
    os.utime(path, (then, then))


@pytest.mark.parametrize("named", ["sleep", "agentapi-named-sleep"])
async def test_shutdown_hook_leaves_a_recycled_pid_alone(world, named):
    """A stale pid file whose pid now belongs to a `sleep` started after the file was written:
    nothing is signalled (sleep dies of SIGUSR1 and SIGTERM, so alive means unsignalled), one line
    says why, and the snapshot is stored all the same. Named `agentapi` (a symlink to sleep),
    only the start time gives it away."""
    argv0: str | Path = "sleep"
    if named != "sleep":
        argv0 = world.tmp / "agentapi"
        argv0.symlink_to(shutil.which("sleep") or "/bin/sleep")
    pid_file = world.tmp / "agentapi.pid"
    stale_pid_file(pid_file, 999_999)  # written first
    sleeper = start_sleeper(argv0)  # started after the pid file was written
    try:
        stale_pid_file(pid_file, sleeper.pid)  # its pid, as a reused pid would be; the mtime kept old
        async with servers(2) as (api, coderd):
            code, out, err = await agentd(
                "shutdown-hook", "--pid-file", str(pid_file), "--save-state", "--timeout", "5", "--stop-timeout", "2",
                env=hook_env(world, coderd.url, api.url),
            )
        assert code == 0, out + err
        found = steps(out, err)
        refusal = step(found, "agentapi", "err")
        assert refusal.startswith(f"pid {sleeper.pid} ") and refusal.endswith("signalling nothing"), refusal
        if named == "sleep":
            assert "is not agentapi" in refusal and "sleep 1000" in refusal, refusal
        else:
            assert "started" in refusal and "after the pid file was written" in refusal, refusal
        assert step(found, "SIGUSR1", "out") == "skipped (no agentapi to signal)"
        assert step(found, "SIGTERM", "out") == "skipped (no agentapi to signal)"
        assert step(found, "snapshot", "out").startswith("stored: 2 messages")
        await anyio.sleep(0.2)
        assert sleeper.poll() is None, f"the process behind the stale pid was signalled ({sleeper.returncode})"
        state = (await anyio.Path(f"/proc/{sleeper.pid}/status").read_text()).split("State:")[1].split()[0]
        assert state in ("S", "R"), f"not stopped either: {state}"
    finally:
        sleeper.kill()
        sleeper.wait(10)
    assert_no_token(out, err)


async def test_shutdown_hook_with_agentapi_already_gone_says_so_and_stores(world):
    gone = await anyio.run_process(["sh", "-c", "echo $$"])
    gone_pid = int(gone.stdout)
    pid_file = world.tmp / "agentapi.pid"
    stale_pid_file(pid_file, gone_pid, age=1)
    async with servers(2) as (api, coderd):
        code, out, err = await agentd(
            "shutdown-hook", "--pid-file", str(pid_file), "--save-state", "--timeout", "5",
            env=hook_env(world, coderd.url, api.url),
        )
    assert code == 0, out + err
    found = steps(out, err)
    assert "not running" in step(found, "agentapi", "out")
    assert step(found, "snapshot", "out").startswith("stored: 2 messages")
    assert step(found, "SIGTERM", "out") == "skipped (no agentapi to signal)"


@pytest.mark.parametrize("content", ["", "abc", "12 34", "-5", "1", "9" * 100])
async def test_shutdown_hook_with_a_bad_pid_file_signals_nothing(world, content):
    pid_file = world.tmp / "agentapi.pid"
    pid_file.write_text(content)
    code, out, err = await agentd(
        "shutdown-hook", "--pid-file", str(pid_file), "--timeout", "2",
        env=hook_env(world, f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}", AGENTD_TASK_ID=None),
    )
    assert code == 0, out + err
    found = steps(out, err)
    line = step(found, "agentapi", "err")
    assert str(pid_file) in line, line
    assert step(found, "SIGTERM", "out") == "skipped (no agentapi to signal)"


async def test_shutdown_hook_state_wait_runs_out_beside_the_snapshot(world):
    """The state file given never changes: the hook waits its bound for it, says so on stderr,
    and the snapshot was stored meanwhile (before the bound ran out), not after it."""
    agentapi = AgentAPIProcess(world, messages=3)
    url = await agentapi.ready()
    still = world.tmp / "not-agentapis-state.json"
    still.write_text("{}")
    wait = 6.0  # a long bound shows the snapshot does not queue behind it
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve():
        code, out, err = await agentd(
            "shutdown-hook", "--pid-file", str(agentapi.pid_file), "--save-state", "--state-file", str(still),
            "--state-wait", str(wait), "--timeout", "5", "--stop-timeout", "3",
            env=hook_env(world, coderd.url, url),
        )
    assert code == 0, out + err
    found = steps(out, err)
    assert step(found, "state", "err").startswith(f"{still} unchanged {wait:g} s after SIGUSR1"), found["state"]
    assert step(found, "snapshot", "out").startswith("stored: 3 messages")
    signals = dict(agentapi.signals())
    (post,) = snapshot_posts(coderd)
    assert signals["SIGUSR1"] < post.time < signals["SIGUSR1"] + wait, "stored while the wait ran"
    assert signals["SIGTERM"] - signals["SIGUSR1"] >= wait * 0.9, "SIGTERM only after the bounded wait"
    assert await agentapi.proc.wait(5) == 0
    assert_no_token(out, err)
