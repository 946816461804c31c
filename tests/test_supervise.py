"""``agentd supervise -- COMMAND``: the container entrypoint mode, with real processes (issue 4).

Every case starts ``python -m agentd supervise -- CHILD`` as a real process (its own event loop
on the test's anyio backend: ``AGENTD_ASYNC_BACKEND``), with coderd a :class:`FakeCoderd` served
by the test on 127.0.0.1 and the child one of:

* the agentapi stand-in process (``python -m agentd.testing.fake_agentapi --signal-log L``),
  which appends ``SIGTERM <time.time()>`` when the signal reaches it and exits 0;
* a small script (:data:`CHILD_SCRIPT`, written to the test's directory) that logs the signals
  it receives, exits with a chosen status on SIGTERM (or ignores it, or dies of it), exits on its
  own, serves a :class:`FakeAgentAPI` in-process when asked, and can leave an orphaned
  grandchild behind.

What is checked: the snapshot reaches coderd *before* the child is told to stop (coderd's
``snapshot_at`` and the request's arrival are older than the child's SIGTERM line); agentd
exits with the child's status (128 + N for a child killed by signal N, 137 when agentd had to
SIGKILL it); a child that exits on its own is stored and mirrored; SIGHUP and SIGUSR1 are
forwarded and agentd keeps running; with coderd refusing connections or hanging, the child is
still stopped within ``AGENTD_SHUTDOWN_TIMEOUT`` (+1.5 s of process slack); the child's stdout
and stderr are agentd's; usage errors (2) and unexecutable commands (127).

PID 1: the entrypoint command line runs as PID 1 of a fresh PID namespace with
``unshare --pid --fork --mount-proc``. util-linux's ``unshare --fork`` (2.38 here) does *not*
forward SIGTERM: it ignores SIGTERM/SIGINT itself and only waits for its child. So the tests
signal the namespace's PID 1 by its host pid, found in ``/proc/<unshare>/task/<unshare>/children``
(what ``docker stop`` does too: it signals the container's PID 1). Orphan reaping is checked
from the host's ``/proc``: the grandchild is seen re-parented to agentd, then must disappear
(a zombie whose parent is alive only disappears when that parent reaps it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import anyio
import anyio.abc
import pytest
from support import EXIT_SLACK, assert_token_absent, clean_env, free_port, json_lines, wait_until

from agentd.settings import Settings
from agentd.signals import REPEAT_WINDOW
from agentd.testing import FakeCoderd, generic_conversation

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "sv-token-9d3c41e7b2aa4f06"
TASK = "5a1e0c9d-7b3f-4c2a-9e8d-1f2a3b4c5d6e"
PY = sys.executable
START_TIMEOUT = 15.0  # seconds for agentd and its child to come up (2 loaded cores)


# ---- the supervised script child ---------------------------------------------------------------

CHILD_SCRIPT = textwrap.dedent(
    '''
    """Supervised test child: logs signals, exits as told, optionally serves agentapi."""
    import argparse, os, signal, sys, time
    import anyio

    p = argparse.ArgumentParser()
    p.add_argument("--log", required=True)
    p.add_argument("--on-term", default="exit:0", help="exit:N | ignore | default (die of it)")
    p.add_argument("--exit-after", type=float, help="exit on its own this long after ready")
    p.add_argument("--status", type=int, default=0, help="status for --exit-after")
    p.add_argument("--agentapi-port", type=int, help="serve a FakeAgentAPI here")
    p.add_argument("--messages", type=int, default=4)
    p.add_argument("--orphan", type=float, help="leave a grandchild that lives this long")
    p.add_argument("--say", default="hello")
    args = p.parse_args()

    def note(line):
        with open(args.log, "a") as f:
            f.write(line + "\\n")
            f.flush()

    async def main():
        wanted = [signal.SIGHUP, signal.SIGUSR1, signal.SIGINT]
        if args.on_term != "default":
            wanted.append(signal.SIGTERM)
        with anyio.open_signal_receiver(*wanted) as signals, anyio.fail_after(60):  # bounded
            api = None
            if args.agentapi_port:
                from agentd.testing import FakeAgentAPI, generic_conversation
                api = FakeAgentAPI()
                api.load(generic_conversation(args.messages))
            if args.orphan:
                middle = os.fork()
                if middle == 0:
                    if os.fork() == 0:  # the grandchild: re-parented once its parent exits
                        note(f"GRANDCHILD {os.getpid()}")
                        time.sleep(args.orphan)
                        note("GRANDCHILD-EXIT")
                        os._exit(0)
                    os._exit(0)
                os.waitpid(middle, 0)
            async with anyio.create_task_group() as tg:
                if api is not None:
                    await tg.start(serve, api)
                print(f"child says {args.say} on stdout", flush=True)
                print(f"child says {args.say} on stderr", file=sys.stderr, flush=True)
                note(f"READY {os.getpid()} {time.time():.6f}")
                if args.exit_after is not None:
                    tg.start_soon(exit_later, api, tg)
                async for signum in signals:
                    note(f"{signal.Signals(signum).name} {time.time():.6f}")
                    stop = signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
                    if stop and api is not None:
                        # agentapi's HTTP shutdown waits up to 5 s for open /events streams: how
                        # many are still open, and how long until none is (3 s at most)
                        began = time.monotonic()
                        with anyio.move_on_after(3):
                            while api.subscribers:
                                await anyio.sleep(0.005)
                        note(f"STREAMS {api.subscribers} {time.monotonic() - began:.6f}")
                    if stop and args.on_term.startswith("exit:"):
                        note(f"EXIT {time.time():.6f}")
                        os._exit(int(args.on_term[5:]))

    async def serve(api, task_status):
        async with api.serve(port=args.agentapi_port):
            task_status.started()
            await anyio.sleep_forever()

    async def exit_later(api, tg):
        if api is not None:  # wait until agentd's tail follows the conversation
            await api.wait_for_subscribers(1, timeout=20)
        await anyio.sleep(args.exit_after)
        note(f"EXIT {time.time():.6f}")
        os._exit(args.status)

    anyio.run(main)
    '''
)


# ---- helpers ---------------------------------------------------------------------------------------


def read_log(path: Path) -> list[tuple[str, list[str]]]:
    """A child's signal log: ``[(WORD, [rest...]), ...]``."""
    if not path.exists():
        return []
    return [(ln.split()[0], ln.split()[1:]) for ln in path.read_text().splitlines() if ln.strip()]


