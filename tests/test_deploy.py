"""Deployment files: the systemd unit, its environment file, the Dockerfile and .dockerignore.

The systemd checks run the real ``systemd-analyze`` (skipped where it is not installed):

* ``systemd-analyze security --offline=yes`` must rate the unit 1.5 or lower.
* ``systemd-analyze verify`` must find nothing wrong *in the unit itself*. It also checks that
  ExecStart's binary exists, which it does not on a development machine (the unit points at the
  installed path, /usr/local/bin/agentd). So the unit is verified as a copy whose ExecStart
  binary is replaced by one that exists; everything else is byte-for-byte the same. A second test
  verifies the real file and accepts only that one "not executable" complaint, and a third
  proves the method can see problems at all by planting an unknown directive.

The Dockerfile is built and run for real, and the unit booted under a real systemd, by
``make deploy-test`` (``deploy/deploy_test.py``; as root on Debian, and in CI after ``make
test``). The checks here are the static half, so a broken deployment file shows up in ``make
test`` too, on any machine; the last ones check that script's own parts and its skip path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "agentd.service"
ENV_EXAMPLE = ROOT / "systemd" / "agentd.env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"
DEPLOY_TEST = ROOT / "deploy" / "deploy_test.py"
IMAGE_UID = "10001"
# `agentd status` took up to 4 s on a busy 2-core machine (make deploy-test prints it): a probe
# timeout must leave a wide margin above that.
MIN_PROBE_TIMEOUT = 10.0

MAX_EXPOSURE = 1.5
DOCKER_STOP_TIMEOUT = 10.0  # `docker stop` default: SIGKILL 10 s after STOPSIGNAL
CODE_DEFAULT_SHUTDOWN_TIMEOUT = 8.0  # agentd's built-in AGENTD_SHUTDOWN_TIMEOUT
STOP_SLACK = 5.0  # seconds between the end of agentd's own budget and systemd's SIGKILL

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd); "
    "the unit's security score and `verify` cannot be checked on this machine",
)


# ---- parsing helpers ---------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit file -> {section: {key: [values in order]}} (comments and continuations)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


_TIMESPAN_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
}  # fmt: skip


def timespan(value: str) -> float:
    """A systemd (or Docker) time span such as ``30``, ``30s``, ``1min 30s``, ``500ms`` -> s."""
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)  # systemd: a bare number is seconds
    total, pos = 0.0, 0
    for match in re.finditer(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)", value):
        assert match.start() == pos, f"bad time span {value!r}"
        assert match.group(2) in _TIMESPAN_UNITS, f"unknown unit in {value!r}"
        total += float(match.group(1)) * _TIMESPAN_UNITS[match.group(2)]
        pos = match.end()
    assert pos == len(value) and pos > 0, f"bad time span {value!r}"
    return total


def env_file_values(text: str, *, include_commented: bool) -> dict[str, str]:
    """KEY=VALUE lines of an EnvironmentFile; with include_commented also ``#KEY=VALUE`` ones."""
    pattern = r"^\s*{}([A-Z][A-Z0-9_]*)=(.*)$".format(r"#?\s*" if include_commented else "")
    return {m.group(1): m.group(2).strip() for m in re.finditer(pattern, text, re.MULTILINE)}


def unit_environment(unit: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in unit["Service"].get("Environment", []):
        for word in shlex.split(value):
            key, _, val = word.partition("=")
            env[key] = val
    return env


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (and parser directives) may sit inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line, pending = (pending + stripped).strip(), ""
        if line:
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1] :]


def docker_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in stage:
        if word != "ENV":
            continue
        if "=" not in args.split()[0]:  # legacy form: ENV KEY value
            key, _, value = args.partition(" ")
            env[key] = value.strip()
            continue
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def docker_flags(args: str) -> tuple[dict[str, str], str]:
    """``--interval=30s --timeout=5s CMD [...]`` -> ({"interval": "30s", ...}, "CMD [...]")."""
    flags: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        key, _, value = flag[2:].partition("=")
        flags[key] = value
        rest = rest.lstrip()
    return flags, rest


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def service(unit: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    return unit["Service"]


@pytest.fixture(scope="module")
def env_example() -> str:
    return ENV_EXAMPLE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def docker() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))


def last(service: dict[str, list[str]], key: str) -> str:
    assert key in service, f"{key}= is not set in {UNIT.name}"
    return service[key][-1]


