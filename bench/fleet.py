"""Fleet simulation: N workspaces stop at once against one rate-limited coderd.

An auto-stop schedule stops thousands of workspaces in the same second. Each runs its own
agentd, whose final upload races the platform's kill: Docker's 10 s (``shutdown_timeout`` 8 s
leaves room for start-up and exit) or Kubernetes' 30 s (``shutdown_timeout`` 28 s).

Here N real :class:`agentd.coderd.CoderdUploader` instances (the real retry policy, each with
its own ``httpx.AsyncClient`` and connection, as each workspace has its own) start uploading a
real snapshot body at the same instant, on one event loop, to one stand-in coderd (a separate
``python -m agentd.testing.fake_coderd`` process, so it has a core to itself) that admits at
most R requests in any sliding second and answers the rest 503 with ``Retry-After``.

What counts is the share stored before the deadline, against the arithmetic's ceiling: coderd
stores at most R a second, so at best ``min(1, R * T / N)`` within T seconds.
"""

from __future__ import annotations

import os
import random
import re
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from agentd import logs
from agentd.buffer import RingBuffer
from agentd.coderd import CoderdUploader
from agentd.messages import Message
from agentd.snapshot import Snapshot, build_snapshot
from agentd.testing import conversations
from bench.common import TOKEN, BenchError, cpu_seconds

#: Docker's and Kubernetes' grace periods, with the shutdown_timeout agentd is given in each.
PLATFORMS = (("Docker", 10.0, 8.0), ("Kubernetes", 30.0, 28.0))


@dataclass
class FleetRun:
    """One simulation: ``n`` uploaders, coderd at ``rps``, deadline ``timeout`` seconds."""

    n: int
    rps: float
    timeout: float
    stored_at: list[float] = field(default_factory=list)  # seconds from the start, per stored upload
    attempts: int = 0
    failed_reasons: dict[str, int] = field(default_factory=dict)
    max_loop_lag: float = 0.0
    elapsed: float = 0.0
    client_cpu: float = 0.0  # seconds of CPU the uploaders' process used during the run
    coderd_cpu: float = 0.0  # seconds of CPU the stand-in coderd used during the run
    body_bytes: list[int] = field(default_factory=list)
    #: (sent, answered, status or None, attempt number), times in seconds from the start
    requests: list[tuple[float, float, int | None, int]] = field(default_factory=list)
    #: True when the stand-in coderd ran on a core of its own (:func:`pin_apart`)
    pinned: bool = False

    @property
    def stored(self) -> int:
        return len(self.stored_at)

    def share(self, within: float | None = None) -> float:
        within = self.timeout if within is None else within
        return sum(1 for t in self.stored_at if t <= within) / self.n

    def best(self, within: float | None = None) -> float:
        within = self.timeout if within is None else within
        return min(1.0, self.rps * within / self.n)

    def peak_retries(self, window: float = 0.1) -> int:
        """Most retries (attempts after the first) sent within any ``window`` seconds: how much
        of a herd the fleet comes back as."""
        sent = sorted(r[0] for r in self.requests if r[3] > 1)
        best = j = 0
        for i, t in enumerate(sent):
            while sent[j] < t - window:
                j += 1
            best = max(best, i - j + 1)
        return best

    @property
    def first_answers(self) -> float:
        """Seconds until every first attempt had its answer (how long coderd took for the burst)."""
        return max((r[1] for r in self.requests if r[3] == 1), default=0.0)

    def quantile(self, q: float) -> float | None:
        """Seconds by which a share ``q`` of all N was stored (None if never)."""
        k = int(q * self.n + 0.999999) - 1
        times = sorted(self.stored_at)
        return times[k] if k < len(times) else None


def snapshot_bodies(n: int) -> list[Snapshot]:
    """``n`` real snapshot bodies: the demo session at different points of the agent's long
    answer (box drawing, emoji), from a few KiB to the full 64 KiB, as the ring buffer holds it."""
    session = conversations.demo_session()
    steps = list(conversations.typing_steps(min_bytes=120_000, lines_per_step=40))
    out = []
    for i in range(n):
        buffer = RingBuffer(10, max_chars=65_536)
        turns = session[: 4 + i % (len(session) - 3)]
        for mid, (role, content) in enumerate(turns):
            buffer.apply(Message(id=mid, role=role, content=content, time="2026-01-01T00:00:00Z"))
        if i % 2:  # half of them were stopped while the agent was typing its long answer
            reply = steps[i % len(steps)]
            buffer.apply(Message(id=len(turns), role="agent", content=reply, time="2026-01-01T00:01:00Z"))
        snapshot = build_snapshot(buffer.messages())
        assert snapshot is not None
        out.append(snapshot)
    return out


