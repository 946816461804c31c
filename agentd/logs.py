"""Logging with structlog: JSON lines off a TTY (journald, containers), a console view on one.

Secrets registered with :func:`add_secret` (the agent token) are replaced by ``[REDACTED]`` in
every rendered line, whatever carried them: an event field, an exception text, a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_SECRETS: set[str] = set()
REDACTED = "[REDACTED]"


def add_secret(value: str) -> None:
    """Never let ``value`` appear in a log line (values shorter than 4 characters are ignored)."""
    if len(value) >= 4:
        _SECRETS.add(value)


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
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        exc = [structlog.processors.dict_tracebacks]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
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
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # httpx and httpcore log through the standard library; keep them quiet (no URLs or headers).
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger whose lines carry ``component=name``."""
    return structlog.get_logger(component=name)
