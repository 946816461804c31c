"""Benchmarks of a real ``agentd run`` process against the stand-ins on loopback.

* shutdown latency: SIGTERM to exit with the snapshot stored, next to one ``curl`` POST of the
  same final body to the same stand-in coderd (process start to exit), in the same run;
* ingest: the daemon's CPU time (``/proc/<pid>/stat`` utime+stime) per 1 000 ``message_update``
  events of 64 KiB, beside the floor (:mod:`bench.floor`: a plain-Python socket reader of the
  same stream) measured in turn in the same run;
* footprint: RSS and CPU share after an idle period with a full buffer (10 x 64 KiB);
* start-up: process start to ``READY=1`` on a stand-in ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from agentd.testing import conversations
from bench.common import (
    TOKEN,
    Agentd,
    BenchError,
    Series,
    Standins,
    agentd_process,
    cpu_seconds,
    require,
    rss_bytes,
    stop,
    wait_exit,
)
from bench.content import KiB, MiB, screen_text


def _ready(agentd: Agentd, timeout: float = 10.0) -> float:
    _, at = agentd.notify.wait_for(lambda m: "READY=1" in m.split("\n"), timeout)
    return at


def control(agentd: Agentd, request: dict, timeout: float = 5.0) -> dict:
    """One request on agentd's control socket (one JSON line each way)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(agentd.workdir / "agentd.sock"))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


# -- shutdown latency ----------------------------------------------------------------------------


def short_conversation() -> list[tuple[str, str]]:
    return conversations.generic_conversation(5)


def big_conversation() -> list[tuple[str, str]]:
    return [("agent" if i % 2 == 0 else "user", screen_text(MiB, i)) for i in range(10)]


