"""Built-in conversations for the demo and the tests.

The text imitates what agentapi reports for a terminal coding agent (Claude Code style): every
message is the agent's screen text, 80 columns wide, full of box-drawing characters
(╭─╮ │ ╰─╯ ├ ┤ ┌ ┐ └ ┘), bullets (⏺ ⎿ ✻) and emoji. Those are 3 or 4 bytes each in UTF-8, so a
message's length in characters is far below its length in bytes -- the trap the CONTRACT.md §4
measurements describe ("characters are not bytes").

* :func:`demo_session` -- a 12-message coding session, ``[(role, content), ...]``; ids 0..11
  when loaded into agentapi; message 0 is the agent's welcome screen and message 11 the user's
  last request, which the agent is still answering.
* :func:`typing_steps` -- the agent's answer to message 11 being "typed": yields successive full
  contents of one growing message until it is past ``min_bytes`` UTF-8 bytes (default: past
  coderd's 65 536-byte cap).
* :func:`generic_conversation` -- ``n`` short alternating messages.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = [
    "WIDTH",
    "demo_session",
    "final_reply",
    "generic_conversation",
    "typing_steps",
    "utf8_len",
]

#: Terminal width agentapi renders at (columns).
WIDTH = 80


def utf8_len(text: str) -> int:
    """Length of ``text`` in UTF-8 bytes (what coderd's 65 536-byte cap counts)."""
    return len(text.encode("utf-8"))


def _pad(line: str, width: int = WIDTH) -> str:
    return line + " " * max(0, width - len(line))


def _screen(lines: list[str]) -> str:
    """Join lines padded to the terminal width, as agentapi reports screen text."""
    return "\n".join(_pad(line) for line in lines)


def _box(title: str, body: list[str], width: int = 60, indent: str = "") -> list[str]:
    inner = width - 2
    top = "╭─ " + title + " " + "─" * max(0, inner - len(title) - 3) + "╮"
    out = [indent + top]
    for line in body:
        out.append(indent + "│ " + line[: inner - 2].ljust(inner - 2) + " │")
    out.append(indent + "╰" + "─" * inner + "╯")
    return out


_WELCOME = _screen(
    [
        "╭───────────────────────────────────────────────────╮",
        "│ ✻ Welcome to Claude Code!                         │",
        "│                                                   │",
        "│   /help for help, /status for your current setup  │",
        "│                                                   │",
        "│   cwd: /home/coder/projects/syncbox               │",
        "╰───────────────────────────────────────────────────╯",
        "",
        " Tips for getting started:",
        "",
        " 1. Ask Claude to create a new app or clone a repository",
        " 2. Use Claude to help with file analysis, editing, bash commands and git",
        " 3. Be as specific as you would with another engineer for the best results",
        " 4. ✔ Run /init to create a CLAUDE.md file with instructions for Claude",
    ]
)

_SESSION: list[tuple[str, str]] = [
    ("agent", _WELCOME),
    (
        "user",
        "The uploader in syncbox/upload.py gives up on the first 503. Add retries with\n"
        "exponential backoff and jitter, and honour Retry-After.",
    ),
    (
        "agent",
        _screen(
            [
                "⏺ I'll start by reading the uploader and its tests.",
                "",
                "⏺ Read(syncbox/upload.py)…",
                "  ⎿  Read 142 lines (ctrl+r to expand)",
                "",
                "⏺ Read(tests/test_upload.py)…",
                "  ⎿  Read 88 lines (ctrl+r to expand)",
                "",
                "⏺ The upload is a single `client.post()` with no retry. Plan:",
                "",
                *_box(
                    "Plan",
                    [
                        "☐ add RetryPolicy(base=0.5 s, cap=8 s, attempts=6)",
                        "☐ retry on 429/502/503/504 and connect errors",
                        "☐ parse Retry-After (seconds or HTTP date)",
                        "☐ full jitter: sleep uniform(0, backoff)",
                        "☐ tests with a fake clock",
                    ],
                ),
            ]
        ),
    ),
    ("user", "Sounds good, go ahead. Keep the public API unchanged."),
    (
        "agent",
        _screen(
            [
                "⏺ Update(syncbox/upload.py)…",
                "  ⎿  Updated syncbox/upload.py with 41 additions and 6 removals",
                *_box(
                    "syncbox/upload.py",
                    [
                        " 58      async def upload(self, payload: bytes) -> None:",
                        " 59 -        resp = await self._client.post(self._url,",
                        " 60 -                                       content=payload)",
                        " 59 +        async for attempt in self._policy.attempts():",
                        " 60 +            resp = await self._client.post(self._url,",
                        " 61 +                                           content=payload)",
                        " 62 +            if resp.status_code not in RETRYABLE:",
                        " 63 +                break",
                        " 64 +            await attempt.wait(retry_after(resp))",
                        " 65          resp.raise_for_status()",
                    ],
                    width=72,
                    indent="     ",
                ),
                "",
                "⏺ Done. `upload()` keeps its signature; the policy is injectable for tests.",
            ]
        ),
    ),
    ("user", "Run the tests."),
    (
        "agent",
        _screen(
            [
                "⏺ Bash(python -m pytest -q tests/test_upload.py)…",
                "  ⎿  ........F.....                                          [100%]",
                "     FAILED tests/test_upload.py::test_retry_after_http_date",
                "     AssertionError: assert 0.0 == 120.0",
                "     1 failed, 13 passed in 0.41s",
                "",
                "⏺ One failure: an HTTP-date Retry-After is parsed as 0 s. The date is",
                "  compared with the wall clock but the test uses a fake clock. 🔧",
            ]
        ),
    ),
    ("user", "Fix it properly: the clock should be injected, not patched."),
    (
        "agent",
        _screen(
            [
                "⏺ Update(syncbox/retry.py)…",
                "  ⎿  Updated syncbox/retry.py with 9 additions and 3 removals",
                "",
                "⏺ Bash(python -m pytest -q)…",
                "  ⎿  ..............................................        [100%]",
                "     46 passed in 1.02s ✅",
                "",
                *_box(
                    "Summary",
                    [
                        "✔ RetryPolicy takes clock=time.time",
                        "✔ Retry-After: delta-seconds and HTTP-date",
                        "✔ jitter uses an injectable random.Random",
                    ],
                ),
            ]
        ),
    ),
    ("user", "Nice 👍 How many requests can one upload make at worst?"),
    (
        "agent",
        _screen(
            [
                "⏺ At most 6 attempts. Worst-case waiting time with the default policy:",
                "",
                "  ┌─────────┬──────────┬──────────────┐",
                "  │ attempt │ backoff  │ cumulative   │",
                "  ├─────────┼──────────┼──────────────┤",
                "  │    1    │   0 s    │     0 s      │",
                "  │    2    │  0.5 s   │    0.5 s     │",
                "  │    3    │   1 s    │    1.5 s     │",
                "  │    4    │   2 s    │    3.5 s     │",
                "  │    5    │   4 s    │    7.5 s     │",
                "  │    6    │   8 s    │   15.5 s     │",
                "  └─────────┴──────────┴──────────────┘",
                "",
                "  A Retry-After larger than the cap (8 s) is clamped to the cap. ⏱",
            ]
        ),
    ),
    (
        "user",
        "Great. Now audit every module that talks HTTP and write me a full migration\n"
        "report, one box per module: what changes, risks, and test status.",
    ),
]


def demo_session() -> list[tuple[str, str]]:
    """The 12-message session: ``[(role, content), ...]``, roles ``agent``/``user`` alternating.

    Message 0 is the agent's welcome screen; message 11 is the user's request for a migration
    report, answered by :func:`typing_steps` / :func:`final_reply`. Every agent message is
    multi-line, 80-column screen text with box-drawing characters and emoji.
    """
    return list(_SESSION)


_MODULES = [
    "syncbox/upload.py",
    "syncbox/download.py",
    "syncbox/retry.py",
    "syncbox/auth/token.py",
    "syncbox/auth/oauth.py",
    "syncbox/api/client.py",
    "syncbox/api/pagination.py",
    "syncbox/api/errors.py",
    "syncbox/webhooks/server.py",
    "syncbox/webhooks/verify.py",
    "syncbox/storage/s3.py",
    "syncbox/storage/gcs.py",
    "syncbox/storage/local.py",
    "syncbox/cli/push.py",
    "syncbox/cli/pull.py",
    "syncbox/cli/status.py",
]

_CHANGES = [
    "replace requests.Session with a shared httpx.AsyncClient",
    "route every call through RetryPolicy.attempts()",
    "stream bodies instead of reading them into memory",
    "map 4xx answers to typed errors (NotFound, Conflict, …)",
    "add timeouts: connect 5 s, read 30 s, pool 5 s",
    "log status, attempt and elapsed time, never the token",
]

_RISKS = [
    "⚠ connection pool shared across event loops in tests",
    "⚠ servers that send Retry-After as an HTTP date in local time",
    "⚠ proxies that buffer chunked uploads",
    "⚠ redirects that drop the Authorization header",
]

_STATUS = ["✅ migrated, tests green", "🔧 migrated, 1 flaky test", "🚧 in progress", "❌ blocked"]


def _module_box(index: int, total: int) -> list[str]:
    module = _MODULES[index % len(_MODULES)]
    status = _STATUS[index % len(_STATUS)]
    inner = WIDTH - 2
    head = f" ✻ {index + 1:02d}/{total:02d}  {module}"
    lines = ["╭" + "─" * inner + "╮", "│" + head.ljust(inner) + "│", "├" + "─" * inner + "┤"]
    lines.append("│" + " Changes".ljust(inner) + "│")
    for j in range(3):
        change = _CHANGES[(index + j) % len(_CHANGES)]
        lines.append("│" + f"   • {change}".ljust(inner) + "│")
    lines.append("│" + " Risks".ljust(inner) + "│")
    risk = _RISKS[index % len(_RISKS)]
    lines.append("│" + f"   {risk}".ljust(inner) + "│")
    lines.append("│" + f" Status: {status}".ljust(inner) + "│")
    bar = "█" * (index % 20 + 1) + "░" * (19 - index % 20)
    lines.append("│" + f" Coverage {bar} {60 + index % 40:>3d} %".ljust(inner) + "│")
    lines.append("╰" + "─" * inner + "╯")
    return lines


def _reply_lines(min_bytes: int) -> list[str]:
    header = [
        "⏺ Read(syncbox/**/*.py)…",
        "  ⎿  Found 16 files that import requests, httpx or aiohttp",
        "",
        "⏺ Migration report 📋",
        "",
    ]
    size = utf8_len("\n".join(header))
    count = 0
    while size <= min_bytes:  # first pass: how many boxes are needed
        size += utf8_len("\n".join(_module_box(count, 0))) + 1
        count += 1
    lines = list(header)
    for index in range(count):  # the "NN/TT" counters only widen, so the size stays past min
        lines.extend(_module_box(index, count))
    lines += ["", f"⏺ {count} modules audited. Next step: fix the ❌ blocked ones first. 🚀"]
    return lines


def typing_steps(min_bytes: int = 70_000, lines_per_step: int = 12) -> Iterator[str]:
    """Yield successive full contents of the agent's growing answer to message 11.

    Each yielded string is the whole message so far (agentapi rewrites the last message in
    place, CONTRACT.md §2); each step adds ``lines_per_step`` screen lines. The last content is
    longer than ``min_bytes`` UTF-8 bytes (default 70 000 > coderd's 65 536-byte cap) and is
    equal to :func:`final_reply`\\ ``(min_bytes)``.
    """
    if lines_per_step < 1:
        raise ValueError("lines_per_step must be >= 1")
    lines = _reply_lines(min_bytes)
    for end in range(lines_per_step, len(lines), lines_per_step):
        yield "\n".join(lines[:end])
    yield "\n".join(lines)


def final_reply(min_bytes: int = 70_000) -> str:
    """The complete answer to message 11: more than ``min_bytes`` UTF-8 bytes of screen text."""
    return "\n".join(_reply_lines(min_bytes))


def generic_conversation(n: int) -> list[tuple[str, str]]:
    """``n`` short messages alternating ``agent``/``user``, starting with ``agent``."""
    out: list[tuple[str, str]] = []
    for i in range(n):
        if i % 2 == 0:
            out.append(("agent", f"⏺ Message {i}: working on step {i // 2 + 1} ─ done ✅"))
        else:
            out.append(("user", f"Message {i}: please continue with step {i // 2 + 2}"))
    return out
