"""Profile the daemon where a benchmark misses its target: ``python -m bench.profile WHAT``.

    python -m bench.profile ingest     # py-spy on the daemon while it takes 1 000 x 64 KiB updates
    python -m bench.profile shutdown   # py-spy on the daemon from SIGTERM to exit (10 x 1 MiB)
    python -m bench.profile startup    # import times (python -X importtime) of `agentd run`
    python -m bench.profile fleet      # pyinstrument on the 1 000 uploaders (R=50/s, 8 s)

py-spy attaches to the running ``agentd run`` process (``ptrace``: run as root, or allow it with
``kernel.yama.ptrace_scope=0``) and writes folded stacks (``--out``, default
``/tmp/agentd-profile-WHAT.folded``, for flamegraph.pl or speedscope); the top functions by own
and by total samples are printed. Needs the ``bench`` extra (``make bench`` installs it).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import process
from bench.common import Standins, agentd_process, cpu_seconds, stop
from bench.content import KiB, screen_text

IDLE_FRAMES = ("select (selectors", "EpollSelector.select", "Condition.wait", "_wait_for_tstate_lock")


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.path.exists(found):
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]' (make bench does)")
    return found


def _attach(pid: int, out: Path, rate: int) -> subprocess.Popen[bytes]:
    spy = subprocess.Popen(
        [_py_spy(), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # py-spy needs a moment to attach
    if spy.poll() is not None:
        err = spy.stderr.read().decode() if spy.stderr else ""
        raise SystemExit(f"py-spy could not attach to pid {pid}: {err.strip()}")
    return spy


def summarize(folded: Path, top: int = 25) -> str:
    """The functions with the most samples, by own (self) and total (inclusive) samples."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    count = 0
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")[1:]  # the first is the thread
        if not frames or any(idle in frames[-1] for idle in IDLE_FRAMES):
            continue
        samples = int(n)
        count += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            total[frame] += samples
    lines = [f"{count} busy samples", "", "own samples:"]
    lines += [f"  {n / count:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "total samples (agentd and its libraries):"]
    interesting = ("agentd", "httpx", "httpcore", "h11", "json", "anyio", "tenacity", "structlog")
    picked = [(frame, n) for frame, n in total.most_common() if any(k in frame for k in interesting)]
    lines += [f"  {n / count:6.1%}  {frame}" for frame, n in picked[:top]]
    return "\n".join(lines)


def profile_ingest(out: Path, rate: int) -> None:
    contents = [screen_text(64 * KiB, 1000 + i) for i in range(1000)]
    base = [("agent" if i % 2 == 0 else "user", f"message {i}") for i in range(9)] + [("agent", contents[0])]
    with Standins() as standins:
        standins.reset_conversation(base)
        with agentd_process(standins) as agentd:
            process._ready(agentd)
            agentd.wait_buffer(10)
            spy = _attach(agentd.pid, out, rate)
            before = cpu_seconds(agentd.pid)

            def push() -> None:
                for content in contents:
                    standins.api.update_last(content)

            standins.call(push)
            time.sleep(3.0)
            print(f"daemon CPU for 1 000 updates (with py-spy attached): {cpu_seconds(agentd.pid) - before:.2f} s")
            stop(agentd)
            spy.wait(timeout=30)


def profile_shutdown(out: Path, rate: int) -> None:
    with Standins() as standins:
        standins.reset_conversation(process.big_conversation())
        with agentd_process(standins) as agentd:
            process._ready(agentd)
            agentd.wait_buffer(10)
            spy = _attach(agentd.pid, out, rate)
            latency, status = stop(agentd)
            print(f"SIGTERM -> exit {latency * 1000:.0f} ms (with py-spy attached), exit status {status}")
            spy.wait(timeout=30)


def profile_startup() -> None:
    with Standins() as standins:
        standins.reset_conversation(process.short_conversation())
        argv = [sys.executable, "-X", "importtime", "-m", "agentd", "run"]
        with agentd_process(standins, argv=argv) as agentd:
            at = process._ready(agentd)
            agentd.proc.send_signal(signal.SIGTERM)
            agentd.proc.wait(timeout=15)
            print(f"start -> READY=1: {(at - agentd.started) * 1000:.0f} ms (with -X importtime)")
            rows = []
            for line in agentd.output().splitlines():
                parts = line.removeprefix("import time:").split("|")
                if line.startswith("import time:") and len(parts) == 3 and parts[1].strip().isdigit():
                    rows.append((int(parts[1]), int(parts[0]), parts[2].strip()))
    print("imports by cumulative time:")
    for cumulative, own, name in sorted(rows, reverse=True)[:30]:
        print(f"  {cumulative / 1000:7.1f} ms  (own {own / 1000:5.1f} ms)  {name}")


def profile_fleet() -> None:
    try:
        from pyinstrument import Profiler
    except ImportError:
        raise SystemExit("pyinstrument is not installed: pip install -e '.[bench]' (make bench does)") from None
    from bench import fleet

    fleet.quiet_logs()
    profiler = Profiler(async_mode="disabled")  # the whole thread: the event loop and its 1 000 tasks
    with profiler:
        run = fleet.simulate(1000, 50, 8.0)
    print(f"stored {run.stored} of 1000, {run.attempts} requests")
    print(profiler.output_text(unicode=True, color=False, show_all=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("ingest", "shutdown", "startup", "fleet"))
    parser.add_argument("--out", type=Path, help="folded stacks file (default /tmp/agentd-profile-WHAT.folded)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    args = parser.parse_args(argv)
    if args.what in ("startup", "fleet"):
        (profile_startup if args.what == "startup" else profile_fleet)()
        return 0
    out = args.out or Path(f"/tmp/agentd-profile-{args.what}.folded")
    (profile_ingest if args.what == "ingest" else profile_shutdown)(out, args.rate)
    print(f"folded stacks: {out}\n")
    print(summarize(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
