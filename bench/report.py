"""Runs the benchmarks and turns their figures into the README's Markdown tables."""

from __future__ import annotations

import os
import statistics
import sys

from bench import fleet, hostile, probe, process, trim
from bench.common import Series, Standins

#: Repeats per figure: (full run, quick run).
RUNS = {
    "shutdown_short": (15, 4),
    "shutdown_big": (9, 2),
    "trim": (200, 20),
    "ingest": (7, 2),
    "startup": (15, 4),
    "probe": (15, 4),
    "hostile": (3, 1),
}
IDLE = (30.0, 5.0)  # footprint: seconds idle
IDLE_PROCESSES = 3  # footprint: daemons idle side by side (each one a sample)


def _runs(name: str, quick: bool) -> int:
    return RUNS[name][1 if quick else 0]


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def spread(series: Series, fmt) -> str:
    return f"{fmt(series.low)} – {fmt(series.high)} (n={series.n})"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def daemon_section(wanted: tuple[str, ...], quick: bool) -> str:
    rows: list[str] = []
    results: dict[str, object] = {}

    def row(what: str, median: str, spread_: str = "", target: str = "", result: str = "") -> None:
        rows.append(f"| {what} | {median} | {spread_} | {target} | {result} |")

    with Standins() as standins:
        if "shutdown" in wanted:
            for name, label, conversation in (
                ("shutdown_short", "5 short messages", process.short_conversation()),
                ("shutdown_big", "10 messages of 1 MiB", process.big_conversation()),
            ):
                _say(f"bench: shutdown latency, {label} ...")
                r = process.shutdown(standins, conversation, _runs(name, quick))
                both = r.curl_get.median + r.curl_post.median
                row(f"**shutdown**, {label}: SIGTERM → coderd's 204 ({r.body_bytes:,} B body)",
                    ms(r.to_stored.median), spread(r.to_stored, ms), "≤ 1.0 × curl POST",
                    f"{verdict(r.stored_ratio <= 1)}: {r.stored_ratio:.2f} × curl POST")
                row("  SIGTERM → exit (after the 204: the confirming `GET /messages`, the state file's fsync'd write)",
                    ms(r.agentd.median), spread(r.agentd, ms), "", f"{r.ratio:.2f} × curl POST")
                row("  one `curl` POST of the same body to the same stand-in coderd, start → exit",
                    ms(r.curl_post.median), spread(r.curl_post, ms))
                row("  one `curl` GET of agentapi's `/messages` (what a stop script fetches first)",
                    ms(r.curl_get.median), spread(r.curl_get, ms))
                row("  a stop script's least: that curl GET, then that curl POST", ms(both), "", "",
                    f"agentd {r.agentd.median / both:.2f} × that")
                results["shutdown_" + name] = r
        if "trim" in wanted:
            _say("bench: trim cost ...")
            for i, (name, series) in enumerate(trim.measure(_runs("trim", quick)).items()):
                what = ("**trim**: `build_snapshot`, 10 × 1 MiB as the ring buffer holds them, " if i == 0 else "  ") + name
                row(what, ms(series.median), spread(series, ms), "≤ 5 ms" if i == 0 else "",
                    verdict(series.median <= 0.005))
        if "ingest" in wanted:
            _say("bench: ingest ...")
            ing = process.ingest(standins, _runs("ingest", quick))
            results["ingest"] = ing
            row("**ingest**: daemon CPU per 1 000 `message_update` events of 64 KiB (box drawing)", f"{ing.agentd.median:.3f} s",
                spread(ing.agentd, lambda v: f"{v:.2f} s"), "≤ 1.5 × floor",
                f"{verdict(ing.ratio <= 1.5)}: {ing.ratio:.2f} × floor (median of the per-run ratios)")
            row("  the floor: plain Python reading the same stream over a socket, `json.loads` per event",
                f"{ing.floor.median:.3f} s", spread(ing.floor, lambda v: f"{v:.2f} s"))
            row("  wall time for them (the stand-in streams them as fast as it can)", f"{ing.wall.median:.2f} s",
                spread(ing.wall, lambda v: f"{v:.2f} s"), "", f"{1000 / ing.wall.median:,.0f} events/s")
        if "footprint" in wanted:
            idle = IDLE[1 if quick else 0]
            _say(f"bench: footprint ({IDLE_PROCESSES} daemons idle {idle:.0f} s) ...")
            f = process.footprint(standins, IDLE_PROCESSES, idle)
            results["footprint"] = f
            row(f"**footprint** after {idle:.0f} s idle, full buffer (10 × 64 KiB): resident memory (RSS)",
                mib(f.rss.median), spread(f.rss, mib), "≤ 40 MiB", verdict(f.rss.median <= 40 * 2**20))
            row("  of which the process's own (RssAnon; the rest is shared libraries)", mib(f.private.median),
                spread(f.private, mib))
            row(f"  CPU while idle, over {idle:.0f} s", f"{f.cpu.median:.3f} % of a core",
                spread(f.cpu, lambda v: f"{v:.3f} %"), "≤ 0.1 %", verdict(f.cpu.median <= 0.1))
        if "startup" in wanted:
            _say("bench: start-up ...")
            ready, bare = process.startup(standins, _runs("startup", quick))
            ratio = ready.median / bare.median
            results["startup"] = (ready, bare)
            row("**start-up**: process start → `READY=1` on `$NOTIFY_SOCKET`", ms(ready.median), spread(ready, ms),
                "≤ 8 × `python -c pass`", f"{verdict(ratio <= 8)}: {ratio:.1f} ×")
            row("  `python -c pass` on the same machine, same run", ms(bare.median), spread(bare, ms))
        if "probe" in wanted:
            _say("bench: probes (client commands against a running daemon) ...")
            series = probe.probe(standins, _runs("probe", quick))
            bare = series[probe.BARE]
            for i, (name, s) in enumerate(series.items()):
                if name == probe.BARE:
                    row("  `python -c pass`, interleaved with them", ms(s.median), spread(s, ms))
                    continue
                what = ("**probe**: " if i == 0 else "  ") + f"{name}, process start → exit with the answer"
                ratio = s.median / bare.median
                row(what, ms(s.median), spread(s, ms), "≤ 3 × `python -c pass`", f"{verdict(ratio <= 3)}: {ratio:.2f} ×")
    table = ["| figure | median | min – max | target | |", "|---|---|---|---|---|", *rows]
    intro = (
        "Real `python -m agentd run` processes against the stand-ins on loopback (`FakeAgentAPI` and "
        "`FakeCoderd` on their own event loop in a thread of the bench process). Wall times with "
        "`perf_counter`, the exit seen through a pidfd; CPU time and memory from `/proc/<pid>`."
    )
    return "\n".join(["### Daemon", "", intro, "", *table, *_notes(results)])