def shutdown_timeouts(unit: dict[str, dict[str, list[str]]], env_example: str) -> dict[str, float]:
    """Every AGENTD_SHUTDOWN_TIMEOUT the service can end up with: the code's default, the unit's
    Environment= and the env example's value (commented or not)."""
    found = {"agentd default": CODE_DEFAULT_SHUTDOWN_TIMEOUT}
    if "AGENTD_SHUTDOWN_TIMEOUT" in unit_environment(unit):
        found["unit Environment="] = float(unit_environment(unit)["AGENTD_SHUTDOWN_TIMEOUT"])
    example = env_file_values(env_example, include_commented=True)
    assert "AGENTD_SHUTDOWN_TIMEOUT" in example, "the env example must document the timeout"
    found["agentd.env.example"] = float(example["AGENTD_SHUTDOWN_TIMEOUT"])
    return found


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=120,
    )


def verify_copy(tmp_path: Path, *, extra_service_lines: str = "") -> tuple[int, list[str]]:
    """Verify a copy of the unit whose ExecStart binary exists; return (rc, lines about it)."""
    stand_in = shutil.which("true") or "/bin/true"
    text = UNIT.read_text(encoding="utf-8")
    text, count = re.subn(
        r"^(ExecStart=[-@:+!]*)(\S+)", lambda m: m.group(1) + stand_in, text, flags=re.MULTILINE
    )
    assert count == 1, "expected exactly one ExecStart= line"
    if extra_service_lines:
        text = text.replace("[Service]\n", "[Service]\n" + extra_service_lines, 1)
    copy = tmp_path / UNIT.name  # same name: verify uses it as the unit name
    copy.write_text(text, encoding="utf-8")
    proc = run_analyze("verify", "--man=no", str(copy))
    output = (proc.stdout + proc.stderr).splitlines()
    ours = [line for line in output if UNIT.name in line]
    return proc.returncode, ours if proc.returncode == 0 else output


# ---- systemd-analyze ---------------------------------------------------------------------------


@needs_systemd_analyze
def test_security_exposure_at_most_1_5() -> None:
    proc = run_analyze("security", "--offline=yes", "--no-pager", str(UNIT))
    if proc.returncode != 0 and "offline" in proc.stderr:
        pytest.skip(f"systemd-analyze too old for --offline (needs systemd >= 250): {proc.stderr}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, f"no exposure line in output:\n{proc.stdout}\n{proc.stderr}"
    exposure = float(match.group(1))
    flagged = [line for line in proc.stdout.splitlines() if line.startswith("✗")]
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n" + "\n".join(flagged)


@needs_systemd_analyze
def test_verify_finds_nothing_wrong_in_the_unit(tmp_path: Path) -> None:
    rc, complaints = verify_copy(tmp_path)
    assert rc == 0 and not complaints, "systemd-analyze verify:\n" + "\n".join(complaints)


@needs_systemd_analyze
def test_verify_of_the_real_file_only_misses_the_binary() -> None:
    """On a machine without agentd installed the only complaint is the missing ExecStart binary
    (and agentapi.service being absent is not a complaint at all: After= only orders)."""
    proc = run_analyze("verify", "--man=no", str(UNIT))
    exec_start = parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]["ExecStart"][-1]
    binary = shlex.split(exec_start)[0]
    about_unit = [line for line in (proc.stdout + proc.stderr).splitlines() if UNIT.name in line]
    expected = f"Command {binary} is not executable"
    if Path(binary).is_file() and os.access(binary, os.X_OK):
        assert proc.returncode == 0 and not about_unit, "\n".join(about_unit)
    else:
        unexpected = [line for line in about_unit if expected not in line]
        assert not unexpected, "\n".join(unexpected)


@needs_systemd_analyze
def test_verify_method_does_report_unit_problems(tmp_path: Path) -> None:
    """The filter above is not vacuous: a planted mistake shows up in the same check."""
    _, complaints = verify_copy(tmp_path, extra_service_lines="NoSuchDirective=1\nWatchdogSec=x\n")
    text = "\n".join(complaints)
    assert any("NoSuchDirective" in line for line in complaints), text
    assert any("parse" in line.lower() and "ignoring" in line for line in complaints), text


# ---- the unit's contract with agentd -----------------------------------------------------------


def test_unit_is_a_notify_service_with_watchdog(service: dict[str, list[str]]) -> None:
    assert last(service, "Type") == "notify"
    assert last(service, "NotifyAccess") == "main"
    assert timespan(last(service, "WatchdogSec")) > 0


