"""The command line as a user meets it (issues 10, 12, 13, 14): real ``python -m agentd``
processes, against a real daemon and the stand-ins on loopback where one is involved.

`--version`; each command's `--help` lists only its flags, with defaults and environment
variables; usage errors exit 2; settings errors all at once, in plain words; results on stdout
and errors on stderr; a closed stdout is a normal end; `status` (text, --json, --short, --body)
counts messages held and to send and says when agentapi is unreachable; `snapshot` says why
nothing was stored; the client commands import no settings, HTTP, logging or async library;
under systemd each log line carries its syslog priority.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import assert_token_absent, clean_env, daemon_status, free_port, json_lines

from agentd import cli
from agentd.settings import ENV_NAMES, Settings
from agentd.testing import FakeAgentAPI, FakeCoderd, conversations

TOKEN = "tok-cli-" + "5e4d3c2b1a09f8e7" * 2
TASK = str(uuid.uuid4())
STARTUP = 20.0  # seconds: a daemon's start, generous for a loaded 2-core machine
HEAVY = ("pydantic", "pydantic_settings", "httpx", "httpcore", "structlog", "anyio", "asyncio", "trio")


def agentd(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentd", *args], env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )


async def agentd_async(*args: str, env: dict[str, str], within: float = 60) -> tuple[int, str, str]:
    with anyio.fail_after(within):
        done = await anyio.run_process([sys.executable, "-m", "agentd", *args], env=env, check=False)
    return done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")


def imported(stderr: str) -> set[str]:
    """The top-level modules a ``python -X importtime`` run imported (from its stderr)."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def human(text: str) -> None:
    """No ``None``, no exception class name, no traceback in text meant for people."""
    assert "None" not in text and "Traceback" not in text, text
    for word in ("Error:", "Exception", "ConnectError", "OSError", "FileNotFoundError", "Pydantic", "pydantic"):
        assert word not in text, text


# -- parsing, help, version ----------------------------------------------------------------------


