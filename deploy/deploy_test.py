#!/usr/bin/env python3
"""``make deploy-test``: build and run the Docker image, and boot the systemd unit under systemd.

What it proves, on a Debian machine where it runs as root (CI's machine):

* **Docker.** Debian's docker.io engine, started here (``dockerd --storage-driver=overlay2``,
  ``vfs`` if overlay2 cannot run; ``--bridge=none``: every scenario's containers share one
  private network namespace, so nothing takes a host port). The base image is a Debian bookworm
  debootstrap with python3, pip and venv, imported as ``python:3.11-slim`` (Docker Hub is not
  reachable from CI). ``docker build --network host`` with the Dockerfile's build args: the
  machine's extra CA certificates (``EXTRA_CA``) and the package index (``PIP_INDEX_URL``).
  Then the README's sidecar and entrypoint forms, run as the README writes them (its ``sh``
  blocks are read from README.md and executed, with ``/etc/agentd/`` moved into the test's work
  directory and ``sudo`` dropped): uid 10001, tini as PID 1, healthy, ``docker stop`` stores
  the snapshot and exits 0, ``supervise`` stores before its child gets SIGTERM.
* **systemd.** A second debootstrap with systemd, booted with ``systemd-nspawn --boot
  --register=no --keep-unit``; commands run inside with ``nsenter -t <leader> -a -- env -i``.
  The README's install steps, then: ``systemd-analyze verify`` and ``security`` (<= 1.5), active
  through READY=1, ``STATUS=`` text, the token as a credential, ``journalctl -p warning``,
  ``systemctl stop agentd agentapi`` storing before the stand-in agentapi unit gets SIGTERM, and
  the watchdog restarting a frozen agentd, which restores its buffer.

The stand-ins are agentd's own (``agentd.testing.fake_agentapi`` / ``fake_coderd``): a finished
13-message session with a 64 KiB reply, and a coderd that checks the agent token and the body.

Where it cannot run (not root, not Debian, no apt-get, the Debian archive unreachable) it
prints one ``SKIPPED`` line and exits 0. Otherwise every check prints PASS, FAIL, XFAIL
(expected to fail, with the reason) or XPASS, and the exit status is 1 if any check failed.
Everything it starts (dockerd, containers, the nspawn machine, stand-ins) is stopped, and its
work directory removed, on every exit path, Ctrl-C and SIGTERM included.

The debootstrap root file systems are cached in ``/var/cache/agentd-deploy-test`` (or
``$AGENTD_DEPLOY_TEST_CACHE``), keyed by a hash of what goes into them; each run works on a
fresh copy. ``AGENTD_DEPLOY_TEST_KEEP=1`` keeps the work directory for a post-mortem.

Runs with Python >= 3.11 that can import agentd (the project's .venv): the host-side coderd
stand-in of the systemd part is ``python -m agentd.testing.fake_coderd``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
README = ROOT / "README.md"

SUITE = "bookworm"
MIRROR = os.environ.get("AGENTD_DEPLOY_TEST_MIRROR", "http://deb.debian.org/debian")
CACHE = Path(os.environ.get("AGENTD_DEPLOY_TEST_CACHE", "/var/cache/agentd-deploy-test"))
HOST_PACKAGES = ["docker.io", "containerd", "runc", "iptables", "debootstrap", "systemd-container"]
# The docker base stands in for python:3.11-slim: python3 with pip and venv, CA certificates.
BASE_PACKAGES = ["python3", "python3-pip", "python3-venv", "ca-certificates"]
# The systemd guest: systemd as PID 1, and what the README's install steps need.
GUEST_PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates"]
BASE_IMAGE = "python:3.11-slim"  # the Dockerfile's default BASE_IMAGE
IMAGE = "agentd"  # the README's `docker build -t agentd .`
AGENT_IMAGE = "my-agent-image"  # the README's entrypoint form
DOCKER = "/usr/bin/docker"  # Debian's client, matching its engine (not another one on PATH)
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CODERD_PORT_IN_NETNS = 7080  # the coderd stand-in inside a scenario's private network namespace
MAX_EXPOSURE = 1.5
DOCKER_STOP_BUDGET = 10.0  # `docker stop`'s default: SIGKILL 10 s after SIGTERM
WATCHDOG_TEST_SEC = 10  # the watchdog check's drop-in (the unit's own WatchdogSec= is 30 s)


class Skip(Exception):
    """This machine cannot run the deploy test; the text says why in one line."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP: unwind through every cleanup."""


# ---- output --------------------------------------------------------------------------------------


def say(text: str) -> None:
    sys.stdout.write(f"deploy-test │ {text}\n")  # one write: the two debootstrap threads may both talk
    sys.stdout.flush()


@dataclass
class Check:
    name: str
    status: str  # PASS FAIL XFAIL XPASS SKIP
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    phases: list[tuple[str, float]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "", *, xfail: str | None = None, skip: bool = False) -> bool:
        if skip:
            status = "SKIP"
        elif xfail is None:
            status = "PASS" if ok else "FAIL"
        else:
            status = "XPASS" if ok else "XFAIL"
            detail = f"{detail} [expected to fail: {xfail}]" if detail else f"[expected to fail: {xfail}]"
        self.checks.append(Check(name, status, detail))
        say(f"{status:5} {name}" + (f": {detail}" if detail else ""))
        return ok

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        say(f"---- {name}")
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases.append((name, time.monotonic() - start))

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAIL"]


# ---- processes -----------------------------------------------------------------------------------


class CommandFailed(Exception):
    pass


