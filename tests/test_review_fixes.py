"""Regression tests for the review fixes (commit "Review fixes: ..."), one per reproduction.

Each case runs the real ``python -m agentd`` as a child process (on the test's anyio backend via
``AGENTD_ASYNC_BACKEND``) against the in-process stand-ins on loopback, and asserts the fixed
behaviour:

1. a bad control request (60 000 ``[``, an infinite / huge timeout, a non-object) gets an
   error answer; the daemon keeps answering and still stores on SIGTERM;
2. coderd answers with ``Content-Encoding: gzip`` on a body that is not gzip: no crash; a 503
   is retried, a 400 ends "not stored" with a line naming the unreadable answer;
3. the agent token (a long one, one with characters JSON escapes) never shows, not even 20
   characters of it, in json or console logs; a non-ASCII token is a one-line config error;
4. stderr on a full disk (``/dev/full``) or a closed pipe: the snapshot is still stored;
5. a state write that never completes (a FIFO at the temp file's path) does not hold the exit;
6. ``agentd snapshot --timeout 2`` while the daemon's upload is held: returns in time, exit 1,
   and never uploads on its own;
7. ``agentd supervise``: the child's stop time must be below the shutdown timeout, and the
   whole stop (hung coderd, a child that ignores SIGTERM) ends within the shutdown timeout.

Wall times are printed as ``REVIEW-TIMING <case> <seconds>`` (see them with ``-s``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import anyio
import pytest
from support import EXIT_SLACK, AgentdChild, clean_env, make_short_dir, small_conversation

from agentd import control
from agentd.testing import FakeAgentAPI, FakeCoderd

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TASK = str(uuid.uuid4())
TOKEN = "review-token-" + secrets.token_hex(12)
#: 80+ characters, with characters that a JSON or repr rendering would escape.
LONG_TOKEN = "review-long-" + secrets.token_hex(30) + '"q\\' + secrets.token_hex(6)
#: Seconds any single wait may take before the test fails.
WAIT = 30.0
#: A scripted answer that claims gzip but is not (a broken proxy in front of coderd).
NOT_GZIP = b"not-gzip!!"


def gzip_lie(status: int) -> tuple[int, dict[str, str], bytes]:
    return (status, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, NOT_GZIP)


def timing(case: str, seconds: float) -> None:
    print(f"REVIEW-TIMING {case} {seconds:.3f}")


def token_forms(token: str) -> set[str]:
    """The token and every 20-character piece of it, raw and as JSON or repr would escape it."""
    forms = {token, json.dumps(token)[1:-1], repr(token)[1:-1]}
    for form in list(forms):
        forms.update(form[i : i + 20] for i in range(0, max(1, len(form) - 19)))
    return forms


def assert_no_token(text: str, token: str) -> None:
    leaked = sorted(f for f in token_forms(token) if f in text)
    assert not leaked, f"the agent token (or a piece of it) was printed: {leaked[:3]}"


def same_conversation(coderd: FakeCoderd, api: FakeAgentAPI) -> bool:
    snap = coderd.stored.get(TASK)
    return snap is not None and [(m["id"], m["content"]) for m in snap.messages] == [(m.id, m.content) for m in api.messages]


class Agentd(AgentdChild):
    """One ``python -m agentd ...`` child process. Output goes to files unless ``stdout`` /
    ``stderr`` are given (a file object or fd the test owns)."""

    def __init__(self, backend: str, workdir: Path, env: dict[str, str], token: str = TOKEN) -> None:
        self.workdir = workdir
        self.token = token
        self.sock_dir = make_short_dir("agentd-r-")
        self.socket = self.sock_dir / "agentd.sock"
        self.state_dir = workdir / "state"
        defaults = {
            "AGENTD_ASYNC_BACKEND": backend,
            "AGENTD_LOG_FORMAT": "json",
            "AGENTD_LOG_LEVEL": "debug",
            "AGENTD_TASK_ID": TASK,
            "CODER_AGENT_TOKEN": token,
            "AGENTD_STATE_DIR": str(self.state_dir),
            "AGENTD_SOCKET": str(self.socket),
            "AGENTD_CHECKPOINT_INTERVAL": "0",
        }
        self.env = clean_env(**{**defaults, **env})
        self.out_path = workdir / "agentd.out"
        self.err_path = workdir / "agentd.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.signalled: float | None = None

    def start(self, args: Sequence[str] = ("run",), *, argv: Sequence[str] | None = None,
              stdout: IO[Any] | int | None = None, stderr: IO[Any] | int | None = None) -> None:
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                list(argv) if argv is not None else [sys.executable, "-m", "agentd", *args],
                stdin=subprocess.DEVNULL,
                stdout=out if stdout is None else stdout,
                stderr=err if stderr is None else stderr,
                env=self.env,
                cwd=self.workdir,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return "".join(p.read_bytes().decode("utf-8", "replace") for p in (self.out_path, self.err_path) if p.exists())

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.err_path.read_bytes().decode("utf-8", "replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"event": "<not json>", "raw": line})
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logs() if line.get("event") == name]

    def assert_clean(self) -> None:
        """No traceback, no internal error, the token never shown."""
        text = self.output()
        assert_no_token(text, self.token)
        assert "Traceback" not in text, text[-3000:]
        assert "internal error" not in text, text[-3000:]

    async def status(self, timeout: float = 2.0) -> dict[str, Any]:
        answer = await control.request(self.socket, {"command": "status"}, timeout)
        assert answer.get("ok"), answer
        return answer["status"]

    async def wait_ready(self, messages: int) -> dict[str, Any]:
        """Wait until the daemon answers ``status`` with ``messages`` in its buffer."""
        with anyio.fail_after(WAIT):
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"agentd exited ({self.proc.returncode}) at start:\n{self.output()[-3000:]}")
                try:
                    status = await self.status(1.0)
                except control.ControlError:
                    status = None
                if status is not None and status["messages"] >= messages:
                    return status
                await anyio.sleep(0.02)

    async def wait_exit(self, timeout: float = WAIT) -> tuple[int, float]:
        """Exit status and seconds since the first signal."""
        status = await self.wait_exited(timeout)
        took = time.monotonic() - (self.signalled or time.monotonic())
        return status, took


@asynccontextmanager
async def agentd(backend: str, workdir: Path, token: str = TOKEN, **env: str) -> AsyncIterator[Agentd]:
    """An Agentd (not started); always killed at the end."""
    proc = Agentd(backend, workdir, env, token)
    try:
        yield proc
    finally:
        proc.kill()


async def run_client(args: Sequence[str], env: dict[str, str], timeout: float = WAIT) -> tuple[int, str, float]:
    """Run ``python -m agentd ARGS`` to completion without blocking the event loop; returns
    (exit status, stdout + stderr, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentd", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    try:
        with anyio.fail_after(timeout):
            while proc.poll() is None:
                await anyio.sleep(0.005)
        took = time.monotonic() - started
        assert proc.stdout is not None
        return proc.returncode, proc.stdout.read().decode("utf-8", "replace"), took
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


# ---------------------------------------------------------------------------------------------
# 1. control socket: a bad request gets an error answer and never takes the daemon down


async def raw_request(path: Path, data: bytes) -> dict[str, Any]:
    """Send ``data`` as is on the control socket; the one JSON line answered."""
    with anyio.fail_after(WAIT):
        async with await anyio.connect_unix(path) as stream:
            await stream.send(data)
            answer = b""
            while b"\n" not in answer:
                try:
                    answer += await stream.receive()
                except anyio.EndOfStream:
                    break
    assert answer.endswith(b"\n"), f"no answer line: {answer[:300]!r}"
    parsed = json.loads(answer)
    assert isinstance(parsed, dict)
    return parsed


BAD_REQUESTS = {
    "60000 [": b"[" * 60000 + b"\n",
    "timeout 1e400": b'{"command":"snapshot","timeout":1e400}\n',
    "timeout 10**400": b'{"command":"snapshot","timeout":1' + b"0" * 400 + b"}\n",
    "timeout 10**5000": b'{"command":"snapshot","timeout":1' + b"0" * 5000 + b"}\n",
    "timeout -Infinity": b'{"command":"snapshot","timeout":-Infinity}\n',
    "timeout NaN": b'{"command":"snapshot","timeout":NaN}\n',
    "timeout true": b'{"command":"snapshot","timeout":true}\n',
    "timeout string": b'{"command":"snapshot","timeout":"8"}\n',
    "array": b"[1, 2, 3]\n",
    "string": b'"status"\n',
    "null": b"null\n",
    "not json": b"\xff\xfe{\n",
    "command object": b'{"command":{"a":1}}\n',
}


async def test_bad_control_requests_get_an_error_answer_and_the_daemon_still_stores(anyio_backend: str, tmp_path: Path) -> None:
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, CODER_AGENT_URL=coderd.url, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT="3",
    ) as d:
        d.start()
        await d.wait_ready(len(api.messages))
        for name, data in BAD_REQUESTS.items():
            answer = await raw_request(d.socket, data)
            assert answer.get("ok") is False and answer.get("error"), (name, answer)
            assert d.proc is not None and d.proc.poll() is None, f"agentd died on {name!r}:\n{d.output()[-3000:]}"
        assert "timeout must be a number" in (await raw_request(d.socket, BAD_REQUESTS["timeout 1e400"]))["error"]
        assert "RecursionError" in (await raw_request(d.socket, BAD_REQUESTS["60000 ["]))["error"]
        status = await d.status()
        assert status["messages"] == len(api.messages)
        assert coderd.requests == [], "a refused request must not upload"
        d.signal()
        rc, took = await d.wait_exit()
        d.assert_clean()
    timing(f"bad-control[{anyio_backend}]", took)
    assert rc == 0, d.output()[-3000:]
    assert same_conversation(coderd, api)
    assert coderd.upserts.get(TASK) == 1


