"""Probe latency: ``agentd status``, ``agentd status --short`` and ``agentd snapshot`` as
clients of a running daemon, process start to exit (the answer printed), next to
``python -c pass`` measured in the same run, interleaved (issue 13: at most 3 x).

The command is the installed ``agentd`` script when there is one (what a HEALTHCHECK, a
Kubernetes exec probe or Coder's metadata runs), else ``python -m agentd``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import Series, Standins, agentd_process, clean_env, require, stop, wait_exit
from bench.process import _ready, short_conversation

PROBES = {
    "`agentd status`": ["status"],
    "`agentd status --short`": ["status", "--short"],
    "`agentd snapshot` (through the daemon; unchanged, nothing sent)": ["snapshot"],
}
BARE = "`python -c pass`"


def agentd_command() -> list[str]:
    script = Path(sys.executable).with_name("agentd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "agentd"]


def _timed(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from spawning ``argv`` to its exit; it must exit 0."""
    import time

    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    exited = wait_exit(proc, 30)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    require(proc.returncode == 0, f"{' '.join(argv[-2:])} exited {proc.returncode}: {err[-500:]}")
    return exited - started


def probe(standins: Standins, runs: int) -> dict[str, Series]:
    """Each probe ``runs`` times against one idle daemon holding a short conversation."""
    series = {name: Series(name, "s") for name in (*PROBES, BARE)}
    standins.reset_conversation(short_conversation())
    command = agentd_command()
    with agentd_process(standins) as agentd:
        _ready(agentd)
        agentd.wait_buffer(5)
        env = clean_env(AGENTD_SOCKET=str(agentd.workdir / "agentd.sock"))
        _timed([*command, "snapshot"], env)  # the first stores; the measured ones find it unchanged
        for _ in range(runs):
            for name, args in PROBES.items():
                series[name].add(_timed([*command, *args], env))
            series[BARE].add(_timed([sys.executable, "-c", "pass"], env))
        _, status = stop(agentd)
        require(status == 0, f"agentd exited {status}")
        agentd.check_token_not_printed()
    return series


def import_profile(args: list[str], env: dict[str, str]) -> list[tuple[str, int]]:
    """``python -X importtime``: the top-level imports of ``agentd ARGS`` by cumulative time (µs)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "agentd", *args], env=env,
                          capture_output=True, text=True, timeout=60)
    top = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            _, cumulative, name = line.split("|")
            if not name.startswith("  "):  # top level only
                top.append((name.strip(), int(cumulative)))
    return sorted(top, key=lambda item: -item[1])


#: What the daemon imports, grouped as the start-up note names them.
_GROUPS = {
    "pydantic": "pydantic, pydantic-core, pydantic-settings",
    "pydantic_core": "pydantic, pydantic-core, pydantic-settings",
    "pydantic_settings": "pydantic, pydantic-core, pydantic-settings",
    "annotated_types": "pydantic, pydantic-core, pydantic-settings",
    "typing_inspection": "pydantic, pydantic-core, pydantic-settings",
    "typing_extensions": "pydantic, pydantic-core, pydantic-settings",
    "dotenv": "pydantic, pydantic-core, pydantic-settings",
    "httpx": "httpx, httpcore, h11 (and the email/http/urllib modules they pull in)",
    "httpcore": "httpx, httpcore, h11 (and the email/http/urllib modules they pull in)",
    "h11": "httpx, httpcore, h11 (and the email/http/urllib modules they pull in)",
    "email": "httpx, httpcore, h11 (and the email/http/urllib modules they pull in)",
    "http": "httpx, httpcore, h11 (and the email/http/urllib modules they pull in)",
    "urllib": "httpx, httpcore, h11 (and the email/http/urllib modules they pull in)",
    "asyncio": "asyncio, anyio, ssl",
    "anyio": "asyncio, anyio, ssl",
    "ssl": "asyncio, anyio, ssl",
    "_ssl": "asyncio, anyio, ssl",
    "structlog": "structlog, logging",
    "logging": "structlog, logging",
    "tenacity": "tenacity, httpx-sse",
    "httpx_sse": "tenacity, httpx-sse",
    "agentd": "agentd's own modules (the settings model's build included)",
}


def import_shares(runs: int = 5) -> tuple[float, list[tuple[str, float]]]:
    """The daemon's imports (``agentd run``'s, trio kept out as on asyncio) under
    ``python -X importtime``: (median total seconds, [(group, share of the total)]), the
    groups' self times summed, medians over ``runs`` fresh interpreters."""
    code = "import sys; sys.modules['trio'] = None\nimport agentd.cli, agentd.settings, agentd.daemon"
    totals: list[float] = []
    shares: dict[str, list[float]] = {}
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=clean_env(),
                              capture_output=True, text=True, timeout=60, check=True)
        by_group: dict[str, float] = {}
        lines = done.stderr.splitlines()
        # The interpreter's own start-up (``site`` and what it imports, listed before it) is
        # what `python -c pass` measures: only what comes after it is the daemon's.
        after_site = next((i + 1 for i, line in enumerate(lines) if line.endswith("| site")), 0)
        for line in lines[after_site:]:
            if not line.startswith("import time:") or line.count("|") != 2:
                continue
            self_us, _, name = line.removeprefix("import time:").split("|")
            if not self_us.strip().isdigit():
                continue
            group = _GROUPS.get(name.strip().split(".")[0], "the standard library and the rest")
            by_group[group] = by_group.get(group, 0.0) + int(self_us) / 1e6
        total = sum(by_group.values())
        totals.append(total)
        for group, seconds in by_group.items():
            shares.setdefault(group, []).append(seconds / total)
    import statistics

    ranked = sorted(((g, statistics.median(v)) for g, v in shares.items()), key=lambda item: -item[1])
    return statistics.median(totals), ranked
