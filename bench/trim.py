"""Trim cost: ``agentd.snapshot.build_snapshot`` over 10 messages of 1 MiB, as the ring buffer holds them.

The ring buffer keeps at most ``max_bytes`` characters of each message (the rest is counted in
``Message.elided``), so this is the body built at every shutdown, snapshot request and
checkpoint of a long conversation. In-process, ``time.perf_counter`` around each call.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

from agentd.buffer import RingBuffer
from agentd.messages import Message
from agentd.snapshot import CODERD_MAX_BODY, build_snapshot
from bench.common import Series, require
from bench.content import MiB, ascii_text, esc_heavy, screen_text

CASES: dict[str, Callable[[int, int], str]] = {
    "screen text (box drawing)": screen_text,
    "ESC-heavy (worst case)": esc_heavy,
    "ASCII": ascii_text,
}


def buffered(make: Callable[[int, int], str], count: int = 10, size: int = MiB) -> list[Message]:
    """``count`` messages of ``size`` bytes fed through a default ring buffer; what it holds."""
    buffer = RingBuffer(10, max_chars=CODERD_MAX_BODY)
    for i in range(count):
        role = "agent" if i % 2 == 0 else "user"
        buffer.apply(Message(id=i, role=role, content=make(size, i), time=f"2026-01-01T00:00:{i:02d}.123456789Z"))
    return buffer.messages()


def measure(runs: int) -> dict[str, Series]:
    out: dict[str, Series] = {}
    for name, make in CASES.items():
        messages = buffered(make)
        series = Series(f"trim, {name}", "s")
        build_snapshot(messages)  # warm up
        gc.collect()
        for _ in range(runs):
            started = time.perf_counter()
            snapshot = build_snapshot(messages)
            series.add(time.perf_counter() - started)
            require(snapshot is not None and snapshot.size <= CODERD_MAX_BODY, "bad snapshot")
        out[name] = series
    return out
