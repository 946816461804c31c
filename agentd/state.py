"""The persisted buffer: the conversation survives a kill -9, an OOM kill or a lost node.

One JSON file per state directory, ``state.json``, written atomically (temp file in the same
directory, fsync, rename, fsync of the directory; mode 0600) and read back on start::

    {"version": 1, "task_id": "<uuid>", "messages": [{"id","role","content","time","elided"}],
     "acked": "<sha256 of the last body coderd stored>" | null, "offset": <int>,
     "last_upload": {"stored","status","attempts","bytes","messages","reason","at"} | null}

Failures never stop the daemon: a corrupt or unreadable file is logged and moved aside
(``state.json.corrupt-<time>``); a full or read-only disk degrades to memory-only with one
warning. State belongs to one task: a file written for another task id is ignored.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from agentd.coderd import UploadOutcome
from agentd.logs import get_logger
from agentd.messages import InvalidMessage, Message, parse_message

log = get_logger("agentd.state")

STATE_VERSION = 1
STATE_FILE = "state.json"


@dataclass
class SavedState:
    """What the state file holds, decoded."""

    messages: list[Message] = field(default_factory=list)
    acked: str | None = None
    last_upload: UploadOutcome | None = None
    #: The ring buffer's offset to agentapi's ids (see :attr:`RingBuffer.offset`).
    offset: int = 0


class StateStore:
    """Reads and writes ``state_dir/state.json`` for ``task_id``.

    ``enabled`` turns False after the first write failure (memory-only from then on).
    """

    def __init__(self, state_dir: Path, task_id: UUID) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE
        self.task_id = str(task_id)
        self.enabled = True

    def load(self) -> SavedState:
        """The saved state, or an empty one if there is none or it cannot be used."""
        try:
            raw = self.path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # no state yet (or no directory: save warns)
            return SavedState()
        except OSError as exc:
            aside = self._move_aside()
            log.warning("state file unreadable; moved aside, starting empty", path=str(self.path), moved_to=aside, error=exc.strerror)
            return SavedState()
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError("unknown state format")
            if data.get("task_id") != self.task_id:
                log.warning("state file is for another task; ignoring it", path=str(self.path))
                return SavedState()
            messages = []
            for item in data.get("messages") or []:
                message = parse_message(item)
                elided = item.get("elided", 0)
                if isinstance(elided, int) and elided > 0:
                    message = Message(message.id, message.role, message.content, message.time, elided)
                messages.append(message)
            last = data.get("last_upload")
            outcome = UploadOutcome(**last) if isinstance(last, dict) else None
            acked = data.get("acked") if isinstance(data.get("acked"), str) else None
            offset = data.get("offset", 0)
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise ValueError(f"offset {offset!r:.40} is not a non-negative integer")
            return SavedState(sorted(messages, key=lambda m: m.id), acked, outcome, offset)
        except (ValueError, TypeError, InvalidMessage) as exc:
            aside = self._move_aside()
            log.warning("state file corrupt; moved aside, starting empty", path=str(self.path), moved_to=aside, error=str(exc)[:200])
            return SavedState()

    def _move_aside(self) -> str | None:
        """Rename the state file to ``state.json.corrupt-<time>`` (kept for a post-mortem, and out
        of the way of the next write); the new path, or None if it could not be moved."""
        aside = self.path.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}")
        try:
            os.replace(self.path, aside)
        except OSError:
            return None
        return str(aside)

    def save(self, state: SavedState) -> bool:
        """Write ``state`` atomically; False (and memory-only from then on) if the disk refuses."""
        if not self.enabled:
            return False
        payload = {
            "version": STATE_VERSION,
            "task_id": self.task_id,
            "messages": [asdict(m) for m in state.messages],
            "acked": state.acked,
            "last_upload": asdict(state.last_upload) if state.last_upload else None,
            "offset": state.offset,
        }
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.dir)
            return True
        except OSError as exc:
            self.enabled = False
            log.warning(
                "cannot write state; keeping the buffer in memory only",
                path=str(self.path),
                error=exc.strerror or str(exc),
            )
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def as_dict(outcome: UploadOutcome | None) -> dict[str, Any] | None:
    """An upload outcome as JSON-ready data (for ``agentd status``)."""
    return asdict(outcome) if outcome else None