def test_execstart_runs_agentd_run(service: dict[str, list[str]]) -> None:
    argv = shlex.split(last(service, "ExecStart"))
    assert Path(argv[0]).is_absolute() and Path(argv[0]).name == "agentd"
    assert not argv[0].startswith(("/home/", "/root/")), "ProtectHome= would hide the binary"
    assert argv[1:] == ["run"]


def test_stop_timeout_leaves_room_for_the_final_upload(
    unit: dict[str, dict[str, list[str]]], env_example: str
) -> None:
    stop = timespan(last(unit["Service"], "TimeoutStopSec"))
    for where, value in shutdown_timeouts(unit, env_example).items():
        assert stop >= value + STOP_SLACK, (
            f"TimeoutStopSec={stop:g}s leaves less than {STOP_SLACK:g}s after "
            f"AGENTD_SHUTDOWN_TIMEOUT={value:g} ({where})"
        )


def test_ordered_to_stop_before_agentapi_and_the_network(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    after = " ".join(unit["Unit"].get("After", [])).split()
    wants = " ".join(unit["Unit"].get("Wants", [])).split()
    assert "agentapi.service" in after
    assert "network-online.target" in after and "network-online.target" in wants
    requires = " ".join(unit["Unit"].get("Requires", []) + unit["Unit"].get("BindsTo", [])).split()
    assert "agentapi.service" not in requires, "agentd must start (and wait) without agentapi"


def test_token_comes_from_a_credential(service: dict[str, list[str]]) -> None:
    creds = service.get("LoadCredential", []) + service.get("LoadCredentialEncrypted", [])
    assert any(value.startswith("agent-token:") for value in creds), creds
    env = unit_environment({"Service": service})
    assert env.get("CODER_AGENT_TOKEN_FILE") == "%d/agent-token"
    assert "CODER_AGENT_TOKEN" not in env
    assert last(service, "EnvironmentFile") == "-/etc/agentd/agentd.env"


def test_restart_policy(service: dict[str, list[str]]) -> None:
    assert last(service, "Restart") == "on-failure"
    assert "78" in " ".join(service.get("RestartPreventExitStatus", [])).split()


def test_state_and_runtime_directories(service: dict[str, list[str]]) -> None:
    assert last(service, "StateDirectory") == "agentd"
    assert last(service, "RuntimeDirectory") == "agentd"
    assert last(service, "RuntimeDirectoryMode") == "0700"
    assert last(service, "ProtectSystem") == "strict"


def test_sandbox_still_reaches_agentapi_and_any_coderd(service: dict[str, list[str]]) -> None:
    families = " ".join(service.get("RestrictAddressFamilies", [])).split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families) and "~" not in "".join(families)
    assert service.get("PrivateNetwork", ["no"])[-1] in ("no", "false", "0", "off")
    denied = " ".join(service.get("IPAddressDeny", [])).split()
    assert not {"any", "0.0.0.0/0", "::/0"} & set(denied), "coderd may be any host"
    assert "@network-io" not in " ".join(service.get("SystemCallFilter", []))


def test_env_example_documents_every_setting_but_holds_no_token(env_example: str) -> None:
    active = env_file_values(env_example, include_commented=False)
    assert "CODER_AGENT_TOKEN" not in active, "the token belongs in the credential, not here"
    documented = env_file_values(env_example, include_commented=True)
    names = {
        "CODER_AGENT_URL", "AGENTD_TASK_ID", "AGENTD_AGENTAPI_URL", "AGENTD_MAX_MESSAGES",
        "AGENTD_MAX_BYTES", "AGENTD_SHUTDOWN_TIMEOUT", "AGENTD_STATE_DIR", "AGENTD_LOG_FORMAT",
        "AGENTD_LOG_LEVEL", "AGENTD_CHECKPOINT_INTERVAL",
    }  # fmt: skip
    assert names <= documented.keys(), sorted(names - documented.keys())
    for name in documented:
        assert re.search(rf"#[^\n]*\n#?\s*{name}=", env_example) or name == "CODER_AGENT_TOKEN", (
            f"{name} has no explanation above it"
        )


def test_env_example_matches_the_settings_code(env_example: str) -> None:
    """Every environment variable agentd reads is documented in the example."""
    settings = pytest.importorskip("agentd.settings")
    names = getattr(settings, "ENV_NAMES", None)
    if not isinstance(names, dict):
        pytest.skip("agentd.settings.ENV_NAMES not available")
    documented = env_file_values(env_example, include_commented=True)
    missing = sorted(set(names.values()) - documented.keys())
    assert not missing, f"not documented in {ENV_EXAMPLE.name}: {missing}"


