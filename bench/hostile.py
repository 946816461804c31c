"""Peak RSS of a real ``agentd run`` process under each hostile peer (issues 9 and 13).

Each case runs ``python -m agentd run`` against one hostile raw-socket server from
:mod:`agentd.testing.hostile` (the same servers the tests use) and the friendly stand-in for
the other peer, reads the child's ``VmHWM`` from ``/proc/<pid>/status`` every 10 ms from its
start until it exits after SIGTERM, and records the peak, the exit status and whether coderd
holds a snapshot. The reference beside them, measured in the same run: the same peak for a
daemon holding a full buffer (10 x 64 KiB) from the friendly stand-ins, stopped the same way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from agentd.testing import hostile
from bench.common import Agentd, BenchError, Series, Standins, agentd_process, require, stop
from bench.content import KiB, screen_text
from bench.process import control, short_conversation

#: The peak RSS each case must stay under, bytes: the limits tests/test_agentapi_source.py
#: (agentapi, 128 MiB: the SSE line/event cap is 32 MiB) and tests/test_hostile_coderd.py
#: (coderd, 80 MiB) assert.
LIMIT = {"agentapi": 128 * 2**20, "coderd": 80 * 2**20}
#: Seconds a case may take to reach its end (a busy 2-core machine; the long conversation is ~300 MB).
CASE_TIMEOUT = 300.0


@dataclass
class Case:
    """One hostile peer: ``peer`` (which one is hostile), what it does, what ends the case."""

    name: str
    peer: str  # "agentapi" or "coderd"
    attack: str
    stored_expected: bool


CASES = [
    Case("endless-line", "agentapi", "an SSE line that never ends (`/events`, as fast as agentd reads)", True),
    Case("data-without-blank-line", "agentapi", "`data:` lines with no blank line, forever", True),
    Case("gzip-bomb", "agentapi", "no stream; `/messages` gzip'd (256 MiB of `0` in 256 KiB)", False),
    Case("long-conversation", "agentapi",
         f"no stream; `/messages` of {hostile.LONG_CONVERSATION:,} messages of 64 KiB (~300 MB)", True),
    Case("nested-503", "coderd", "503 with JSON nested 100 000 deep, twice, then 204", True),
    Case("retry-after-superscript-two", "coderd", "503 with `Retry-After: ²`, twice, then 204", True),
    Case("gzip-bomb-503", "coderd", "503 gzip bomb (1 MiB → 1 GiB), twice, then 204", True),
    Case("html-200", "coderd", "200 `text/html` (a proxy's page), twice, then 204", True),
]

_CODERD_ANSWERS: dict[str, Callable[[], bytes]] = {
    "nested-503": hostile.nested_503,
    "retry-after-superscript-two": hostile.superscript_retry_after_503,
    "gzip-bomb-503": hostile.gzip_bomb_503,
    "html-200": hostile.html_200,
}


@dataclass
class Result:
    case: Case
    peak: Series = field(default_factory=lambda: Series("peak RSS (VmHWM)", "B"))
    exits: list[int] = field(default_factory=list)
    stored: list[bool] = field(default_factory=list)


# -- the peak ------------------------------------------------------------------------------------


def _hwm(pid: int) -> int | None:
    """``VmHWM`` of ``pid``, bytes; None once it has exited (a zombie has none)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakWatch:
    """Reads ``VmHWM`` of ``pid`` every ``interval`` seconds in a thread until the process is gone
    or :meth:`close`; ``peak`` is the highest seen, bytes. (``wait4``'s ``ru_maxrss`` would not
    do: Linux carries the parent's high-water mark across fork and exec.)"""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"peak-{pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            value = _hwm(self.pid)
            if value is None:
                return
            self.peak = max(self.peak, value)
            self._done.wait(self.interval)

    def close(self) -> int:
        self._done.set()
        self._thread.join(5)
        return self.peak


# -- the cases -----------------------------------------------------------------------------------


def _until(what: str, check: Callable[[], bool], agentd: Agentd, timeout: float = CASE_TIMEOUT) -> None:
    deadline = time.perf_counter() + timeout
    while not check():
        if agentd.proc.poll() is not None:
            raise BenchError(f"agentd exited {agentd.proc.returncode} before {what}: {agentd.output()[-2000:]}")
        if time.perf_counter() > deadline:
            raise BenchError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.2)


