"""The state dir is ours alone (issue 9 rows 8-10), against real ``agentd`` processes.

A FIFO or a symlink to /dev/zero as ``state.json`` (with a SIGTERM during start-up), a state dir
other users can write (exit 78, one line), and a 64 KiB tmpfs that fills up and is freed again
(the state file catches up with the buffer without any new message). The unit-level rows (0700
whatever the umask, exclusive temp files, concurrent writes, the local-user attack) are in
tests/test_state.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import assert_token_absent, clean_env, fill, json_lines, wait_status, wait_until

from agentd.testing import FakeAgentAPI, FakeCoderd, generic_conversation

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "state-dir-token-3f9a0c2e7d4b1a58"
TASK = str(uuid.uuid4())
START = 20.0


class Agentd:
    """``python -m agentd run`` with stdout/stderr in files."""

    def __init__(self, tmp: Path, env: dict[str, str], args: tuple[str, ...] = ("run",)) -> None:
        self.out_path, self.err_path = tmp / "agentd.out", tmp / "agentd.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "agentd", *args], env=env, cwd=ROOT,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        return json_lines(self.err())

    async def exit_status(self, bound: float = 20.0) -> int:
        proc = self.proc
        await wait_until(lambda: proc.poll() is not None, bound, "agentd to exit")
        return proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def procs() -> Iterator[list[Agentd]]:
    started: list[Agentd] = []
    yield started
    for p in started:
        p.kill()


def env_for(backend: str, state: Path, sock: Path, coderd_url: str, api_url: str, **extra: str) -> dict[str, str]:
    return clean_env(
        CODER_AGENT_URL=coderd_url, CODER_AGENT_TOKEN=TOKEN, AGENTD_TASK_ID=TASK, AGENTD_AGENTAPI_URL=api_url,
        AGENTD_STATE_DIR=str(state), AGENTD_SOCKET=str(sock), AGENTD_SHUTDOWN_TIMEOUT="5",
        AGENTD_CHECKPOINT_INTERVAL="0", AGENTD_LOG_FORMAT="json", AGENTD_LOG_LEVEL="info",
        AGENTD_ASYNC_BACKEND=backend, **extra,
    )


def stored(coderd: FakeCoderd) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in coderd.stored[TASK].messages]


def state_messages(state_dir: Path) -> int:
    try:
        return len(json.loads((state_dir / "state.json").read_bytes())["messages"])
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
@pytest.mark.parametrize("when", ["during-start-up", "after-start"])
async def test_state_json_fifo_or_dev_zero_neither_hangs_nor_bloats_start_up(
    anyio_backend: str, tmp_path: Path, short_dir: Path, procs: list[Agentd], kind: str, when: str
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    if kind == "fifo":
        os.mkfifo(state_dir / "state.json")
    else:
        (state_dir / "state.json").symlink_to("/dev/zero")
    api = FakeAgentAPI()
    api.load(generic_conversation(3))
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with api.serve(), coderd.serve():
        d = Agentd(tmp_path, env_for(anyio_backend, state_dir, short_dir / "agentd.sock", coderd.url, api.url))
        procs.append(d)
        if when == "during-start-up":
            await anyio.sleep(0.3)  # the interpreter is up, agentd is importing or loading its state
        else:
            await wait_until(lambda: "agentd started" in [e.get("event") for e in d.logs()] or d.proc.poll() is not None,
                             START, "agentd started")
        d.proc.send_signal(signal.SIGTERM)
        status = await d.exit_status()
    assert status == 0, d.err()[-3000:]
    assert stored(coderd) == generic_conversation(3)
    assert stat.S_ISREG(os.lstat(state_dir / "state.json").st_mode), "a regular state file now"
    aside = [p for p in state_dir.iterdir() if p.name.startswith("state.json.corrupt-")]
    if when == "after-start":  # loaded (and moved aside) before it said it started
        assert len(aside) == 1, sorted(p.name for p in state_dir.iterdir())
        warned = [e for e in d.logs() if e.get("component") == "agentd.state" and e.get("level") == "warning"]
        assert len(warned) == 1 and "moved aside" in warned[0]["event"], warned
    assert state_messages(state_dir) == 3, "a regular state file replaced it"
    assert_token_absent(TOKEN, d.err())


@pytest.mark.parametrize("command", ["run", "snapshot"])
async def test_a_state_dir_others_can_write_is_refused_with_exit_78(
    anyio_backend: str, tmp_path: Path, short_dir: Path, procs: list[Agentd], command: str
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # as umask 000 used to leave it: every user may rename what is inside
    state_dir = shared / "state"
    d = Agentd(tmp_path, env_for(anyio_backend, state_dir, short_dir / "agentd.sock", "http://127.0.0.1:9",
                                 "http://127.0.0.1:9"), (command,))
    procs.append(d)
    assert await d.exit_status() == 78, d.err()[-3000:]
    lines = [line for line in d.err().splitlines() if line.strip() and not line.startswith("{")]  # not log lines
    assert len(lines) == 1, lines
    assert "AGENTD_STATE_DIR" in lines[0] and str(shared) in lines[0] and "Traceback" not in lines[0], lines[0]
    assert not state_dir.exists(), "nothing created in it"


def _tiny_tmpfs(path: Path) -> str | None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs root and mount(8) for a 64 KiB tmpfs"
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(path)],
                         capture_output=True, text=True, timeout=20)
    return None if res.returncode == 0 else f"cannot mount a tmpfs here: {res.stderr.strip()[:200]}"


async def test_a_disk_full_once_then_freed_catches_up_without_a_new_message(
    anyio_backend: str, tmp_path: Path, short_dir: Path, procs: list[Agentd]
) -> None:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    problem = _tiny_tmpfs(mnt)
    if problem:
        pytest.skip(problem)
    try:
        state_dir = mnt / "state"
        sock = short_dir / "agentd.sock"
        api = FakeAgentAPI()
        api.load(generic_conversation(4))
        coderd = FakeCoderd(token=TOKEN, tasks={TASK})
        async with api.serve(), coderd.serve():
            d = Agentd(tmp_path, env_for(anyio_backend, state_dir, sock, coderd.url, api.url))
            procs.append(d)
            await wait_until(lambda: "agentd started" in [e.get("event") for e in d.logs()] or d.proc.poll() is not None,
                             START, "agentd started")
            assert d.proc.poll() is None, d.err()[-3000:]
            await wait_status(sock, lambda s: s["messages"] == 4, START)
            await wait_until(lambda: state_messages(state_dir) == 4, START, "the first state write")
            filler = fill(mnt)
            for i in range(11):
                api.add_message("user" if i % 2 else "agent", f"while the disk is full {i}: " + "─" * 300)
            await wait_status(sock, lambda s: s["newest_id"] == 14 and s["persisted"] is False, START)
            assert state_messages(state_dir) == 4, "the last good state is intact"
            filler.unlink()  # space again; no new message arrives
            await wait_status(sock, lambda s: s["persisted"] is True, START)
            assert state_messages(state_dir) == 10, "the ring buffer's ten newest, ids 5-14"
            d.proc.send_signal(signal.SIGTERM)
            assert await d.exit_status() == 0, d.err()[-3000:]
        assert state_messages(state_dir) == 10, "at exit the file holds the whole buffer"
        assert json.loads((state_dir / "state.json").read_bytes())["messages"][-1]["id"] == 14
        events = [(e["level"], e["event"]) for e in d.logs() if e.get("component") == "agentd.state"]
        assert [lvl for lvl, _ in events] == ["warning", "info"], events
        assert len(stored(coderd)) == 10  # the ring buffer's ten newest
    finally:
        await anyio.run_process(["umount", "-l", str(mnt)], check=False)