def first(path: Path, word: str) -> float:
    """The time on the first line of ``path`` starting with ``word`` (fails if none)."""
    for w, rest in read_log(path):
        if w == word:
            return float(rest[-1])
    raise AssertionError(f"no {word} line in {path}: {path.read_text() if path.exists() else '(missing)'}")


class Proc:
    """A process started by a test, stdout and stderr in files; leftovers killed on close."""

    def __init__(self, process: anyio.abc.Process, out: Path, err: Path) -> None:
        self.process = process
        self.out_path, self.err_path = out, err

    @property
    def pid(self) -> int:
        return self.process.pid

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def events(self) -> list[str]:
        return [d.get("event", "") for d in json_lines(self.err())]

    def signal(self, signum: int) -> float:
        """Send ``signum``; returns the time it was sent."""
        at = time.time()
        self.process.send_signal(signum)
        return at

    async def started(self) -> None:
        """Wait for agentd's ``agentd started`` line."""
        await wait_until(lambda: "agentd started" in self.events() or self.process.returncode is not None,
                   START_TIMEOUT, "agentd started")
        assert self.process.returncode is None, f"agentd exited early:\n{self.err()}"

    async def exit_status(self, timeout: float) -> int:
        with anyio.fail_after(timeout):
            return await self.process.wait()

    def assert_no_token(self) -> None:
        assert_token_absent(TOKEN, self.out() + self.err())

    async def close(self) -> None:
        """Kill what is left of the process group (agentd, any grandchild) and agentd's child,
        which runs in a session (so a process group) of its own."""
        try:
            kids = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:
            kids = []
        for kid in kids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(kid), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with anyio.move_on_after(5):
            await self.process.wait()


async def start(cmd: list[str], env: dict[str, str], tmp: Path, name: str = "agentd") -> Proc:
    out, err = tmp / f"{name}.out", tmp / f"{name}.err"
    with out.open("wb") as fo, err.open("wb") as fe:
        process = await anyio.open_process(
            cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=env, cwd=str(ROOT), start_new_session=True
        )
    return Proc(process, out, err)


