"""Command line: ``agentd run | supervise | check | snapshot | status | shutdown-hook | demo``.

Results go to stdout, errors to stderr; a closed stdout (``agentd status --json | head``) is a
normal end. Exit statuses are :mod:`agentd.exits`' (0 stored, or would be for ``check``;
1 not stored, 2 usage, 3 no
daemon, 70 internal error, 73 socket held by another daemon, 78 bad configuration, 128+n a
signal).

Each command's settings flags are derived from :class:`agentd.settings.Settings`: its ``--help``
lists only the settings it uses, with their defaults and environment variables. Imports are
lazy: ``agentd status`` and ``agentd snapshot`` (when a daemon answers) import neither the
settings library nor the HTTP, logging or async stack. Process-wide set-up (early signal
handlers, ``gc.freeze``, the quick exit) belongs to the entry point, :mod:`agentd.entry`.

A new command is one entry in :data:`COMMANDS`: its help, a function adding its flags and a
function running it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence

from agentd import __version__
from agentd.exits import EX_CONFIG, EX_SOFTWARE, ConfigError
from agentd.logs import redact
from agentd.paths import client_socket

TYPE_CHECKING = False  # typing's own costs an import on the probe path; mypy reads this one too
if TYPE_CHECKING:
    from typing import Any

    from agentd.entry import EarlySignals
    from agentd.settings import Settings

#: Settings a daemon uses but a client that stores once does not (its one deadline is --timeout).
DAEMON_ONLY = frozenset({"shutdown_timeout", "checkpoint_interval", "child_stop_timeout", "startup_probe"})

#: Settings each command leaves out of its flags; a command not named here takes no settings.
SETTINGS_LEFT_OUT: dict[str, frozenset[str]] = {
    "run": frozenset({"child_stop_timeout"}),
    "supervise": frozenset(),
    "check": frozenset({"child_stop_timeout", "startup_probe"}),
    "snapshot": DAEMON_ONLY,
    "shutdown-hook": DAEMON_ONLY,
}

#: The daemon commands: they keep the early signals; every other command restores the defaults.
DAEMONS = frozenset({"run", "supervise", "demo"})


class Context:
    """What :func:`main` was given beyond the arguments (see :mod:`agentd.entry`)."""

    def __init__(self, early_signals: list[int], before_daemon: Callable[[], None] | None) -> None:
        self.early_signals = early_signals
        self.before_daemon = before_daemon


# -- flags ---------------------------------------------------------------------------------------


def settings_used(command: str) -> list[str]:
    """The settings ``command`` takes as flags, in :class:`Settings`' order."""
    if command not in SETTINGS_LEFT_OUT:
        return []
    from agentd.settings import Settings

    return [name for name in Settings.model_fields if name not in SETTINGS_LEFT_OUT[command]]


def _default_text(name: str) -> str:
    from pydantic_core import PydanticUndefined

    from agentd.settings import Settings

    info = Settings.model_fields[name]
    if info.is_required():
        return "required"
    default: Any = info.default
    if info.default_factory is not None:
        if info.default_factory_takes_validated_data:  # worked out from other settings: the help says how
            return ""
        default = info.default_factory()  # type: ignore[call-arg]
    return "" if default is None or default is PydanticUndefined else f"default {default}"


def add_settings_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """One flag per setting ``command`` uses, derived from ``Settings.model_fields``; each
    flag's help gives the setting's meaning, its default and its environment variable."""
    names = settings_used(command)
    if not names:
        return
    from typing import get_args

    from agentd.settings import ENV_NAMES, Settings, flag_name

    group = parser.add_argument_group("settings (each also from its environment variable; flags win)")
    for name in names:
        info = Settings.model_fields[name]
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        choices = get_args(info.annotation)
        metavar = str(extra.get("metavar") or "{" + ",".join(map(str, choices)) + "}")
        facts = "; ".join(filter(None, [_default_text(name), ENV_NAMES[name]]))
        text = f"{info.description or name} ({facts})".replace("%", "%%")
        group.add_argument(flag_name(name), dest=name, metavar=metavar, help=text)


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    """``--socket`` and ``--state-dir`` for commands that only talk to the daemon (the same
    names and environment variables as the settings; tests check they agree)."""
    parser.add_argument("--socket", metavar="PATH", help="control socket (default: $RUNTIME_DIRECTORY/agentd.sock, else in the state directory; AGENTD_SOCKET)")
    parser.add_argument("--state-dir", metavar="PATH", help="state directory, where the socket is by default (AGENTD_STATE_DIR)")


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds in (0, 3600]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 3600] seconds")
    return value


