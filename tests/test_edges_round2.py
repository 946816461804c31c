"""Regressions from a fresh-eyes review: closed standard streams, URLs coderd or agentapi can
never be at, a token file that is not a file, a control-socket path holding someone's file,
``nohup`` (SIGHUP ignored on purpose) and a supervised child's leftovers. Real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from support import clean_env, free_port, make_short_dir

TASK = str(uuid.uuid4())
TOKEN = "round2-" + uuid.uuid4().hex


def env_for(state: Path, **extra: str) -> dict[str, str]:
    dead = f"http://127.0.0.1:{free_port()}"
    return clean_env(
        CODER_AGENT_URL=dead, CODER_AGENT_TOKEN=TOKEN, AGENTD_TASK_ID=TASK, AGENTD_AGENTAPI_URL=dead,
        AGENTD_STATE_DIR=str(state), AGENTD_STARTUP_PROBE="false", AGENTD_LOG_FORMAT="json", **extra,
    )


def agentd(*args: str, env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentd", *args], env=env, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload]


def test_a_closed_stdout_is_a_normal_end(tmp_path: Path) -> None:
    env = env_for(tmp_path / "state")
    done = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -m agentd status >&-'], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3, done.stderr  # no daemon: 3, as with an open stdout
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr


def test_urls_that_cannot_be_a_server_are_settings_errors(tmp_path: Path) -> None:
    for flag, url in (("--agentapi-url", "http://127.0.0.1:99999"), ("--coderd-url", "http://127.0.0.1:8080/?x=1")):
        done = agentd("check", flag, url, env=env_for(tmp_path / "state"))
        assert done.returncode == 78, done.stdout + done.stderr
        assert "Traceback" not in done.stderr and flag in done.stderr


def test_a_token_file_that_is_not_a_file_is_refused_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    done = agentd("check", "--agent-token-file", "/dev/zero", env=env_for(tmp_path / "state"))
    assert done.returncode == 78 and "CODER_AGENT_TOKEN_FILE" in done.stderr and "not a regular file" in done.stderr
    assert time.monotonic() - started < 50  # read neither forever nor into memory


def test_a_socket_path_holding_a_file_leaves_the_file_alone(tmp_path: Path) -> None:
    short = make_short_dir()
    try:
        victim = short / "victim.txt"
        victim.write_text("important\n")
        log = short / "agentd.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agentd", "run", "--socket", str(victim)], env=env_for(short / "state"),
                stdout=subprocess.DEVNULL, stderr=out,
            )
        deadline = time.monotonic() + 60  # the socket is tried before "agentd started"
        while time.monotonic() < deadline and "agentd started" not in log.read_text():
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        err = log.read_text()
        assert victim.read_text() == "important\n" and victim.is_file()
        assert "is not a socket" in err
    finally:
        subprocess.run(["rm", "-rf", str(short)], check=False)


def test_nohup_keeps_sighup_ignored_and_sigterm_still_stops(tmp_path: Path) -> None:
    short = make_short_dir()
    try:
        env = env_for(short / "state", AGENTD_SOCKET=str(short / "agentd.sock"))
        proc = subprocess.Popen(
            ["nohup", sys.executable, "-m", "agentd", "run"], env=env, cwd=short,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (short / "agentd.sock").exists():
            time.sleep(0.05)
        assert (short / "agentd.sock").exists(), "the daemon did not start"
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # long enough for a SIGHUP that counted to begin the stop
        assert proc.poll() is None, "SIGHUP stopped a daemon started under nohup"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        subprocess.run(["rm", "-rf", str(short)], check=False)


def test_supervise_kills_what_the_child_left_in_its_session(tmp_path: Path) -> None:
    short = make_short_dir()
    pid_file = short / "sleeper.pid"
    try:
        env = env_for(short / "state", AGENTD_SOCKET=str(short / "agentd.sock"), AGENTD_SHUTDOWN_TIMEOUT="4",
                      AGENTD_CHILD_STOP_TIMEOUT="2")
        child = f'trap "" TERM INT HUP; sleep 300 & echo $! > {pid_file}; wait'
        proc = subprocess.Popen([sys.executable, "-m", "agentd", "supervise", "--", "sh", "-c", child], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (pid_file.exists() and pid_file.read_text().strip()):
            time.sleep(0.05)
        sleeper = int(pid_file.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGKILL
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{sleeper}").exists():
            state = Path(f"/proc/{sleeper}/stat").read_text().split()[2] if Path(f"/proc/{sleeper}/stat").exists() else "X"
            if state == "Z":
                break
            time.sleep(0.05)
        alive = Path(f"/proc/{sleeper}/stat").exists() and Path(f"/proc/{sleeper}/stat").read_text().split()[2] != "Z"
        if alive:
            os.kill(sleeper, signal.SIGKILL)
        assert not alive, "the child's leftover sleep outlived agentd supervise"
    finally:
        subprocess.run(["rm", "-rf", str(short)], check=False)


def test_snapshot_names_agentapis_host_allow_list_instead_of_an_empty_conversation(tmp_path: Path) -> None:
    """agentapi refuses agentd's Host: `agentd snapshot` (through the daemon) says so and names the
    fix, rather than "the conversation is empty"."""
    short = make_short_dir()
    port = free_port()
    api = subprocess.Popen(
        [sys.executable, "-m", "agentd.testing.fake_agentapi", "--port", str(port), "--messages", "3",
         "--allowed-hosts", "agentapi.example"],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    daemon = None
    try:
        assert api.stdout is not None and "listening on" in api.stdout.readline()
        env = env_for(short / "state", AGENTD_SOCKET=str(short / "agentd.sock"))
        env["AGENTD_AGENTAPI_URL"] = f"http://127.0.0.1:{port}"
        daemon = subprocess.Popen([sys.executable, "-m", "agentd", "run"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            shown = agentd("status", "--json", env=env)
            if shown.returncode == 0 and '"problem": null' not in shown.stdout and "allowed-hosts" in shown.stdout:
                line = agentd("snapshot", "--timeout", "5", env=env).stdout
                break
            time.sleep(0.2)
        assert "--allowed-hosts" in line and "the conversation is empty" not in line, line
    finally:
        for proc in (daemon, api):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        subprocess.run(["rm", "-rf", str(short)], check=False)