@pytest.fixture
def child_script(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD_SCRIPT)
    return path


def agentd_env(
    backend: str, state: Path, *, coderd_url: str, agentapi_port: int, shutdown: float = 4.0,
    child_stop: float = 1.0,
) -> dict[str, str]:
    return clean_env(
        CODER_AGENT_URL=coderd_url,
        CODER_AGENT_TOKEN=TOKEN,
        AGENTD_TASK_ID=TASK,
        AGENTD_AGENTAPI_URL=f"http://127.0.0.1:{agentapi_port}",
        AGENTD_STATE_DIR=str(state),
        AGENTD_SHUTDOWN_TIMEOUT=str(shutdown),
        AGENTD_CHILD_STOP_TIMEOUT=str(child_stop),
        AGENTD_CHECKPOINT_INTERVAL="0",  # only the stop path uploads: nothing older can pass for it
        AGENTD_LOG_FORMAT="json",
        AGENTD_LOG_LEVEL="info",
        AGENTD_ASYNC_BACKEND=backend,
    )


def supervise(*child: str) -> list[str]:
    return [PY, "-m", "agentd", "supervise", "--", *child]


def fake_agentapi(port: int, signal_log: Path, *extra: str) -> list[str]:
    return [PY, "-m", "agentd.testing.fake_agentapi", "--port", str(port), "--signal-log", str(signal_log), *extra]


def script(path: Path, log: Path, *extra: str) -> list[str]:
    return [PY, str(path), "--log", str(log), *extra]


def expected_messages(n: int) -> list[tuple[str, str]]:
    return generic_conversation(n)


def stored_pairs(coderd: FakeCoderd) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in coderd.stored[TASK].messages]


async def buffered_messages(sock: Path) -> int:
    """How many messages agentd holds, asked over its control socket (``status``)."""
    try:
        stream = await anyio.connect_unix(str(sock))
    except OSError:
        return -1
    async with stream:
        await stream.send(b'{"command":"status"}\n')
        data = b""
        with anyio.fail_after(30):
            while not data.endswith(b"\n"):
                data += await stream.receive()
    return int(json.loads(data)["status"]["messages"])


async def wait_buffered(sock: Path, n: int) -> None:
    with anyio.fail_after(START_TIMEOUT):
        while await buffered_messages(sock) != n:
            await anyio.sleep(0.05)


async def child_ready(log: Path) -> int:
    """Wait for the script child's READY line; returns its pid."""
    await wait_until(lambda: any(w == "READY" for w, _ in read_log(log)), START_TIMEOUT, f"READY in {log}")
    return next(int(rest[0]) for w, rest in read_log(log) if w == "READY")


pytestmark = pytest.mark.anyio


# ---- SIGTERM / SIGINT: store first, then stop the child, then mirror its status --------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
async def test_stop_signal_stores_while_agentapi_alive_then_mirrors_exit(
    anyio_backend: str, tmp_path: Path, short_dir: Path, stop_signal: signal.Signals
) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    port = free_port()
    sig_log = tmp_path / "signals.log"
    async with coderd.serve():
        env = agentd_env(anyio_backend, short_dir, coderd_url=coderd.url, agentapi_port=port)
        proc = await start(supervise(*fake_agentapi(port, sig_log, "--messages", "3")), env, tmp_path)
        try:
            await proc.started()
            await wait_until(lambda: "agentapi listening on" in proc.out(), START_TIMEOUT, "the child's listening line")
            await wait_until(lambda: "agentapi connected" in proc.events(), START_TIMEOUT, "agentd's tail to connect")
            sent = proc.signal(stop_signal)
            status = await proc.exit_status(10)
        finally:
            await proc.close()

    assert status == 0, f"the stand-in exits 0 on {stop_signal.name}; agentd must mirror it\n{proc.err()}"
    child_got = first(sig_log, stop_signal.name)
    uploads = coderd.answered(204)
    assert len(uploads) == 1, [r.as_json() for r in coderd.requests]
    snap = coderd.stored[TASK]
    # The order the issue asks for: stored while agentapi was alive, then the signal forwarded.
    assert sent <= uploads[0].time < child_got, (sent, uploads[0].time, child_got)
    assert snap.snapshot_at < child_got, (snap.snapshot_at, child_got)
    assert stored_pairs(coderd) == expected_messages(3)
    assert [w for w, _ in read_log(sig_log)] == [stop_signal.name], "the child got exactly one signal"
    logged = json_lines(proc.err())
    assert any(d.get("event") == "shutting down" and d.get("why") == stop_signal.name for d in logged)
    proc.assert_no_token()
    assert not (short_dir / "agentd.sock").exists(), "the control socket is removed on exit"


