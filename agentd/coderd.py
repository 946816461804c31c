"""The sink: storing a snapshot with coderd's log-snapshot endpoint.

``POST {CODER_AGENT_URL}/api/v2/workspaceagents/me/tasks/{task}/log-snapshot?format=agentapi``
with the agent token in ``Coder-Session-Token`` (CONTRACT.md §1). coderd answers **204** on
success (its handler writes nothing else) and upserts: each stored snapshot replaces the
previous one for the task.

What counts as stored: a 204, nothing else. Any other 2xx (a proxy's or captive portal's HTML
page, the Coder dashboard served because ``CODER_AGENT_URL`` has a wrong path) was written by
something other than coderd's handler, so coderd may never have seen the snapshot. It is a
**retryable** failure that says so: coderd did not refuse anything, the snapshot is kept, and
another attempt (perhaps through another backend of a load balancer) can still store it; the
deadline bounds what the retries cost, and the final log line names the likely fix.

Every answer is read defensively: coderd or anything in between may be hostile.

* agentd asks for ``Accept-Encoding: identity``; a body is read raw and streamed, at most
  :data:`ANSWER_MAX_BYTES` bytes of it (then the connection is closed), and a gzip/deflate body
  sent anyway is inflated to at most that many bytes (a gzip bomb costs nothing);
* ``Retry-After`` is ASCII delta-seconds or an HTTP date, and is bounded
  (:func:`parse_retry_after`); anything else is ignored;
* any exception while reading or parsing an answer (a JSON body nested 100 000 deep, a broken
  encoding) is that attempt's failure, logged once and retried; it never ends the daemon.

Retry policy (tenacity, sleeping through anyio so it works on asyncio and trio):

* retried: connection errors, timeouts, unreadable answers, a 2xx other than 204, 408, 429,
  500, 502, 503, 504;
* waits: :func:`agentd.backoff.full_jitter` after the n-th failed attempt, ``uniform(0,
  window)`` with ``window = min(backoff_max, backoff_base * 2**(n - 1))`` seconds (0.25, 0.5,
  1, 2, 4, 4, ...): a lone agentd against a briefly failing coderd retries at once;
* ``Retry-After`` is a floor, not a schedule: the wait is ``retry_after + uniform(0,
  max(window, retry_after))``. coderd gives every client of a fleet that stopped at the same
  moment the same value, so honouring it exactly brings them all back in the same instant,
  second after second (``bench/fleet.py`` measures it);
* final, one attempt only: 400, 401, 403, 404, 413 and any other answer, and a TLS
  certificate coderd presents that is not trusted (retrying cannot fix it: AGENTD_CA_FILE can);
  :func:`explain` turns the answer into the sentence the final log line carries;
* never past the deadline: an attempt is only started with at least ``min_attempt`` seconds
  left and each attempt is cut at the deadline. The jitter is drawn within the time left, so
  the last attempt still happens (spread out, not piled up at the deadline); a
  ``Retry-After`` longer than the time left ends the upload at once, saying so.

tenacity is used as documented: its ``stop`` decides from the ``RetryCallState`` (the last
attempt's ``Retry-After``) and the deadline (:meth:`CoderdUploader.out_of_time`); its ``wait``
only computes the jittered wait. Neither reads what the other decided, so the result does not
depend on the order in which tenacity calls them (tenacity 8 asks ``stop`` first, 9 ``wait``).
tenacity over a plain loop: it is the team's retry library, and the pieces it composes
(retry predicate, stop, wait, an anyio sleep) are exactly the policy above.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import re
import ssl
import time
import zlib
from collections.abc import AsyncGenerator
from typing import Any, NoReturn, cast
from uuid import UUID

import anyio
import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from agentd.backoff import full_jitter
from agentd.logs import get_logger, redact
from agentd.outcome import UploadOutcome
from agentd.snapshot import Snapshot

log = get_logger("agentd.coderd")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

#: Bytes of an answer's body agentd reads at most (after inflating, if it was compressed).
#: coderd's error bodies are a few hundred bytes; the rest of a longer answer is never read.
ANSWER_MAX_BYTES = 16 * 1024
#: Seconds a ``Retry-After`` may ask for at most: a day (anything longer is as good as never).
RETRY_AFTER_MAX = 86_400.0
#: Characters of an answer's text quoted in a log line or an outcome's reason.
EXCERPT_CHARS = 200

_DELTA_SECONDS = re.compile(r"[0-9]+")  # RFC 9110 delay-seconds: ASCII digits only ("²" is not one)

#: coderd's ``message`` for an unregistered route, and for a task it does not have for this agent.
ROUTE_NOT_FOUND = "Route not found."
RESOURCE_NOT_FOUND = "Resource not found."


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


def explain(status: int | None, message: str | None = None) -> str:
    """One sentence saying what coderd's answer means and what fixes it.

    ``status`` is the HTTP status (None: no answer at all); ``message`` coderd's JSON
    ``message`` when there was one. The two 404s read differently (CONTRACT.md §1):
    "Route not found." is a Coder without the log-snapshot endpoint, "Resource not found." a
    task this agent cannot store to. Shared with the start-up probe, so both say the same.
    """
    if status is None:
        return "coderd did not answer: check CODER_AGENT_URL and that coderd is reachable from the workspace"
    if status == 404:
        return _explain_404(message)
    if status == 401:
        return (
            "coderd refused the agent token: CODER_AGENT_TOKEN is wrong, or no longer valid because the "
            "workspace's stop build has completed or the workspace was deleted (store before the stop build ends)"
        )
    if status == 400 and message == "Invalid task ID format.":
        return "the task id is not a UUID: set AGENTD_TASK_ID to the template's data.coder_task.me.id"
    if status in (400, 413):
        return "coderd refused the request body (over 65 536 bytes or not the messages shape): an agentd bug, please report it"
    if status == 403:
        return "the agent token may not store this task's snapshot: check that AGENTD_TASK_ID is this workspace's task"
    if 200 <= status < 300:
        return (
            "not coderd's answer (coderd answers 204): a proxy or captive portal answered, or CODER_AGENT_URL "
            "points at a web page rather than coderd's base URL"
        )
    if status in RETRY_STATUSES:
        return _explain_busy(status, message)
    return "coderd refused the snapshot: check CODER_AGENT_URL (coderd's base URL, no path)"


def _explain_404(message: str | None) -> str:
    if message == ROUTE_NOT_FOUND:
        return (
            "this Coder has no log-snapshot endpoint: Tasks are off (set CODER_ENABLE_AI_TASKS=true on coderd "
            "v2.36/v2.37), or this release removed Tasks or predates the endpoint"
        )
    if message == RESOURCE_NOT_FOUND:
        return (
            "coderd has no such task for this workspace: the task id is wrong, the task was deleted, or it is "
            "another workspace's; set AGENTD_TASK_ID to the template's data.coder_task.me.id"
        )
    return "not found, and not in coderd's words: check CODER_AGENT_URL (coderd's base URL, no path)"


def _explain_busy(status: int, message: str | None) -> str:
    if status == 429:
        return "coderd's rate limit: retried after its Retry-After"
    if status == 500 and message == "Internal error fetching task.":
        return "coderd's database failed looking up the task: retried"
    if status == 500:
        return "coderd failed storing the snapshot: retried"
    return f"coderd or a proxy in front of it is unavailable ({status}): retried"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, or None when it is absent or not one.

    RFC 9110: ASCII ``delay-seconds`` or an HTTP date (``now`` is ``time.time()`` by default); a
    date in the past is 0. At most :data:`RETRY_AFTER_MAX` seconds. Never raises.
    """
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return min(RETRY_AFTER_MAX, float(int(value[:12])))  # 12 digits are already far past the cap
    if len(value) > 64:  # an HTTP date is 29 characters
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
        seconds = when.timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return min(RETRY_AFTER_MAX, max(0.0, seconds))


