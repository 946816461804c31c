"""Bad configuration: one line naming the setting, exit 78, no traceback, never the token."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from agentd.settings import ConfigError, load_settings

TOKEN = "tok-" + "s3cr3t" * 4
TASK = str(uuid.uuid4())


def agentd(*args, env=None, timeout=30):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "CODER_"))}
    return subprocess.run(
        [sys.executable, "-m", "agentd", *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


GOOD = {"CODER_AGENT_URL": "http://127.0.0.1:9", "CODER_AGENT_TOKEN": TOKEN, "AGENTD_TASK_ID": TASK}


@pytest.mark.parametrize(
    "change,named",
    [
        ({"CODER_AGENT_URL": None}, "CODER_AGENT_URL"),
        ({"CODER_AGENT_URL": "localhost:3000"}, "CODER_AGENT_URL"),
        ({"CODER_AGENT_TOKEN": None}, "CODER_AGENT_TOKEN"),
        ({"CODER_AGENT_TOKEN": None, "CODER_AGENT_TOKEN_FILE": "/nonexistent/token"}, "CODER_AGENT_TOKEN_FILE"),
        ({"AGENTD_TASK_ID": "not-a-uuid"}, "AGENTD_TASK_ID"),
        ({"AGENTD_MAX_BYTES": "70000"}, "AGENTD_MAX_BYTES"),
        ({"AGENTD_MAX_BYTES": "lots"}, "AGENTD_MAX_BYTES"),
        ({"AGENTD_MAX_MESSAGES": "0"}, "AGENTD_MAX_MESSAGES"),
        ({"AGENTD_SHUTDOWN_TIMEOUT": "-1"}, "AGENTD_SHUTDOWN_TIMEOUT"),
        ({"AGENTD_LOG_FORMAT": "xml"}, "AGENTD_LOG_FORMAT"),
        ({"AGENTD_AGENTAPI_URL": "ftp://x"}, "AGENTD_AGENTAPI_URL"),
    ],
)
def test_bad_setting_is_one_line_and_exit_78(change, named):
    env = {**GOOD, **{k: v for k, v in change.items() if v is not None}}
    for key, value in change.items():
        if value is None:
            env.pop(key)
    result = agentd("run", env=env)
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert "Traceback" not in result.stderr and TOKEN not in result.stderr + result.stdout



def test_flag_overrides_env(monkeypatch, tmp_path):
    for key, value in GOOD.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AGENTD_MAX_MESSAGES", "7")
    monkeypatch.setenv("AGENTD_STATE_DIR", str(tmp_path))
    assert load_settings().max_messages == 7
    assert load_settings(max_messages="4").max_messages == 4
    assert load_settings(coderd_url="http://127.0.0.1:1234/").coderd_url == "http://127.0.0.1:1234"


def test_token_file_is_read_and_wins(monkeypatch, tmp_path):
    for key, value in GOOD.items():
        monkeypatch.setenv(key, value)
    token_file = tmp_path / "token"
    token_file.write_text("from-file-token\n")
    monkeypatch.setenv("CODER_AGENT_TOKEN_FILE", str(token_file))
    settings = load_settings()
    assert settings.token == "from-file-token"
    assert "from-file-token" not in repr(settings) and TOKEN not in repr(settings)


def test_empty_token_file_is_refused(monkeypatch, tmp_path):
    for key, value in GOOD.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "token").write_text("  \n")
    monkeypatch.setenv("CODER_AGENT_TOKEN_FILE", str(tmp_path / "token"))
    with pytest.raises(ConfigError, match="CODER_AGENT_TOKEN_FILE"):
        load_settings()


def test_state_dir_follows_systemd(monkeypatch):
    for key, value in GOOD.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AGENTD_STATE_DIR", raising=False)
    monkeypatch.delenv("AGENTD_SOCKET", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/agentd:/var/lib/other")
    settings = load_settings()
    assert str(settings.state_dir) == "/var/lib/agentd"
    assert str(settings.socket) == "/var/lib/agentd/agentd.sock"
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/agentd")
    assert str(load_settings().socket) == "/run/agentd/agentd.sock"


def test_token_never_in_settings_errors(monkeypatch):
    monkeypatch.setenv("CODER_AGENT_TOKEN", TOKEN)
    monkeypatch.setenv("CODER_AGENT_URL", "nope")
    monkeypatch.setenv("AGENTD_TASK_ID", TASK)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert TOKEN not in str(info.value)


def test_every_problem_is_reported_at_once_in_plain_words(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith(("AGENTD_", "CODER_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AGENTD_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("AGENTD_SHUTDOWN_TIMEOUT", "0")
    monkeypatch.setenv("AGENTD_CHECKPOINT_INTERVAL", "soon")
    with pytest.raises(ConfigError) as info:
        load_settings(max_bytes="100")
    problems = info.value.problems
    assert problems == [
        "missing setting CODER_AGENT_URL (--coderd-url)",
        "missing setting AGENTD_TASK_ID (--task-id)",
        "AGENTD_MAX_BYTES (--max-bytes) must be at least 1024, got '100'",
        "AGENTD_SHUTDOWN_TIMEOUT (--shutdown-timeout) must be above 0, got '0'",
        "AGENTD_CHECKPOINT_INTERVAL (--checkpoint-interval) must be a number, got 'soon'",
        "missing setting CODER_AGENT_TOKEN (--agent-token), or CODER_AGENT_TOKEN_FILE (--agent-token-file)",
    ]
    assert str(info.value) == "; ".join(problems)


def test_a_bad_token_file_is_named_with_the_other_problems(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith(("AGENTD_", "CODER_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CODER_AGENT_TOKEN_FILE", str(tmp_path / "absent"))
    with pytest.raises(ConfigError) as info:
        load_settings(task_id=TASK)
    assert info.value.problems == [
        "missing setting CODER_AGENT_URL (--coderd-url)",
        f"CODER_AGENT_TOKEN_FILE (--agent-token-file): cannot read {tmp_path / 'absent'}: No such file or directory",
    ]


def test_the_socket_default_follows_the_state_dir(monkeypatch, tmp_path):
    for key, value in GOOD.items():
        monkeypatch.setenv(key, value)
    for key in ("AGENTD_SOCKET", "RUNTIME_DIRECTORY"):
        monkeypatch.delenv(key, raising=False)
    assert load_settings(state_dir=str(tmp_path)).socket == tmp_path / "agentd.sock"
    assert load_settings(state_dir=str(tmp_path), socket=str(tmp_path / "s")).socket == tmp_path / "s"


def test_every_setting_has_help_and_a_value_name_for_its_flag():
    from typing import get_args

    from agentd.settings import Settings

    for name, info in Settings.model_fields.items():
        assert info.description, name
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        assert extra.get("metavar") or get_args(info.annotation), name