@pytest.mark.parametrize(
    ("on_term", "expected"),
    [("exit:7", 7), ("default", 128 + signal.SIGTERM)],
    ids=["child-exits-7", "child-dies-of-SIGTERM"],
)
async def test_exit_status_is_the_childs(
    anyio_backend: str, tmp_path: Path, short_dir: Path, child_script: Path, on_term: str, expected: int
) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    port = free_port()
    log = tmp_path / "child.log"
    async with coderd.serve():
        env = agentd_env(anyio_backend, short_dir, coderd_url=coderd.url, agentapi_port=port)
        cmd = supervise(*script(child_script, log, "--on-term", on_term, "--agentapi-port", str(port)))
        proc = await start(cmd, env, tmp_path)
        try:
            await proc.started()
            await child_ready(log)
            await wait_until(lambda: "agentapi connected" in proc.events(), START_TIMEOUT, "agentd's tail to connect")
            sent = proc.signal(signal.SIGTERM)
            status = await proc.exit_status(10)
        finally:
            await proc.close()

    assert status == expected, proc.err()
    # Stored before the child was signalled (for "default" the child cannot log: it just dies).
    upload = coderd.answered(204)
    assert len(upload) == 1 and upload[0].time >= sent
    if on_term.startswith("exit:"):
        assert coderd.stored[TASK].snapshot_at < first(log, "SIGTERM")
    assert stored_pairs(coderd) == expected_messages(4)
    exited = [d for d in json_lines(proc.err()) if d.get("event") == "child exited"]
    assert exited and exited[-1]["status"] == expected
    proc.assert_no_token()


async def test_child_ignoring_sigterm_is_killed_after_child_stop_timeout(
    anyio_backend: str, tmp_path: Path, short_dir: Path, child_script: Path
) -> None:
    # agentapi unreachable (nothing listens on the port): nothing to store, so the child is
    # signalled at once and the SIGKILL comes AGENTD_CHILD_STOP_TIMEOUT later.
    shutdown, child_stop = 2.5, 1.0
    log = tmp_path / "child.log"
    env = agentd_env(anyio_backend, short_dir, coderd_url=f"http://127.0.0.1:{free_port()}",
                     agentapi_port=free_port(), shutdown=shutdown, child_stop=child_stop)
    proc = await start(supervise(*script(child_script, log, "--on-term", "ignore")), env, tmp_path)
    try:
        await proc.started()
        await child_ready(log)
        sent = proc.signal(signal.SIGTERM)
        status = await proc.exit_status(shutdown + 5)
        done = time.time()
    finally:
        await proc.close()

    assert status == 128 + signal.SIGKILL, proc.err()
    child_got = first(log, "SIGTERM")
    assert done - child_got >= child_stop - 0.05, "killed before AGENTD_CHILD_STOP_TIMEOUT ran out"
    assert done - sent <= shutdown + EXIT_SLACK, f"took {done - sent:.2f} s"
    assert "child did not exit in time; killing it" in proc.events()
    proc.assert_no_token()


# ---- the child exits on its own ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["exit-5", "killed-externally"])
async def test_child_exiting_on_its_own_is_stored_and_mirrored(
    anyio_backend: str, tmp_path: Path, short_dir: Path, child_script: Path, how: str
) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    port = free_port()
    log = tmp_path / "child.log"
    linger = ["--exit-after", "1", "--status", "5"] if how == "exit-5" else []
    async with coderd.serve():
        env = agentd_env(anyio_backend, short_dir, coderd_url=coderd.url, agentapi_port=port)
        cmd = supervise(*script(child_script, log, "--agentapi-port", str(port), "--messages", "5", *linger))
        proc = await start(cmd, env, tmp_path)
        try:
            await proc.started()
            child_pid = await child_ready(log)
            await wait_until(lambda: "agentapi connected" in proc.events(), START_TIMEOUT, "agentd's tail to connect")
            if how == "killed-externally":
                await wait_buffered(short_dir / "agentd.sock", 5)  # the tail holds the conversation
                gone = time.time()
                os.kill(child_pid, signal.SIGKILL)
                expected = 128 + signal.SIGKILL
            else:
                expected = 5
            status = await proc.exit_status(10)
        finally:
            await proc.close()

    assert status == expected, proc.err()
    if how == "exit-5":
        gone = first(log, "EXIT")
    # Stored after the child was gone, from the buffer the tail kept (agentapi died with it).
    assert coderd.stored[TASK].snapshot_at > gone
    assert stored_pairs(coderd) == expected_messages(5)
    logged = json_lines(proc.err())
    assert any(d.get("event") == "shutting down" and d.get("why") == "child exited" for d in logged)
    assert [w for w, _ in read_log(log) if w.startswith("SIG")] == [], "no signal is sent to an exited child"
    proc.assert_no_token()