def _notes(results: dict) -> list[str]:
    """What was done about the misses, and what remains (with figures from this run)."""
    out: list[str] = []
    short, big = results.get("shutdown_shutdown_short"), results.get("shutdown_shutdown_big")
    if short is not None and big is not None:
        out.append(
            "- **Shutdown.** With the tail live and caught up (its `/events` stream connected, the replay "
            "merged), agentd uploads the buffer at once: agentapi pushes every change on the stream, so the "
            "buffer already holds what a final `GET /messages` would return. That fetch comes after the 204, "
            "to confirm; if it shows an update still in flight at the stop, agentd uploads again (no reply "
            "lost: `tests/test_faults.py::test_last_update_just_before_sigterm_is_not_lost`). With the tail "
            "not live (polling, disconnected, reconnecting) the fetch comes first, as before. "
            f"SIGTERM → 204: {short.stored_ratio:.2f} × one curl POST for 5 short messages, "
            f"{big.stored_ratio:.2f} × for 10 × 1 MiB (the curl figure includes curl's own process start). "
            f"SIGTERM → exit adds the confirming fetch ({ms(big.curl_get.median)} for curl to fetch the 10 MiB "
            "alone) and the state file's fsync'd write."
        )
    startup = results.get("startup")
    if startup is not None and startup[0].median > 8 * startup[1].median:
        ready, bare = startup
        imports, shares = probe.import_shares()
        listed = ", ".join(f"{group} {share:.0%}" for group, share in shares[:6])
        out.append(
            f"- **Start-up.** READY=1 comes {ready.median / bare.median:.1f} × `python -c pass` after the start. "
            f"Importing the daemon's modules alone takes {ms(imports)} in a fresh interpreter "
            f"({imports / bare.median:.1f} × `python -c pass`; `python -X importtime`, self time by group: {listed}). "
            "Done: the client commands import none of it; on asyncio trio is kept out; the settings are read "
            "once. What remains is the libraries the design asks for: pydantic-settings builds its model and "
            "pydantic-core its validators at import, and httpx pulls in the standard library's email and HTTP "
            "modules. Deferring the coderd client, tenacity and its TLS context to the first upload would "
            "take off a few percent more; the 8 × target needs a settings reader without pydantic."
        )
    ingest = results.get("ingest")
    if ingest is not None and ingest.ratio > 1.5:
        out.append(
            f"- **Ingest.** agentd takes {ingest.ratio:.2f} × the floor. Its reader is already shaped like "
            "the floor (raw bytes, its own bounded line splitter, one UTF-8 decode and one `json.loads` per "
            "event); the rest is httpcore/h11 de-chunking and the event loop (`python -m bench.profile ingest`)."
        )
    footprint = results.get("footprint")
    if footprint is not None and footprint.rss.median > 40 * 2**20:
        parts = process.import_footprint()
        imports = sum(size for _, size in parts)
        listed = ", ".join(f"{name} {mib(size)}" for name, size in parts)
        out.append(
            f"- **Footprint.** The imports alone make {mib(imports)} of the {mib(footprint.rss.median)}: "
            f"{listed}. Done: on asyncio, agentd keeps httpcore from importing trio when trio is installed "
            "(5 MiB, 45 ms), and the agentapi client, plain HTTP to localhost, loads no CA bundle. What remains is mostly pydantic-settings, which reads about fifteen settings once at "
            "start-up. A plain reader for them would save about "
            f"{mib(dict(parts).get('pydantic, pydantic-settings', 0))} and be the one change that reaches "
            "the target; the design card asks for pydantic-settings, so it stays."
        )
    return ["", *out] if out else []