def _newest_id(agentd: Agentd) -> int | None:
    try:
        return control(agentd, {"command": "status"}).get("status", {}).get("newest_id")
    except (OSError, ValueError):
        return None


def _agentapi_end(case: Case, server: hostile.RawServer, standins: Standins, agentd: Agentd) -> None:
    """Wait for the case's end: two capped streams and a reconnect, three refused polls, or the
    newest message of the long conversation in the buffer."""
    def hits(path: str) -> int:
        return int(standins.call(lambda: server.hits.get(path, 0)))

    if case.name in ("endless-line", "data-without-blank-line"):
        _until("two capped streams and a reconnect", lambda: hits("/events") >= 3, agentd)
    elif case.name == "gzip-bomb":
        _until("three refused polls", lambda: hits("/messages") >= 3, agentd)
    else:
        _until("the newest message in the buffer", lambda: _newest_id(agentd) == hostile.LONG_CONVERSATION - 1, agentd)


def _serve(standins: Standins, server: Any) -> AbstractContextManager[Any]:
    return standins.portal.wrap_async_context_manager(server.serve())


def _measure(standins: Standins, result: Result, end: Callable[[Agentd], None], stored: Callable[[Agentd], bool],
             **urls: str) -> None:
    """One run: start agentd (VmHWM watched from its start), ``end``, SIGTERM, wait for the exit."""
    env = {"AGENTD_SHUTDOWN_TIMEOUT": "5", "AGENTD_CHECKPOINT_INTERVAL": "0", "AGENTD_STARTUP_PROBE": "false"}
    with agentd_process(standins, extra_env=env, **urls) as agentd:
        watch = PeakWatch(agentd.pid)
        try:
            end(agentd)
            _, status = stop(agentd, timeout=60)
        finally:
            peak = watch.close()
        agentd.check_token_not_printed()
        require("Traceback" not in agentd.output(), f"agentd printed a traceback: {agentd.output()[-2000:]}")
        result.peak.add(peak)
        result.exits.append(status)
        result.stored.append(stored(agentd))


def _agentapi_run(standins: Standins, case: Case, result: Result) -> None:
    events = case.name in ("endless-line", "data-without-blank-line")
    server = hostile.RawServer(hostile.hostile_events(case.name) if events else hostile.hostile_messages(case.name))
    with _serve(standins, server):
        _measure(standins, result, lambda a: _agentapi_end(case, server, standins, a),
                 lambda a: standins.stored(a.task) is not None, agentapi_url=server.url)


def _coderd_run(standins: Standins, case: Case, result: Result) -> None:
    make = _CODERD_ANSWERS[case.name]
    coderd = hostile.HostileCoderd(answers=[make(), make()])
    standins.reset_conversation(short_conversation())
    with _serve(standins, coderd):
        _measure(standins, result, lambda a: a.wait_buffer(5, timeout=60),
                 lambda a: bool(standins.call(lambda: list(coderd.stored))), coderd_url=coderd.url)
    answered = int(standins.call(lambda: len(coderd.requests)))
    require(answered > len(coderd.answers), f"{case.name}: {answered} requests, the hostile answers not all met")


def run_case(standins: Standins, case: Case, runs: int) -> Result:
    """``runs`` runs of ``case``, each a fresh agentd and a fresh hostile server."""
    result = Result(case)
    for _ in range(runs):
        (_agentapi_run if case.peer == "agentapi" else _coderd_run)(standins, case, result)
    return result


def idle_reference(standins: Standins, runs: int, idle: float) -> Series:
    """The same peak for a daemon holding a full buffer (10 x 64 KiB) from the friendly stand-ins,
    left ``idle`` seconds, then stopped with SIGTERM (stored)."""
    result = Result(Case("idle", "none", "friendly stand-ins, full buffer (10 × 64 KiB)", True))
    conversation = [("agent" if i % 2 == 0 else "user", screen_text(64 * KiB, 500 + i)) for i in range(10)]
    for _ in range(runs):
        standins.reset_conversation(conversation)

        def end(agentd: Agentd) -> None:
            agentd.wait_buffer(10, timeout=60)
            time.sleep(idle)

        _measure(standins, result, end, lambda a: standins.stored(a.task) is not None)
        require(result.exits[-1] == 0 and result.stored[-1], f"the idle reference exited {result.exits[-1]}, not stored")
    return result.peak
