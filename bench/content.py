"""Message contents for the benchmarks: realistic terminal screen text, sized in UTF-8 bytes.

* :func:`screen_text` -- an agent's screen (box drawing, bullets, emoji: 3-4 bytes a
  character), from :mod:`agentd.testing.conversations`.
* :func:`esc_heavy` -- the worst case for JSON: ANSI colour sequences (every ESC costs 6 bytes
  as ``\\u001b``) around box-drawing characters.
* :func:`ascii_text` -- plain ASCII lines (1 byte a character).
"""

from __future__ import annotations

from functools import lru_cache

from agentd.testing import conversations

KiB = 1024
MiB = 1024 * 1024


@lru_cache(maxsize=1)
def _screen_source() -> str:
    return conversations.final_reply(300_000)


def _fill(source: str, nbytes: int, offset: int) -> str:
    """``source`` repeated (rotated by ``offset`` characters) until it is about ``nbytes`` UTF-8 bytes."""
    offset %= len(source)
    rotated = source[offset:] + "\n" + source[:offset]
    per_char = len(rotated.encode("utf-8")) / len(rotated)
    chars = int(nbytes / per_char)
    reps = chars // len(rotated) + 1
    text = (rotated * reps)[:chars]
    while len(text.encode("utf-8")) > nbytes:  # per_char is an average: trim the rest
        text = text[: -max(1, (len(text.encode("utf-8")) - nbytes) // 4)]
    return text


def screen_text(nbytes: int, variant: int = 0) -> str:
    """About ``nbytes`` (at most) UTF-8 bytes of agent screen text; ``variant`` rotates it."""
    return _fill(_screen_source(), nbytes, variant * 997)


def esc_heavy(nbytes: int, variant: int = 0) -> str:
    """About ``nbytes`` UTF-8 bytes where a third of the characters are ESC (``\\x1b``)."""
    line = "".join(f"\x1b[1;3{i % 8}m─\x1b[0m\x1b[2K{i % 10}" for i in range(40)) + "\n"
    return _fill(line, nbytes, variant * 7)


def ascii_text(nbytes: int, variant: int = 0) -> str:
    """``nbytes`` bytes of plain ASCII lines."""
    line = "".join(f"line {i:05d}: the quick brown fox jumps over the lazy dog 0123456789\n" for i in range(200))
    return _fill(line, nbytes, variant * 61)
