"""What became of one upload to coderd: the one model, and its one JSON shape.

The sink (:mod:`agentd.coderd`) makes an :class:`UploadOutcome`; the daemon keeps the last one;
the state file remembers it; ``agentd status`` and the control socket's ``snapshot`` answer
show it. No I/O and no HTTP stack here, so the state module can use it without importing the
uploader.

The JSON shape (:meth:`UploadOutcome.as_json`), everywhere agentd shows an outcome::

    {"outcome": "stored"|"failed", "http_status": 204|null, "time": "2026-01-01T00:00:00Z",
     "bytes": 1234, "messages": 4, "attempts": 1, "reason": null|"..."}

``time`` is UTC, RFC 3339 to the second. :meth:`UploadOutcome.from_json` reads that shape and
the dataclass's own field names (``stored``/``status``/``at`` as epoch seconds), which is how
state files record it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: The one time format for people and machines: UTC, RFC 3339, whole seconds.
ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def iso(ts: float) -> str:
    """``ts`` (seconds since the epoch) as ``2026-01-01T00:00:00Z``."""
    return time.strftime(ISO_FORMAT, time.gmtime(ts))


def parse_iso(text: str) -> float:
    """Seconds since the epoch for an RFC 3339 time (``Z`` or an offset). Raises ValueError."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True, slots=True)
class UploadOutcome:
    """What became of one upload.

    ``stored`` is True when coderd answered 204. ``status`` is the last HTTP status (None if
    coderd never answered); ``attempts`` the number of requests sent; ``bytes``/``messages``
    describe the body; ``reason`` is a one-line explanation when not stored; ``at`` a
    ``time.time()`` (seconds since the epoch).
    """

    stored: bool
    status: int | None
    attempts: int
    bytes: int
    messages: int
    reason: str
    at: float

    def as_json(self) -> dict[str, Any]:
        """The one JSON shape (see the module docstring)."""
        return {
            "outcome": "stored" if self.stored else "failed",
            "http_status": self.status,
            "time": iso(self.at),
            "bytes": self.bytes,
            "messages": self.messages,
            "attempts": self.attempts,
            "reason": self.reason or None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UploadOutcome:
        """Read :meth:`as_json`'s shape or the field names (state files). Raises ValueError or
        TypeError for anything else."""
        if "outcome" in data:
            if data["outcome"] not in ("stored", "failed"):
                raise ValueError(f"unknown upload outcome {str(data['outcome'])[:20]!r}")
            data = {
                "stored": data["outcome"] == "stored",
                "status": data.get("http_status"),
                "attempts": data.get("attempts", 0),
                "bytes": data.get("bytes", 0),
                "messages": data.get("messages", 0),
                "reason": data.get("reason") or "",
                "at": parse_iso(str(data.get("time"))),
            }
        return cls(**data)


def as_json(outcome: UploadOutcome | None) -> dict[str, Any] | None:
    """``outcome.as_json()``, or None for no outcome."""
    return outcome.as_json() if outcome is not None else None