def _timeout_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--timeout", type=_seconds, default=8.0, metavar="SECONDS", help=f"{what} (default 8)")


def _flags_run(parser: argparse.ArgumentParser, lean: bool) -> None:
    add_settings_flags(parser, "run")


def _flags_supervise(parser: argparse.ArgumentParser, lean: bool) -> None:
    add_settings_flags(parser, "supervise")
    parser.add_argument("child", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]", help="the command to run, e.g. agentapi server -- claude")


def _flags_check(parser: argparse.ArgumentParser, lean: bool) -> None:
    parser.add_argument("--json", action="store_true", help="everything, as JSON")
    add_settings_flags(parser, "check")


def _flags_snapshot(parser: argparse.ArgumentParser, lean: bool) -> None:
    _timeout_flag(parser, "store within this many seconds, retries included")
    if lean:  # the flags a snapshot through the daemon reads; anything else takes the full parser
        _add_client_flags(parser)
    else:
        add_settings_flags(parser, "snapshot")


def _flags_status(parser: argparse.ArgumentParser, lean: bool) -> None:
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--json", dest="view", action="store_const", const="json", help="everything, as JSON")
    view.add_argument("--short", dest="view", action="store_const", const="short", help="one line: messages held, last upload (Coder's dashboard)")
    view.add_argument("--body", dest="view", action="store_const", const="body", help="what would be sent now, message by message")
    parser.set_defaults(view="text")
    _add_client_flags(parser)


def _flags_hook(parser: argparse.ArgumentParser, lean: bool) -> None:
    parser.add_argument("--pid-file", metavar="PATH", help="agentapi's pid file")
    parser.add_argument("--save-state", action="store_true", help="send agentapi SIGUSR1 (state save) first")
    _timeout_flag(parser, "store the snapshot within this many seconds")
    parser.add_argument("--stop-timeout", type=_seconds, default=5.0, metavar="SECONDS", help="wait for agentapi to exit (default 5)")
    from agentd.hooks import STATE_WAIT

    parser.add_argument("--state-file", metavar="PATH", help="agentapi's state file, waited for after SIGUSR1 (default: agentapi's own --state-file)")
    parser.add_argument("--state-wait", type=_seconds, default=STATE_WAIT, metavar="SECONDS", help=f"wait for that file to change, beside the snapshot (default {STATE_WAIT:g})")
    add_settings_flags(parser, "shutdown-hook")


def _flags_demo(parser: argparse.ArgumentParser, lean: bool) -> None:
    parser.add_argument("--log-format", default="console", metavar="{console,json}", help="how the daemon's lines look (default console)")


# -- commands ------------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace, command: str | None = None) -> Settings:
    """Settings from the environment with the flags in ``args`` on top. Raises ConfigError."""
    from agentd.settings import load_settings

    names = settings_used(command or args.command)
    return load_settings(**{name: getattr(args, name, None) for name in names})


def _backend() -> str:
    """``AGENTD_ASYNC_BACKEND``: asyncio (default) or trio. Raises ConfigError otherwise."""
    backend = os.environ.get("AGENTD_ASYNC_BACKEND", "asyncio").strip().lower() or "asyncio"
    if backend not in ("asyncio", "trio"):
        raise ConfigError(f"AGENTD_ASYNC_BACKEND must be asyncio or trio, got {backend[:20]!r}")
    return backend


def _configure_logs(args: argparse.Namespace, level: str = "warning") -> None:
    """Logging for a client command, before (or without) the settings: a bad value is the
    settings' to report, so here it falls back to the default."""
    from agentd import logs

    fmt = (getattr(args, "log_format", None) or os.environ.get("AGENTD_LOG_FORMAT") or "auto").lower()
    wanted = (getattr(args, "log_level", None) or os.environ.get("AGENTD_LOG_LEVEL") or level).lower()
    logs.configure(fmt if fmt in ("auto", "json", "console") else "auto", wanted if wanted in logs.LEVELS else level)


