"""agentd.agentapi_proc: which processes count as agentapi, and signals that reach only the
checked process (with a pidfd, and with the kill() fallback where there is none)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from agentd import agentapi_proc
from agentd.agentapi_proc import NotAgentAPI, find_agentapi, is_agentapi, state_file_of


@pytest.mark.parametrize(
    ("argv", "exe", "expected"),
    [
        (["agentapi", "server", "--", "claude"], "/usr/local/bin/agentapi", True),
        (["/opt/bin/agentapi", "server"], "", True),  # another user's: no exe to read
        (["/x/python3.11", "-m", "agentd.testing.fake_agentapi", "--port", "0"], "/usr/bin/python3.11", True),
        (["node", "/srv/agentapi/agentapi.js"], "/usr/bin/node", True),
        (["sh", "-c", "agentapi server -- claude"], "/bin/dash", True),
        (["sleep", "1000"], "/usr/bin/sleep", False),
        (["tail", "-f", "/tmp/agentapi.log"], "/usr/bin/tail", False),  # named in an argument only
        (["python3", "-m", "http.server"], "/usr/bin/python3", False),
        (["vim", "agentapi.pid"], "/usr/bin/vim", False),
        ([], "", False),
    ],
)
def test_is_agentapi(argv, exe, expected):
    assert is_agentapi(argv, exe) is expected


def named_agentapi(tmp_path: Path) -> subprocess.Popen[bytes]:
    """A sleeping Python run through a symlink named agentapi (``argv[0]`` "…/agentapi"), with
    agentapi's ``--state-file`` flag on its command line."""
    link = tmp_path / "agentapi"
    link.symlink_to(sys.executable)
    proc = subprocess.Popen([str(link), "-c", "import time; time.sleep(1000)", "--state-file", "rel/state.json"],
                            cwd=tmp_path, stdin=subprocess.DEVNULL)
    wait_exec(proc.pid, b"time.sleep(1000)")
    return proc


def wait_exec(pid: int, arg: bytes) -> None:
    """Wait until ``pid`` runs its new program (``arg`` in its command line), bounded."""
    end = time.monotonic() + 20
    while arg not in Path(f"/proc/{pid}/cmdline").read_bytes():
        assert time.monotonic() < end, "the child never exec'd"
        time.sleep(0.005)


@pytest.mark.parametrize("pidfd", ["pidfd", "no-pidfd"])
@pytest.mark.anyio
async def test_a_checked_agentapi_is_signalled_and_seen_exiting(tmp_path, monkeypatch, pidfd):
    if pidfd == "no-pidfd":
        def no_pidfd(pid: int, flags: int = 0) -> int:
            raise OSError(errno.ENOSYS, "pidfd_open is not available")

        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    proc = named_agentapi(tmp_path)
    try:
        await anyio.sleep(0.05)
        pid_file = tmp_path / "agentapi.pid"
        pid_file.write_text(f"{proc.pid}\n")  # written after the start, as agentapi does
        agentapi = find_agentapi(pid_file)
        assert (agentapi.pidfd is None) is (pidfd == "no-pidfd")
        assert agentapi.pid == proc.pid and "agentapi -c" in agentapi.command
        assert state_file_of(proc.pid) == tmp_path / "rel" / "state.json"
        assert not agentapi.exited()
        agentapi.send(signal.SIGTERM)
        with anyio.fail_after(20):
            await agentapi.wait_exited()  # a zombie until we reap it: exited all the same
        assert agentapi.exited()
        assert proc.wait(10) == -signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            agentapi.send(signal.SIGTERM)  # never to whatever has the pid next
        agentapi.close()
    finally:
        proc.kill()
        proc.wait(10)


def test_started_after_the_pid_file_is_refused(tmp_path):
    pid_file = tmp_path / "agentapi.pid"
    pid_file.write_text("1\n")
    then = time.time() - 10
    os.utime(pid_file, (then, then))
    proc = named_agentapi(tmp_path)
    try:
        pid_file.write_text(f"{proc.pid}\n")
        os.utime(pid_file, (then, then))
        with pytest.raises(NotAgentAPI, match="after the pid file was written"):
            find_agentapi(pid_file)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)


def test_start_slack_is_small():
    assert 0 < agentapi_proc.START_SLACK <= 2
