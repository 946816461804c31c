"""The persisted buffer: the conversation survives a kill -9, an OOM kill or a lost node.

One JSON file per state directory, ``state.json``, written atomically and read back on start::

    {"version": 1, "task_id": "<uuid>", "messages": [{"id","role","content","time","elided"}],
     "acked": "<sha256 of the last body coderd stored>" | null, "offset": <int>,
     "last_upload": {"stored","status","attempts","bytes","messages","reason","at"} | null}

The state directory is agentd's alone (issue 9):

* it is created 0700 (each missing parent too) whatever the umask; a state directory, or a
  parent of it, that another user can write (world-writable without the sticky bit, or group-
  or world-writable and owned by neither us nor root) is refused with
  :class:`UnsafeStateDir`, a :class:`ConfigError` (exit 78). One exception: a Kubernetes
  ``emptyDir`` with the pod's ``fsGroup`` (root's, mode 2777, group ours), which a non-root pod
  cannot make private and only the pod's own containers can reach;
* every write goes to a new temp file ``.state.json.<pid>.<random>.tmp`` created with
  ``O_CREAT|O_EXCL|O_NOFOLLOW`` (mode 0600), relative to one open descriptor of the directory,
  then fsync, rename over ``state.json``, fsync of the directory; a planted file or symlink of
  that name is never opened or followed;
* writes are serialised: a thread lock in the process and ``flock`` on ``.state.lock`` across
  processes, each waited for at most :data:`LOCK_TIMEOUT` seconds;
* ``state.json`` is opened with ``O_NOFOLLOW|O_NONBLOCK`` (a symlink or a FIFO never hangs or
  redirects the read), must be a regular file (``fstat``) of at most :data:`MAX_STATE_BYTES`.

Failures never stop the daemon: a corrupt, unreadable, irregular or oversized file is logged
and moved aside (``state.json.corrupt-<time>-<random>``); a failed write (a full disk, a
read-only one) keeps the buffer in memory with one warning, and the next write tries again
(an info line when one works again). State belongs to one task: a file written for another
task id is ignored.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import stat
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from agentd.logs import get_logger
from agentd.messages import InvalidMessage, Message, parse_message
from agentd.outcome import UploadOutcome
from agentd.settings import ConfigError

log = get_logger("agentd.state")

STATE_VERSION = 1
STATE_FILE = "state.json"
LOCK_FILE = ".state.lock"
#: Largest state file read back, bytes. Ten messages of coderd's 65 536-byte body hold far less.
MAX_STATE_BYTES = 16 * 1024 * 1024
#: Seconds a write waits for another write (this process's or another's) before giving up.
LOCK_TIMEOUT = 10.0


class UnsafeStateDir(ConfigError):
    """The state directory, or a parent of it, can be written by another user."""


class _Unusable(Exception):
    """The state file exists but cannot be used (not regular, too large, a symlink)."""


@dataclass
class SavedState:
    """What the state file holds, decoded."""

    messages: list[Message] = field(default_factory=list)
    acked: str | None = None
    last_upload: UploadOutcome | None = None
    #: The ring buffer's offset to agentapi's ids (see :attr:`RingBuffer.offset`).
    offset: int = 0


def check_private(state_dir: Path) -> None:
    """Raise :class:`UnsafeStateDir` if ``state_dir`` or an existing parent of it (its path as
    given and with symlinks resolved) is writable by another user: world-writable without the
    sticky bit, or group- or world-writable and owned by neither this user nor root."""
    me = os.geteuid()
    given = Path(os.path.abspath(state_dir))
    resolved = Path(os.path.realpath(state_dir))
    seen: set[Path] = set()
    for path in (given, *given.parents, resolved, *resolved.parents):
        if path in seen:
            continue
        seen.add(path)
        try:
            st = os.stat(path)
        except OSError:
            continue  # not there (yet): created 0700 by us, or the write fails and says why
        if not stat.S_ISDIR(st.st_mode):
            continue
        why = _unsafe(st, me)
        if why:
            raise UnsafeStateDir(
                f"unsafe setting AGENTD_STATE_DIR (--state-dir) {str(state_dir)[:200]!r}: {str(path)[:200]} {why}; "
                "use a directory only this user can write"
            )


def _unsafe(st: os.stat_result, me: int) -> str:
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX and not _pod_volume(st, mode):
        return f"is writable by every user (mode {mode:04o}, no sticky bit)"
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and st.st_uid not in (me, 0):
        return f"is writable by others and owned by uid {st.st_uid} (mode {mode:04o})"
    return ""


def _pod_volume(st: os.stat_result, mode: int) -> bool:
    """A Kubernetes ``emptyDir`` with the pod's ``fsGroup``: root's, setgid, group one of ours
    (kubelet makes it 2777; a non-root pod cannot change that). Only the containers of the pod
    that mount it can reach it, so it is accepted: mount it into agentd's container alone."""
    return st.st_uid == 0 and bool(mode & stat.S_ISGID) and (st.st_gid == os.getegid() or st.st_gid in os.getgroups())


def make_private_dir(state_dir: Path) -> None:
    """Create ``state_dir`` and each missing parent with mode 0700, whatever the umask.

    Raises OSError when a directory cannot be made (a file in the way, a read-only disk)."""
    missing = []
    path = Path(os.path.abspath(state_dir))
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not path.is_dir():
                raise
            continue
        os.chmod(path, 0o700)  # the umask can only have taken bits away: restore u+rwx