# ---------------------------------------------------------------------------------------------
# 2 + 3. coderd's answer claims gzip but is not; the token never shows


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_gzip_lie_503_is_retried_then_stored_and_the_long_token_never_shows(
    anyio_backend: str, log_format: str, tmp_path: Path
) -> None:
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=LONG_TOKEN, tasks={TASK}, script=[gzip_lie(503), gzip_lie(503)])
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, LONG_TOKEN, CODER_AGENT_URL=coderd.url, AGENTD_AGENTAPI_URL=api.url,
        AGENTD_SHUTDOWN_TIMEOUT="4", AGENTD_LOG_FORMAT=log_format,
    ) as d:
        d.start()
        await d.wait_ready(len(api.messages))
        d.signal()
        rc, took = await d.wait_exit()
        d.assert_clean()
    timing(f"gzip-503-{log_format}[{anyio_backend}]", took)
    assert rc == 0, d.output()[-3000:]  # not 70: the DecodingError no longer escapes
    assert [r.status for r in coderd.requests] == [503, 503, 204]
    assert same_conversation(coderd, api)
    stored = [line for line in d.output().splitlines() if "snapshot stored" in line]
    assert len(stored) == 1 and re.search(r'attempts["=: ]+3\b', stored[0]), d.output()[-2000:]
    # Each bad answer is logged, naming it, even though the upload then succeeds.
    bad = [line for line in d.output().splitlines() if "unreadable answer from coderd" in line]
    assert len(bad) == 2 and all("DecodingError" in line for line in bad), d.output()[-2000:]


