"""The sink: storing a snapshot with coderd's log-snapshot endpoint.

``POST {CODER_AGENT_URL}/api/v2/workspaceagents/me/tasks/{task}/log-snapshot?format=agentapi``
with the agent token in ``Coder-Session-Token`` (CONTRACT.md §1). coderd answers 204 on success
and upserts: each stored snapshot replaces the previous one for the task.

Retry policy (tenacity, sleeping through anyio so it works on asyncio and trio):

* retried: connection errors, timeouts, 408, 429, 500, 502, 503, 504;
* waits: after the n-th failed attempt, exponential backoff with full jitter,
  ``uniform(0, window)`` with ``window = min(backoff_max, backoff_base * 2**(n - 1))`` seconds
  (0.25, 0.5, 1, 2, 4, 4, ...): a lone agentd against a briefly failing coderd retries at once;
* ``Retry-After`` (seconds or an HTTP date) is a floor, not a schedule: the wait is
  ``retry_after + uniform(0, max(window, retry_after))``. coderd gives every client of a fleet
  that stopped at the same moment the same value, so honouring it exactly brings them all
  back in the same instant, second after second (``bench/fleet.py`` measures it);
* final, one attempt only: 400, 401, 403, 404, 413 and any other answer, and a TLS
  certificate coderd presents that is not trusted (retrying cannot fix it: AGENTD_CA_FILE can);
* never past the deadline: an attempt is only started with at least ``min_attempt`` seconds
  left and each attempt is cut at the deadline. The jitter is drawn within the time left, so
  the last attempt still happens (spread out, not piled up at the deadline); a
  ``Retry-After`` longer than the time left ends the upload at once, saying so.
"""

from __future__ import annotations

import email.utils
import random
import ssl
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import anyio
import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from agentd.logs import get_logger
from agentd.snapshot import Snapshot

log = get_logger("agentd.coderd")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

_FINAL_HINTS = {
    400: "coderd refused the request",
    401: "coderd refused the agent token",
    403: "the agent token may not store this task's snapshot",
    404: "task not in this workspace, or a Coder version without the log-snapshot endpoint",
    413: "the body is over coderd's limit",
}


@dataclass(frozen=True, slots=True)
class UploadOutcome:
    """What became of one upload.

    ``stored`` is True on 204. ``status`` is the last HTTP status (None if coderd never
    answered); ``attempts`` the number of requests sent; ``bytes``/``messages`` describe the
    body; ``reason`` is a one-line explanation when not stored; ``at`` a ``time.time()``.
    """

    stored: bool
    status: int | None
    attempts: int
    bytes: int
    messages: int
    reason: str
    at: float


class _Retryable(Exception):
    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.retry_after = retry_after


class _Final(Exception):
    def __init__(self, reason: str, status: int | None) -> None:
        super().__init__(reason)
        self.status = status


class _DeadlineTooClose(Exception):
    pass


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _why(exc: BaseException) -> str:
    """``Type: text`` for a transport error. When it has no text, the text of the first cause
    that has one: on trio a TLS failure reaches httpx as a bare ``BrokenResourceError``, and
    "certificate verify failed" is only in the ``SSLCertVerificationError`` behind it."""
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None or str(cause):
            break
        cause = cause.__cause__ or cause.__context__
    text = str(cause) if cause is not None else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _cert_failure(exc: BaseException) -> bool:
    """True if a certificate verification failure is behind ``exc`` (its cause chain)."""
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None:
            return False
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _coderd_error(response: httpx.Response) -> str:
    """coderd's ``message`` and ``detail`` from a JSON error body, or the start of the body."""
    try:
        body = response.json()
        parts = [str(body.get(key)) for key in ("message", "detail") if body.get(key)]
        return ": ".join(parts) if parts else response.text[:200]
    except (ValueError, AttributeError):
        return response.text[:200]