# ---- forwarded signals --------------------------------------------------------------------------------


async def test_sigusr1_stores_then_reaches_agentapi_and_agentd_keeps_running(
    anyio_backend: str, tmp_path: Path, short_dir: Path
) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    port = free_port()
    sig_log, state_file = tmp_path / "signals.log", tmp_path / "agentapi-state.json"
    async with coderd.serve():
        env = agentd_env(anyio_backend, short_dir, coderd_url=coderd.url, agentapi_port=port)
        cmd = supervise(*fake_agentapi(port, sig_log, "--messages", "2", "--state-file", str(state_file)))
        proc = await start(cmd, env, tmp_path)
        try:
            await proc.started()
            await wait_until(lambda: "agentapi listening on" in proc.out(), START_TIMEOUT, "the child's listening line")
            await wait_buffered(short_dir / "agentd.sock", 2)
            proc.signal(signal.SIGUSR1)
            await wait_until(lambda: [w for w, _ in read_log(sig_log)] == ["SIGUSR1"], 30, "SIGUSR1 at the child")
            await wait_until(state_file.exists, 30, "agentapi's saved state")  # agentapi saves on SIGUSR1
            assert proc.process.returncode is None, "agentd must keep running after SIGUSR1"
            # SIGUSR1 is `agentd snapshot`: stored first, then agentapi saves its own state.
            [upload] = coderd.answered(204)
            assert upload.time < first(sig_log, "SIGUSR1")
            assert "snapshot on signal" in proc.events()
            sent = proc.signal(signal.SIGTERM)
            status = await proc.exit_status(10)
        finally:
            await proc.close()

    assert status == 0, proc.err()
    assert [w for w, _ in read_log(sig_log)] == ["SIGUSR1", "SIGTERM"]
    assert len(coderd.requests) == 1, "the stop found coderd already holding this exact body"
    assert coderd.stored[TASK].snapshot_at < sent
    assert stored_pairs(coderd) == expected_messages(2)
    proc.assert_no_token()


async def test_sighup_stops_sigusr1_forwarded_others_ignored_and_child_output_passes_through(
    anyio_backend: str, tmp_path: Path, short_dir: Path, child_script: Path
) -> None:
    """SIGUSR1 reaches the child (after a store: nothing to store here), SIGUSR2 and SIGALRM are
    logged and ignored (not forwarded, not fatal), SIGHUP stops agentd and the child like
    SIGTERM does (agentapi treats SIGHUP as shutdown)."""
    log = tmp_path / "child.log"
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve():
        env = agentd_env(anyio_backend, short_dir, coderd_url=coderd.url, agentapi_port=free_port())
        marker = uuid.uuid4().hex
        proc = await start(supervise(*script(child_script, log, "--on-term", "exit:3", "--say", marker)), env, tmp_path)
        try:
            await proc.started()
            await child_ready(log)
            # The child's stdout is agentd's stdout, its stderr agentd's stderr: no pipe, no prefix.
            await wait_until(lambda: f"child says {marker} on stdout\n" in proc.out(), 30, "the child's stdout line")
            await wait_until(lambda: f"child says {marker} on stderr\n" in proc.err(), 30, "the child's stderr line")
            assert "on stderr" not in proc.out() and "on stdout" not in proc.err()
            proc.signal(signal.SIGUSR1)
            await wait_until(lambda: [w for w, _ in read_log(log) if w.startswith("SIG")] == ["SIGUSR1"], 10,
                             "SIGUSR1 at the child")
            for signum in (signal.SIGUSR2, signal.SIGALRM):
                proc.signal(signum)
                await wait_until(lambda s=signum: any(d.get("event") == "signal ignored" and d.get("signal") == s.name
                                                      for d in json_lines(proc.err())), 30, f"{signum.name} logged")
            assert proc.process.returncode is None, "agentd must keep running after SIGUSR1/SIGUSR2/SIGALRM"
            proc.signal(signal.SIGHUP)
            status = await proc.exit_status(10)
        finally:
            await proc.close()

    assert [w for w, _ in read_log(log) if w.startswith("SIG")] == ["SIGUSR1", "SIGHUP"]
    assert status == 3, proc.err()
    logged = json_lines(proc.err())
    assert any(d.get("event") == "shutting down" and d.get("why") == "SIGHUP" for d in logged)
    assert not coderd.requests, "nothing to store: agentapi never answered"
    proc.assert_no_token()