def test_version_is_the_package_version() -> None:
    done = agentd("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"agentd {importlib.metadata.version('agentd')}"


@pytest.mark.parametrize("command", ["run", "supervise", "snapshot", "shutdown-hook"])
def test_help_lists_only_the_settings_the_command_uses_with_defaults_and_env(command: str) -> None:
    done = agentd(command, "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines
    used = cli.settings_used(command)
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert (flag in text) == (name in used), (command, flag)
        if name in used:
            assert ENV_NAMES[name] in text, (command, name)
    assert "(default 65536; AGENTD_MAX_BYTES)" in text and "(required; AGENTD_TASK_ID)" in text
    if command == "snapshot":  # one timeout flag
        assert text.count("--timeout") >= 1 and "--shutdown-timeout" not in text
    if command == "run":
        assert "--child-stop-timeout" not in text and "--checkpoint-interval" in text


def test_status_help_has_only_client_flags_and_they_agree_with_the_settings() -> None:
    done = agentd("status", "--help")
    assert done.returncode == 0
    for flag in ("--json", "--short", "--body", "--socket", "--state-dir"):
        assert flag in done.stdout
    assert "--coderd-url" not in done.stdout and "--task-id" not in done.stdout
    for name in ("socket", "state_dir"):  # hand-written for the lean path: same names as the settings
        assert ENV_NAMES[name] in " ".join(done.stdout.split())
        assert name in Settings.model_fields


@pytest.mark.parametrize("args", [["bogus"], ["status", "--bogus"], ["snapshot", "--bogus"], ["snapshot", "--timeout", "0"], []])
def test_usage_errors_exit_2_on_stderr(args: list[str]) -> None:
    done = agentd(*args)
    assert done.returncode == 2 and done.stdout == "" and "usage:" in done.stderr, done


def test_settings_errors_are_reported_all_at_once_in_plain_words() -> None:
    env = clean_env(AGENTD_TASK_ID="not-a-uuid", AGENTD_MAX_BYTES="lots", AGENTD_MAX_MESSAGES="0", AGENTD_LOG_FORMAT="xml")
    done = agentd("run", env=env)
    assert done.returncode == 78 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    expected = [
        "agentd: missing setting CODER_AGENT_URL (--coderd-url)",
        "agentd: AGENTD_TASK_ID (--task-id) must be a UUID",
        "agentd: AGENTD_MAX_MESSAGES (--max-messages) must be at least 1, got '0'",
        "agentd: AGENTD_MAX_BYTES (--max-bytes) must be a whole number, got 'lots'",
        "agentd: AGENTD_LOG_FORMAT (--log-format) must be one of",
        "agentd: missing setting CODER_AGENT_TOKEN (--agent-token), or CODER_AGENT_TOKEN_FILE",
    ]
    assert len(lines) == len(expected), done.stderr
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, done.stderr)
    human(done.stderr)
    for jargon in ("invalid", "Input should", "validation error", "type=", "errors.pydantic"):
        assert jargon not in done.stderr


def test_main_in_process_is_the_production_path(capsys: pytest.CaptureFixture[str], short_dir: Path) -> None:
    """``main([...])`` takes the same path as ``agentd``: no handlers installed, no module rewritten."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    assert cli.main(["status", "--socket", str(short_dir / "none.sock")]) == 3
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("agentd: no agentd answered on") and "no such socket" in err
    assert cli.main(["status", "--short", "--socket", str(short_dir / "none.sock")], early_signals=_Early([signal.SIGTERM])) == 143
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0


class _Early(list[int]):
    def restore_defaults(self) -> None:  # pragma: no cover - not reached when a signal is pending
        raise AssertionError("a pending signal ends a client command before anything else")


# -- the lean client path ------------------------------------------------------------------------


@contextmanager
def control_socket_standin(path: Path, answer: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
    """A Unix socket answering every request line with ``answer`` (the daemon's wire format)."""
    requests: list[dict[str, Any]] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                data = b""
                while b"\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                requests.append(json.loads(data.split(b"\n")[0]))
                conn.sendall(json.dumps(answer).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield requests
    finally:
        stop.set()
        thread.join(5)
        server.close()


STATUS = {
    "messages": 3, "to_send": 3, "bytes": 300, "newest_id": 2, "agent_status": "stable",
    "source": {"state": "disconnected", "since": "2026-12-01T07:00:00Z", "url": "http://127.0.0.1:3284"},
    "last_upload": None, "task_id": TASK, "pid": 1, "started": "2026-12-01T06:00:00Z", "persisted": True,
    "snapshot": {"bytes": 300, "max_bytes": 65536, "messages": [], "cut_id": None, "left_out": []},
}


@pytest.mark.parametrize(
    "args,answer",
    [
        (["status"], {"ok": True, "status": STATUS}),
        (["status", "--short"], {"ok": True, "status": STATUS}),
        (["snapshot", "--timeout", "3"], {"ok": True, "result": "stored", "line": "stored: 3 messages, 300 bytes, 1 attempt"}),
    ],
)
def test_client_commands_import_no_settings_http_logging_or_async_library(short_dir: Path, args: list[str], answer: dict[str, Any]) -> None:
    sock = short_dir / "agentd.sock"
    with control_socket_standin(sock, answer) as requests:
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "agentd", *args], env=clean_env(AGENTD_SOCKET=str(sock)),
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    assert requests and requests[0]["command"] == args[0]
    assert not imported(done.stderr) & set(HEAVY), sorted(imported(done.stderr) & set(HEAVY))
    if args[0] == "status":
        assert "agentapi unreachable" in done.stdout if "--short" in args else "unreachable since 2026-12-01 07:00:00 UTC" in done.stdout
        human(done.stdout)


def test_a_closed_stdout_is_a_normal_end(short_dir: Path) -> None:
    """``agentd status --json | head -c 1``: no BrokenPipeError, no internal error."""
    sock = short_dir / "agentd.sock"
    big = {**STATUS, "filler": ["x" * 1000] * 2000}  # 2 MB: more than a pipe holds
    with control_socket_standin(sock, {"ok": True, "status": big}):
        done = subprocess.run(
            f"{sys.executable} -m agentd status --json | head -c 1", shell=True, env=clean_env(AGENTD_SOCKET=str(sock)),
            capture_output=True, text=True, timeout=60, executable="/bin/bash",
        )
        piped = subprocess.run(
            f"{sys.executable} -m agentd status --json | head -c 1; exit ${{PIPESTATUS[0]}}", shell=True,
            env=clean_env(AGENTD_SOCKET=str(sock)), capture_output=True, text=True, timeout=60, executable="/bin/bash",
        )
    assert done.stdout == "{" and done.stderr == "", done.stderr
    assert piped.returncode == 0 and piped.stderr == ""


# -- against a real daemon -----------------------------------------------------------------------

@asynccontextmanager
async def standins(messages: int = 3):
    api = FakeAgentAPI()
    api.load(conversations.generic_conversation(messages))
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve(), api.serve():
        yield api, coderd


def daemon_env(tmp: Path, sock: Path, backend: str, coderd_url: str, agentapi_url: str, **extra: str) -> dict[str, str]:
    return clean_env(
        CODER_AGENT_URL=coderd_url, CODER_AGENT_TOKEN=TOKEN, AGENTD_TASK_ID=TASK, AGENTD_AGENTAPI_URL=agentapi_url,
        AGENTD_STATE_DIR=str(tmp / "state"), AGENTD_SOCKET=str(sock), AGENTD_LOG_FORMAT="json",
        AGENTD_SHUTDOWN_TIMEOUT="5", AGENTD_CHECKPOINT_INTERVAL="0", AGENTD_ASYNC_BACKEND=backend, **extra,
    )


@contextmanager
def daemon(env: dict[str, str], tmp: Path, stderr_path: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    err_path = stderr_path or tmp / "daemon.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "agentd", "run"], env=env, stdout=err, stderr=err, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def wait_status(sock: Path, predicate: Any, within: float) -> dict[str, Any]:
    """The daemon's status (a raw JSON line) once ``predicate`` holds; waits for it to listen."""
    last: Any = None
    try:
        with anyio.fail_after(within):
            while True:
                try:
                    last = await daemon_status(sock)
                    if predicate(last):
                        return last
                except (OSError, ValueError, anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"status never matched; last: {last}") from None


async def wait_exit(proc: subprocess.Popen[bytes], within: float = 30) -> int:
    with anyio.fail_after(within):
        while proc.poll() is None:
            await anyio.sleep(0.02)
    return proc.returncode


@pytest.mark.anyio
async def test_status_views_of_a_running_daemon(anyio_backend: str, tmp_path: Path, short_dir: Path) -> None:
    sock = short_dir / "agentd.sock"
    client_env = clean_env(AGENTD_SOCKET=str(sock))
    async with standins(3) as (api, coderd):
        big = "╭" + "─" * 10 + "╮\nfirst line of a long screen\n" + "│ box drawing ─ line\n" * 5000 + "last line ✅"
        api.add_message("agent", big)  # ~115 KB: cut to fit 64 KiB
        env = daemon_env(tmp_path, sock, anyio_backend, coderd.url, api.url)
        with daemon(env, tmp_path) as proc:
            s = await wait_status(sock, lambda s: s["messages"] == 4 and s["source"]["state"] == "connected", STARTUP)
            snap = s["snapshot"]
            sent = [m["id"] for m in snap["messages"]]
            # The cut answer, and the question before it when it fits (the trimming policy's).
            assert sent[-1] == 3 and snap["cut_id"] == 3 and s["to_send"] == len(sent) in (1, 2)
            assert sorted(snap["left_out"] + sent) == [0, 1, 2, 3]

            code, out, err = await agentd_async("status", env=client_env)
            assert code == 0 and err == "", err
            assert f"4 held (newest id 3); {len(sent)} would be sent now" in out and "message 3 cut" in out
            assert "connected since" in out and "last upload:   none yet" in out
            human(out)

            code, out, err = await agentd_async("status", "--short", env=client_env)
            assert (code, out, err) == (0, "4 messages held; last upload none yet\n", "")

            code, out, err = await agentd_async("status", "--body", env=client_env)
            assert code == 0 and err == ""
            left_out = ", ".join(map(str, snap["left_out"]))
            assert out.startswith(f"would send {len(sent)} of 4 messages held,") and f"left out, older: {left_out}" in out
            assert "#3  agent" in out and "characters left out" in out
            assert "last:  last line ✅" in out
            human(out)

            code, out, _ = await agentd_async("status", "--json", env=client_env)
            data = json.loads(out)
            items = data["snapshot"]["messages"]
            assert sum(m["bytes"] for m in items) + len(items) - 1 + len('{"messages":[]}') == data["bytes"]

            answer = await agentd_async("snapshot", env=client_env)
            assert answer[0] == 0 and answer[1].startswith(f"stored: {len(sent)} messages")
            code, out, _ = await agentd_async("status", "--short", env=client_env)
            assert code == 0 and out.startswith("4 messages held; last upload stored ") and out.endswith(" ago\n")
            proc.send_signal(signal.SIGTERM)
            assert await wait_exit(proc) == 0
    # agentapi gone, the persisted buffer restored: "unreachable since ..."
    with daemon(daemon_env(tmp_path, sock, anyio_backend, "http://127.0.0.1:9", f"http://127.0.0.1:{free_port()}"), tmp_path, tmp_path / "d2.err") as proc:
        await wait_status(sock, lambda s: s["source"]["state"] == "disconnected", STARTUP)
        code, out, err = await agentd_async("status", env=client_env)
        assert code == 0 and "agentapi:      unreachable since" in out, out
        code, out, err = await agentd_async("status", "--short", env=client_env)
        assert out.startswith("agentapi unreachable; 4 messages held"), out  # the persisted buffer
        proc.send_signal(signal.SIGTERM)
        await wait_exit(proc)
    assert_token_absent(TOKEN, (tmp_path / "daemon.err").read_text(), (tmp_path / "d2.err").read_text())


@pytest.mark.anyio
async def test_snapshot_says_why_nothing_was_stored(anyio_backend: str, tmp_path: Path, short_dir: Path) -> None:
    port = free_port()
    env = clean_env(
        CODER_AGENT_URL="http://127.0.0.1:9", CODER_AGENT_TOKEN=TOKEN, AGENTD_TASK_ID=TASK,
        AGENTD_AGENTAPI_URL=f"http://127.0.0.1:{port}", AGENTD_STATE_DIR=str(tmp_path / "state"),
        AGENTD_SOCKET=str(short_dir / "none.sock"), AGENTD_ASYNC_BACKEND=anyio_backend,
    )
    code, out, err = await agentd_async("snapshot", "--timeout", "3", env=env)
    assert code == 0 and out.startswith(f"nothing to store: agentapi at 127.0.0.1:{port} not reached"), out + err
    assert "no messages held" in out
    async with standins(0) as (api, coderd):
        env.update(AGENTD_AGENTAPI_URL=api.url, CODER_AGENT_URL=coderd.url)
        code, out, err = await agentd_async("snapshot", "--timeout", "3", env=env)
        assert (code, out) == (0, "nothing to store: the conversation is empty\n"), err
    assert_token_absent(TOKEN, out, err)


# -- journald ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_under_systemd_each_line_carries_its_priority_and_no_timestamp(anyio_backend: str, tmp_path: Path, short_dir: Path) -> None:
    """``JOURNAL_STREAM`` names the daemon's stderr: ``<6>`` for info, ``<4>`` for a warning."""
    sock = short_dir / "agentd.sock"
    err_path = tmp_path / "journal"
    err_path.touch()
    st = os.stat(err_path)
    env = daemon_env(tmp_path, sock, anyio_backend, "http://127.0.0.1:9", f"http://127.0.0.1:{free_port()}",
                     JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    with daemon(env, tmp_path, err_path) as proc:
        await wait_status(sock, lambda s: s["source"]["state"] == "disconnected", STARTUP)  # logged as a warning
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0  # nothing to store
    lines = [line for line in err_path.read_text().splitlines() if line.strip()]
    assert lines
    by_level: dict[str, set[str]] = {}
    for line in lines:
        assert line[:1] == "<" and line[2:3] == ">", line
        record = json.loads(line[3:])
        assert "timestamp" not in record, line
        by_level.setdefault(record["level"], set()).add(line[:3])
    assert by_level["info"] == {"<6>"} and by_level["warning"] == {"<4>"}, by_level


def test_without_journal_stream_lines_keep_their_timestamp(tmp_path: Path) -> None:
    """A JOURNAL_STREAM naming another file (inherited, stderr redirected) changes nothing."""
    env = clean_env(JOURNAL_STREAM="1:2", AGENTD_LOG_FORMAT="json", AGENTD_LOG_LEVEL="info",
                    AGENTD_SOCKET=str(tmp_path / "none.sock"), CODER_AGENT_URL="http://127.0.0.1:9",
                    CODER_AGENT_TOKEN=TOKEN, AGENTD_TASK_ID=TASK, AGENTD_AGENTAPI_URL=f"http://127.0.0.1:{free_port()}",
                    AGENTD_STATE_DIR=str(tmp_path / "state"))
    done = agentd("snapshot", "--timeout", "2", env=env)
    records = json_lines(done.stderr)
    assert records and all("timestamp" in r for r in records), done.stderr
    assert not any(line.startswith("<") for line in done.stderr.splitlines())


# -- early signals -------------------------------------------------------------------------------

_COALESCE = """
import hashlib, os, signal, threading, time
from agentd.entry import EarlySignals
early = EarlySignals().install()
started = threading.Event()
def send():
    started.wait()
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=send).start()
started.set()
t = time.monotonic()
while time.monotonic() - t < 20 and len(early) < 2:
    hashlib.pbkdf2_hmac("sha256", b"x", b"y", 3_000_000)  # C code: Python handlers wait for its end
print(list(early), [round(at - t, 3) >= 0 for at in early.at], list(early.timed()) == list(zip(early, early.at)))
"""


def test_two_quick_stops_during_a_long_c_call_stay_two() -> None:
    """Python runs a handler once for two deliveries in one C call; the wakeup pipe counts both,
    so the daemon still sees a second SIGTERM (give up), not one."""
    done = subprocess.run([sys.executable, "-c", _COALESCE], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[15, 15] [True, True] True", done.stdout
