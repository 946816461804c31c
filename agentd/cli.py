"""Command line: ``agentd run | check | snapshot | status | shutdown-hook | demo``.

Exit status: 0 stored (or nothing to store; ``check``: would be stored), 1 not stored, 3 no daemon answered (``status``),
73 another daemon holds the control socket, 78 bad configuration (one line on stderr naming
the setting, no traceback), 70 internal error (logged with the token redacted).
"""

from __future__ import annotations

import signal
import sys

# Until the event loop installs its handlers, remember SIGTERM/SIGINT instead of dying: a stop
# that arrives during start-up still stores the snapshot. Installed before importing the daemon,
# whose imports take a while (~0.2 s); only the interpreter's own start-up stays uncovered.
_early_signals: list[int] = []
for _signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_signum, lambda signum, _frame: _early_signals.append(signum))

from agentd import daemon  # noqa: E402

daemon.early_signals = _early_signals

import argparse  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NoReturn  # noqa: E402

import anyio  # noqa: E402

from agentd import control, hooks, logs  # noqa: E402
from agentd.settings import EX_CONFIG, ConfigError, Settings, default_state_dir, load_settings  # noqa: E402

EX_SOFTWARE = 70  # sysexits.h: internal software error


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    flags = parser.add_argument_group("settings (each also from the environment; flags win)")
    flags.add_argument("--coderd-url", metavar="URL", help="coderd base URL [CODER_AGENT_URL]")
    flags.add_argument("--agent-token", metavar="TOKEN", help="agent token [CODER_AGENT_TOKEN]; visible in ps: prefer the environment or a file")
    flags.add_argument("--agent-token-file", metavar="PATH", help="file holding the agent token [CODER_AGENT_TOKEN_FILE]")
    flags.add_argument("--task-id", metavar="UUID", help="the task's UUID [AGENTD_TASK_ID]")
    flags.add_argument("--agentapi-url", metavar="URL", help="agentapi base URL [AGENTD_AGENTAPI_URL]")
    flags.add_argument("--max-messages", metavar="N", help="ring buffer size [AGENTD_MAX_MESSAGES]")
    flags.add_argument("--max-bytes", metavar="BYTES", help="snapshot body limit [AGENTD_MAX_BYTES]")
    flags.add_argument("--shutdown-timeout", metavar="SECONDS", help="signal to exit, retries included [AGENTD_SHUTDOWN_TIMEOUT]")
    flags.add_argument("--state-dir", metavar="PATH", help="state directory [AGENTD_STATE_DIR]")
    flags.add_argument("--ca-file", metavar="PATH", help="CA bundle for coderd's TLS certificate [AGENTD_CA_FILE]")
    flags.add_argument("--checkpoint-interval", metavar="SECONDS", help="least time between checkpoint uploads, 0 off [AGENTD_CHECKPOINT_INTERVAL]")
    flags.add_argument("--socket", metavar="PATH", help="control socket [AGENTD_SOCKET]")
    flags.add_argument("--child-stop-timeout", metavar="SECONDS", help="supervise: time the child gets to exit [AGENTD_CHILD_STOP_TIMEOUT]")
    flags.add_argument("--log-format", metavar="FORMAT", help="json, console or auto [AGENTD_LOG_FORMAT]")
    flags.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning, error [AGENTD_LOG_LEVEL]")
    flags.add_argument("--startup-probe", metavar="BOOL", help="run: probe agentapi and coderd at start-up, true or false [AGENTD_STARTUP_PROBE]")


_SETTING_FLAGS = (
    "coderd_url agent_token agent_token_file task_id agentapi_url max_messages max_bytes "
    "shutdown_timeout state_dir ca_file checkpoint_interval socket child_stop_timeout log_format log_level startup_probe"
).split()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentd",
        description="Keeps a Coder task's agentapi conversation and stores it in coderd when the workspace stops.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="tail agentapi; store the snapshot on SIGTERM/SIGINT")
    _add_settings_flags(run)
    sup = sub.add_parser("supervise", help="container entrypoint: run COMMAND as a child and tail it as run does")
    _add_settings_flags(sup)
    sup.add_argument("child", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]", help="the command to run, e.g. agentapi server -- claude")
    chk = sub.add_parser("check", help="probe agentapi and coderd: would the snapshot be stored? (stores nothing)")
    chk.add_argument("--json", action="store_true", help="machine-readable output")
    _add_settings_flags(chk)
    snap = sub.add_parser("snapshot", help="store the snapshot now (via the daemon, or directly without one)")
    snap.add_argument("--timeout", type=_seconds, default=8.0, metavar="SECONDS", help="give up after this long (default 8)")
    _add_settings_flags(snap)
    stat = sub.add_parser("status", help="ask the daemon how it is (exit 3 when none answers)")
    stat.add_argument("--json", action="store_true", help="machine-readable output")
    stat.add_argument("--socket", metavar="PATH", help="control socket [AGENTD_SOCKET]")
    stat.add_argument("--state-dir", metavar="PATH", help="state directory [AGENTD_STATE_DIR]")
    hook = sub.add_parser("shutdown-hook", help="stop-script drop-in: SIGUSR1 agentapi, snapshot, SIGTERM agentapi")
    hook.add_argument("--pid-file", type=Path, metavar="PATH", help="agentapi's pid file")
    hook.add_argument("--save-state", action="store_true", help="send agentapi SIGUSR1 (state save) first")
    hook.add_argument("--timeout", type=_seconds, default=8.0, metavar="SECONDS", help="snapshot time limit (default 8)")
    hook.add_argument("--stop-timeout", type=_seconds, default=5.0, metavar="SECONDS", help="wait for agentapi to exit (default 5)")
    hook.add_argument("--state-file", type=Path, metavar="PATH", help="agentapi's state file, waited for after SIGUSR1 (default: agentapi's own --state-file)")
    hook.add_argument("--state-wait", type=_seconds, default=hooks.STATE_WAIT, metavar="SECONDS", help=f"wait for that file to change, beside the snapshot (default {hooks.STATE_WAIT:g})")
    _add_settings_flags(hook)
    demo = sub.add_parser("demo", help="run the whole job against built-in stand-ins on loopback")
    demo.add_argument("--log-format", default="console", help="json or console (default console)")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment with the flags in ``args`` on top. Raises ConfigError."""
    return load_settings(**{name: getattr(args, name, None) for name in _SETTING_FLAGS})


def socket_from(args: argparse.Namespace) -> Path:
    """The control socket for client commands, without needing the daemon's other settings."""
    if getattr(args, "socket", None):
        return Path(args.socket)
    state_dir = getattr(args, "state_dir", None) or os.environ.get("AGENTD_STATE_DIR")
    return control.default_socket_path(Path(state_dir) if state_dir else default_state_dir())