def _why(exc: BaseException) -> str:
    """``Type: text`` for a transport error. When it has no text, the text of the first cause
    that has one: on trio a TLS failure reaches httpx as a bare ``BrokenResourceError``, and
    "certificate verify failed" is only in the ``SSLCertVerificationError`` behind it."""
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None or str(cause):
            break
        cause = cause.__cause__ or cause.__context__
    text = _excerpt(str(cause)) if cause is not None else ""
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


def _excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` on one line, printable, at most ``limit`` characters, secrets redacted."""
    flat = "".join(ch if ch.isprintable() else " " for ch in text[: limit * 2])
    flat = " ".join(flat.split())
    return redact(flat if len(flat) <= limit else flat[: limit - 1] + "…")


async def _read_capped(response: httpx.Response, cap: int = ANSWER_MAX_BYTES) -> bytes:
    """At most ``cap`` bytes of ``response``'s body, streamed raw, then inflated (gzip/deflate)
    to at most ``cap`` bytes. Raises httpx.DecodingError for a body its encoding does not
    describe; an encoding other than gzip/deflate is not decoded (the raw bytes are returned)."""
    raw = bytearray()
    async with contextlib.aclosing(cast(AsyncGenerator[bytes, None], response.aiter_raw())) as chunks:
        async for chunk in chunks:
            raw += chunk[: cap - len(raw)]
            if len(raw) >= cap:
                break  # the rest is never read: closing the response closes the connection
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return _inflate(bytes(raw), zlib.MAX_WBITS | 16, cap)
    if encoding == "deflate":
        try:
            return _inflate(bytes(raw), zlib.MAX_WBITS, cap)
        except httpx.DecodingError:
            return _inflate(bytes(raw), -zlib.MAX_WBITS, cap)  # raw deflate, as some servers send it
    return bytes(raw)


def _inflate(data: bytes, wbits: int, cap: int) -> bytes:
    try:
        return zlib.decompressobj(wbits).decompress(data, cap)
    except zlib.error as exc:
        raise httpx.DecodingError(str(exc)) from None


def _error_fields(body: bytes) -> tuple[str | None, str]:
    """coderd's ``message`` (None if the body is not coderd's JSON error) and a one-line text
    for the log: ``message: detail``, or the start of the body. Never raises."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # a body nested deeper than the parser's stack
        return None, _excerpt(text)
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        return None, _excerpt(text)
    message: str = data["message"]
    parts = [str(data.get(key)) for key in ("message", "detail") if data.get(key)]
    return message, _excerpt(": ".join(parts))


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
        self._token = token
        self._headers = {
            "Coder-Session-Token": token,
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",  # never a compressed answer to inflate
        }
        self.attempt_timeout = attempt_timeout
        self.min_attempt = min_attempt
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max

    def __repr__(self) -> str:  # the headers hold the token
        return f"CoderdUploader(url={self.url!r})"

    def out_of_time(self, retry_after: float | None, left: float) -> bool:
        """True when no further attempt fits: ``left`` seconds before the deadline leave less
        than ``min_attempt`` after waiting coderd's ``retry_after`` seconds (None: none asked)."""
        return (retry_after or 0.0) > left - self.min_attempt

    def retry_wait(self, failures: int, retry_after: float | None, left: float) -> float | None:
        """Seconds to wait after ``failures`` failed attempts, or None to give up.

        ``retry_after`` is coderd's ``Retry-After`` in seconds (None without one); ``left`` the
        seconds before the deadline. See the module docstring.
        """
        if self.out_of_time(retry_after, left):
            return None  # no time left, or coderd asks for more of it than is left
        return full_jitter(
            failures, self.backoff_base, self.backoff_max, floor=retry_after or 0.0, room=left - self.min_attempt
        )

    async def upload(self, snapshot: Snapshot, deadline: float) -> UploadOutcome:
        """POST ``snapshot`` until stored, a final answer, or ``deadline`` (``anyio.current_time()``).

        Never raises for coderd's failures: the outcome says what happened, and one log line
        reports it.
        """
        attempts = 0
        status: int | None = None

        def last_retry_after(state: RetryCallState) -> float | None:
            exc = state.outcome.exception() if state.outcome else None
            return exc.retry_after if isinstance(exc, _Retryable) else None

        def stop(state: RetryCallState) -> bool:
            return self.out_of_time(last_retry_after(state), deadline - anyio.current_time())

        def wait(state: RetryCallState) -> float:
            room = deadline - anyio.current_time() - self.min_attempt
            retry_after = last_retry_after(state) or 0.0
            return full_jitter(state.attempt_number, self.backoff_base, self.backoff_max, floor=retry_after, room=room)

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
            reason = self._gave_up(exc, deadline - anyio.current_time())
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

    def _gave_up(self, exc: _Retryable, left: float) -> str:
        if exc.retry_after is not None and exc.retry_after + self.min_attempt > left:
            return (
                f"{exc}; coderd asked to retry after {exc.retry_after:.1f} s, "
                f"{max(left, 0):.1f} s left before the deadline"
            )
        if exc.status is None:  # never an answer: say where to look
            return f"{exc}; gave up at the deadline ({explain(None)})"
        return f"{exc}; gave up at the deadline"

    async def _attempt(self, snapshot: Snapshot, deadline: float) -> int:
        """One POST: the status when stored (204); raises _Retryable or _Final otherwise."""
        left = deadline - anyio.current_time()
        timeout = min(self.attempt_timeout, left)
        try:
            with anyio.fail_after(timeout):
                async with self.client.stream(
                    "POST",
                    self.url,
                    params={"format": "agentapi"},
                    content=snapshot.body,
                    headers=self._headers,
                    timeout=timeout,
                ) as response:
                    if response.status_code == 204:
                        return 204
                    body = await self._read(response)
        except TimeoutError:
            raise _Retryable(f"no answer from coderd within {timeout:.1f} s") from None
        except httpx.TimeoutException as exc:
            raise _Retryable(f"coderd timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            if _cert_failure(exc):  # retrying cannot make an untrusted certificate trusted
                raise _Final(f"coderd's TLS certificate is not trusted ({_why(exc)}); set AGENTD_CA_FILE", None) from None
            raise _Retryable(f"cannot reach coderd: {_why(exc)}") from None
        self._judge(response, body)

    async def _read(self, response: httpx.Response) -> bytes:
        """The answer's body, capped (:func:`_read_capped`). A transport failure or timeout
        propagates; any other exception while reading it is this attempt's failure, logged once."""
        try:
            return await _read_capped(response)
        except (httpx.TransportError, httpx.TimeoutException):
            raise
        except Exception as exc:  # a broken proxy's gzip, anything a hostile peer can provoke
            log.warning("unreadable answer from coderd", status=response.status_code, error=_why(exc))
            raise _Retryable(f"unreadable answer from coderd: {_why(exc)}", response.status_code) from None

    def _judge(self, response: httpx.Response, body: bytes) -> NoReturn:
        """Raise the failure a non-204 answer is (retryable or final), logging it once."""
        status = response.status_code
        try:
            message, detail = _error_fields(body)
        except Exception as exc:  # never the daemon's end: this attempt failed, that is all
            log.warning("unreadable answer from coderd", status=status, error=_why(exc))
            raise _Retryable(f"unreadable answer from coderd ({status}): {_why(exc)}", status) from None
        detail = self._hide_token(detail)
        if 200 <= status < 300:
            kind = self._hide_token(_excerpt(response.headers.get("content-type", ""))) or "no content type"
            log.warning("answer not from coderd", status=status, content_type=kind, detail=detail)
            raise _Retryable(f"got {status} ({kind}), {explain(status, message)}: {detail}", status)
        if status in RETRY_STATUSES:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            log.info("coderd busy", status=status, detail=detail, retry_after=retry_after)
            raise _Retryable(f"coderd answered {status}: {detail}", status, retry_after)
        raise _Final(f"coderd answered {status} ({explain(status, message)}): {detail}", status)

    def _hide_token(self, text: str) -> str:
        """``text`` without the agent token (a hostile answer may echo the request's headers)."""
        return text.replace(self._token, "[REDACTED]") if len(self._token) >= 4 else text
