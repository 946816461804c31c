"""Command line: ``agentd run`` and ``agentd demo``.

Exit status: 0 stored (or nothing to store), 1 not stored, 78 bad configuration (one line on
stderr naming the setting, no traceback), 70 internal error (logged with the token redacted).
"""

from __future__ import annotations

import signal
import sys

from agentd import daemon

# Until the event loop installs its handlers, remember SIGTERM/SIGINT instead of dying: a stop
# that arrives during start-up still stores the snapshot.
for _signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_signum, lambda signum, _frame: daemon.early_signals.append(signum))

import argparse  # noqa: E402

import anyio  # noqa: E402

from agentd import logs  # noqa: E402
from agentd.settings import EX_CONFIG, ConfigError, Settings, load_settings  # noqa: E402

EX_SOFTWARE = 70  # sysexits.h: internal software error


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    flags = parser.add_argument_group("settings (each also from the environment; flags win)")
    flags.add_argument("--coderd-url", metavar="URL", help="coderd base URL [CODER_AGENT_URL]")
    flags.add_argument("--agent-token", metavar="TOKEN", help="agent token [CODER_AGENT_TOKEN]")
    flags.add_argument("--agent-token-file", metavar="PATH", help="file holding the agent token [CODER_AGENT_TOKEN_FILE]")
    flags.add_argument("--task-id", metavar="UUID", help="the task's UUID [AGENTD_TASK_ID]")
    flags.add_argument("--agentapi-url", metavar="URL", help="agentapi base URL [AGENTD_AGENTAPI_URL]")
    flags.add_argument("--max-messages", metavar="N", help="ring buffer size [AGENTD_MAX_MESSAGES]")
    flags.add_argument("--max-bytes", metavar="BYTES", help="snapshot body limit [AGENTD_MAX_BYTES]")
    flags.add_argument("--shutdown-timeout", metavar="SECONDS", help="signal to exit, retries included [AGENTD_SHUTDOWN_TIMEOUT]")
    flags.add_argument("--state-dir", metavar="PATH", help="state directory [AGENTD_STATE_DIR]")
    flags.add_argument("--ca-file", metavar="PATH", help="CA bundle for coderd's TLS certificate [AGENTD_CA_FILE]")
    flags.add_argument("--log-format", metavar="FORMAT", help="json, console or auto [AGENTD_LOG_FORMAT]")
    flags.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning, error [AGENTD_LOG_LEVEL]")


_SETTING_FLAGS = (
    "coderd_url agent_token agent_token_file task_id agentapi_url max_messages max_bytes "
    "shutdown_timeout state_dir ca_file log_format log_level"
).split()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentd",
        description="Keeps a Coder task's agentapi conversation and stores it in coderd when the workspace stops.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="tail agentapi; store the snapshot on SIGTERM/SIGINT")
    _add_settings_flags(run)
    demo = sub.add_parser("demo", help="run the whole job against built-in stand-ins on loopback")
    demo.add_argument("--log-format", default="console", help="json or console (default console)")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment with the flags in ``args`` on top. Raises ConfigError."""
    return load_settings(**{name: getattr(args, name, None) for name in _SETTING_FLAGS})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from agentd.demo import main as demo_main

            return demo_main(args)
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return EX_CONFIG
    logs.configure(settings.log_format, settings.log_level)
    logs.add_secret(settings.token)
    try:
        return anyio.run(daemon.run, settings)
    except Exception:
        logs.get_logger("agentd").exception("internal error")
        return EX_SOFTWARE