def _run_daemon(args: argparse.Namespace, ctx: Context) -> int:
    """``agentd run`` and ``agentd supervise``: the daemon, until SIGTERM/SIGINT."""
    command: list[str] | None = None
    if args.command == "supervise":
        command = args.child[1:] if args.child[:1] == ["--"] else args.child
        if not command:
            error("supervise needs a command: agentd supervise -- COMMAND [ARGS...]")
            return 2
    settings = settings_from(args)
    if command:
        settings.check_supervise()
    backend = _backend()
    from agentd import logs

    logs.configure(settings.log_format, settings.log_level)
    logs.add_secret(settings.token)
    import anyio

    from agentd import daemon

    if ctx.before_daemon is not None:
        ctx.before_daemon()
    return int(anyio.run(_daemon_main(daemon, settings, command, ctx.early_signals), backend=backend))


def _daemon_main(daemon: Any, settings: Settings, command: list[str] | None, early: list[int]) -> Callable[[], Any]:
    """``daemon.run`` with the early signals: as a parameter where it takes one, else through
    the module global it read before."""
    code = daemon.run.__code__
    if "early_signals" in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
        timed = early.timed() if hasattr(early, "timed") else early  # read by run itself, with their times
        return lambda: daemon.run(settings, command, early_signals=timed)
    daemon.early_signals = early
    return lambda: daemon.run(settings, command)


def _check(args: argparse.Namespace, ctx: Context) -> int:
    """``agentd check``: would the snapshot be stored? Stores nothing."""
    import anyio

    from agentd import check

    settings = settings_from(args)
    flags = {name: getattr(args, name, None) for name in settings_used("check")}
    status, text = anyio.run(check.main, settings, flags, args.json, backend=_backend())
    say(text)
    return int(status)


def _status(args: argparse.Namespace, ctx: Context) -> int:
    from agentd import client

    status, out, err = client.status_command(client_socket(args.socket, args.state_dir), args.view)
    if err:
        error(err)
    if out:
        say(out)
    return status


def _snapshot(args: argparse.Namespace, ctx: Context) -> int:
    from agentd import client

    socket = client_socket(args.socket, args.state_dir)
    try:
        status, line = client.snapshot_via_daemon(socket, args.timeout)
    except client.NoDaemon as exc:
        status, line = _snapshot_alone(args, str(exc))
    say(line)
    return status


def _snapshot_alone(args: argparse.Namespace, why: str) -> tuple[int, str]:
    """No daemon listens: load the settings (every flag this time) and store it here."""
    if not hasattr(args, "coderd_url"):  # parsed by the lean parser: parse again with all flags
        args = build_parser(["snapshot"]).parse_args(args.argv)
    settings = settings_from(args, "snapshot")
    backend = _backend()
    _configure_logs(args)
    from agentd import logs

    logs.add_secret(settings.token)
    import anyio

    from agentd import client

    return anyio.run(client.store_alone, settings, args.timeout, why, backend=backend)


def _shutdown_hook(args: argparse.Namespace, ctx: Context) -> int:
    from pathlib import Path

    import anyio

    from agentd import hooks

    _configure_logs(args)
    have_task = bool(args.task_id or os.environ.get("AGENTD_TASK_ID"))
    return anyio.run(  # one line per step, printed by the hook itself
        lambda: hooks.shutdown_hook(
            pid_file=Path(args.pid_file) if args.pid_file else None,
            save_state=args.save_state,
            socket=client_socket(args.socket, args.state_dir),
            timeout=args.timeout,
            stop_timeout=args.stop_timeout,
            load_settings=lambda: settings_from(args),
            have_task=have_task,
            state_file=Path(args.state_file) if args.state_file else None,
            state_wait=args.state_wait,
        ),
        backend=_backend(),
    )


def _demo(args: argparse.Namespace, ctx: Context) -> int:
    from agentd.demo import main as demo_main

    return demo_main(args)


class Command:
    """One command: its help, what adds its flags (``lean``: the flags of its usual call, without
    the settings library) and what runs it."""

    def __init__(
        self,
        help: str,
        flags: Callable[[argparse.ArgumentParser, bool], None],
        run: Callable[[argparse.Namespace, Context], int],
        lean: bool = False,
    ) -> None:
        self.help, self.flags, self.run, self.lean = help, flags, run, lean