# ---- Dockerfile --------------------------------------------------------------------------------


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str | None]:
    """ARG lines -> {name: default or None}."""
    out: dict[str, str | None] = {}
    for word, rest in instructions:
        if word == "ARG":
            name, sep, value = rest.partition("=")
            out[name.strip()] = value.strip() if sep else None
    return out


def test_dockerfile_is_multi_stage_venv_then_copy(docker: list[tuple[str, str]]) -> None:
    """Build stage: a venv under /opt/agentd; final stage: only that venv, copied (no wheels
    left in a layer, no pip, no registry access)."""
    froms = [args for word, args in docker if word == "FROM"]
    assert len(froms) >= 2, froms
    global_args = dockerfile_args(docker[: next(i for i, (w, _) in enumerate(docker) if w == "FROM")])
    assert global_args.get("BASE_IMAGE") == "python:3.11-slim", global_args
    assert froms[0].split()[0] == froms[-1].split()[0] == "${BASE_IMAGE}", "both stages share the base"
    stage = final_stage(docker)
    build_stages = docker[: len(docker) - len(stage)]
    build_runs = " ".join(a for w, a in build_stages if w == "RUN")
    assert "-m venv /opt/agentd" in build_runs and "pip install ." in build_runs
    assert not any(w == "RUN" and "pip install" in a for w, a in stage), "no pip in the final stage"
    copies = [a for w, a in stage if w == "COPY"]
    assert copies == ["--from=build /opt/agentd /opt/agentd"], copies
    assert "/tmp/wheels" not in " ".join(a for _, a in stage)
    assert "/opt/agentd/bin" in docker_env(stage)["PATH"].split(":")[0]


