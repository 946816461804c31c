"""``python -m bench``: agentd's benchmarks and the fleet simulation (``make bench``).

    python -m bench                 # everything; prints the Markdown, writes bench/results.md
    python -m bench --quick         # a smoke run: fewer repeats, 5 s idle, fleet at 8 s only
    python -m bench shutdown trim   # only some (shutdown trim ingest footprint startup probe hostile fleet)
    python -m bench fleet           # only the fleet simulation
    python -m bench hostile         # only the peak RSS under hostile peers (one run per case with --quick)

``make bench QUICK=1`` (or ``BENCH_QUICK=1``) is the smoke run. Only a full run of everything
writes ``bench/results.md`` and copies it into README.md between the ``bench:start`` and
``bench:end`` markers (the README's figures); others just print.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import report
from bench.common import BenchError

ALL = ("shutdown", "trim", "ingest", "footprint", "startup", "probe", "hostile", "fleet")
RESULTS = Path(__file__).with_name("results.md")
README = Path(__file__).resolve().parent.parent / "README.md"
_START, _END = "<!-- bench:start -->", "<!-- bench:end -->"


def _into_readme(text: str) -> bool:
    """Replace the README's figures (between the markers) with ``text``; False without markers."""
    try:
        readme = README.read_text(encoding="utf-8")
    except OSError:
        return False
    head, start, rest = readme.partition(_START)
    _, end, tail = rest.partition(_END)
    if not (start and end):
        return False
    README.write_text(f"{head}{_START}\n{text}{_END}{tail}", encoding="utf-8")
    return True


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]
    return (
        f"{datetime.now(UTC):%Y-%m-%d}, {cpu}, {os.cpu_count()} cores, "
        f"Linux {platform.release()}, Python {platform.python_version()}; load average {load:.2f} at the start"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", metavar="NAME", help=f"run only these ({', '.join(ALL)}); default all")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK", "") not in ("", "0"),
                        help="smoke run: fewer repeats, short idle (also BENCH_QUICK=1)")
    parser.add_argument("--out", type=Path, default=None, help=f"write the Markdown here (default {RESULTS} on a full run)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(ALL))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(ALL)}")
    wanted = tuple(args.only) or ALL
    out = args.out or (RESULTS if wanted == ALL and not args.quick else None)

    started = time.perf_counter()
    sections: list[str] = []
    header = f"_{_machine()}; {'quick smoke run' if args.quick else 'full run'}._"
    print(header, flush=True)
    try:
        if any(name in wanted for name in ("shutdown", "trim", "ingest", "footprint", "startup", "probe")):
            sections.append(report.daemon_section(wanted, args.quick))
        if "hostile" in wanted:
            sections.append(report.hostile_section(args.quick))
        if "fleet" in wanted:
            sections.append(report.fleet_section(args.quick))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    text = "\n\n".join([header, *sections]) + "\n"
    text += f"\n_`make bench` took {time.perf_counter() - started:.0f} s._\n"
    print()
    print(text)
    if out is not None:
        out.write_text(text, encoding="utf-8")
        print(f"(written to {out})")
        if out == RESULTS and _into_readme(text.replace("### ", "#### ")):
            print(f"(and into {README})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