class StateStore:
    """Reads and writes ``state_dir/state.json`` for ``task_id``.

    ``enabled`` is False while writes fail (the buffer is then in memory only); every
    :meth:`save` tries again.
    """

    def __init__(self, state_dir: Path, task_id: UUID, max_bytes: int = MAX_STATE_BYTES) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE
        self.task_id = str(task_id)
        self.max_bytes = max_bytes
        self.enabled = True
        self._lock = threading.Lock()

    def load(self) -> SavedState:
        """The saved state, or an empty one if there is none or it cannot be used.

        Creates the state directory (0700). Raises :class:`UnsafeStateDir` when another user
        can write it or a parent of it.
        """
        check_private(self.dir)
        try:
            make_private_dir(self.dir)
            check_private(self.dir)  # as created (or found): still ours alone
        except OSError as exc:
            self._failed(exc.strerror or str(exc))
            return SavedState()
        try:
            raw = self._read()
        except _Unusable as exc:
            aside = self._move_aside()
            log.warning("state file unreadable; moved aside, starting empty", path=str(self.path), moved_to=aside, error=str(exc))
            return SavedState()
        except OSError as exc:
            aside = self._move_aside()
            log.warning("state file unreadable; moved aside, starting empty", path=str(self.path), moved_to=aside, error=exc.strerror or str(exc))
            return SavedState()
        if raw is None:
            return SavedState()
        try:
            return self._decode(raw)
        except (ValueError, TypeError, InvalidMessage) as exc:
            aside = self._move_aside()
            log.warning("state file corrupt; moved aside, starting empty", path=str(self.path), moved_to=aside, error=str(exc)[:200])
            return SavedState()

    def _read(self) -> bytes | None:
        """The state file's bytes; None when there is none. Raises _Unusable or OSError."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Unusable("a symbolic link (not followed)") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Unusable(f"not a regular file ({_kind(st.st_mode)})")
            if st.st_size > self.max_bytes:
                raise _Unusable(f"{st.st_size} bytes, over the {self.max_bytes}-byte cap")
            chunks, size = [], 0
            while size <= self.max_bytes:
                chunk = os.read(fd, min(1 << 20, self.max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > self.max_bytes:
                raise _Unusable(f"grew past the {self.max_bytes}-byte cap while being read")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _decode(self, raw: bytes) -> SavedState:
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

    def _move_aside(self) -> str | None:
        """Rename the state file to ``state.json.corrupt-<time>-<random>`` (kept for a
        post-mortem, and out of the way of the next write; a symlink is renamed, not followed);
        the new path, or None if it could not be moved."""
        aside = self.path.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}-{secrets.token_hex(3)}")
        try:
            os.rename(self.path, aside)
        except OSError:
            return None
        return str(aside)

    def save(self, state: SavedState) -> bool:
        """Write ``state`` atomically; False (logged once per run of failures) if it failed.

        Thread-safe: concurrent calls are serialised. Never raises for the disk's failures."""
        payload = {
            "version": STATE_VERSION,
            "task_id": self.task_id,
            "messages": [asdict(m) for m in state.messages],
            "acked": state.acked,
            "last_upload": asdict(state.last_upload) if state.last_upload else None,
            "offset": state.offset,
        }
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if not self._lock.acquire(timeout=LOCK_TIMEOUT):
            return self._failed(f"another state write still held the lock after {LOCK_TIMEOUT:g} s")
        try:
            self._write(data)
        except UnsafeStateDir as exc:
            return self._failed(str(exc))
        except OSError as exc:
            return self._failed(exc.strerror or str(exc))
        finally:
            self._lock.release()
        if not self.enabled:
            log.info("state written again", path=str(self.path))
        self.enabled = True
        return True

    def _failed(self, reason: str) -> bool:
        if self.enabled:
            log.warning("cannot write state; keeping the buffer in memory only until a write works again",
                        path=str(self.path), error=reason)
        self.enabled = False
        return False

    def _write(self, data: bytes) -> None:
        check_private(self.dir)
        make_private_dir(self.dir)
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            lock_fd = _lock_file(dir_fd)
            try:
                _replace(dir_fd, data)
            finally:
                os.close(lock_fd)  # releases the flock
        finally:
            os.close(dir_fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def _lock_file(dir_fd: int) -> int:
    """``.state.lock`` in the directory, flock'ed exclusively (waited for up to LOCK_TIMEOUT)."""
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{LOCK_FILE} is not a regular file")
        end = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= end:
                    raise OSError(errno.EWOULDBLOCK, f"another process held {LOCK_FILE} for {LOCK_TIMEOUT:g} s") from None
                time.sleep(0.02)
    except BaseException:
        os.close(fd)
        raise


def _replace(dir_fd: int, data: bytes) -> None:
    """Write ``data`` to a new exclusive temp file in ``dir_fd`` and rename it over state.json."""
    tmp = f".{STATE_FILE}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, STATE_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def as_dict(outcome: UploadOutcome | None) -> dict[str, Any] | None:
    """An upload outcome as JSON-ready data (for ``agentd status``)."""
    return asdict(outcome) if outcome else None