class CoderdUploader:
    """Uploads snapshots for one task. ``client`` is shared; the token is sent only as a header.

    Timing (seconds): ``attempt_timeout`` caps one request; ``min_attempt`` is the least time
    worth starting an attempt with; backoff as in the module docstring (:meth:`retry_wait`).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        coderd_url: str,
        token: str,
        task_id: UUID,
        *,
        attempt_timeout: float = 5.0,
        min_attempt: float = 0.2,
        backoff_base: float = 0.25,
        backoff_max: float = 4.0,
    ) -> None:
        self.client = client
        self.url = f"{coderd_url}/api/v2/workspaceagents/me/tasks/{task_id}/log-snapshot"
        self._headers = {"Coder-Session-Token": token, "Content-Type": "application/json"}
        self.attempt_timeout = attempt_timeout
        self.min_attempt = min_attempt
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max

    def __repr__(self) -> str:  # the headers hold the token
        return f"CoderdUploader(url={self.url!r})"

    def retry_wait(self, failures: int, retry_after: float | None, left: float) -> float | None:
        """Seconds to wait after ``failures`` failed attempts, or None to give up.

        ``retry_after`` is coderd's ``Retry-After`` in seconds (None without one); ``left`` the
        seconds before the deadline. See the module docstring.
        """
        room = left - self.min_attempt  # the next attempt must start within this many seconds
        floor = retry_after or 0.0
        if floor > room:
            return None  # no time left, or coderd asks for more of it than is left
        window = min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))
        if retry_after is not None:
            window = max(window, retry_after)
        return floor + random.uniform(0, min(window, room - floor))

    async def upload(self, snapshot: Snapshot, deadline: float) -> UploadOutcome:
        """POST ``snapshot`` until stored, a final answer, or ``deadline`` (``anyio.current_time()``).

        Never raises for coderd's failures: the outcome says what happened, and one log line
        reports it.
        """
        attempts = 0
        status: int | None = None
        give_up = False

        def wait(state: RetryCallState) -> float:  # tenacity asks for the wait, then for stop
            nonlocal give_up
            exc = state.outcome.exception() if state.outcome else None
            retry_after = exc.retry_after if isinstance(exc, _Retryable) else None
            seconds = self.retry_wait(state.attempt_number, retry_after, deadline - anyio.current_time())
            give_up = seconds is None
            return seconds or 0.0

        def stop(state: RetryCallState) -> bool:
            return give_up

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Retryable),
            wait=wait,
            stop=stop,
            sleep=anyio.sleep,
            reraise=True,
        )
        reason = ""
        try:
            if anyio.current_time() + self.min_attempt > deadline:
                raise _DeadlineTooClose
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    status = None
                    status = await self._attempt(snapshot, deadline)
        except _Retryable as exc:
            status = exc.status
            left = deadline - anyio.current_time()
            if exc.retry_after is not None and exc.retry_after + self.min_attempt > left:
                reason = f"{exc}; coderd asked to retry after {exc.retry_after:.1f} s, {max(left, 0):.1f} s left before the deadline"
            else:
                reason = f"{exc}; gave up at the deadline"
        except _Final as exc:
            status, reason = exc.status, str(exc)
        except _DeadlineTooClose:
            reason = "no time left before the deadline"
        outcome = UploadOutcome(
            stored=not reason,
            status=status,
            attempts=attempts,
            bytes=snapshot.size,
            messages=len(snapshot.message_ids),
            reason=reason,
            at=time.time(),
        )
        fields: dict[str, Any] = dict(status=status, attempts=attempts, bytes=snapshot.size, messages=outcome.messages)
        if outcome.stored:
            log.info("snapshot stored", newest_id=snapshot.newest_id, **fields)
        else:
            log.error("snapshot not stored", reason=reason, **fields)
        return outcome

    async def _attempt(self, snapshot: Snapshot, deadline: float) -> int:
        left = deadline - anyio.current_time()
        timeout = min(self.attempt_timeout, left)
        try:
            with anyio.fail_after(timeout):
                response = await self.client.post(
                    self.url,
                    params={"format": "agentapi"},
                    content=snapshot.body,
                    headers=self._headers,
                    timeout=timeout,
                )
        except TimeoutError:
            raise _Retryable(f"no answer from coderd within {timeout:.1f} s") from None
        except httpx.TimeoutException as exc:
            raise _Retryable(f"coderd timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            if _cert_failure(exc):  # retrying cannot make an untrusted certificate trusted
                raise _Final(f"coderd's TLS certificate is not trusted ({_why(exc)}); set AGENTD_CA_FILE", None) from None
            raise _Retryable(f"cannot reach coderd: {_why(exc)}") from None
        except httpx.HTTPError as exc:  # e.g. a body that does not decode (a broken proxy's gzip)
            log.warning("unreadable answer from coderd", error=_why(exc))
            raise _Retryable(f"unreadable answer from coderd: {_why(exc)}") from None
        status = response.status_code
        if status == 204 or 200 <= status < 300:
            return status
        detail = _coderd_error(response)
        if status in RETRY_STATUSES:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            log.info("coderd busy", status=status, detail=detail, retry_after=retry_after)
            raise _Retryable(f"coderd answered {status}: {detail}", status, retry_after)
        hint = _FINAL_HINTS.get(status, "coderd refused the snapshot")
        raise _Final(f"coderd answered {status} ({hint}): {detail}", status)