async def test_events_stream_closed_before_the_child_is_signalled(
    anyio_backend: str, tmp_path: Path, short_dir: Path, child_script: Path
) -> None:
    """agentapi's HTTP shutdown waits up to 5 s for open connections, agentd's ``/events`` stream
    among them: agentd closes it before signalling the child, so that wait costs nothing."""
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    port = free_port()
    log = tmp_path / "child.log"
    async with coderd.serve():
        env = agentd_env(anyio_backend, short_dir, coderd_url=coderd.url, agentapi_port=port)
        cmd = supervise(*script(child_script, log, "--on-term", "exit:0", "--agentapi-port", str(port)))
        proc = await start(cmd, env, tmp_path)
        try:
            await proc.started()
            await child_ready(log)
            await wait_until(lambda: "agentapi connected" in proc.events(), START_TIMEOUT, "agentd's tail to connect")
            proc.signal(signal.SIGTERM)
            status = await proc.exit_status(10)
        finally:
            await proc.close()

    assert status == 0, proc.err()
    assert stored_pairs(coderd) == expected_messages(4)
    [streams] = [rest for w, rest in read_log(log) if w == "STREAMS"]
    assert int(streams[0]) == 0, f"agentd's /events stream still open {streams[1]} s after the child's SIGTERM"
    proc.assert_no_token()


def test_child_stop_timeout_default_fits_agentapi_and_docker() -> None:
    """agentapi stops in up to ~5 s (its HTTP shutdown, then SIGINT to the agent and up to 5 s
    before SIGKILL); the default leaves it that, and the upload some time, inside the default
    shutdown timeout, itself inside Docker's 10 s."""
    fields = Settings.model_fields
    child_stop = fields["child_stop_timeout"].default
    shutdown = fields["shutdown_timeout"].default
    assert child_stop > 5.0, "agentapi's agent gets 5 s before its SIGKILL: agentd must not kill it sooner"
    assert shutdown - child_stop >= 2.0, "the upload keeps at least 2 s of the shutdown budget"
    assert shutdown < 10.0, "inside docker stop's 10 s"


# ---- coderd down: the child is stopped within the bound anyway ---------------------------------------


