"""``agentd check`` and the start-up line, as real processes (issue 10).

The stand-ins run as processes too (``python -m agentd.testing.fake_coderd`` with
``--store-file``/``--request-log``, ``python -m agentd.testing.fake_agentapi``), so what coderd
stored is read from its store file: ``agentd check`` must leave it untouched. Each case runs
agentd on asyncio and on trio (``AGENTD_ASYNC_BACKEND``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from support import assert_token_absent, clean_env, free_port, json_lines

pytestmark = pytest.mark.slow

TOKEN = "agt-" + uuid.uuid4().hex
TASK = str(uuid.uuid4())
BACKENDS = ["asyncio", "trio"]
WAIT = 30.0


@contextmanager
def standin(module: str, *args: str) -> Iterator[str]:
    """Run ``python -m agentd.testing.<module> --port P ARGS``; yield its URL once it listens."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"agentd.testing.{module}", "--port", str(port), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=clean_env(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # "... listening on http://127.0.0.1:P" (pytest-timeout bounds it)
        assert "listening on" in line, line
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def world(tmp_path: Path, *coderd_args: str, messages: int = 3) -> Iterator[dict[str, Any]]:
    (tmp_path / "token").write_text(TOKEN + "\n")
    store, requests = tmp_path / "store.json", tmp_path / "requests.jsonl"
    with standin(
        "fake_coderd", "--token-file", str(tmp_path / "token"), "--task", TASK,
        "--store-file", str(store), "--request-log", str(requests), *coderd_args,
    ) as coderd, standin("fake_agentapi", "--messages", str(messages)) as agentapi:
        yield {"coderd": coderd, "agentapi": agentapi, "store": store, "requests": requests, "token_file": tmp_path / "token"}


def agentd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentd", *args], env=env, capture_output=True, text=True, timeout=120)


def check_env(w: dict[str, Any], backend: str, **extra: str) -> dict[str, str]:
    base = {
        "CODER_AGENT_URL": w["coderd"], "CODER_AGENT_TOKEN_FILE": str(w["token_file"]),
        "AGENTD_AGENTAPI_URL": w["agentapi"], "AGENTD_ASYNC_BACKEND": backend,
    }
    return clean_env(**{**base, **extra})


def logged(w: dict[str, Any]) -> list[dict[str, Any]]:
    return json_lines(w["requests"].read_text()) if w["requests"].exists() else []


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_ready_exits_0_shows_where_each_setting_came_from_and_stores_nothing(tmp_path: Path, backend: str) -> None:
    with world(tmp_path) as w:
        done = agentd("check", "--task-id", TASK, env=check_env(w, backend))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"coderd    ok    log-snapshot endpoint ready for task {TASK}" in out
    assert "agentapi  ok    reachable at 127.0.0.1:" in out and "3 messages held" in out
    assert out.rstrip().endswith("result: a snapshot would be stored")
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()[0].isupper()}
    assert lines["AGENTD_TASK_ID"].endswith("[flag --task-id]")
    assert lines["CODER_AGENT_URL"].endswith("[environment]")
    assert lines["CODER_AGENT_TOKEN"].endswith(f"[file {w['token_file']}]") and "[REDACTED]" in lines["CODER_AGENT_TOKEN"]
    assert lines["AGENTD_MAX_MESSAGES"].endswith("[default]")
    assert done.stderr == ""
    assert_token_absent(TOKEN, done.stdout, done.stderr)
    assert not w["store"].exists(), "agentd check stored a snapshot"
    [request] = [r for r in logged(w) if r["path"].endswith("/log-snapshot")]
    assert (request["method"], request["status"], request["message"]) == ("POST", 400, "Failed to decode request payload.")


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_json_shape(tmp_path: Path, backend: str) -> None:
    with world(tmp_path) as w:
        done = agentd("check", "--json", env=check_env(w, backend, AGENTD_TASK_ID=TASK, AGENTD_MAX_MESSAGES="2"))
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert data["would_store"] is True
    assert set(data) == {"would_store", "settings", "agentapi", "coderd"}
    assert data["settings"]["agent_token"] == {
        "env": "CODER_AGENT_TOKEN", "flag": "--agent-token", "value": "[REDACTED]", "source": "file", "origin": str(w["token_file"])
    }
    assert data["settings"]["max_messages"]["source"] == "environment" and data["settings"]["max_messages"]["value"] == "2"
    assert data["settings"]["checkpoint_interval"]["source"] == "default"
    coderd = data["coderd"]
    assert {k: coderd[k] for k in ("code", "ready", "transient", "status")} == {"code": "ready", "ready": True, "transient": False, "status": 400}
    agentapi = data["agentapi"]
    assert (agentapi["code"], agentapi["ok"], agentapi["events"], agentapi["messages"], agentapi["snapshot_messages"]) == ("ok", True, "sse", 3, 2)
    assert_token_absent(TOKEN, done.stdout, done.stderr)
    assert not w["store"].exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_without_the_route_exits_1_naming_the_flag(tmp_path: Path, backend: str) -> None:
    with world(tmp_path, "--no-route", "--coder-version", "v2.37.0") as w:
        done = agentd("check", env=check_env(w, backend, AGENTD_TASK_ID=TASK))
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = [x for x in done.stdout.splitlines() if x.startswith("  coderd")]
    assert "FAIL" in line and "CODER_ENABLE_AI_TASKS=true" in line and "v2.37.0" in line
    assert "would NOT be stored" in done.stdout
    assert not w["store"].exists()