def hostile_section(quick: bool) -> str:
    """Peak RSS of a real ``agentd run`` under each hostile peer, beside a friendly run's (issue 9)."""
    runs = _runs("hostile", quick)
    rows: list[str] = []
    with Standins() as standins:
        _say(f"bench: hostile peers, the reference (friendly stand-ins, full buffer) x {runs} ...")
        idle = hostile.idle_reference(standins, runs, 2.0 if quick else 5.0)
        rows.append(f"| reference: friendly stand-ins, full buffer (10 × 64 KiB), idle, SIGTERM | – | "
                    f"{mib(idle.median)} | {spread(idle, mib)} | 1.00 × | 0 | yes | |")
        for case in hostile.CASES:
            _say(f"bench: hostile {case.peer}, {case.name} x {runs} ...")
            r = hostile.run_case(standins, case, runs)
            limit = hostile.LIMIT[case.peer]
            stored = sorted({"yes" if s else "no" for s in r.stored})
            rows.append(
                f"| {case.name}: {case.attack} | {case.peer} | {mib(r.peak.median)} | {spread(r.peak, mib)} | "
                f"{r.peak.median / idle.median:.2f} × | {', '.join(str(e) for e in sorted(set(r.exits)))} | "
                f"{' / '.join(stored)}{'' if all(s == case.stored_expected for s in r.stored) else ' (**unexpected**)'} | "
                f"< {mib(limit)}: {verdict(r.peak.high < limit)} |"
            )
    intro = (
        "A real `python -m agentd run` against one hostile raw-socket server (`agentd/testing/hostile.py`, "
        "the tests' servers) with the friendly stand-in for the other peer. Its peak RSS is `VmHWM` from "
        "`/proc/<pid>/status`, read every 10 ms from its start until it exits after SIGTERM (sent once the "
        "case has done its worst: two capped streams and a reconnect, three refused polls, the long "
        "conversation's newest message held, or the snapshot in the buffer for a coderd case). The "
        "reference is the same figure for a friendly run, measured in the same section."
    )
    table = [
        "| case | hostile peer | peak RSS, median | min – max | × reference | exit status | snapshot stored | limit |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    return "\n".join(["### Hostile peers: peak memory", "", intro, "", *table])


def fleet_section(quick: bool) -> str:
    n = 1000
    rates = (50, 200, 1000)
    platforms = fleet.PLATFORMS[:1] if quick else fleet.PLATFORMS
    policies = ("tuned",) if quick else ("tuned", "untuned")
    fleet.quiet_logs()
    rows: list[str] = []
    detail: list[str] = []
    all_runs: list[tuple[str, fleet.FleetRun]] = []
    for rps in rates:
        for platform, grace, timeout in platforms:
            runs: dict[str, fleet.FleetRun] = {}
            for policy in policies:
                _say(f"bench: fleet N={n} R={rps}/s shutdown_timeout={timeout:g} s, {policy} policy ...")
                runs[policy] = fleet.simulate(n, rps, timeout, fleet.POLICIES[policy])
            all_runs += list(runs.items())
            t = runs["tuned"]
            u = runs.get("untuned")
            best_grace = min(1.0, rps * grace / n)
            cells = [
                f"{rps:,}/s",
                f"{platform}, {grace:g} s",
                f"{timeout:g} s",
                f"{t.best():.0%} ({best_grace:.0%} in {grace:g} s)",
                f"**{t.share():.1%}**",
                f"{u.share():.1%}" if u else "–",
                _when(t),
                f"{t.attempts / n:.1f}" + (f" / {u.attempts / n:.1f}" if u else ""),
                f"{t.peak_retries()}" + (f" / {u.peak_retries()}" if u else ""),
            ]
            rows.append("| " + " | ".join(cells) + " |")
            for policy, run in runs.items():
                detail.append(
                    f"| {rps:,}/s | {timeout:g} s | {policy} | {run.stored} | {run.attempts} | {run.first_answers:.1f} s | "
                    f"{run.coderd_cpu:.1f} s | {run.client_cpu:.1f} s | {run.max_loop_lag * 1000:.0f} ms | "
                    f"{_reasons(run)} |"
                )
    head = [
        "### Fleet: 1 000 workspaces stop at once",
        "",
        f"N = {n} real `CoderdUploader`s (agentd's retry policy; each with its own `httpx.AsyncClient`, as each "
        "workspace has its own) start uploading a real snapshot body (demo-session conversations, "
        f"{min(t.body_bytes) / 1024:.0f} to {max(t.body_bytes) / 1024:.0f} KiB, {statistics.median(t.body_bytes) / 1024:.0f} KiB median) at the same instant, on one event loop, to one "
        "stand-in coderd (`python -m agentd.testing.fake_coderd --max-rps R`, its own process) that admits R "
        "requests in any sliding second and answers the rest 503 with `Retry-After: 1`. The best any client can "
        "do is min(1, R × T / N) within T seconds. agentd's deadline is its `AGENTD_SHUTDOWN_TIMEOUT`, "
        "which leaves the platform's grace period room for start-up and exit. One simulation per cell; "
        "\"untuned\" is the policy before the fleet tuning (`Retry-After` honoured exactly, backoff capped "
        "at 2 s, no last attempt near the deadline), run in the same `make bench`.",
        "",
        "| coderd admits | platform, grace | agentd deadline | best possible | stored in time | untuned | "
        "half stored by | requests per workspace (tuned / untuned) | most retries within 100 ms (tuned / untuned) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *_fleet_notes(all_runs),
        "",
        "<details><summary>Simulation details (CPU, event-loop lag, why the rest was not stored)</summary>",
        "",
        "| R | deadline | policy | stored | requests | first 1 000 answered by | coderd CPU | uploaders' CPU | "
        "max loop lag | not stored |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *detail,
        "",
        "</details>",
    ]
    return "\n".join(head)


def _fleet_notes(runs: list[tuple[str, fleet.FleetRun]]) -> list[str]:
    out = []
    short = [(p, r) for p, r in runs if p == "tuned" and r.share() < r.best() - 0.005]
    for _, run in short:
        first_stored = sum(1 for r in run.requests if r[3] == 1 and r[2] == 204)
        retry_from = run.first_answers + 1.0
        out.append(
            f"- R = {run.rps:g}/s, {run.timeout:g} s: {run.stored} stored of the {run.best() * run.n:.0f} the "
            f"arithmetic allows ({run.share():.1%} against {run.best():.0%}). "
            + (f"The stand-in coderd is a Python process with a core of its own (the 1 000 uploaders on the other {os.cpu_count() - 1}). "
               if run.pinned else f"The stand-in coderd is a Python process sharing {os.cpu_count()} cores with the 1 000 uploaders. ")
            + f"It took {run.first_answers:.1f} s to answer the first 1 000 simultaneous "
            f"uploads, and stored {first_stored} of them. `Retry-After` counts from the answer, so no retry "
            f"could arrive before {retry_from:.1f} s. That left {max(0.0, run.timeout - retry_from):.1f} s of "
            f"coderd's capacity for the other {run.n - first_stored}. A real coderd answers such a burst in "
            "well under a second."
        )
    pairs = {}
    for policy, run in runs:
        pairs.setdefault((run.rps, run.timeout), {})[policy] = run
    saved = [(k, v["tuned"], v["untuned"]) for k, v in pairs.items() if "untuned" in v and v["untuned"].attempts > v["tuned"].attempts]
    if saved:
        (rps, timeout), t, u = max(saved, key=lambda item: item[2].attempts - item[1].attempts)
        out.append(
            f"- The tuning shows in coderd's load more than in the shares. At R = {rps:g}/s over {timeout:g} s "
            f"the fleet sent {t.attempts:,} requests instead of {u.attempts:,}. At most {t.peak_retries()} retries "
            f"came within any 100 ms, instead of {u.peak_retries()}. That was the untuned fleet coming back all "
            f"together, one second after each 503. Stored: {t.share():.1%} against {u.share():.1%}; half of "
            f"them by {_when(t)} against {_when(u)}. A lone agentd still retries within 0.25 s, 0.5 s and "
            "1 s, and 1 to 2 s after a `Retry-After: 1`."
        )
    return out


def _when(run: fleet.FleetRun) -> str:
    t = run.quantile(0.5)
    return "never" if t is None or t > run.timeout else f"{t:.1f} s"


def _reasons(run: fleet.FleetRun) -> str:
    if not run.failed_reasons:
        return "–"
    return "; ".join(f"{count}: {reason}" for reason, count in sorted(run.failed_reasons.items(), key=lambda kv: -kv[1]))
