"""A hostile coderd cannot end the daemon (issue 9 rows 2, 4, 12), with real processes.

Each case runs ``python -m agentd run`` (on the test's anyio backend) against the friendly
stand-in agentapi and a small raw-socket server in place of coderd that sends bytes no
well-behaved coderd would: a 503 whose JSON body is nested 100 000 deep, ``Retry-After: ²``
(``str.isdigit`` says yes, ``int`` says no), a gzip bomb (1 MiB on the wire, 1 GiB inflated)
and a 200 ``text/html`` page from something in between. After the hostile answers the server
answers 204 and keeps the body: that is what counts as stored. Asserted: the exit status
(never 70, agentd's own bugs), what was stored, one log line per bad answer, and the child's
peak RSS (``VmHWM``) under :data:`PEAK_RSS_LIMIT_KIB`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from support import clean_env, make_short_dir, small_conversation

from agentd import control
from agentd.testing import FakeAgentAPI
from agentd.testing.hostile import (
    HostileCoderd,
    gzip_bomb,
    gzip_bomb_503,
    html_200,
    nested_503,
    superscript_retry_after_503,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TOKEN = "hostile-token-" + secrets.token_hex(12)
TASK = str(uuid.uuid4())
REPO_ROOT = Path(__file__).resolve().parents[1]

#: Seconds any single wait may take before the test fails (a busy 2-core machine).
WAIT = 30.0
#: The peak RSS agentd may reach against any answer here, KiB. An idle agentd peaks at about
#: 45 MiB; inflating the bomb would take it past 1 GiB.
PEAK_RSS_LIMIT_KIB = 80 * 1024
#: Exit statuses: stored, not stored, agentd's own bug (EX_SOFTWARE).
EXIT_STORED, EXIT_NOT_STORED, EX_SOFTWARE = 0, 1, 70


# ---------------------------------------------------------------------------------------------
# the agentd child, reaped with wait4 for its peak RSS


class Child:
    def __init__(self, backend: str, workdir: Path, coderd_url: str, agentapi_url: str, **env: str) -> None:
        self.sock_dir = make_short_dir("agentd-h-")
        self.socket = self.sock_dir / "agentd.sock"
        self.err_path = workdir / "agentd.err"
        self.env = clean_env(
            AGENTD_ASYNC_BACKEND=backend, AGENTD_LOG_FORMAT="json", AGENTD_LOG_LEVEL="info", AGENTD_TASK_ID=TASK,
            CODER_AGENT_TOKEN=TOKEN, CODER_AGENT_URL=coderd_url, AGENTD_AGENTAPI_URL=agentapi_url,
            AGENTD_STATE_DIR=str(workdir / "state"), AGENTD_SOCKET=str(self.socket), AGENTD_CHECKPOINT_INTERVAL="0",
            AGENTD_STARTUP_PROBE="false",  # the uploads meet the hostile answers, not the start-up probe
            **env,
        )
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentd", "run"], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                env=self.env, cwd=workdir,
            )
        self.peak_rss_kib: int | None = None

    def output(self) -> str:
        return self.err_path.read_bytes().decode("utf-8", "replace") if self.err_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == name:
                out.append(entry)
        return out

    async def wait_log(self, name: str) -> dict[str, Any]:
        with anyio.fail_after(WAIT):
            while not self.events(name):
                assert self.proc.returncode is None and self.proc.poll() is None, f"agentd exited:\n{self.output()}"
                await anyio.sleep(0.02)
        return self.events(name)[0]

    def _hwm_kib(self) -> int | None:
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return None  # a zombie: its memory is gone

    async def wait_exit(self) -> int:
        """The exit status, and in ``peak_rss_kib`` the child's peak RSS: its ``VmHWM``, read
        every 10 ms until it exits (``wait4``'s ``ru_maxrss`` would not do: Linux carries the
        parent's high-water mark across fork and exec, so it reports pytest's size)."""
        peak = 0
        with anyio.fail_after(WAIT):
            while True:
                peak = max(peak, self._hwm_kib() or 0)
                pid, status = os.waitpid(self.proc.pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: never blocks)
                if pid:
                    break
                await anyio.sleep(0.01)
        self.peak_rss_kib = peak
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.returncode is None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for path in self.sock_dir.iterdir():
            path.unlink()
        self.sock_dir.rmdir()

    def assert_clean(self) -> None:
        text = self.output()
        assert TOKEN not in text, "the agent token was printed"
        assert "Traceback" not in text, text[-3000:]
        assert not self.events("internal error"), text[-3000:]


@asynccontextmanager
async def running_agentd(backend: str, workdir: Path, coderd: HostileCoderd, **env: str) -> AsyncIterator[tuple[Child, FakeAgentAPI]]:
    api = FakeAgentAPI()
    small_conversation(api)
    async with api.serve(), coderd.serve():
        child = Child(backend, workdir, coderd.url, api.url, **env)
        try:
            await api.wait_for_subscribers(1, timeout=WAIT)
            await child.wait_log("agentd started")
            yield child, api
        finally:
            child.kill()


def same_conversation(stored: list[dict[str, Any]], api: FakeAgentAPI) -> bool:
    return [(m["id"], m["role"], m["content"]) for m in stored] == [(m.id, m.role, m.content) for m in api.messages]


def report_rss(case: str, backend: str, child: Child) -> None:
    print(f"HOSTILE-CODERD-PEAK-RSS {case}[{backend}] {child.peak_rss_kib} KiB")


# ---------------------------------------------------------------------------------------------
# the cases


@pytest.mark.parametrize(
    ("case", "make", "bad_event"),
    [
        ("nested-503", nested_503, "coderd busy"),
        ("retry-after-superscript-two", superscript_retry_after_503, "coderd busy"),
        ("gzip-bomb-503", gzip_bomb_503, "coderd busy"),
        ("html-200", html_200, "answer not from coderd"),
    ],
)
async def test_a_hostile_answer_is_one_failed_attempt_then_stored(
    anyio_backend: str, tmp_path: Path, case: str, make: Callable[[], bytes], bad_event: str
) -> None:
    coderd = HostileCoderd(answers=[make(), make()])
    async with running_agentd(anyio_backend, tmp_path, coderd) as (child, api):
        child.proc.send_signal(signal.SIGTERM)
        rc = await child.wait_exit()
        child.assert_clean()
    report_rss(case, anyio_backend, child)
    assert rc == EXIT_STORED, child.output()[-3000:]
    assert len(coderd.requests) == 3 and len(coderd.stored) == 1
    assert same_conversation(coderd.stored_messages(), api)
    assert [e["attempts"] for e in child.events("snapshot stored")] == [3]
    assert len(child.events(bad_event)) == 2, "each bad answer is logged once"
    assert child.peak_rss_kib is not None and child.peak_rss_kib < PEAK_RSS_LIMIT_KIB, child.peak_rss_kib


async def test_only_html_pages_end_not_stored_saying_who_answered(anyio_backend: str, tmp_path: Path) -> None:
    """A 2xx that is not coderd's 204 is never counted as stored: retried to the deadline, then
    exit 1 with a reason that says it was not coderd and what to check."""
    coderd = HostileCoderd(answers=[], always=html_200())
    async with running_agentd(anyio_backend, tmp_path, coderd, AGENTD_SHUTDOWN_TIMEOUT="3") as (child, _api):
        child.proc.send_signal(signal.SIGTERM)
        rc = await child.wait_exit()
        child.assert_clean()
    report_rss("html-200-always", anyio_backend, child)
    assert rc == EXIT_NOT_STORED, child.output()[-3000:]
    assert coderd.stored == [] and len(coderd.requests) >= 2, "retried: the page was not coderd's answer"
    [line] = child.events("snapshot not stored")
    assert line["status"] == 200
    assert "not coderd's answer" in line["reason"] and "CODER_AGENT_URL" in line["reason"], line["reason"]
    assert "text/html" in line["reason"], line["reason"]
    assert not child.events("snapshot stored")
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert not state.get("acked"), "a page from a proxy is never remembered as acknowledged"


async def test_a_checkpoint_against_a_hostile_coderd_keeps_the_daemon_running(anyio_backend: str, tmp_path: Path) -> None:
    """A snapshot asked for mid-run meets the nested body with a Retry-After of an hour: that
    upload fails at once, the daemon keeps running, and SIGTERM stores."""
    coderd = HostileCoderd(answers=[nested_503(retry_after="3600")])
    async with running_agentd(anyio_backend, tmp_path, coderd) as (child, api):
        reply = await control.request(child.socket, {"command": "snapshot", "timeout": 10.0}, WAIT)
        assert reply["ok"] and reply["result"] == "failed", reply
        assert "retry after 3600" in reply["line"] or "3600" in json.dumps(reply), reply
        status = await control.request(child.socket, {"command": "status"}, WAIT)
        assert status["ok"], status
        assert child.proc.poll() is None, "the daemon survived the checkpoint"
        child.proc.send_signal(signal.SIGTERM)
        rc = await child.wait_exit()
        child.assert_clean()
    report_rss("checkpoint-nested-503", anyio_backend, child)
    assert rc == EXIT_STORED, child.output()[-3000:]
    assert same_conversation(coderd.stored_messages(), api)
    assert child.peak_rss_kib is not None and child.peak_rss_kib < PEAK_RSS_LIMIT_KIB


async def test_retry_after_superscript_waits_by_the_backoff_not_by_the_header(anyio_backend: str, tmp_path: Path) -> None:
    """``Retry-After: ²`` is not a number: ignored, so the retry comes within the first backoff
    window (0.25 s), not 2 s later (generous bound for a busy machine: under 2 s)."""
    coderd = HostileCoderd(answers=[superscript_retry_after_503()])
    async with running_agentd(anyio_backend, tmp_path, coderd) as (child, _api):
        child.proc.send_signal(signal.SIGTERM)
        rc = await child.wait_exit()
    assert rc == EXIT_STORED, child.output()[-3000:]
    [busy] = child.events("coderd busy")
    assert busy["retry_after"] is None, busy


def test_the_gzip_bomb_is_one() -> None:
    """The bomb is real: about 1 MiB that inflates to 1 GiB (checked in bounded steps)."""
    bomb = gzip_bomb()
    assert len(bomb) < 2 * 1024 * 1024
    inflate = zlib.decompressobj(zlib.MAX_WBITS | 16)
    total, rest, t0 = 0, bomb, time.monotonic()
    while rest and time.monotonic() - t0 < WAIT:
        total += len(inflate.decompress(rest, 64 << 20))
        rest = inflate.unconsumed_tail
    assert total == 1 << 30 and inflate.eof