def test_check_rate_limited_is_a_wait_not_a_fail(tmp_path: Path) -> None:
    with world(tmp_path, "--rate-limit", "1") as w:
        env = check_env(w, "asyncio", AGENTD_TASK_ID=TASK)
        first = agentd("check", env=env)
        second = agentd("check", "--json", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert second.returncode == 1
    coderd = json.loads(second.stdout)["coderd"]
    assert (coderd["code"], coderd["transient"], coderd["status"], coderd["retry_after"]) == ("rate_limited", True, 429, 60.0)
    assert "You've been rate limited for sending more than 1 requests in 1m0s." in coderd["sentence"]


def test_check_bad_token_and_agentapi_unreachable(tmp_path: Path) -> None:
    with world(tmp_path) as w:
        env = check_env(w, "trio", AGENTD_TASK_ID=TASK, AGENTD_AGENTAPI_URL=f"http://127.0.0.1:{free_port()}")
        del env["CODER_AGENT_TOKEN_FILE"]
        env["CODER_AGENT_TOKEN"] = "wrong-" + TOKEN[::-1]
        done = agentd("check", env=env)
    assert done.returncode == 1
    lines = {x.split()[0]: x for x in done.stdout.splitlines() if x.startswith("  ") and x.split()[0] in ("agentapi", "coderd")}
    assert "FAIL" in lines["agentapi"] and "connection refused" in lines["agentapi"]
    assert "FAIL" in lines["coderd"] and "refused the agent token" in lines["coderd"]
    assert "wrong-" not in done.stdout and TOKEN[::-1] not in done.stdout


def test_check_bad_settings_exit_78_on_stderr(tmp_path: Path) -> None:
    env = clean_env(CODER_AGENT_URL="http://127.0.0.1:9", CODER_AGENT_TOKEN=TOKEN)
    done = agentd("check", env=env)
    assert done.returncode == 78
    assert done.stdout == "" and "AGENTD_TASK_ID" in done.stderr and "Traceback" not in done.stderr
    assert_token_absent(TOKEN, done.stdout, done.stderr)


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_logs_the_ready_line_at_start_up(tmp_path: Path, backend: str) -> None:
    with world(tmp_path) as w:
        env = check_env(
            w, backend, AGENTD_TASK_ID=TASK, AGENTD_STARTUP_PROBE="true", AGENTD_LOG_FORMAT="json",
            AGENTD_STATE_DIR=str(tmp_path / "state"), AGENTD_SOCKET=f"/tmp/agentd-check-{uuid.uuid4().hex[:8]}.sock",
        )
        log = tmp_path / "agentd.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "agentd", "run"], env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
        try:
            want = f"coderd: log-snapshot endpoint ready for task {TASK}"
            end = time.monotonic() + WAIT
            while time.monotonic() < end and not (want in log.read_text() and '"agentapi: reachable' in log.read_text()):
                assert proc.poll() is None, log.read_text()
                time.sleep(0.05)
            assert want in log.read_text()
            assert not w["store"].exists(), "the start-up probe stored a snapshot"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            Path(env["AGENTD_SOCKET"]).unlink(missing_ok=True)
        stored = json.loads(w["store"].read_text())
        assert len(stored[TASK]["messages"]) == 3  # the stop stored the conversation
    events = [e.get("event") for e in json_lines(log.read_text())]
    assert events.count(want) == 1 and any(str(e).startswith("agentapi: reachable") for e in events)
    assert_token_absent(TOKEN, log.read_text())


def test_resolved_settings_sources_and_the_token_never_shown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from support import drop_inherited

    from agentd.check import resolved_settings
    from agentd.settings import load_settings

    drop_inherited(monkeypatch)
    monkeypatch.setenv("CODER_AGENT_URL", "http://coder.example:8080")
    monkeypatch.setenv("AGENTD_TASK_ID", TASK)
    flags = {"agent_token": TOKEN, "max_messages": "5"}
    settings = load_settings(**flags)
    lines = {line.name: line for line in resolved_settings(settings, flags)}
    assert (lines["agent_token"].value, lines["agent_token"].source) == ("[REDACTED]", "flag")
    assert (lines["max_messages"].value, lines["max_messages"].source) == ("5", "flag")
    assert lines["coderd_url"].source == "environment" and lines["task_id"].source == "environment"
    assert lines["startup_probe"].source == "environment"  # the harness sets it
    assert (lines["agentapi_url"].value, lines["agentapi_url"].source) == ("http://localhost:3284", "default")
    assert_token_absent(TOKEN, json.dumps([line.as_dict() for line in lines.values()]))
    (tmp_path / "token").write_text(TOKEN)
    from_file = load_settings(agent_token_file=str(tmp_path / "token"))
    line = {x.name: x for x in resolved_settings(from_file, {"agent_token_file": str(tmp_path / "token")})}["agent_token"]
    assert (line.value, line.source, line.origin) == ("[REDACTED]", "file", str(tmp_path / "token"))
