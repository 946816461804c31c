"""``agentd supervise``: Ctrl-C reaches agentd first (issue 14), with real processes.

The child runs in a session of its own, so a SIGINT to agentd's process group (a terminal's
Ctrl-C, a shell's ``kill -INT -- -PGID``, ``timeout -s INT``) reaches agentd only; agentd stores
the snapshot while the child still serves the conversation, then forwards the signal once.

Two ways in: ``os.killpg`` on agentd's process group (agentd started as a group leader, as a
shell starts a job), and a real terminal: agentd in a new session whose controlling terminal is
a pty's slave (its stdin), Ctrl-C typed on the master. There the child also reads a line typed
on that terminal, which it can do without being stopped (SIGTTIN) because it is in another
session and the terminal is not its controlling one.
"""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import assert_token_absent, clean_env, free_port, json_lines, wait_until

from agentd.testing import FakeCoderd, generic_conversation

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "sv-term-token-5e1f7a09c3d2b4a6"
TASK = "7b2d4f60-1c3e-4a5b-8d9e-0f1a2b3c4d5e"
START = 20.0  # seconds for agentd and its child to come up on a loaded machine

CHILD = textwrap.dedent(
    '''
    """Supervised child: serves agentapi, logs signals and a line read from stdin, exits 0 on SIGINT."""
    import os, signal, sys, time
    import anyio
    from agentd.testing import FakeAgentAPI, generic_conversation

    log_path, port, read = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "read"

    def note(line):
        with open(log_path, "a") as f:
            f.write(line + "\\n")

    async def main():
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, anyio.fail_after(120):
            api = FakeAgentAPI()
            api.load(generic_conversation(3))
            async with api.serve(port=port), anyio.create_task_group() as tg:
                note(f"READY {os.getpid()} {os.getpgrp()} {os.getsid(0)}")
                if read:
                    async def read_line():
                        line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                        note(f"READ {line.strip()}")
                    tg.start_soon(read_line)
                async for signum in signals:
                    note(f"{signal.Signals(signum).name} {time.time():.6f}")
                    os._exit(0)

    anyio.run(main)
    '''
)


