"""sd_notify against a fake $NOTIFY_SOCKET: READY=1, STATUS=, WATCHDOG=1 at the right rate, STOPPING=1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid


def test_daemon_notifies_and_pings_the_watchdog(tmp_path):
    address = str(tmp_path / "notify")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(address)
    sink.settimeout(0.1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "CODER_"))}
    env.update(
        CODER_AGENT_URL="http://127.0.0.1:9",
        CODER_AGENT_TOKEN="tok-watchdog-test",
        AGENTD_TASK_ID=str(uuid.uuid4()),
        AGENTD_AGENTAPI_URL="http://127.0.0.1:9",
        AGENTD_STATE_DIR=str(tmp_path / "state"),
        NOTIFY_SOCKET=address,
        WATCHDOG_USEC="400000",  # pings every 0.2 s
    )
    process = subprocess.Popen([sys.executable, "-m", "agentd", "run"], env=env, stderr=subprocess.DEVNULL)
    received: list[tuple[float, str]] = []
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end and not any(m == "READY=1" for _, m in received):
            with contextlib.suppress(TimeoutError):
                received.append((time.monotonic(), sink.recv(4096).decode()))
        ready_at = next(t for t, m in received if m == "READY=1")
        end = ready_at + 2.0
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                received.append((time.monotonic(), sink.recv(4096).decode()))
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        while True:
            try:
                received.append((time.monotonic(), sink.recv(4096).decode()))
            except (TimeoutError, BlockingIOError):
                break
    finally:
        process.kill()
        sink.close()
    messages = [m for _, m in received]
    pings = [t for t, m in received if m == "WATCHDOG=1" and ready_at <= t <= ready_at + 2.0]
    assert 7 <= len(pings) <= 13, f"expected about 10 pings in 2 s at 0.2 s, got {len(pings)}"
    assert any(m.startswith("STATUS=") for m in messages)
    assert messages[-1] == "STOPPING=1" or "STOPPING=1" in messages
    assert messages.index("READY=1") < messages.index("STOPPING=1")