async def test_gzip_lie_400_ends_not_stored_naming_the_unreadable_answer(anyio_backend: str, tmp_path: Path) -> None:
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=LONG_TOKEN, tasks={TASK}, script=[gzip_lie(400)] * 200)
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, LONG_TOKEN, CODER_AGENT_URL=coderd.url, AGENTD_AGENTAPI_URL=api.url,
        AGENTD_SHUTDOWN_TIMEOUT="1.5",
    ) as d:
        d.start()
        await d.wait_ready(len(api.messages))
        d.signal()
        rc, took = await d.wait_exit()
        d.assert_clean()
        not_stored = d.events("snapshot not stored")
    timing(f"gzip-400[{anyio_backend}]", took)
    assert rc == 1, d.output()[-3000:]
    assert took <= 1.5 + EXIT_SLACK
    assert coderd.stored == {} and coderd.requests and all(r.status == 400 for r in coderd.answered())
    assert len(not_stored) == 1, d.output()[-3000:]
    assert "unreadable answer from coderd" in not_stored[0]["reason"], not_stored[0]
    assert "DecodingError" in not_stored[0]["reason"], not_stored[0]


async def test_non_ascii_token_is_a_one_line_config_error(anyio_backend: str, tmp_path: Path) -> None:
    token = "tök-SECRET-" + secrets.token_hex(10)
    async with agentd(anyio_backend, tmp_path, token, CODER_AGENT_URL="http://127.0.0.1:9", AGENTD_AGENTAPI_URL="http://127.0.0.1:9") as d:
        d.start()
        rc, _ = await d.wait_exit()
        out, err = d.out_path.read_text("utf-8", "replace"), d.err_path.read_text("utf-8", "replace")
    assert rc == 78, out + err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "CODER_AGENT_TOKEN" in lines[0] and "ASCII" in lines[0], lines[0]
    assert_no_token(err, token)
    assert "SECRET" not in err


