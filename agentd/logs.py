"""Logging with structlog: JSON lines off a TTY (journald, containers), a console view on one.

Secrets registered with :func:`add_secret` (the agent token) are replaced by ``[REDACTED]`` in
every rendered line, whatever carried them: an event field, an exception text, a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

import structlog

_SECRETS: set[str] = set()
REDACTED = "[REDACTED]"


def add_secret(value: str) -> None:
    """Never let ``value`` appear in a log line, as is or escaped the way JSON or a repr would
    write it (values shorter than 4 characters are ignored)."""
    if len(value) >= 4:
        _SECRETS.update({value, json.dumps(value)[1:-1], repr(value)[1:-1]})


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``[REDACTED]``."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _redact_rendered(_logger: Any, _name: str, rendered: str) -> str:
    return redact(rendered)


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog for the process.

    ``fmt`` is ``json``, ``console`` or ``auto`` (console when ``stream`` is a TTY);
    ``level`` one of debug/info/warning/error. Lines go to ``stream`` (default stderr).
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    # Tracebacks never carry frame locals: an HTTP client's frames hold the agent token in
    # their headers, and a local may be cut short so that redaction cannot recognise it.
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        exc = [structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback)
        exc = []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *exc,
            renderer,
            _redact_rendered,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *args: _SafePrintLogger(stream),
        cache_logger_on_first_use=False,
    )
    # httpx and httpcore log through the standard library; keep them quiet (no URLs or headers).
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _SafePrintLogger(structlog.PrintLogger):
    """A PrintLogger whose failures are dropped: a full disk or a closed pipe on stderr must
    cost log lines, never the snapshot."""

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except (OSError, ValueError):
            pass

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger whose lines carry ``component=name``."""
    return structlog.get_logger(component=name)