COMMANDS: dict[str, Command] = {
    "run": Command("tail agentapi; store the snapshot on SIGTERM/SIGINT", _flags_run, _run_daemon),
    "supervise": Command("container entrypoint: run COMMAND as a child and tail it as run does", _flags_supervise, _run_daemon),
    "check": Command("probe agentapi and coderd: would the snapshot be stored? (stores nothing)", _flags_check, _check),
    "snapshot": Command("store the snapshot now (through the daemon, or alone without one)", _flags_snapshot, _snapshot, lean=True),
    "status": Command("ask the daemon how it is and what it would send (exit 3 when none answers)", _flags_status, _status, lean=True),
    "shutdown-hook": Command("stop-script drop-in: SIGUSR1 agentapi, snapshot, SIGTERM agentapi", _flags_hook, _shutdown_hook),
    "demo": Command("run the whole job against built-in stand-ins on loopback", _flags_demo, _demo),
}


# -- parsing -------------------------------------------------------------------------------------


def build_parser(only: Sequence[str] | None = None, *, lean: bool = False) -> argparse.ArgumentParser:
    """The parser; the flags of the commands in ``only`` (default: all) are filled in, the others
    are listed by name and help only. ``lean``: the commands' lean flags (no settings library)."""
    parser = argparse.ArgumentParser(
        prog="agentd",
        description="Keeps a Coder task's agentapi conversation and stores it in coderd when the workspace stops.",
        epilog="exit status: 0 stored, 1 not stored, 2 usage, 3 no daemon, 70 internal error, "
        "73 socket in use, 78 bad settings, 128+n stopped by signal n",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"agentd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.help, allow_abbrev=False)
        if only is None or name in only:
            command.flags(child, lean)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (the first argument that is not an option), if any."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``. A lean command's usual call is parsed without the settings library; any
    other flag (or ``--help``) takes the full parser, which also gives the errors."""
    name = _command_of(argv)
    command = COMMANDS.get(name or "")
    if name is None or command is None:
        return build_parser(()).parse_args(argv)  # --version, --help, or an error naming the choices
    args: argparse.Namespace | None = None
    if command.lean and not {"-h", "--help"} & set(argv):
        args, rest = build_parser([name], lean=True).parse_known_args(argv)
        args = None if rest else args
    if args is None:
        args = build_parser([name]).parse_args(argv)
    args.argv = list(argv)
    return args


# -- output --------------------------------------------------------------------------------------


def say(text: str) -> None:
    """A result, on stdout. A closed stdout (``| head``) is a normal end: the rest is dropped."""
    try:
        sys.stdout.write(redact(text) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()


def error(text: str) -> None:
    """An error, on stderr, as ``agentd: text``."""
    with contextlib.suppress(OSError, ValueError):
        print(f"agentd: {redact(text)}", file=sys.stderr, flush=True)


def _drop_stdout() -> None:
    """Point stdout at /dev/null so that no later flush fails on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # not a real file (a test's capture): nothing to protect
        pass


# -- main ----------------------------------------------------------------------------------------


def main(
    argv: Sequence[str] | None = None,
    *,
    early_signals: EarlySignals | None = None,
    before_daemon: Callable[[], None] | None = None,
) -> int:
    """Run one command; returns the exit status (:mod:`agentd.exits`).

    ``early_signals``: the stop signals taken since the process started (the entry point's);
    a daemon handles them as its first, a client command returns 128+n at once. The client
    commands hand the signals back to their defaults. ``before_daemon``: called once
    everything is imported, just before a daemon starts (the entry point freezes the GC).
    Usage errors raise SystemExit(2), as argparse does.
    """
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # --help into a closed pipe
        _drop_stdout()
        return 0
    ctx = Context([] if early_signals is None else early_signals, before_daemon)
    if args.command not in DAEMONS:
        if ctx.early_signals:
            return 128 + ctx.early_signals[0]
        if early_signals is not None:
            early_signals.restore_defaults()
    return _run(args, ctx)


def _run(args: argparse.Namespace, ctx: Context) -> int:
    try:
        return COMMANDS[args.command].run(args, ctx)
    except ConfigError as exc:
        for problem in exc.problems:
            error(problem)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _drop_stdout()
        return 0
    except Exception:
        from agentd import logs

        if not logs.configured():  # structlog's own default writes to stdout
            _configure_logs(args)
        logs.get_logger("agentd").exception("internal error")
        return EX_SOFTWARE