class CoderdProcess:
    """``python -m agentd.testing.fake_coderd`` with ``max_rps`` and ``tasks``, on a free port."""

    def __init__(self, tasks: list[str], rps: float | None, workdir: Path) -> None:
        token_file = workdir / "token"
        token_file.write_text(TOKEN)
        argv = [sys.executable, "-m", "agentd.testing.fake_coderd", "--port", "0", "--token-file", str(token_file)]
        if rps is not None:
            argv += ["--max-rps", str(rps)]
        for task in tasks:
            argv += ["--task", task]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            self.close()
            raise BenchError(f"fake coderd did not start: {line!r}")
        self.url = match.group(1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


UploaderFactory = Callable[[httpx.AsyncClient, str, uuid.UUID], CoderdUploader]


def default_uploader(client: httpx.AsyncClient, url: str, task: uuid.UUID) -> CoderdUploader:
    """As agentd's daemon builds it (agentd.daemon.Daemon): the default retry policy."""
    return CoderdUploader(client, url, TOKEN, task)


class UntunedUploader(CoderdUploader):
    """The policy before the fleet tuning, for comparison in the same run: ``Retry-After``
    honoured exactly, backoff ``uniform(0, min(2, 0.25 * 2**n))``, and no last attempt when
    a wait would end too close to the deadline."""

    def retry_wait(self, failures: int, retry_after: float | None, left: float) -> float | None:
        wait = retry_after if retry_after is not None else random.uniform(0, min(2.0, 0.25 * 2**failures))
        return None if wait + self.min_attempt > left else wait


def untuned_uploader(client: httpx.AsyncClient, url: str, task: uuid.UUID) -> CoderdUploader:
    return UntunedUploader(client, url, TOKEN, task)


POLICIES: dict[str, UploaderFactory] = {"tuned": default_uploader, "untuned": untuned_uploader}


def _trace(uploader: CoderdUploader, run: FleetRun, start: Callable[[], float]) -> None:
    """Record every request of ``uploader`` in ``run.requests`` (times from the start)."""
    attempt = uploader._attempt
    count = 0

    async def traced(*args: Any) -> int:
        nonlocal count
        count += 1
        sent, number, status = anyio.current_time() - start(), count, None
        try:
            status = await attempt(*args)
            return status
        except Exception as exc:
            status = getattr(exc, "status", None)
            raise
        finally:
            run.requests.append((sent, anyio.current_time() - start(), status, number))

    uploader._attempt = traced  # type: ignore[method-assign]


async def _simulate(
    coderd_pid: int, url: str, tasks: list[uuid.UUID], bodies: list[Snapshot], timeout: float, run: FleetRun, factory: UploaderFactory
) -> None:
    # One TLS context for all: httpx would load the CA bundle once per client (1 000 x 1 MiB).
    tls = ssl.create_default_context()
    clients = [httpx.AsyncClient(verify=tls, trust_env=False, timeout=5.0) for _ in tasks]
    uploaders = [factory(client, url, task) for client, task in zip(clients, tasks, strict=True)]
    for uploader in uploaders:
        _trace(uploader, run, lambda: start)
    go = anyio.Event()
    done = anyio.Event()
    remaining = len(uploaders)
    start = 0.0

    async def one(uploader: CoderdUploader, body: Snapshot) -> None:
        nonlocal remaining
        await go.wait()
        outcome = await uploader.upload(body, start + timeout)
        run.attempts += outcome.attempts
        if outcome.stored:
            run.stored_at.append(anyio.current_time() - start)
        else:
            key = re.sub(r"[\d.]+ s", "N s", outcome.reason.split(":")[0] + ("; " + outcome.reason.rsplit("; ", 1)[-1] if "; " in outcome.reason else ""))
            run.failed_reasons[key] = run.failed_reasons.get(key, 0) + 1
        remaining -= 1
        if not remaining:
            done.set()

    async def watch_lag() -> None:
        while not done.is_set():
            before = anyio.current_time()
            await anyio.sleep(0.05)
            run.max_loop_lag = max(run.max_loop_lag, anyio.current_time() - before - 0.05)

    try:
        async with anyio.create_task_group() as tg:
            for uploader, body in zip(uploaders, bodies, strict=True):
                tg.start_soon(one, uploader, body)
            await anyio.sleep(0.2)  # every task waiting on `go`
            tg.start_soon(watch_lag)
            start = anyio.current_time()
            cpu0, coderd0 = time.process_time(), cpu_seconds(coderd_pid)
            go.set()
            with anyio.fail_after(timeout + 15):
                await done.wait()
            run.elapsed = anyio.current_time() - start
            run.client_cpu = time.process_time() - cpu0
            run.coderd_cpu = cpu_seconds(coderd_pid) - coderd0
    finally:
        with anyio.CancelScope(shield=True):
            for client in clients:
                await client.aclose()


def simulate(n: int, rps: float | None, timeout: float, factory: UploaderFactory = default_uploader) -> FleetRun:
    """Run one simulation in this process (its own event loop); the fake coderd is a child process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * n + 1000), hard))
    tasks = [uuid.uuid4() for _ in range(n)]
    bodies = snapshot_bodies(n)
    run = FleetRun(n=n, rps=rps or float("inf"), timeout=timeout, body_bytes=[b.size for b in bodies])
    with tempfile.TemporaryDirectory(prefix="agentd-fleet-", dir="/tmp") as tmp:
        coderd = CoderdProcess([str(t) for t in tasks], rps, Path(tmp))
        pinned = pin_apart(coderd.proc.pid)
        try:
            anyio.run(_simulate, coderd.proc.pid, coderd.url, tasks, bodies, timeout, run, factory, backend="asyncio")
        finally:
            coderd.close()
            if pinned is not None:
                os.sched_setaffinity(0, pinned)
    run.pinned = pinned is not None
    return run


def pin_apart(coderd_pid: int) -> set[int] | None:
    """Give the stand-in coderd a core of its own and the uploaders the others, where the machine
    has two or more; returns this process's former CPU set (to restore), or None if not pinned.

    On a shared 2-core machine an unpinned stand-in competes with the 1 000 uploaders for both
    cores, and its slowness shows up as agentd's: pinned, what is measured is the policy.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    former = set(cpus)
    try:
        os.sched_setaffinity(coderd_pid, {cpus[-1]})
        os.sched_setaffinity(0, set(cpus[:-1]))
    except OSError:
        return None
    return former


def timeline(run: FleetRun, step: float = 1.0) -> str:
    """Requests sent and answered 204 / 503 / nothing, per ``step`` seconds."""
    rows = ["   t   sent  204  503  other"]
    t = 0.0
    while t < run.elapsed + step:
        sent = [r for r in run.requests if t <= r[0] < t + step]
        ok = sum(1 for r in run.requests if t <= r[1] < t + step and r[2] == 204)
        busy = sum(1 for r in run.requests if t <= r[1] < t + step and r[2] == 503)
        other = sum(1 for r in run.requests if t <= r[1] < t + step and r[2] not in (204, 503))
        rows.append(f"{t:4.0f} {len(sent):6d} {ok:4d} {busy:4d} {other:6d}")
        t += step
    return "\n".join(rows)


def quiet_logs() -> None:
    """The uploaders log every 503 at info level: keep only errors, and send them nowhere."""
    logs.configure("json", "error", open(os.devnull, "w"))


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - ad hoc runs
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rps", type=float, default=50)
    parser.add_argument("--timeout", type=float, default=8)
    parser.add_argument("--policy", choices=sorted(POLICIES), default="tuned")
    args = parser.parse_args(argv)
    quiet_logs()
    started = time.perf_counter()
    run = simulate(args.n, args.rps, args.timeout, POLICIES[args.policy])
    print(timeline(run))
    print(
        f"{args.policy}: N={run.n} R={args.rps:g} T={run.timeout:g}: stored {run.stored} ({run.share():.1%}, best {run.best():.1%}), "
        f"attempts {run.attempts} ({run.attempts / max(run.stored, 1):.1f} per stored), "
        f"p50 {run.quantile(0.5)}, max lag {run.max_loop_lag * 1000:.0f} ms, "
        f"CPU: uploaders {run.client_cpu:.1f} s, coderd {run.coderd_cpu:.1f} s, "
        f"elapsed {run.elapsed:.1f} s, wall {time.perf_counter() - started:.1f} s; failed: {run.failed_reasons}"
    )


if __name__ == "__main__":  # pragma: no cover
    main()
