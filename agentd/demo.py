"""``agentd demo``: the whole job, end to end, on loopback, with no configuration.

In one process: the built-in stand-in agentapi streams a realistic 13-message session (box
drawing, emoji) whose last agent message grows past 64 KiB while "the agent types"; the
built-in stand-in coderd enforces the real log-snapshot rules (and answers 503 once, as a busy
coderd does); the real daemon code (:func:`agentd.daemon.run`) tails and buffers, stores a
snapshot mid-turn when a hook asks (``agentd snapshot`` over the control socket) and, on a real
SIGTERM, stores the final one. Then it prints what coderd stored.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import tempfile
import uuid
from pathlib import Path

import anyio

from agentd import client, daemon, logs
from agentd.settings import load_settings
from agentd.snapshot import CODERD_MAX_BODY
from agentd.testing import FakeAgentAPI, FakeCoderd, demo_session, typing_steps, utf8_len


def _say(text: str = "") -> None:
    print(f"demo │ {text}" if text else "demo │", flush=True)


async def _demo(state_dir: Path) -> int:
    token = "demo-" + secrets.token_hex(16)
    task = str(uuid.uuid4())
    api = FakeAgentAPI(status="running")  # the agent is mid-turn
    coderd = FakeCoderd(token=token, tasks={task}, script=[None, (503, {"Retry-After": "1"})])
    async with api.serve() as api, coderd.serve() as coderd:
        api.load(demo_session())
        _say(f"stand-in agentapi on {api.url}: {len(api.messages)} messages so far")
        _say(f"stand-in coderd   on {coderd.url}: enforces the log-snapshot rules, busy (503) once")
        settings = load_settings(
            coderd_url=coderd.url,
            agent_token=token,
            task_id=task,
            agentapi_url=api.url,
            state_dir=state_dir,
            socket=state_dir / "agentd.sock",
            checkpoint_interval=0,
            log_format=os.environ.get("AGENTD_LOG_FORMAT", "console"),
        )
        exit_status: list[int] = []

        async def run_daemon() -> None:
            exit_status.append(await daemon.run(settings))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_daemon)
            await api.wait_for_subscribers(1, timeout=10)
            _say("agentd is tailing /events; the agent starts typing a long answer …")
            api.add_message("agent", "")
            content = ""
            asked = False
            for step, content in enumerate(typing_steps()):
                api.update_last(content)
                if step % 20 == 0:
                    _say(f"  agent screen now {utf8_len(content):>6} bytes")
                if not asked and utf8_len(content) > 30_000:
                    asked = True
                    status, line = await client.snapshot(settings.socket, 5.0, lambda: settings)
                    _say(f"  a stop hook asks mid-turn: `agentd snapshot` -> {line} (exit {status})")
                await anyio.sleep(0.01)
            api.set_status("stable")
            _say(f"  agent done: last message {utf8_len(content)} bytes (> {CODERD_MAX_BODY}, coderd's cap)")
            await anyio.sleep(0.3)
            _say("the workspace stops: SIGTERM to agentd")
            os.kill(os.getpid(), signal.SIGTERM)
        stored = coderd.stored.get(task)
        _say()
        _say(f"agentd exited with status {exit_status[0]}")
        if stored is None:
            _say("coderd stored nothing")
            return 1
        answers = [r.status for r in coderd.requests if r.method == "POST"]
        _say(f"coderd answered {answers}; stored {len(stored.body)} bytes (limit {CODERD_MAX_BODY})")
        _say(f"stored messages: ids {[m['id'] for m in stored.messages]} of 0..{len(api.messages) - 1}")
        newest = stored.messages[-1]
        _say(f"newest message id {newest['id']} ({newest['role']}), {utf8_len(newest['content'])} bytes; it starts:")
        for line in newest["content"].splitlines()[:2]:
            _say(f"    {line}")
        _say("… and ends:")
        for line in newest["content"].splitlines()[-6:]:
            _say(f"    {line}")
        intact = content.endswith(newest["content"].split("\n", 1)[1])
        _say(f"tail identical to the agent's screen: {'yes' if intact else 'NO'}")
        token_seen = token in json.dumps([r.as_json() for r in coderd.requests])
        _say(f"token in coderd's request log: {'YES' if token_seen else 'no (redacted)'}")
        return 0 if exit_status[0] == 0 and intact else 1


def main(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when coderd stored the conversation's tail intact."""
    logs.configure(getattr(args, "log_format", "console") or "console", "info")
    with tempfile.TemporaryDirectory(prefix="agentd-demo-", dir="/tmp") as state_dir:
        return anyio.run(_demo, Path(state_dir))