@pytest.mark.parametrize("coderd_state", ["refused", "hanging", "hanging-second-sigterm"])
async def test_coderd_down_child_still_stopped_within_bound(
    anyio_backend: str, tmp_path: Path, short_dir: Path, coderd_state: str
) -> None:
    # With a second SIGTERM the wait ends early, so a long budget costs nothing and shows it.
    shutdown, child_stop = (6.0 if coderd_state == "hanging-second-sigterm" else 2.5), 1.0
    port = free_port()
    sig_log = tmp_path / "signals.log"
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, hang=True)
    second = None
    async with coderd.serve():
        url = f"http://127.0.0.1:{free_port()}" if coderd_state == "refused" else coderd.url
        env = agentd_env(anyio_backend, short_dir, coderd_url=url, agentapi_port=port,
                         shutdown=shutdown, child_stop=child_stop)
        proc = await start(supervise(*fake_agentapi(port, sig_log, "--messages", "3")), env, tmp_path)
        try:
            await proc.started()
            await wait_until(lambda: "agentapi listening on" in proc.out(), START_TIMEOUT, "the child's listening line")
            sent = proc.signal(signal.SIGTERM)
            if coderd_state != "refused":
                await wait_until(lambda: bool(coderd.requests), 30, "the upload to reach coderd")
            if coderd_state == "hanging":
                # SIGUSR1 during the (hanging) upload is still forwarded, and is not a second stop.
                proc.signal(signal.SIGUSR1)
            if coderd_state == "hanging-second-sigterm":
                # A deliberate second stop (not a repeat within a second): give up on coderd now.
                await anyio.sleep(max(0.0, sent + REPEAT_WINDOW + 0.05 - time.time()))
                second = proc.signal(signal.SIGTERM)
            status = await proc.exit_status(shutdown + 5)
            done = time.time()
        finally:
            await proc.close()

    assert status == 0, f"the child's status (it exits 0 on SIGTERM), whatever coderd did\n{proc.err()}"
    child_got = first(sig_log, "SIGTERM")
    assert child_got - sent <= shutdown - child_stop + EXIT_SLACK, f"child signalled {child_got - sent:.2f} s after the stop"
    assert done - sent <= shutdown + EXIT_SLACK, f"agentd took {done - sent:.2f} s"
    assert not coderd.stored
    events = proc.events()
    assert any(e.startswith("snapshot not stored") for e in events), events
    if coderd_state != "refused":
        assert coderd.requests and all(r.status is None for r in coderd.requests)
    if coderd_state == "hanging":
        assert [w for w, _ in read_log(sig_log)] == ["SIGUSR1", "SIGTERM"]
        assert "second signal: giving up on the snapshot" not in events
    if second is not None:
        assert "second signal: giving up on the snapshot" in events
        assert child_got - second < 1.5, f"the child was signalled {child_got - second:.2f} s after the second SIGTERM"
        assert [w for w, _ in read_log(sig_log)] == ["SIGTERM"], "the second stop signal is not sent on twice"
    proc.assert_no_token()