@dataclass
class Runner:
    """Runs commands, logging each with its output to ``log``; ``stop_all`` ends those still
    running (on an interrupt, from another thread)."""

    log: Path
    live: set[subprocess.Popen[str]] = field(default_factory=set)

    def __call__(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 600,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        start = time.monotonic()
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", env=env, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
        self.live.add(proc)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            self._write(argv, None, f"TIMEOUT after {timeout:g} s\n{out}{err}", start)
            raise CommandFailed(f"{shlex.join(argv)[:200]}: no answer within {timeout:g} s") from None
        finally:
            self.live.discard(proc)
        self._write(argv, proc.returncode, out + err, start)
        if check and proc.returncode != 0:
            tail = (out + err).strip().splitlines()[-15:]
            raise CommandFailed(f"{shlex.join(argv)[:200]} exited {proc.returncode}:\n  " + "\n  ".join(tail))
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def stop_all(self) -> None:
        for proc in list(self.live):
            _kill_group(proc)

    def _write(self, argv: Sequence[str], rc: int | None, output: str, start: float) -> None:
        with self.log.open("a", encoding="utf-8") as f:
            f.write(f"$ {shlex.join(argv)[:2000]}\n{output[-20000:]}")
            f.write(f"[rc={rc} after {time.monotonic() - start:.1f} s]\n\n")


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def kill_strays(marker: str) -> None:
    """SIGKILL every process whose command line mentions ``marker`` (the work directory: only
    what this run started, e.g. containerd and its shims if dockerd could not stop them)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker in cmdline.read_bytes().decode(errors="replace") and int(cmdline.parent.name) != os.getpid():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)


def unmount_under(path: Path) -> None:
    """Lazily unmount everything mounted at or below ``path``, deepest first (debootstrap mounts
    /proc and /sys in its target; an interrupted one leaves them)."""
    prefix = str(path)
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m == prefix or m.startswith(prefix + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)


def remove_tree(path: Path) -> None:
    unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)


def stop_process(proc: subprocess.Popen[Any], grace: float = 20) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise CommandFailed after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CommandFailed(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- preflight -----------------------------------------------------------------------------------


def preflight(run: Runner) -> None:
    if sys.platform != "linux":
        raise Skip("not Linux")
    if os.geteuid() != 0:
        raise Skip("needs root (it installs Debian packages, runs dockerd and systemd-nspawn)")
    if not Path("/etc/debian_version").is_file() or shutil.which("apt-get") is None:
        raise Skip("needs Debian with apt-get")
    try:
        with urllib.request.urlopen(f"{MIRROR}/dists/{SUITE}/Release", timeout=60) as answer:
            answer.read(64)
    except OSError as exc:
        raise Skip(f"the Debian archive {MIRROR} is not reachable ({exc})") from None
    missing = [p for p in HOST_PACKAGES if run(["dpkg-query", "-W", "-f=${Status}", p], check=False).stdout != "install ok installed"]
    if missing:
        say(f"installing from Debian's archive: {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-q"], env=env, timeout=900)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env, timeout=1800)


# ---- root file systems ---------------------------------------------------------------------------


def rootfs(run: Runner, name: str, packages: list[str]) -> Path:
    """A cached debootstrap of SUITE with ``packages`` (built once per package list)."""
    recipe = {"suite": SUITE, "variant": "minbase", "mirror": MIRROR, "packages": sorted(packages), "recipe": 1}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    target = CACHE / f"{name}-{key}"
    if (target / ".complete").is_file():
        say(f"{name} root file system: cached ({target})")
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    for stale in CACHE.glob(f"{name}-*"):
        if stale != target:
            remove_tree(stale)
    building = CACHE / f"{name}-{key}.building.{os.getpid()}"
    start = time.monotonic()
    try:
        run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(building), MIRROR], timeout=2400)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (building / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        (building / ".complete").write_text(json.dumps(recipe) + "\n")
        remove_tree(target)
        building.rename(target)
    finally:
        remove_tree(building)
    say(f"{name} root file system: debootstrap took {time.monotonic() - start:.0f} s ({target})")
    return target


def extra_ca_pem() -> str:
    return "".join(p.read_text(encoding="utf-8") for p in sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt")))


# ---- Docker --------------------------------------------------------------------------------------


class Docker:
    def __init__(self, run: Runner, work: Path) -> None:
        self.run = run
        self.dir = work / "docker"
        self.dir.mkdir()
        self.sock = self.dir / "docker.sock"
        self.env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",  # Debian's docker client first
            "DOCKER_HOST": f"unix://{self.sock}",
            "DOCKER_BUILDKIT": "1",
            "HOME": str(work),
            "LANG": "C.UTF-8",
        }
        self.proc: subprocess.Popen[Any] | None = None
        self.driver = ""

    def start(self) -> None:
        for driver in ("overlay2", "vfs"):
            log = (self.dir / f"dockerd-{driver}.log").open("w")
            self.proc = subprocess.Popen(
                ["/usr/sbin/dockerd", f"--host=unix://{self.sock}", f"--data-root={self.dir / 'data'}",
                 f"--exec-root={self.dir / 'exec'}", f"--pidfile={self.dir / 'dockerd.pid'}",
                 f"--storage-driver={driver}", "--bridge=none", "--iptables=false", "--ip6tables=false"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            log.close()
            try:
                wait_for("dockerd answers", self._answers, 90)
                self.driver = driver
                return
            except CommandFailed:
                self.stop()
                say(f"dockerd with --storage-driver={driver} did not start; see {self.dir}/dockerd-{driver}.log")
        raise CommandFailed("dockerd did not start with overlay2 or vfs")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise CommandFailed(f"dockerd exited {self.proc.returncode}")
        return self.sock.exists() and self("version", check=False, timeout=30).returncode == 0

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(CommandFailed):
                running = self("ps", "-aq", check=False, timeout=60).stdout.split()
                if running:
                    self("rm", "-f", *running, check=False, timeout=120)
        stop_process(self.proc, grace=60)
        self.proc = None
        kill_strays(str(self.dir))  # containerd and shims, if dockerd died without stopping them

    def __call__(self, *args: str, check: bool = True, timeout: float = 600, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run([DOCKER, *args], check=check, timeout=timeout, env=self.env, input=input)

    def inspect(self, container: str, template: str) -> str:
        return self("inspect", "-f", template, container, timeout=60).stdout.strip()

    def sh(self, script: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run a README ``sh`` block with this engine's docker (``sudo`` is a no-op: we are root)."""
        preamble = "set -eu\nsudo() { \"$@\"; }\n"
        return self.run(["bash", "-c", preamble + script], cwd=cwd, env=self.env, timeout=timeout)


def readme_block(after: str) -> str:
    """The first ```sh block after the line containing ``after`` in README.md."""
    text = README.read_text(encoding="utf-8")
    start = text.index(after)
    match = re.compile(r"```sh\n(.*?)```", re.DOTALL).search(text, start)
    assert match, f"no sh block after {after!r} in README.md"
    return match.group(1)


def split_stop(block: str) -> tuple[str, str]:
    """A README block -> (the commands that start things, the `docker stop` line(s) at its end)."""
    lines = block.splitlines()
    first_stop = next(i for i, line in enumerate(lines) if line.startswith("docker stop"))
    while first_stop > 0 and lines[first_stop - 1].startswith("#"):
        first_stop -= 1
    return "\n".join(lines[:first_stop]) + "\n", "\n".join(lines[first_stop:]) + "\n"


def parse_signal_log(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, when = line.partition(" ")
        if name and when:
            out.setdefault(name, float(when))
    return out


@dataclass
class Scenario:
    """One scenario's coderd stand-in and its files (a host directory owned by uid 10001)."""

    out: Path
    token: str
    task: str

    @property
    def store(self) -> dict[str, Any]:
        path = self.out / "store.json"
        return json.loads(path.read_text(encoding="utf-8")).get(self.task, {}) if path.is_file() else {}


def docker_phase(report: Report, run: Runner, work: Path, base_root: Path) -> None:
    docker = Docker(run, work)
    try:
        start = time.monotonic()
        docker.start()
        report.add("dockerd starts", True, f"--storage-driver={docker.driver}, {time.monotonic() - start:.1f} s")
        build_image(report, docker, work, base_root)
        etc = prepare_etc_agentd(docker, work)
        sidecar_form(report, docker, work, etc)
        entrypoint_form(report, docker, work, etc)
        root_only_token_is_refused(report, docker, etc)
    finally:
        docker.stop()


def build_image(report: Report, docker: Docker, work: Path, base_root: Path) -> None:
    start = time.monotonic()
    tar = subprocess.Popen(["tar", "-C", str(base_root), "--exclude=./.complete", "-c", "."], stdout=subprocess.PIPE)
    try:
        subprocess.run(
            [DOCKER, "import", "--change", f"ENV PATH={GUEST_PATH}", "--change", "ENV LANG=C.UTF-8",
             "--change", 'CMD ["python3"]', "-", BASE_IMAGE],
            stdin=tar.stdout, env=docker.env, check=True, capture_output=True, timeout=600,
        )  # fmt: skip
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait(60)
    say(f"base image {BASE_IMAGE} imported from the debootstrap in {time.monotonic() - start:.1f} s")

    ca = extra_ca_pem()
    index = os.environ.get("AGENTD_DEPLOY_TEST_PIP_INDEX_URL", "https://pypi.org/simple")
    start = time.monotonic()
    build = docker(
        "build", "--network", "host", "--progress", "plain", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        "--build-arg", f"PIP_INDEX_URL={index}", "--build-arg", f"EXTRA_CA={ca}", "-t", IMAGE, str(ROOT),
        check=False, timeout=1800,
    )  # fmt: skip
    took = time.monotonic() - start
    sizes = {}
    if build.returncode == 0:
        for image in (BASE_IMAGE, IMAGE):
            sizes[image] = int(docker("image", "inspect", "-f", "{{.Size}}", image, timeout=60).stdout)
    report.add(
        "docker build --network host (BASE_IMAGE, PIP_INDEX_URL, EXTRA_CA build args; no `# syntax=` frontend to fetch)",
        build.returncode == 0,
        f"{took:.0f} s; image {sizes.get(IMAGE, 0) / 1e6:.0f} MB on a {sizes.get(BASE_IMAGE, 0) / 1e6:.0f} MB base, "
        f"{len(ca.split('BEGIN CERTIFICATE')) - 1} extra CA certificate(s), index {index}"
        if build.returncode == 0 else "\n" + "\n".join((build.stdout + build.stderr).splitlines()[-25:]),
    )  # fmt: skip
    if build.returncode != 0:
        raise CommandFailed("the image did not build; nothing else in the Docker part can run")

    history = docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", IMAGE, timeout=60).stdout
    config = json.loads(docker("image", "inspect", IMAGE, timeout=60).stdout)[0]["Config"]
    probe = docker(
        "run", "--rm", "--entrypoint", "sh", IMAGE, "-c",
        "test ! -e /tmp/wheels && test ! -e /opt/agentd/bin/pip && ! python -m pip --version 2>/dev/null"
        " && ! ls /usr/local/share/ca-certificates | grep -q agentd-build",
        check=False, timeout=120,
    )  # fmt: skip
    leaks = [what for what, needle in (("wheels", "/tmp/wheels"), ("the extra CA", "BEGIN CERTIFICATE"), ("the index URL", index)) if needle in history + json.dumps(config)]
    report.add(
        "final image: one venv layer, no wheels, no pip, no build-arg CA or index URL in it or its history",
        probe.returncode == 0 and not leaks,
        "layers: " + ", ".join(f"{line.split(chr(9))[0]}" for line in history.splitlines() if not line.startswith("0B")) + (f"; leaked: {leaks}" if leaks else ""),
    )  # fmt: skip
    health = config.get("Healthcheck") or {}
    report.add(
        "image config: USER 10001, ENTRYPOINT tini -- agentd, HEALTHCHECK agentd status",
        config.get("User") == "10001:10001" and config.get("Entrypoint") == ["/usr/bin/tini", "--", "agentd"]
        and health.get("Test") == ["CMD", "agentd", "status"],
        f"User={config.get('User')}, Entrypoint={config.get('Entrypoint')}, Healthcheck timeout "
        f"{health.get('Timeout', 0) / 1e9:g} s, interval {health.get('Interval', 0) / 1e9:g} s",
    )  # fmt: skip

    # The README's entrypoint form needs "an image FROM agentd that also contains agentapi".
    ctx = work / "my-agent-image"
    ctx.mkdir()
    shutil.copy2(HERE / "agentapi-standin", ctx / "agentapi")
    (ctx / "Dockerfile").write_text("FROM agentd\nCOPY --chmod=0755 agentapi /usr/local/bin/agentapi\n")
    docker("build", "--progress", "plain", "-t", AGENT_IMAGE, str(ctx), timeout=600)


def prepare_etc_agentd(docker: Docker, work: Path) -> Path:
    """The host's /etc/agentd as the README's systemd steps leave it: agent-token root:root 0600."""
    etc = work / "etc" / "agentd"
    etc.mkdir(parents=True, mode=0o755)
    token = etc / "agent-token"
    token.touch(mode=0o600)
    os.chown(token, 0, 0)
    token.write_text(secrets.token_urlsafe(24))
    return etc


def new_scenario(docker: Docker, work: Path, name: str, etc: Path) -> Scenario:
    out = work / name
    out.mkdir(mode=0o700)
    token = (etc / "agent-token").read_text()
    scenario = Scenario(out=out, token=token, task=str(uuid.uuid4()))
    (out / "token").write_text(token)
    for path in (out, out / "token"):
        os.chown(path, 10001, 10001)
    (work / "agentd.env").write_text(
        "# the two required settings (systemd/agentd.env.example documents every setting)\n"
        f"CODER_AGENT_URL=http://127.0.0.1:{CODERD_PORT_IN_NETNS}\nAGENTD_TASK_ID={scenario.task}\n"
    )
    docker("volume", "rm", "-f", "agentd-state", check=False, timeout=60)
    return scenario


def start_coderd(docker: Docker, scenario: Scenario, netns_of: str) -> None:
    docker(
        "run", "-d", "--name", "coderd", "--network", f"container:{netns_of}", "-v", f"{scenario.out}:/out",
        "--entrypoint", "python", IMAGE, "-m", "agentd.testing.fake_coderd", "--port", str(CODERD_PORT_IN_NETNS),
        "--token-file", "/out/token", "--task", scenario.task, "--store-file", "/out/store.json",
        "--request-log", "/out/requests.jsonl", timeout=120,
    )  # fmt: skip
    wait_for("coderd stand-in listening", lambda: "listening" in docker("logs", "coderd", check=False, timeout=60).stdout, 90)


def held(docker: Docker, container: str) -> dict[str, Any]:
    """``agentd status --json`` inside the container ({} when no daemon answers)."""
    proc = docker("exec", container, "agentd", "status", "--json", check=False, timeout=120)
    try:
        return dict(json.loads(proc.stdout)) if proc.returncode == 0 else {}
    except ValueError:
        return {}


def stored_before(scenario: Scenario, signals: dict[str, float], since: float, newest_id: int) -> tuple[bool, str]:
    """Did coderd store, after ``since``, a snapshot ending with message ``newest_id``, before
    agentapi got SIGTERM? (The stand-in's last reply is over 64 KiB, so trimming keeps it alone.)"""
    stored = scenario.store
    at = float(stored.get("snapshot_at") or 0)
    term = signals.get("SIGTERM")
    messages = stored.get("messages") or []
    ok = bool(messages) and messages[-1].get("id") == newest_id and at >= since and term is not None and at < term
    detail = (
        f"stored {len(messages)} message(s) up to id {messages[-1].get('id') if messages else None}, {stored.get('body_bytes')} bytes; "
        + (f"agentapi got SIGTERM {term - at:.2f} s after the store" if term and at else f"agentapi signals: {signals}")
    )
    return ok, detail


def sidecar_form(report: Report, docker: Docker, work: Path, etc: Path) -> None:
    say("README, Docker, sidecar form")
    scenario = new_scenario(docker, work, "sidecar", etc)
    docker(
        "run", "-d", "--name", "agentapi", "-v", f"{scenario.out}:/out", "-e", "AGENTAPI_SIGNAL_LOG=/out/agentapi-signals.log",
        "--entrypoint", "agentapi", AGENT_IMAGE, "server", "--", "claude", timeout=120,
    )  # fmt: skip
    start_coderd(docker, scenario, "agentapi")
    block = readme_block("As a **sidecar**").replace("/etc/agentd/", f"{etc}/")
    up, down = split_stop(block)
    docker.sh(up, cwd=work)
    report.add(
        "sidecar: the README's token copy is readable by uid 10001 (the systemd file stays root:root 0600)",
        (etc / "agent-token").stat().st_mode & 0o777 == 0o600 and any(p.stat().st_uid == 10001 for p in etc.iterdir()),
        ", ".join(f"{p.name} {p.stat().st_uid}:{p.stat().st_gid} {p.stat().st_mode & 0o777:04o}" for p in sorted(etc.iterdir())),
    )  # fmt: skip
    uid = docker("exec", "agentd", "id", "-u", check=False, timeout=60).stdout.strip()
    pid1 = docker("exec", "agentd", "cat", "/proc/1/cmdline", check=False, timeout=60).stdout.replace("\0", " ").strip()
    report.add("sidecar: runs as uid 10001 with tini as PID 1", uid == "10001" and pid1.startswith("/usr/bin/tini -- agentd run"), f"uid {uid}; PID 1: {pid1}")

    start = time.monotonic()
    try:
        health = wait_for("healthy", lambda: docker.inspect("agentd", "{{.State.Health.Status}}") in ("healthy", "unhealthy") and docker.inspect("agentd", "{{.State.Health.Status}}"), 180, 2)
    except CommandFailed as exc:
        health = str(exc)
    log = json.loads(docker.inspect("agentd", "{{json .State.Health.Log}}") or "[]")
    health_timeout = json.loads(docker.inspect("agentd", "{{json .Config.Healthcheck}}"))["Timeout"] / 1e9  # ns
    probes = [_seconds_between(p["Start"], p["End"]) for p in log]
    report.add(
        "sidecar: HEALTHCHECK (agentd status) turns healthy",
        health == "healthy",
        f"{health} after {time.monotonic() - start:.0f} s (first check one 30 s interval after the start); "
        f"probe took {', '.join(f'{p:.2f}' for p in probes)} s of its {health_timeout:g} s timeout",
    )  # fmt: skip
    newest = wait_for("agentd holds the 10 newest messages", lambda: (h := held(docker, "agentd")).get("messages") == 10 and h["newest_id"], 120, 2)

    since = time.time()
    start = time.monotonic()
    docker.sh(down, cwd=work)  # the README's `docker stop agentd && docker stop agentapi`
    took = time.monotonic() - start
    code = docker.inspect("agentd", "{{.State.ExitCode}}")
    signals = parse_signal_log(_read(scenario.out / "agentapi-signals.log"))
    ok, detail = stored_before(scenario, signals, since, newest)
    report.add(
        f"sidecar: `docker stop agentd` stores the snapshot and exits 0 well within {DOCKER_STOP_BUDGET:g} s, before agentapi stops",
        ok and code == "0" and took < DOCKER_STOP_BUDGET,
        f"exit {code}; both stops took {took:.1f} s; {detail}",
    )  # fmt: skip
    logs = docker("logs", "agentd", check=False, timeout=60)
    report.add("sidecar: the agent token is in no log line", scenario.token not in logs.stdout + logs.stderr, f"{len((logs.stdout + logs.stderr).splitlines())} log lines checked")
    docker("rm", "-f", "agentd", "agentapi", "coderd", timeout=120)


def entrypoint_form(report: Report, docker: Docker, work: Path, etc: Path) -> None:
    say("README, Docker, entrypoint form (agentd supervise -- agentapi server -- claude)")
    scenario = new_scenario(docker, work, "entrypoint", etc)
    block = readme_block("As the **entrypoint").replace("/etc/agentd/", f"{etc}/")
    up, down = split_stop(block)
    docker.sh(up, cwd=work)
    start_coderd(docker, scenario, "task")
    top = docker("top", "task", "-o", "pid,user,args", check=False, timeout=60).stdout
    report.add(
        "entrypoint: tini -> agentd supervise -> agentapi, as uid 10001",
        bool(re.search(r"tini -- agentd supervise", top)) and "fake_agentapi" in top and " root " not in top,
        " | ".join(" ".join(line.split()[1:])[:70] for line in top.splitlines()[1:]),
    )  # fmt: skip
    newest = wait_for("agentd holds the 10 newest messages", lambda: (h := held(docker, "task")).get("messages") == 10 and h["newest_id"], 120, 2)
    since = time.time()
    start = time.monotonic()
    docker.sh(down, cwd=work)  # the README's `docker stop task`
    took = time.monotonic() - start
    code = docker.inspect("task", "{{.State.ExitCode}}")
    docker("cp", "task:/tmp/agentapi-signals.log", str(work / "entrypoint-signals.log"), check=False, timeout=60)
    signals = parse_signal_log(_read(work / "entrypoint-signals.log"))
    ok, detail = stored_before(scenario, signals, since, newest)
    report.add(
        "entrypoint: `docker stop` -> supervise stores before agentapi gets SIGTERM, exits 0 well within 10 s",
        ok and code == "0" and took < DOCKER_STOP_BUDGET,
        f"exit {code}; docker stop took {took:.1f} s (--stop-timeout 30); {detail}",
    )  # fmt: skip
    docker("rm", "-f", "task", "coderd", timeout=120)


def root_only_token_is_refused(report: Report, docker: Docker, etc: Path) -> None:
    """Why the README's copy is needed: the root-only file itself, mounted, is refused (exit 78)."""
    proc = docker(
        "run", "--rm", "-e", "CODER_AGENT_URL=http://127.0.0.1:9", "-e", f"AGENTD_TASK_ID={uuid.uuid4()}",
        "-v", f"{etc}/agent-token:/run/secrets/agent-token:ro", "-e", "CODER_AGENT_TOKEN_FILE=/run/secrets/agent-token",
        IMAGE, check=False, timeout=120,
    )  # fmt: skip
    text = (proc.stdout + proc.stderr).strip()
    token = (etc / "agent-token").read_text()
    report.add(
        "the root:root 0600 token itself, mounted into the image, exits 78 with one clear line (hence the copy)",
        proc.returncode == 78 and "ermission denied" in text and token not in text,
        f"exit {proc.returncode}: {text.splitlines()[-1][:160] if text else ''}",
    )


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def _seconds_between(start: str, end: str) -> float:
    def parse(stamp: str) -> float:
        main, _, frac = stamp.partition(".")
        frac = re.match(r"\d*", frac).group(0) if frac else ""  # type: ignore[union-attr]
        base = time.mktime(time.strptime(main[:19], "%Y-%m-%dT%H:%M:%S"))
        return base + (float(f"0.{frac}") if frac else 0.0)

    return parse(end) - parse(start)


# ---- systemd -------------------------------------------------------------------------------------


class Guest:
    """A debootstrap root file system booted with systemd-nspawn; ``sh`` runs commands inside."""

    def __init__(self, run: Runner, work: Path, template: Path) -> None:
        self.run = run
        self.work = work
        self.root = work / "guest"
        self.proc: subprocess.Popen[Any] | None = None
        self.leader = 0
        start = time.monotonic()
        run(["cp", "-a", str(template), str(self.root)], timeout=900)
        say(f"fresh copy of the guest in {time.monotonic() - start:.0f} s")

    def boot(self) -> None:
        log = (self.work / "nspawn.log").open("w")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", f"--directory={self.root}",
             f"--machine=agentd-deploy-test-{os.getpid()}", "--console=read-only"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.leader = wait_for("the guest's systemd (PID 1 inside)", self._find_leader, 120, 0.5)
        wait_for("the guest's systemd listens", lambda: self.sh("test -S /run/systemd/private", check=False, timeout=60).returncode == 0, 120, 0.5)
        state = self.sh("systemctl is-system-running --wait", check=False, timeout=300).stdout.strip()
        if state not in ("running", "degraded"):
            raise CommandFailed(f"the guest did not boot: {state}")
        if state == "degraded":
            say("guest degraded: " + self.sh("systemctl --failed --no-legend --plain", check=False).stdout.strip())

    def _find_leader(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise CommandFailed(f"systemd-nspawn exited {self.proc.returncode}; see {self.work}/nspawn.log")
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        for pid in _read(children).split():
            status = _read(Path(f"/proc/{pid}/status"))
            nspid = re.search(r"^NSpid:\s*(.*)$", status, re.MULTILINE)
            if nspid and nspid.group(1).split()[-1] == "1":
                return int(pid)
        return 0

    def sh(self, script: str, *, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``script`` in the guest as root, in a clean environment (nothing of the host's leaks)."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        argv = ["nsenter", "-t", str(self.leader), "-a", "--", "env", "-i", f"PATH={GUEST_PATH}", "HOME=/root",
                "LANG=C.UTF-8", "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=", "SYSTEMD_LOG_COLOR=0", *extra, "sh", "-c", script]  # fmt: skip
        return self.run(argv, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props), check=False, timeout=60).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def shutdown(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn: an orderly poweroff of the guest
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                if self.leader:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None


def journal_priorities_supported() -> bool:
    """Does this tree's agentd give journald syslog priorities (``<4>`` prefixes under
    JOURNAL_STREAM)? Without them every line is logged at the default priority, info."""
    return any("JOURNAL_STREAM" in p.read_text(encoding="utf-8") for p in (ROOT / "agentd").glob("*.py"))


def systemd_phase(report: Report, run: Runner, work: Path, guest_root: Path) -> None:
    guest = Guest(run, work, guest_root)
    coderd: subprocess.Popen[str] | None = None
    try:
        # The machine's extra CAs, so pip inside the guest reaches the index (as on the host).
        ca_dir = guest.root / "usr/local/share/ca-certificates"
        for ca in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy2(ca, ca_dir / ca.name)
        run(["chroot", str(guest.root), "update-ca-certificates"], timeout=300)
        src = guest.root / "usr/src/agentd"
        src.mkdir(parents=True)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, src / name)
        for name in ("agentd", "systemd"):
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

        token = secrets.token_urlsafe(24)
        task = str(uuid.uuid4())
        (work / "coderd-token").write_text(token)
        coderd = subprocess.Popen(
            [sys.executable, "-m", "agentd.testing.fake_coderd", "--port", "0", "--token-file", str(work / "coderd-token"),
             "--task", task, "--store-file", str(work / "systemd-store.json"), "--request-log", str(work / "systemd-requests.jsonl")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=(work / "coderd.log").open("w"), text=True, cwd=ROOT,
        )  # fmt: skip
        assert coderd.stdout is not None
        coderd_url = re.search(r"http://\S+", coderd.stdout.readline()).group(0)  # type: ignore[union-attr]
        agentapi_port = free_port()

        start = time.monotonic()
        guest.boot()
        report.add("guest boots systemd under systemd-nspawn", True, f"{time.monotonic() - start:.0f} s; {guest.sh('systemctl --version', timeout=60).stdout.splitlines()[0]}")
        install_as_readme(report, guest, token, task, coderd_url, agentapi_port)
        analyze(report, guest)
        environ, shown = running(report, guest)
        stop_order(report, guest, work, task)
        credential(report, guest, work, token, task, environ, shown)
        watchdog(report, guest)
    finally:
        guest.shutdown()
        if coderd is not None:
            stop_process(coderd)


def install_as_readme(report: Report, guest: Guest, token: str, task: str, coderd_url: str, agentapi_port: int) -> None:
    start = time.monotonic()
    # README "Install as a systemd service", steps 1-3 (sudo dropped: we are root in the guest).
    guest.sh(
        "set -e\n"
        "python3 -m venv /opt/agentd\n"
        "/opt/agentd/bin/pip install --quiet /usr/src/agentd\n"
        "ln -sf /opt/agentd/bin/agentd /usr/local/bin/agentd\n"
        "cd /usr/src/agentd\n"
        "install -m 0644 systemd/agentd.service /etc/systemd/system/agentd.service\n"
        "install -d -m 0755 /etc/agentd\n"
        "install -m 0644 systemd/agentd.env.example /etc/agentd/agentd.env\n"
        # sudoedit: the two required values, and where the stand-in agentapi listens
        f"printf '%s\\n' CODER_AGENT_URL={coderd_url} AGENTD_TASK_ID={task} "
        f"AGENTD_AGENTAPI_URL=http://127.0.0.1:{agentapi_port} >>/etc/agentd/agentd.env\n"
        "install -m 0600 -o root -g root /dev/null /etc/agentd/agent-token\n"
        "printf '%s' \"$CODER_AGENT_TOKEN\" | tee /etc/agentd/agent-token >/dev/null\n",
        env={"CODER_AGENT_TOKEN": token}, timeout=900,
    )  # fmt: skip
    # The stand-in agentapi unit: agentd's fake agentapi, logging the signals it gets.
    (guest.root / "etc/systemd/system/agentapi.service").write_text(
        "[Unit]\nDescription=stand-in agentapi for make deploy-test (agentd.testing.fake_agentapi)\n\n"
        "[Service]\n"
        f"ExecStart=/opt/agentd/bin/python -m agentd.testing.fake_agentapi --port {agentapi_port} "
        "--script static --signal-log /var/log/agentapi-signals.log\n"
    )
    guest.sh("systemctl daemon-reload", timeout=120)
    report.add("the README's install steps 1-3 (venv + pip install, unit, settings, token file)", True, f"{time.monotonic() - start:.0f} s")


def analyze(report: Report, guest: Guest) -> None:
    verify = guest.sh("systemd-analyze verify /etc/systemd/system/agentd.service", check=False, timeout=120)
    text = (verify.stdout + verify.stderr).strip()
    report.add("systemd-analyze verify /etc/systemd/system/agentd.service is clean", verify.returncode == 0 and not text, text[:300] or "no output")
    security = guest.sh("systemd-analyze security --no-pager agentd.service", check=False, timeout=120).stdout
    match = re.search(r"Overall exposure level for agentd.service: (\d+(?:\.\d+)?)", security)
    score = float(match.group(1)) if match else 99.0
    report.add(f"systemd-analyze security agentd.service <= {MAX_EXPOSURE}", score <= MAX_EXPOSURE, f"{score:g}" if match else security[-300:])


def agentd_status(guest: Guest) -> dict[str, Any]:
    proc = guest.sh("agentd status --json", check=False, timeout=120)
    try:
        return dict(json.loads(proc.stdout)) if proc.returncode == 0 else {}
    except ValueError:
        return {}


def running(report: Report, guest: Guest) -> tuple[str, str]:
    """Start as README step 4; return (agentd's environment, `systemctl show` + `status` text)."""
    # README step 4, before agentapi runs: agentd must come up anyway (and warn).
    start = time.monotonic()
    enable = guest.sh("systemctl enable --now agentd", check=False, timeout=180)
    took = time.monotonic() - start
    props = guest.show("agentd", "Type", "ActiveState", "SubState", "NotifyAccess", "StatusText")
    report.add(
        "systemctl enable --now agentd: Type=notify reaches active (READY=1), before agentapi runs",
        enable.returncode == 0 and props.get("ActiveState") == "active" and props.get("Type") == "notify",
        f"{took:.1f} s; Type={props.get('Type')} ActiveState={props.get('ActiveState')} SubState={props.get('SubState')}",
    )  # fmt: skip
    time.sleep(3)  # a reconnect attempt or two against the absent agentapi
    guest.sh("systemctl start agentapi", timeout=120)
    try:
        wait_for("agentd holds the 10 newest messages", lambda: agentd_status(guest).get("messages") == 10, 120, 2)
        text = wait_for("STATUS= shows them", lambda: "10 messages" in (s := guest.show("agentd", "StatusText").get("StatusText", "")) and s, 60, 1)
    except CommandFailed as exc:
        text = str(exc)
    report.add("STATUS= text (systemctl status) says what agentd holds", "10 messages" in text, repr(text))

    warnings = guest.sh("journalctl -u agentd -p warning --no-pager -o cat", check=False, timeout=120).stdout
    ours = [line for line in warnings.splitlines() if "agentapi" in line and "systemd" not in line]
    supported = journal_priorities_supported()
    report.add(
        "journalctl -u agentd -p warning shows agentd's warnings (agentapi unreachable at start)",
        bool(ours),
        (ours[0][:160] if ours else "no agentd line at priority warning or above"),
        xfail=None if supported else "agentd in this tree prints no syslog priority prefixes under JOURNAL_STREAM, so journald files every line as info",
    )  # fmt: skip

    # What a reader of the host could see while agentd runs; judged after the stop stored with it.
    main_pid = guest.show("agentd", "MainPID").get("MainPID", "0")
    environ = guest.sh(f"tr '\\0' '\\n' </proc/{main_pid}/environ", check=False, timeout=60).stdout
    shown = guest.sh("systemctl show agentd; systemctl status --no-pager agentd", check=False, timeout=120).stdout
    return environ, shown


def credential(report: Report, guest: Guest, work: Path, token: str, task: str, environ: str, shown: str) -> None:
    shown += guest.sh("journalctl -u agentd --no-pager -o cat", check=False, timeout=120).stdout
    requests = [json.loads(line) for line in _read(work / "systemd-requests.jsonl").splitlines() if line.strip()]
    stored = json.loads(_read(work / "systemd-store.json") or "{}").get(task, {})
    report.add(
        "the token as a credential: coderd accepted it; it is not in agentd's environment, systemctl show/status or the journal",
        bool(stored) and all(r.get("status") != 401 for r in requests)
        and _env_value(environ, "CODER_AGENT_TOKEN_FILE") == "/run/credentials/agentd.service/agent-token"
        and token not in shown + environ and "CODER_AGENT_TOKEN=" not in environ,
        f"{len(requests)} upload(s) answered {sorted({r.get('status') for r in requests})}; "
        f"CODER_AGENT_TOKEN_FILE={_env_value(environ, 'CODER_AGENT_TOKEN_FILE')}",
    )  # fmt: skip


def _env_value(environ: str, name: str) -> str:
    for line in environ.splitlines():
        if line.startswith(name + "="):
            return line.split("=", 1)[1]
    return "(unset)"


def stop_order(report: Report, guest: Guest, work: Path, task: str) -> None:
    before = json.loads(_read(work / "systemd-store.json") or "{}").get(task, {}).get("upserts", 0)
    since = time.time()
    start = time.monotonic()
    stop = guest.sh("systemctl stop agentd agentapi", check=False, timeout=120)
    took = time.monotonic() - start
    props = guest.show("agentd", "Result", "ExecMainStatus", "ActiveState")
    stored = json.loads(_read(work / "systemd-store.json") or "{}").get(task, {})
    signals = parse_signal_log(_read(guest.root / "var/log/agentapi-signals.log"))
    at = float(stored.get("snapshot_at") or 0)
    term = signals.get("SIGTERM")
    report.add(
        "systemctl stop agentd agentapi: agentd stores first, agentapi gets SIGTERM after, agentd exits 0",
        stop.returncode == 0 and stored.get("upserts", 0) > before and at >= since and term is not None and at < term
        and props.get("Result") == "success" and props.get("ExecMainStatus") == "0",
        f"{took:.1f} s; {len(stored.get('messages') or [])} messages stored; "
        + (f"agentapi's SIGTERM {term - at:.2f} s after the store; " if term else f"agentapi signals {signals}; ")
        + f"Result={props.get('Result')} ExecMainStatus={props.get('ExecMainStatus')}",
    )  # fmt: skip


def watchdog(report: Report, guest: Guest) -> None:
    dropin = guest.root / "etc/systemd/system/agentd.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "deploy-test-watchdog.conf").write_text(f"[Service]\nWatchdogSec={WATCHDOG_TEST_SEC}s\n")
    guest.sh("systemctl daemon-reload && systemctl start agentapi agentd", timeout=180)
    wait_for("agentd holds the 10 newest messages", lambda: agentd_status(guest).get("messages") == 10, 120, 2)
    time.sleep(2)  # at least one save of the buffer (about once a second while it changes)
    before = guest.show("agentd", "MainPID", "NRestarts")
    guest.sh(f"kill -STOP {before['MainPID']}", timeout=60)  # frozen: no more WATCHDOG=1
    start = time.monotonic()
    try:
        wait_for(
            "restarted by the watchdog",
            lambda: (p := guest.show("agentd", "MainPID", "NRestarts", "ActiveState"))["NRestarts"] != before["NRestarts"]
            and p["ActiveState"] == "active" and p["MainPID"] not in ("0", before["MainPID"]),
            WATCHDOG_TEST_SEC * 3 + 60, 1,
        )  # fmt: skip
        restarted = True
    except CommandFailed:
        restarted = False
    took = time.monotonic() - start
    journal = guest.sh("journalctl -u agentd --no-pager -o cat", check=False, timeout=120).stdout
    tail = journal[journal.rfind("Watchdog timeout") :] if "Watchdog timeout" in journal else ""
    held = agentd_status(guest).get("messages") if restarted else None
    report.add(
        f"watchdog (drop-in WatchdogSec={WATCHDOG_TEST_SEC}s): a frozen agentd is killed, restarted, and restores its buffer",
        restarted and bool(tail) and "restored the persisted buffer" in tail and held == 10,
        f"restarted {took:.0f} s after SIGSTOP; NRestarts {before['NRestarts']} -> {guest.show('agentd', 'NRestarts').get('NRestarts')}; "
        f"'Watchdog timeout' logged: {bool(tail)}; restored: {'restored the persisted buffer' in tail}; holds {held} messages",
    )  # fmt: skip
    guest.sh("systemctl stop agentd agentapi", check=False, timeout=120)


# ---- main ----------------------------------------------------------------------------------------


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main() -> int:
    started = time.monotonic()
    report = Report()
    try:
        preflight(Runner(Path(os.devnull)))
    except Skip as exc:
        say(f"SKIPPED: {exc}")
        return 0
    report.phases.append(("checks and Debian packages", time.monotonic() - started))
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    keep = os.environ.get("AGENTD_DEPLOY_TEST_KEEP") == "1"
    work = Path(tempfile.mkdtemp(prefix="agentd-deploy-test.", dir="/var/tmp"))
    os.chmod(work, 0o755)
    run = Runner(work / "commands.log")
    say(f"work directory {work} (commands and their output: {run.log})")
    try:
        with report.phase("root file systems (debootstrap, cached)"):
            pool = concurrent.futures.ThreadPoolExecutor(2)
            try:
                base = pool.submit(rootfs, run, "docker-base", BASE_PACKAGES)
                guest = pool.submit(rootfs, run, "systemd-guest", GUEST_PACKAGES)
                base_root, guest_root = base.result(), guest.result()
            finally:
                run.stop_all()  # on an interrupt: end the other debootstrap now, not when it is done
                pool.shutdown(wait=True)
        only = os.environ.get("AGENTD_DEPLOY_TEST_ONLY", "")  # "Docker" or "systemd": one part only
        parts: list[tuple[str, Callable[[], None]]] = [
            ("Docker", lambda: docker_phase(report, run, work, base_root)),
            ("systemd", lambda: systemd_phase(report, run, work, guest_root)),
        ]
        for name, phase in parts:
            if only and only.lower() != name.lower():
                report.add(f"{name} part", True, f"not run: AGENTD_DEPLOY_TEST_ONLY={only}", skip=True)
                continue
            with report.phase(name):
                try:
                    phase()
                except (CommandFailed, AssertionError, OSError, KeyError, ValueError) as exc:
                    report.add(f"{name} part ran to the end", False, f"{type(exc).__name__}: {exc}")
    except (KeyboardInterrupt, Interrupted) as exc:
        report.add("ran to the end", False, f"interrupted ({type(exc).__name__} {exc})")
    finally:
        run.stop_all()
        _cleanup(work, keep)
    total = time.monotonic() - started
    counts = {s: sum(c.status == s for c in report.checks) for s in ("PASS", "FAIL", "XFAIL", "XPASS", "SKIP")}
    say("phases: " + ", ".join(f"{name} {secs:.0f} s" for name, secs in report.phases))
    say(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"; {total:.0f} s in all")
    for check in report.failed:
        say(f"FAILED: {check.name}: {check.detail}")
    return 1 if report.failed or not report.checks else 0


def _cleanup(work: Path, keep: bool) -> None:
    kill_strays(str(work))
    if keep:
        unmount_under(work)
        say(f"kept {work} (AGENTD_DEPLOY_TEST_KEEP=1)")
    else:
        remove_tree(work)


if __name__ == "__main__":
    sys.exit(main())