# ---------------------------------------------------------------------------------------------
# 4. the log cannot be written: the snapshot still is


@pytest.mark.parametrize("sink", ["dev-full", "closed-pipe"])
async def test_unwritable_stderr_does_not_cost_the_snapshot(anyio_backend: str, sink: str, tmp_path: Path) -> None:
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, script=[503])  # a retry: more lines to fail
    read_fd = write_fd = -1
    full: IO[bytes] | None = None
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, CODER_AGENT_URL=coderd.url, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT="3",
    ) as d:
        try:
            if sink == "dev-full":
                full = open("/dev/full", "wb")
                d.start(stdout=full, stderr=full)
            else:
                read_fd, write_fd = os.pipe()
                d.start(stderr=write_fd)
                os.close(write_fd)
                write_fd = -1
                # The log reader takes a little, then exits (`agentd run 2>&1 | logger` and the logger dies).
                with anyio.fail_after(WAIT):
                    got = await anyio.to_thread.run_sync(os.read, read_fd, 100)
                assert got, "agentd wrote nothing to stderr"
                os.close(read_fd)
                read_fd = -1
            await d.wait_ready(len(api.messages))
            d.signal()
            rc, took = await d.wait_exit()
        finally:
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            if full is not None:
                full.close()
        assert_no_token(d.output(), TOKEN)
    timing(f"stderr-{sink}[{anyio_backend}]", took)
    assert rc == 0
    assert [r.status for r in coderd.requests] == [503, 204]
    assert same_conversation(coderd, api)


# ---------------------------------------------------------------------------------------------
# 5. a state write that never completes does not hold the exit


async def test_hung_state_write_does_not_hold_the_exit(anyio_backend: str, tmp_path: Path) -> None:
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    shutdown_timeout = 2.0
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, CODER_AGENT_URL=coderd.url, AGENTD_AGENTAPI_URL=api.url,
        AGENTD_SHUTDOWN_TIMEOUT=str(shutdown_timeout),
    ) as d:
        d.state_dir.mkdir(mode=0o700)
        # agentd/state.py takes `.state.lock` (flock) before it writes: held here, every write
        # waits behind it, like a hung disk (temp files are exclusive: nothing planted can block).
        lock_fd = os.open(d.state_dir / ".state.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        d.start()
        await d.wait_ready(len(api.messages))
        await anyio.sleep(1.3)  # the persistence loop (once a second) is now stuck in its write
        assert not (d.state_dir / "state.json").exists()
        assert (await d.status())["messages"] == len(api.messages)  # and the daemon still answers
        d.signal()
        rc, took = await d.wait_exit()
        d.assert_clean()
        os.close(lock_fd)
    timing(f"hung-state-write[{anyio_backend}]", took)
    assert rc == 0, d.output()[-3000:]
    assert took <= shutdown_timeout + EXIT_SLACK, took
    assert same_conversation(coderd, api)
    assert coderd.upserts.get(TASK) == 1


# ---------------------------------------------------------------------------------------------
# 6. `agentd snapshot --timeout 2` while the daemon's upload is held


async def test_snapshot_timeout_while_the_daemons_upload_is_held(anyio_backend: str, tmp_path: Path) -> None:
    api = FakeAgentAPI()
    small_conversation(api)
    # A hold is a hold: every request hangs until the test lets go (the daemon cuts each attempt
    # after its own 5 s and retries into the same hold, however slow the machine is).
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, hang=True)
    # Where the client would upload if it (wrongly) did so on its own: must see no request.
    sentinel = FakeCoderd(token=TOKEN, tasks={TASK})
    async with api.serve(), coderd.serve(), sentinel.serve(), agentd(
        anyio_backend, tmp_path, CODER_AGENT_URL=coderd.url, AGENTD_AGENTAPI_URL=api.url, AGENTD_SHUTDOWN_TIMEOUT="3",
    ) as d:
        d.start()
        await d.wait_ready(len(api.messages))
        async with anyio.create_task_group() as tg:

            async def first_snapshot() -> None:  # holds the upload: coderd never answers it
                with contextlib.suppress(control.ControlError):  # cut when the daemon stops
                    await control.request(d.socket, {"command": "snapshot", "timeout": 600}, 610)

            tg.start_soon(first_snapshot)
            await coderd.wait_for(lambda: len(coderd.requests) >= 1, WAIT)
            # The client has everything it would need to upload on its own (to the sentinel).
            client_env = clean_env(**{k: v for k, v in d.env.items() if k.startswith(("AGENTD_", "CODER_"))})
            client_env["CODER_AGENT_URL"] = sentinel.url
            rc_status, out_status, start_cost = await run_client(["status"], client_env, timeout=60)
            assert rc_status == 0, out_status
            rc, out, took = await run_client(["snapshot", "--timeout", "2"], client_env, timeout=60)
            assert sentinel.requests == [], [(r.method, r.path, r.status) for r in sentinel.requests]
            assert all(r.status is None for r in coderd.requests)  # still held
            coderd.hang = False  # let go: the daemon's final upload gets through
            d.signal()
            code, _ = await d.wait_exit()
            tg.cancel_scope.cancel()
        d.assert_clean()
    timing(f"snapshot-timeout-2[{anyio_backend}]", took)
    timing(f"status-process[{anyio_backend}]", start_cost)
    assert_no_token(out + out_status, TOKEN)
    assert "Traceback" not in out
    assert rc == 1, out
    assert re.search(r"another upload|did not answer", out), out
    assert took >= 1.5, took  # it waited for its --timeout (how much longer depends on the machine)
    # The daemon's own shutdown stores: the held requests were cut, the final upload got 204.
    assert code == 0, d.output()[-3000:]
    statuses = [r.status for r in coderd.requests]
    assert statuses[-1] == 204 and all(s is None for s in statuses[:-1]), statuses
    assert same_conversation(coderd, api)