def _backend() -> str:
    """``AGENTD_ASYNC_BACKEND``: asyncio (default) or trio. Raises ConfigError otherwise."""
    backend = os.environ.get("AGENTD_ASYNC_BACKEND", "asyncio").lower() or "asyncio"
    if backend not in ("asyncio", "trio"):
        raise ConfigError(f"invalid setting AGENTD_ASYNC_BACKEND: {backend[:20]!r} is not asyncio or trio")
    return backend


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds in (0, 3600]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 3600] seconds")
    return value


def _say(line: str) -> None:
    print(logs.redact(line), flush=True)


def _lean_start() -> None:
    """Before the daemon starts: import less, and keep start-up's objects out of collections.

    On asyncio, httpcore must not import trio: it does so eagerly whenever trio is installed
    (about 45 ms and 5 MiB, for a backend it will not use). Everything imported so far lives as
    long as the process: frozen, the garbage collector never walks it again (cheaper collections
    while running, and no 40 ms collection of it all at exit).
    """
    if _backend() == "asyncio":
        sys.modules.setdefault("trio", None)  # type: ignore[arg-type]  # `import trio` -> ImportError
    gc.freeze()


def _quick_exit(status: int) -> NoReturn:
    """Exit now, without the interpreter's teardown (60 to 100 ms with this many modules).

    Only once the daemon is done: the snapshot is stored or given up, the state is written,
    sockets are closed, the child (supervise) is reaped; nothing but buffered output is left.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("run", "supervise", "demo"):
        # Client commands stop on SIGTERM/SIGINT like any short-lived command.
        if daemon.early_signals:
            return 128 + daemon.early_signals[0]
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.command == "demo":
            from agentd.demo import main as demo_main

            return demo_main(args)
        if args.command in ("run", "supervise"):
            command = None
            if args.command == "supervise":
                command = args.child[1:] if args.child[:1] == ["--"] else args.child
                if not command:
                    print("agentd: supervise needs a command: agentd supervise -- COMMAND [ARGS...]", file=sys.stderr)
                    return 2
            settings = settings_from(args)
            if command:
                settings.check_supervise()
            logs.configure(settings.log_format, settings.log_level)
            logs.add_secret(settings.token)
            standalone = argv is None  # the process is ours (`agentd`, `python -m agentd`)
            if standalone:
                _lean_start()
            status = anyio.run(daemon.run, settings, command, backend=_backend())
            if standalone:
                _quick_exit(status)
            return status
        logs.configure(
            getattr(args, "log_format", None) or os.environ.get("AGENTD_LOG_FORMAT", "auto").lower(),
            getattr(args, "log_level", None) or os.environ.get("AGENTD_LOG_LEVEL", "warning").lower(),
        )
        if args.command == "status":
            status, text = anyio.run(hooks.status, socket_from(args), args.json, backend=_backend())
            _say(text)
            return status
        if args.command == "check":
            from agentd import check

            settings = settings_from(args)
            flags = {name: getattr(args, name, None) for name in _SETTING_FLAGS}
            status, text = anyio.run(check.main, settings, flags, args.json, backend=_backend())
            _say(text)
            return status
        if args.command == "snapshot":
            status, line = anyio.run(hooks.snapshot, socket_from(args), args.timeout, lambda: settings_from(args), backend=_backend())
            _say(line)
            return status
        if args.command == "shutdown-hook":
            have_task = bool(args.task_id or os.environ.get("AGENTD_TASK_ID"))
            return anyio.run(  # one line per step, printed by the hook itself
                lambda: hooks.shutdown_hook(
                    pid_file=args.pid_file,
                    save_state=args.save_state,
                    socket=socket_from(args),
                    timeout=args.timeout,
                    stop_timeout=args.stop_timeout,
                    load_settings=lambda: settings_from(args),
                    have_task=have_task,
                    state_file=args.state_file,
                    state_wait=args.state_wait,
                ),
                backend=_backend(),
            )
        raise AssertionError(f"unhandled command {args.command}")
    except ConfigError as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except Exception:
        logs.get_logger("agentd").exception("internal error")
        return EX_SOFTWARE