def _curl(argv: list[str], expect: str) -> float:
    """Run ``curl``; seconds from process start to exit. Its ``-w`` output must be ``expect``."""
    started = time.perf_counter()
    proc = subprocess.Popen(["curl", "-sS", "--max-time", "10", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    exited = wait_exit(proc, 15)
    out = proc.stdout.read().decode() if proc.stdout else ""
    require(proc.returncode == 0 and out == expect, f"curl {argv[-1]}: {out!r} (exit {proc.returncode})")
    return exited - started


def curl_post(standins: Standins, task: str, body: bytes, workdir: Path) -> float:
    """One ``curl`` POST of ``body`` to the stand-in coderd (204), as a stop script sends it."""
    body_file = workdir / "body.json"
    body_file.write_bytes(body)
    headers = workdir / "headers"  # not on the command line: the token stays out of `ps`
    headers.write_text(f"Coder-Session-Token: {TOKEN}\nContent-Type: application/json\n")
    url = standins.coderd.snapshot_url(task)
    return _curl(["-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H", f"@{headers}",
                  "--data-binary", f"@{body_file}", url], "204")


def curl_get_messages(standins: Standins) -> float:
    """One ``curl`` GET of agentapi's ``/messages`` (what a stop script fetches before posting)."""
    return _curl(["-o", "/dev/null", "-w", "%{http_code}", f"{standins.api.url}/messages"], "200")


@dataclass
class Shutdown:
    """One shutdown case, measured in pairs: agentd, then curl against the same stand-ins."""

    agentd: Series
    curl_post: Series
    curl_get: Series
    body_bytes: int
    to_stored: Series  # SIGTERM -> agentd's "snapshot stored" log line (coderd answered 204)

    @property
    def ratio(self) -> float:
        """agentd's median (SIGTERM -> exit) over curl POST's median (same run)."""
        return self.agentd.median / self.curl_post.median

    @property
    def stored_ratio(self) -> float:
        """SIGTERM -> coderd's 204, median, over curl POST's median (same run): issue 13's target."""
        return self.to_stored.median / self.curl_post.median


def shutdown(standins: Standins, conversation: list[tuple[str, str]], runs: int) -> Shutdown:
    """SIGTERM -> exit of ``agentd run`` holding ``conversation``, stored; ``runs`` times,
    each followed by one curl POST of the body it stored and one curl GET of /messages."""
    result = Shutdown(Series("agentd SIGTERM -> exit, stored", "s"), Series("curl POST of the same body", "s"),
                      Series("curl GET /messages", "s"), 0, Series("SIGTERM -> stored", "s"))
    held = min(10, len(conversation))
    with tempfile.TemporaryDirectory(prefix="agentd-bench-curl-", dir="/tmp") as tmp:
        for _ in range(runs):
            standins.reset_conversation(conversation)
            with agentd_process(standins) as agentd:
                _ready(agentd)
                agentd.wait_buffer(held)
                latency, status = stop(agentd)
                require(status == 0, f"agentd exited {status}: {agentd.output()[-2000:]}")
                agentd.check_token_not_printed()
                stored = standins.stored(agentd.task)
                require(stored is not None, "agentd exited 0 but coderd holds no snapshot")
                require(stored.messages[-1]["id"] == len(conversation) - 1, "stored snapshot lacks the newest message")
                result.agentd.add(latency)
                stored_at = agentd.log_time("snapshot stored")
                require(stored_at is not None, "no 'snapshot stored' log line")
                result.to_stored.add(stored_at - agentd.signalled)
                result.body_bytes = len(stored.body)
                result.curl_post.add(curl_post(standins, agentd.task, stored.body, Path(tmp)))
                result.curl_get.add(curl_get_messages(standins))
    return result


# -- ingest --------------------------------------------------------------------------------------


def _push(standins: Standins, contents: list[str]) -> None:
    def push() -> None:
        for content in contents:
            standins.api.update_last(content)
        standins.api.add_message("user", "marker: the updates are over")

    standins.call(push)


@dataclass
class Ingest:
    """CPU seconds per ``events`` updates: agentd, and the floor reader (:mod:`bench.floor`)
    on the same stream from the same stand-in, measured in turn in the same run."""

    agentd: Series
    floor: Series
    wall: Series

    @property
    def ratio(self) -> float:
        """The median of the per-run ratios (each agentd run beside the floor run right after
        it, so both see the same load on a shared machine)."""
        return statistics.median(a / f for a, f in zip(self.agentd.values, self.floor.values, strict=True))


def _floor_cpu(standins: Standins, base: list[tuple[str, str]], contents: list[str]) -> float:
    """CPU seconds of ``python -m bench.floor`` reading the pushed updates (ready -> done)."""
    standins.reset_conversation(base)
    proc = subprocess.Popen([sys.executable, "-m", "bench.floor", standins.api.url, str(len(base))],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        require(proc.stdout.readline().strip() == "ready", "the floor reader did not take the replay")
        before = cpu_seconds(proc.pid)
        _push(standins, contents)
        line = proc.stdout.readline().strip()
        after = cpu_seconds(proc.pid)
        require(line.startswith("done "), f"the floor reader ended with {line!r}")
        require(int(line.split()[1]) >= len(contents), f"the floor reader decoded {line.split()[1]} events")
        return after - before
    finally:
        proc.kill()
        proc.wait(timeout=10)


def ingest(standins: Standins, runs: int, events: int = 1000, size: int = 64 * KiB) -> Ingest:
    """Per run: agentd's CPU seconds for ``events`` updates of ``size`` bytes (and the wall
    time), then the floor reader's for the same updates."""
    result = Ingest(Series(f"ingest CPU per {events} x 64 KiB updates", "s"), Series("floor CPU", "s"),
                    Series("ingest wall time", "s"))
    contents = [screen_text(size, 1000 + i) for i in range(events)]
    base = [("agent" if i % 2 == 0 else "user", f"message {i}") for i in range(9)] + [("agent", contents[0])]
    for _ in range(runs):
        standins.reset_conversation(base)
        with agentd_process(standins) as agentd:
            _ready(agentd)
            agentd.wait_buffer(10)
            time.sleep(1.2)  # let the first state write after the replay pass
            before = cpu_seconds(agentd.pid)
            started = time.perf_counter()
            _push(standins, contents)
            marker = len(base)
            # Done when the daemon holds the marker message and its CPU time stands still.
            last, still_since, done_at = cpu_seconds(agentd.pid), time.perf_counter(), None
            deadline = time.perf_counter() + 60
            while time.perf_counter() < deadline:
                time.sleep(0.05)
                now = cpu_seconds(agentd.pid)
                if now != last:
                    last, still_since = now, time.perf_counter()
                    continue
                if time.perf_counter() - still_since >= 0.5:
                    status = control(agentd, {"command": "status"})["status"]
                    if status["newest_id"] == marker:
                        done_at = still_since
                        break
                    still_since = time.perf_counter()
            if done_at is None:
                raise BenchError("agentd did not take in the updates within 60 s")
            result.agentd.add(last - before)
            result.wall.add(done_at - started)
            _, status = stop(agentd)
            require(status == 0, f"agentd exited {status}")
            agentd.check_token_not_printed()
            stored = standins.stored(agentd.task)
            require(stored is not None and stored.messages[-1]["id"] == marker, "final snapshot lacks the marker")
            require(stored.messages[-2]["content"].endswith(contents[-1][-1000:]), "newest content did not win")
        result.floor.add(_floor_cpu(standins, base, contents))
    return result


# -- footprint -----------------------------------------------------------------------------------


@dataclass
class Footprint:
    rss: Series  # VmRSS after the idle period, bytes
    private: Series  # RssAnon (the process's own memory, without shared libraries), bytes
    cpu: Series  # CPU time over the idle period / its length, % of one core
    idle: float  # seconds


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no {key} for pid {pid}")


def footprint(standins: Standins, processes: int, idle: float) -> Footprint:
    """``processes`` daemons, each holding a full buffer (10 x 64 KiB), left idle together."""
    result = Footprint(Series("RSS", "B"), Series("private (RssAnon)", "B"), Series("CPU", "%"), idle)
    conversation = [("agent" if i % 2 == 0 else "user", screen_text(64 * KiB, 500 + i)) for i in range(10)]
    standins.reset_conversation(conversation)
    with ExitStack() as stack:
        daemons = [stack.enter_context(agentd_process(standins)) for _ in range(processes)]
        for agentd in daemons:
            _ready(agentd)
            agentd.wait_buffer(10)
        time.sleep(2.0)  # the state write after the replay
        before = [cpu_seconds(a.pid) for a in daemons]
        started = time.perf_counter()
        time.sleep(idle)
        elapsed = time.perf_counter() - started
        for agentd, cpu0 in zip(daemons, before, strict=True):
            result.cpu.add((cpu_seconds(agentd.pid) - cpu0) / elapsed * 100)
            result.rss.add(rss_bytes(agentd.pid))
            result.private.add(_status_kib(agentd.pid, "RssAnon"))
        for agentd in daemons:
            _, status = stop(agentd)
            require(status == 0, f"agentd exited {status}")
            agentd.check_token_not_printed()
    return result


# -- start-up ------------------------------------------------------------------------------------


def startup(standins: Standins, runs: int) -> tuple[Series, Series]:
    """(agentd process start -> READY=1, python -c pass start -> exit)."""
    ready = Series("start -> READY=1", "s")
    bare = Series("python -c pass", "s")
    standins.reset_conversation(short_conversation())
    for _ in range(runs):
        with agentd_process(standins) as agentd:
            at = _ready(agentd)
            ready.add(at - agentd.started)
            _, status = stop(agentd)
            require(status == 0, f"agentd exited {status}")
            agentd.check_token_not_printed()
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        bare.add(wait_exit(proc, 10) - started)
    return ready, bare


# -- where the memory goes -----------------------------------------------------------------------

_IMPORT_STEPS = [
    ("the interpreter", ""),
    ("asyncio and OpenSSL", "import asyncio, ssl"),
    ("anyio", "import anyio"),
    ("httpx, httpcore, h11", "import httpx, httpcore, h11"),
    ("pydantic, pydantic-settings", "import pydantic, pydantic_settings"),
    ("structlog, tenacity, httpx-sse", "import structlog, tenacity, httpx_sse"),
    ("agentd's own modules", "import agentd.cli, agentd.daemon"),
    ("the HTTP clients (coderd's loads the CA bundle)", "c1 = httpx.AsyncClient(verify=False); c2 = httpx.AsyncClient(trust_env=True)"),
]


def import_footprint() -> list[tuple[str, float]]:
    """RSS each group of the daemon's imports adds, bytes, in a fresh interpreter (trio kept
    out, as agentd does on asyncio)."""
    code = "\n".join([
        "import sys, json",
        "sys.modules['trio'] = None",
        "def rss():",
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmRSS:'))",
        "out = []",
        *[f"{stmt}\nout.append(rss())" if stmt else "out.append(rss())" for _, stmt in _IMPORT_STEPS],
        "print(json.dumps(out))",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    sizes = json.loads(done.stdout)
    return [(name, size - (sizes[i - 1] if i else 0)) for i, ((name, _), size) in enumerate(zip(_IMPORT_STEPS, sizes, strict=False))]