def read_log(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def env_for(backend: str, state: Path, coderd_url: str, port: int) -> dict[str, str]:
    return clean_env(
        CODER_AGENT_URL=coderd_url, CODER_AGENT_TOKEN=TOKEN, AGENTD_TASK_ID=TASK,
        AGENTD_AGENTAPI_URL=f"http://127.0.0.1:{port}", AGENTD_STATE_DIR=str(state),
        AGENTD_SHUTDOWN_TIMEOUT="6", AGENTD_CHILD_STOP_TIMEOUT="2", AGENTD_CHECKPOINT_INTERVAL="0",
        AGENTD_LOG_FORMAT="json", AGENTD_LOG_LEVEL="info", AGENTD_ASYNC_BACKEND=backend,
    )


class Run:
    """agentd supervise with the child above: stdout/stderr in files, cleaned up on exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.script = tmp / "child.py"
        self.script.write_text(CHILD)
        self.log = tmp / "child.log"
        self.err_path = tmp / "agentd.err"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self, port: int, read: bool) -> list[str]:
        child = [sys.executable, str(self.script), str(self.log), str(port), "read" if read else "no-read"]
        return [sys.executable, "-m", "agentd", "supervise", "--", *child]

    def events(self) -> list[str]:
        return [d.get("event", "") for d in json_lines(self.err_path.read_text(errors="replace"))]

    async def ready(self) -> list[str]:
        """Wait for the child's READY line and agentd's tail to connect; the READY fields."""
        assert self.proc is not None
        await wait_until(lambda: any(w[0] == "READY" for w in read_log(self.log)) or self.proc.poll() is not None,
                         START, "the child to be ready")
        await wait_until(lambda: "agentapi connected" in self.events() or self.proc.poll() is not None,
                         START, "agentd's tail to connect")
        assert self.proc.poll() is None, self.err_path.read_text()[-3000:]
        return next(w for w in read_log(self.log) if w[0] == "READY")

    def spawn(self, argv: list[str], env: dict[str, str], stdin: int, **popen: bool) -> None:
        with open(self.tmp / "agentd.out", "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=stdin, stdout=out, stderr=err, **popen)

    async def exit_status(self, bound: float = 20.0) -> int:
        proc = self.proc
        assert proc is not None
        await wait_until(lambda: proc.poll() is not None, bound, "agentd to exit")
        return proc.returncode

    def cleanup(self) -> None:
        """Kill agentd and, since it lives in a session of its own, the child too."""
        ready = [w for w in read_log(self.log) if w[0] == "READY"]
        for pid in [int(ready[0][1])] if ready else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def check_stored_first(run: Run, coderd: FakeCoderd, sent: float, agentd_pid: int) -> None:
    """Stored while the child served, then SIGINT forwarded once; the child in its own session."""
    signals = [w for w in read_log(run.log) if w[0].startswith("SIG")]
    assert [w[0] for w in signals] == ["SIGINT"], f"the child got exactly one SIGINT, from agentd: {signals}"
    child_got = float(signals[0][1])
    uploads = coderd.answered(204)
    assert len(uploads) == 1, [r.as_json() for r in coderd.requests]
    assert sent <= uploads[0].time < child_got, (sent, uploads[0].time, child_got)
    assert coderd.stored[TASK].snapshot_at < child_got
    assert [(m["role"], m["content"]) for m in coderd.stored[TASK].messages] == generic_conversation(3)
    ready = next(w for w in read_log(run.log) if w[0] == "READY")
    child_pid, child_pgrp, child_sid = map(int, ready[1:4])
    assert child_pgrp == child_pid == child_sid, "the child leads a session (and process group) of its own"
    assert child_pgrp != agentd_pid, "not in agentd's process group (agentd leads its own)"
    assert any(e == "shutting down" for e in run.events())
    assert_token_absent(TOKEN, run.err_path.read_text(errors="replace"))


async def test_sigint_to_agentds_process_group_stores_before_the_child_stops(
    anyio_backend: str, tmp_path: Path, short_dir: Path
) -> None:
    port = free_port()
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    run = Run(tmp_path)
    async with coderd.serve():
        try:
            # A new session and process group for agentd: the job a shell would start.
            run.spawn(run.argv(port, read=False), env_for(anyio_backend, short_dir, coderd.url, port),
                      subprocess.DEVNULL, start_new_session=True)
            await run.ready()
            sent = time.time()
            os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
            status = await run.exit_status()
        finally:
            run.cleanup()
    assert status == 0, run.err_path.read_text()[-3000:]
    check_stored_first(run, coderd, sent, run.proc.pid)


SET_CTTY = (
    "import fcntl, os, sys, termios\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"  # stdin, a pty slave, becomes the controlling terminal
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


async def test_ctrl_c_on_a_real_terminal_stores_first_and_the_child_still_reads_it(
    anyio_backend: str, tmp_path: Path, short_dir: Path
) -> None:
    port = free_port()
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    run = Run(tmp_path)
    master, slave = pty.openpty()
    try:
        async with coderd.serve():
            try:
                run.spawn([sys.executable, "-c", SET_CTTY, *run.argv(port, read=True)],
                          env_for(anyio_backend, short_dir, coderd.url, port), slave, start_new_session=True)
                await run.ready()
                assert run.proc is not None and os.tcgetpgrp(master) == run.proc.pid, "agentd is the terminal's foreground process group"
                os.write(master, b"typed on the terminal\n")
                await wait_until(lambda: any(w[0] == "READ" for w in read_log(run.log)), START,
                                 "the child to read the terminal")
                assert ["READ", "typed", "on", "the", "terminal"] in read_log(run.log)
                sent = time.time()
                os.write(master, b"\x03")  # Ctrl-C
                status = await run.exit_status()
            finally:
                run.cleanup()
    finally:
        os.close(slave)
        os.close(master)
    assert status == 0, run.err_path.read_text()[-3000:]
    check_stored_first(run, coderd, sent, run.proc.pid)