# ---------------------------------------------------------------------------------------------
# 7. supervise: the child's stop time is part of the shutdown timeout


async def test_supervise_child_stop_timeout_must_be_below_the_shutdown_timeout(anyio_backend: str, tmp_path: Path) -> None:
    marker = tmp_path / "child-ran"
    async with agentd(
        anyio_backend, tmp_path, CODER_AGENT_URL="http://127.0.0.1:9", AGENTD_AGENTAPI_URL="http://127.0.0.1:9",
        AGENTD_SHUTDOWN_TIMEOUT="4", AGENTD_CHILD_STOP_TIMEOUT="10",
    ) as d:
        d.start(["supervise", "--", "touch", str(marker)])
        rc, _ = await d.wait_exit()
        out, err = d.out_path.read_text(), d.err_path.read_text()
    assert rc == 78, out + err
    assert out == "" and len(err.splitlines()) == 1, err
    assert "AGENTD_CHILD_STOP_TIMEOUT" in err, err
    assert_no_token(err, TOKEN)
    assert not marker.exists(), "the child must not start with a bad configuration"


async def test_supervise_stops_within_the_shutdown_timeout(anyio_backend: str, tmp_path: Path) -> None:
    api = FakeAgentAPI()
    small_conversation(api)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, hang=True)
    shutdown_timeout, child_stop = 4.0, 2.0
    pid_file = tmp_path / "child.pid"
    child = f'trap "" TERM; echo $$ > {pid_file}; while :; do sleep 0.1; done'
    async with api.serve(), coderd.serve(), agentd(
        anyio_backend, tmp_path, CODER_AGENT_URL=coderd.url, AGENTD_AGENTAPI_URL=api.url,
        AGENTD_SHUTDOWN_TIMEOUT=str(shutdown_timeout), AGENTD_CHILD_STOP_TIMEOUT=str(child_stop),
    ) as d:
        d.start(["supervise", "--", "sh", "-c", child])
        await d.wait_ready(len(api.messages))
        with anyio.fail_after(WAIT):
            while not pid_file.exists() or not pid_file.read_text().strip():
                await anyio.sleep(0.02)
        child_pid = int(pid_file.read_text())
        d.signal()
        rc, took = await d.wait_exit(shutdown_timeout + EXIT_SLACK + 3)
        d.assert_clean()
        not_stored = d.events("snapshot not stored")
    timing(f"supervise-4-2[{anyio_backend}]", took)
    assert took <= shutdown_timeout + EXIT_SLACK, took
    assert rc == 128 + signal.SIGKILL, d.output()[-3000:]
    assert coderd.requests and coderd.stored == {}
    assert len(not_stored) == 1, d.output()[-3000:]
    with anyio.fail_after(30):  # the child that ignored SIGTERM was killed
        while alive(child_pid):
            await anyio.sleep(0.02)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