# ---- usage errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["supervise"], ["supervise", "--"]], ids=["no-args", "bare-dashes"])
def test_supervise_without_command_is_a_usage_error(args: list[str]) -> None:
    env = clean_env(CODER_AGENT_URL="http://127.0.0.1:9", CODER_AGENT_TOKEN=TOKEN, AGENTD_TASK_ID=TASK)
    res = subprocess.run([PY, "-m", "agentd", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "agentd supervise -- COMMAND" in lines[0], res.stderr
    assert TOKEN not in res.stdout + res.stderr


@pytest.mark.parametrize("what", ["missing", "not-executable", "directory"])
def test_unexecutable_command_exits_127(tmp_path: Path, short_dir: Path, what: str) -> None:
    if what == "missing":
        command = str(tmp_path / "no-such-agentapi")
    elif what == "not-executable":
        path = tmp_path / "agentapi"
        path.write_text("#!/bin/sh\necho should not run\n")
        path.chmod(0o644)
        command = str(path)
    else:
        command = str(tmp_path)
    env = agentd_env("asyncio", short_dir, coderd_url="http://127.0.0.1:9", agentapi_port=9)
    started = time.monotonic()
    res = subprocess.run([PY, "-m", "agentd", "supervise", "--", command, "server"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 127, res
    assert time.monotonic() - started < 10
    assert "should not run" not in res.stdout
    errors = [d for d in json_lines(res.stderr) if d.get("event") == "cannot start the child"]
    assert errors and errors[0]["level"] == "error", res.stderr
    assert TOKEN not in res.stdout + res.stderr
    assert not (short_dir / "agentd.sock").exists(), "no control socket left behind"


# ---- PID 1 of a fresh PID namespace ---------------------------------------------------------------------

UNSHARE = shutil.which("unshare")


def _unshare_problem() -> str | None:
    if UNSHARE is None:
        return "unshare (util-linux) is not installed"
    try:
        res = subprocess.run([UNSHARE, "--pid", "--fork", "--mount-proc", "sh", "-c", "echo $$"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if res.returncode != 0 or res.stdout.strip() != "1":
        return f"unshare --pid --fork --mount-proc is not permitted here: {res.stderr.strip()[:200]}"
    return None


_UNSHARE_PROBLEM = _unshare_problem()
needs_unshare = pytest.mark.skipif(_UNSHARE_PROBLEM is not None, reason=_UNSHARE_PROBLEM or "")


def proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def children_of(pid: int) -> dict[int, dict[str, str]]:
    """Host pids whose parent is ``pid``, with their /proc status."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = proc_status(int(entry.name))
            if st.get("PPid") == str(pid):
                out[int(entry.name)] = st
    return out


def namespace_init(unshare_pid: int) -> int | None:
    """The host pid of the namespace's PID 1: the child of ``unshare --fork``."""
    try:
        kids = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


@needs_unshare
@pytest.mark.parametrize("init", ["agentd", "tini"])
async def test_pid1_sigterm_stores_and_exits_and_orphans_are_reaped(
    anyio_backend: str, tmp_path: Path, short_dir: Path, child_script: Path, init: str
) -> None:
    tini = shutil.which("tini")
    if init == "tini" and tini is None:
        pytest.skip("tini is not installed (Debian: apt-get install tini); the agentd-as-PID-1 case runs without it")
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    port = free_port()
    log = tmp_path / "child.log"
    orphan_life = 0.6
    async with coderd.serve():
        env = agentd_env(anyio_backend, short_dir, coderd_url=coderd.url, agentapi_port=port)
        child = script(child_script, log, "--agentapi-port", str(port), "--orphan", str(orphan_life))
        entry = supervise(*child)
        if init == "tini":
            entry = [tini, "--", *entry]
        proc = await start([UNSHARE, "--pid", "--fork", "--mount-proc", *entry], env, tmp_path)
        try:
            await proc.started()
            child_pid_in_ns = await child_ready(log)
            ns_init = namespace_init(proc.pid)
            assert ns_init is not None
            ns_pids = proc_status(ns_init).get("NSpid", "").split()
            assert ns_pids[-1:] == ["1"], f"not PID 1 in its namespace: {ns_pids}"
            agentd_host = ns_init
            if init == "tini":
                kids = [p for p in children_of(ns_init)
                        if b"agentd\0supervise" in Path(f"/proc/{p}/cmdline").read_bytes()]
                assert len(kids) == 1, kids
                agentd_host = kids[0]
            agentd_ns = proc_status(agentd_host)["NSpid"].split()[-1]
            assert agentd_ns == ("1" if init == "agentd" else "2"), agentd_ns

            # The grandchild, orphaned by the double fork, belongs to the namespace's PID 1 now.
            await wait_until(lambda: any(w == "GRANDCHILD" for w, _ in read_log(log)), 30, "the grandchild")
            g_ns = next(rest[0] for w, rest in read_log(log) if w == "GRANDCHILD")

            def grandchild() -> tuple[int, dict[str, str]] | None:
                for pid, st in children_of(ns_init).items():
                    if st.get("NSpid", "").split()[-1:] == [g_ns]:
                        return pid, st
                return None

            found = grandchild()
            assert found is not None, f"grandchild {g_ns} is not a child of the namespace's PID 1"
            g_host = found[0]
            assert found[1]["State"][0] != "Z", "seen alive, re-parented to PID 1"
            await wait_until(lambda: any(w == "GRANDCHILD-EXIT" for w, _ in read_log(log)), orphan_life + 5,
                       "the grandchild to exit")
            # Reaped: gone from /proc altogether (an unreaped zombie would stay while PID 1 lives).
            await wait_until(lambda: not proc_status(g_host), 3, f"the orphan {g_host} to be reaped")
            zombies = {p: s["Name"] for p, s in children_of(ns_init).items() if s["State"].startswith("Z")}
            assert not zombies, f"zombies left under PID 1: {zombies}"
            assert proc.process.returncode is None, "agentd still running"
            direct = [p for p, s in children_of(agentd_host).items() if s["NSpid"].split()[-1] == str(child_pid_in_ns)]
            assert direct, "the supervised child is still alive (the reaper must not steal it)"

            # SIGTERM as `docker stop` sends it: to the namespace's PID 1.
            sent = time.time()
            os.kill(ns_init, signal.SIGTERM)
            status = await proc.exit_status(10)
        finally:
            await proc.close()

    assert status == 0, f"unshare mirrors PID 1, which mirrors the child (exit 0)\n{proc.err()}"
    child_got = first(log, "SIGTERM")
    assert sent <= coderd.stored[TASK].snapshot_at < child_got
    assert stored_pairs(coderd) == expected_messages(4)
    proc.assert_no_token()
