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