def test_dockerfile_has_no_syntax_directive() -> None:
    """``# syntax=`` makes BuildKit fetch a frontend image from Docker Hub: offline builds fail."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE)


def test_dockerfile_build_args_reach_the_build_stage_only(docker: list[tuple[str, str]]) -> None:
    stage = final_stage(docker)
    build_args = dockerfile_args(docker[: len(docker) - len(stage)])
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "EXTRA_CA"):
        assert name in build_args, f"ARG {name} missing from the build stage"
    assert not dockerfile_args(stage), "the final stage must not see the index URLs or the CA"
    runs = " ".join(a for w, a in docker if w == "RUN")
    assert "update-ca-certificates" in runs and "PIP_CERT=" in runs


def test_dockerfile_runs_as_non_root(docker: list[tuple[str, str]]) -> None:
    users = [args for word, args in final_stage(docker) if word == "USER"]
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert user.isdigit(), "a numeric UID lets Kubernetes' runAsNonRoot verify it"


def test_dockerfile_uses_tini_exec_form_without_group_kill(docker: list[tuple[str, str]]) -> None:
    stage = final_stage(docker)
    assert any(w == "RUN" and "apt-get install" in a and "tini" in a for w, a in stage)
    entry = [args for word, args in stage if word == "ENTRYPOINT"][-1]
    argv = json.loads(entry)  # exec form: a JSON array, no shell in between
    assert Path(argv[0]).name == "tini" and argv[1:] == ["--", "agentd"], argv
    cmd = json.loads([args for word, args in stage if word == "CMD"][-1])
    assert cmd == ["run"]


def test_dockerfile_stop_signal_and_timeout_fit_docker_stop(docker: list[tuple[str, str]]) -> None:
    stage = final_stage(docker)
    assert [a for w, a in stage if w == "STOPSIGNAL"][-1] in ("SIGTERM", "15")
    timeout = float(docker_env(stage)["AGENTD_SHUTDOWN_TIMEOUT"])
    assert timeout + 1 <= DOCKER_STOP_TIMEOUT, f"{timeout}s does not fit docker stop's 10 s"


def test_dockerfile_healthcheck_is_agentd_status(docker: list[tuple[str, str]]) -> None:
    checks = [args for word, args in final_stage(docker) if word == "HEALTHCHECK"]
    assert checks, "no HEALTHCHECK"
    flags, rest = docker_flags(checks[-1])
    assert rest.startswith("CMD ")
    assert json.loads(rest[4:]) == ["agentd", "status"]
    interval = timespan(flags.get("interval", "30s"))
    timeout = timespan(flags.get("timeout", "30s"))
    assert MIN_PROBE_TIMEOUT <= timeout < interval <= 120


def test_dockerfile_state_dir_is_writable_by_the_user(docker: list[tuple[str, str]]) -> None:
    stage = final_stage(docker)
    env = docker_env(stage)
    assert env.get("AGENTD_STATE_DIR") == "/var/lib/agentd"
    runs = " ".join(a for w, a in stage if w == "RUN")
    assert re.search(r"(install -d -o \S+|chown \S+)[^&;]*/var/lib/agentd", runs), runs


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    assert DOCKERIGNORE.is_file()
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for needed in (".git", ".venv"):
        assert needed in patterns, f"{needed} should be excluded"
    for source in ("pyproject.toml", "agentd", "agentd/", "*"):
        assert source not in patterns, f"{source} is needed to build the wheel"


# ---- README: the Docker and Kubernetes forms -------------------------------------------------


def readme_sh_block(after: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.compile(r"```sh\n(.*?)```", re.DOTALL).search(text, text.index(after))
    assert match, f"no sh block after {after!r}"
    return match.group(1).replace("\\\n", " ")


@pytest.mark.parametrize("form", ["As a **sidecar**", "As the **entrypoint"])
def test_readme_docker_token_is_readable_by_the_image_user(form: str) -> None:
    """The systemd steps leave /etc/agentd/agent-token root:root 0600, which uid 10001 cannot
    read (agentd exits 78): the container mounts a copy owned by, or group-readable for, 10001."""
    sidecar = readme_sh_block("As a **sidecar**")
    install = re.search(r"install (.*) /etc/agentd/agent-token (\S+)", sidecar)
    assert install, sidecar
    flags, copy = install.group(1), install.group(2)
    owner = re.search(r"-o (\S+)", flags)
    group = re.search(r"-g (\S+)", flags)
    mode = int(re.search(r"-m (\d+)", flags).group(1), 8)  # type: ignore[union-attr]
    readable = (owner and owner.group(1) == IMAGE_UID and mode & 0o400) or (group and group.group(1) == IMAGE_UID and mode & 0o040)
    assert readable, flags
    mounts = re.findall(r"-v (\S+):/run/secrets/agent-token:ro", readme_sh_block(form))
    assert mounts == [copy], (mounts, copy)


def test_readme_kubernetes_probes_have_timeouts() -> None:
    text = README.read_text(encoding="utf-8")
    probes = re.findall(r"^\s*(startupProbe|livenessProbe|readinessProbe):\s*(\{.*\})\s*$", text, re.MULTILINE)
    assert {name for name, _ in probes} >= {"startupProbe", "livenessProbe"}, probes
    for name, body in probes:
        timeout = re.search(r"timeoutSeconds:\s*(\d+)", body)
        assert timeout, f"{name} has no timeoutSeconds (Kubernetes' default is 1 s)"
        assert int(timeout.group(1)) >= MIN_PROBE_TIMEOUT, f"{name}: timeoutSeconds {timeout.group(1)}"


# ---- make deploy-test: its wiring, its README parsing and its skip path ------------------------


@pytest.fixture(scope="module")
def deploy_test() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_test", DEPLOY_TEST)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_ci_runs_deploy_test_after_make_test() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^deploy-test:.*\n\t.*deploy/deploy_test\.py", makefile, re.MULTILINE)
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    test_at = lines.index("make test")
    assert any("make deploy-test" in line for line in lines[test_at + 1 :]), lines


def test_deploy_test_splits_the_readme_blocks_it_runs(deploy_test: ModuleType) -> None:
    up, down = deploy_test.split_stop(deploy_test.readme_block("As a **sidecar**"))
    assert "docker run -d --name agentd" in up and "docker stop" not in up
    assert down.splitlines()[-1] == "docker stop agentd && docker stop agentapi"
    up, down = deploy_test.split_stop(deploy_test.readme_block("As the **entrypoint"))
    assert "supervise -- agentapi server" in up and down.strip() == "docker stop task"


def test_deploy_test_reads_the_stand_in_agentapi_signal_log(deploy_test: ModuleType) -> None:
    log = "SIGUSR1 1700000000.5\nSIGTERM 1700000001.25\nSIGTERM 1700000009.0\n"
    assert deploy_test.parse_signal_log(log) == {"SIGUSR1": 1700000000.5, "SIGTERM": 1700000001.25}


def test_deploy_test_skips_in_one_line_when_not_root(tmp_path: Path) -> None:
    """Not root: one SKIPPED line, exit 0, and nothing installed or started."""
    argv = [sys.executable, str(DEPLOY_TEST)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop to a user")
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and "SKIPPED" in lines[0] and "root" in lines[0], proc.stdout + proc.stderr
