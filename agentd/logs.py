"""Logging with structlog: JSON lines off a TTY (journald, containers), a console view on one.

Secrets registered with :func:`add_secret` (the agent token) are replaced by ``[REDACTED]`` in
every rendered line, whatever carried them: an event field, an exception text, a traceback. So
is the userinfo of any URL (``https://user:password@host`` is shown as
``https://[REDACTED]@host``), registered or not: the same :func:`redact` guards the control
socket's answers (``agentd status --json``), the client commands' output and the settings'
error lines.

Under systemd (``$JOURNAL_STREAM`` names the stream's device and inode, systemd.exec(5)) each
line starts with its syslog priority, ``<4>`` for a warning, as sd-daemon(3) describes, and
carries no timestamp of its own (the journal stamps every line): ``journalctl -u agentd -p
warning`` then shows the warnings and errors only.

Importing this module is cheap (no structlog, no :mod:`logging`): the client commands use
:func:`redact` without paying for the logging stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import re  # already loaded by json: free
import sys

TYPE_CHECKING = False  # typing's own costs an import on the probe path; mypy reads this one too
if TYPE_CHECKING:
    from typing import Any, TextIO

    import structlog

#: The levels ``AGENTD_LOG_LEVEL`` takes.
LEVELS = ("debug", "info", "warning", "error")

_SECRETS: set[str] = set()
REDACTED = "[REDACTED]"

#: syslog priority of each structlog method (sd-daemon(3): ``<7>`` debug ... ``<2>`` critical).
PRIORITY = {
    "debug": 7,
    "info": 6,
    "msg": 6,
    "warn": 4,
    "warning": 4,
    "err": 3,
    "error": 3,
    "exception": 3,
    "failure": 3,
    "critical": 2,
    "fatal": 2,
}


#: ``scheme://userinfo@``: RFC 3986 userinfo holds no ``/ ? # @``; quotes and backslashes end it
#: too (a URL inside JSON or a repr).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s\"'\\]+@")


def add_secret(value: str) -> None:
    """Never let ``value`` appear in a log line, as is or escaped the way JSON or a repr would
    write it (values shorter than 4 characters are ignored)."""
    if len(value) >= 4:
        _SECRETS.update({value, json.dumps(value)[1:-1], repr(value)[1:-1]})


def add_url_secrets(url: str) -> None:
    """Register the userinfo of ``url`` (``user:password``, and the password alone) with
    :func:`add_secret`, so it is hidden even where it shows without its URL."""
    _scheme, sep, rest = url.partition("://")
    userinfo, at, _host = rest.partition("/")[0].rpartition("@")
    if sep and at and userinfo:
        add_secret(userinfo)
        password = userinfo.partition(":")[2]
        if password:
            add_secret(password)


def redact(text: str) -> str:
    """``text`` with every registered secret and every URL's userinfo replaced by ``[REDACTED]``."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "@" in text:
        text = _USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)
    return text


def _redact_rendered(_logger: Any, _name: str, rendered: Any) -> Any:
    return redact(rendered)


def _with_priority(_logger: Any, name: str, rendered: Any) -> Any:
    return f"<{PRIORITY.get(name, 6)}>{rendered}"


def journal_stream(stream: TextIO, environ: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """True when ``stream`` is the journal's stream: ``$JOURNAL_STREAM`` (``device:inode``, set
    by systemd for a service whose output goes to the journal) names the file ``stream`` writes to.

    A child that inherited the variable but writes elsewhere (a pipe, a file) does not match.
    """
    value = (environ if environ is not None else os.environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):  # no fileno (a StringIO), or not two numbers
        return False


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog for the process.

    ``fmt`` is ``json``, ``console`` or ``auto`` (console when ``stream`` is a TTY);
    ``level`` one of debug/info/warning/error. Lines go to ``stream`` (default stderr). When
    ``stream`` is the journal's (:func:`journal_stream`), lines carry a ``<N>`` priority prefix
    and no timestamp.
    """
    import logging

    import structlog

    stream = stream or sys.stderr
    tty = _isatty(stream)
    journal = journal_stream(stream)
    if fmt == "auto":
        fmt = "console" if tty else "json"
    renderer: Any
    # Tracebacks never carry frame locals: an HTTP client's frames hold the agent token in
    # their headers, and a local may be cut short so that redaction cannot recognise it.
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        exc = [structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=tty and not journal, exception_formatter=structlog.dev.plain_traceback)
        exc = []
    stamp = [] if journal else [structlog.processors.TimeStamper(fmt="iso", utc=True)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *stamp,
            *exc,
            renderer,
            _redact_rendered,
            *([_with_priority] if journal else []),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *args: _safe_print_logger(stream),
        cache_logger_on_first_use=False,
    )
    # httpx and httpcore log through the standard library; keep them quiet (no URLs or headers).
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def configured() -> bool:
    """Whether :func:`configure` (or anything else) has set up structlog in this process."""
    import structlog

    return structlog.is_configured()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


_SAFE_LOGGER: Any = None


def _safe_print_logger(stream: TextIO) -> Any:
    """A structlog PrintLogger whose failures are dropped: a full disk or a closed pipe on
    stderr must cost log lines, never the snapshot. (The class is made on first use, so that
    importing this module does not import structlog.)"""
    global _SAFE_LOGGER
    if _SAFE_LOGGER is None:
        import structlog

        class SafePrintLogger(structlog.PrintLogger):
            def msg(self, message: str) -> None:
                with contextlib.suppress(OSError, ValueError):
                    super().msg(message)

            log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg

        _SAFE_LOGGER = SafePrintLogger
    return _SAFE_LOGGER(stream)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger whose lines carry ``component=name``."""
    import structlog

    logger: structlog.stdlib.BoundLogger = structlog.get_logger(component=name)
    return logger
