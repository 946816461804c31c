"""The source: tailing agentapi's conversation into the ring buffer.

``GET /events`` (Server-Sent Events, parsed by httpx-sse) replays the whole state on connect (a
``message_update`` per message, then a ``status_change``) and then streams changes. The replay
is collected and merged as one full view (:meth:`RingBuffer.sync`), so reconnecting never
duplicates messages and an agentapi restarted without its state is recognised. Live
``message_update`` events are applied one by one; ``status_change`` is tracked; ``agent_error``
is logged.

When the stream ends or fails for a passing reason (connection refused or reset, a timeout,
a 5xx other than 501, another unexpected status; a 3xx/4xx only up to three times in a row,
then it polls), the tail reconnects with capped exponential
backoff and full jitter, logging state changes (connected, disconnected, polling) rather than
every attempt. A server with no usable event stream -- ``/events`` answers 404, 405 or 501
(older agentapi builds, simple stubs, proxies), or a 2xx that is not ``text/event-stream``
(an HTML or JSON page) -- is polled with ``GET /messages`` instead, about once a second, for
the rest of the run (even if ``/events`` appears later: polling still follows the
conversation). Retrying the stream there would never fill the buffer, and an agentapi gone
by the stop would leave nothing to store. A poll failure is logged once per run of failures;
if ``/messages`` answers 404 too, an error says the URL serves neither endpoint. A malformed
event is logged and skipped.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any, Literal

import anyio
import httpx
from httpx_sse import SSEError, aconnect_sse

from agentd.buffer import RingBuffer
from agentd.logs import get_logger
from agentd.messages import InvalidMessage, Message, may_hold_surrogates, parse_message, parse_messages

log = get_logger("agentd.agentapi")

SourceState = Literal["connecting", "connected", "polling", "disconnected"]


class AgentAPIError(Exception):
    """agentapi could not be reached or answered something unusable.

    ``status`` is the HTTP status when agentapi answered one (else None).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


async def fetch_messages(client: httpx.AsyncClient, base_url: str, timeout: float) -> list[Message]:
    """``GET {base_url}/messages`` within ``timeout`` seconds; the valid messages, ids ascending.

    Invalid messages are logged and left out. Raises :class:`AgentAPIError` on a connection
    error, a timeout, a non-200 answer or a body without a ``messages`` list.
    """
    try:
        with anyio.fail_after(timeout):
            response = await client.get(f"{base_url}/messages", timeout=timeout)
    except (httpx.HTTPError, TimeoutError) as exc:
        raise AgentAPIError(f"GET /messages failed: {type(exc).__name__}: {exc}".rstrip(": ")) from None
    if response.status_code != 200:
        raise AgentAPIError(f"GET /messages answered {response.status_code}", response.status_code)
    try:
        messages, problems = parse_messages(response.json())
    except (ValueError, InvalidMessage, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise AgentAPIError(f"GET /messages body unusable: {exc}") from None
    for problem in problems:
        log.warning("message skipped", reason=problem)
    return sorted(messages, key=lambda m: m.id)


class AgentAPITail:
    """Keeps ``buffer`` up to date with the agentapi at ``base_url`` until cancelled.

    ``on_status(old, new)`` is called on every agent status change (``running``/``stable``);
    it must be quick and must not raise. Changes to the buffer show in ``buffer.version``.
    ``state``/``state_since`` (a ``time.time()``) and ``agent_status`` describe the source for
    ``agentd status``.

    Timing (seconds): ``poll_interval`` between polls without ``/events``; reconnect backoff
    is ``uniform(0, min(backoff_max, backoff_base * 2**n))`` after the n-th failure in a row;
    ``idle_timeout`` is how long a silent stream is trusted before reconnecting.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        buffer: RingBuffer,
        *,
        on_status: Callable[[str | None, str], None] | None = None,
        poll_interval: float = 1.0,
        backoff_base: float = 0.25,
        backoff_max: float = 5.0,
        connect_timeout: float = 3.0,
        idle_timeout: float = 300.0,
    ) -> None:
        self.client = client
        self.base_url = base_url
        self.buffer = buffer
        self._on_status = on_status or (lambda old, new: None)
        self.poll_interval = poll_interval
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.state: SourceState = "connecting"
        self.state_since = time.time()
        self.agent_status: str | None = None

    # -- state ---------------------------------------------------------------------------

    def _set_state(self, state: SourceState, **fields: Any) -> None:
        if state == self.state:
            return
        was, self.state, self.state_since = self.state, state, time.time()
        level = log.warning if state == "disconnected" else log.info
        level(f"agentapi {state}", was=was, url=self.base_url, **fields)

    def _set_agent_status(self, status: Any) -> None:
        if status not in ("running", "stable") or status == self.agent_status:
            return
        old, self.agent_status = self.agent_status, status
        log.debug("agent status", status=status, was=old)
        self._on_status(old, status)

    def _merge(self, view: list[Message]) -> None:
        resets = self.buffer.resets
        self.buffer.sync(view)
        if self.buffer.resets != resets:
            log.warning("agentapi conversation started over; keeping the earlier messages before it")

    # -- main loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Tail until cancelled. Never raises for agentapi's failures; they are logged."""
        failures = 0
        refused = 0  # GET /events answered a 3xx/4xx this many times in a row
        while True:
            started = time.monotonic()
            try:
                await self._stream_events()
            except _NoEvents as exc:
                await self._poll(str(exc))  # until cancelled
            except (httpx.HTTPError, SSEError, AgentAPIError, TimeoutError) as exc:
                self._set_state("disconnected", error=_short(exc))
                status = getattr(exc, "status", None)
                refused = refused + 1 if status is not None and status < 500 else 0
                if refused >= _REFUSALS_BEFORE_POLLING:  # a lasting refusal, not a hiccup: poll instead
                    await self._poll(f"GET /events answered {status} {refused} times in a row")
            else:
                self._set_state("disconnected", error="stream ended")
            # A stream that lived a while was healthy: reconnect at once (a replay is cheap).
            failures = 0 if time.monotonic() - started > 5.0 else failures + 1
            if failures:
                await anyio.sleep(random.uniform(0, min(self.backoff_max, self.backoff_base * 2**failures)))

    async def _stream_events(self) -> None:
        timeout = httpx.Timeout(self.connect_timeout, read=self.idle_timeout)
        async with aconnect_sse(self.client, "GET", f"{self.base_url}/events", timeout=timeout) as source:
            status = source.response.status_code
            if status in _NO_EVENT_STREAM:
                raise _NoEvents(f"GET /events answered {status}")
            # The same test httpx-sse applies before parsing: what passes here parses there.
            content_type = source.response.headers.get("content-type", "").partition(";")[0].strip()
            if 200 <= status < 300 and "text/event-stream" not in content_type:
                raise _NoEvents(f"GET /events answered {status} {content_type or 'without a content type'}"[:120])
            if status != 200:
                raise AgentAPIError(f"GET /events answered {status}", status)
            replay: dict[int, Message] | None = {}  # by id; None once the replay is over
            async for event in source.aiter_sse():
                try:
                    data = json.loads(event.data)
                    if event.event == "message_update":
                        message = parse_message(data, content_key="message", clean=may_hold_surrogates(event.data))
                        if replay is None:
                            self.buffer.apply(message)
                        else:  # keep only what the buffer could hold: memory stays bounded
                            replay[message.id] = self.buffer.clip(message)
                            if len(replay) > self.buffer.max_messages:
                                del replay[min(replay)]
                    elif event.event == "status_change":
                        if replay is not None:  # the replay ends with the first status_change
                            self._merge([replay[i] for i in sorted(replay)])
                            replay = None
                            self._set_state("connected")
                        self._set_agent_status(data.get("status") if isinstance(data, dict) else None)
                    elif event.event == "agent_error":
                        fields = data if isinstance(data, dict) else {"message": data}
                        log.warning(
                            "agent error",
                            message=str(fields.get("message"))[:500],
                            agent_level=fields.get("level"),
                            time=fields.get("time"),
                        )
                    else:
                        log.debug("unknown agentapi event skipped", sse_event=event.event[:60])
                except (ValueError, InvalidMessage, AttributeError, RecursionError) as exc:
                    log.warning("malformed agentapi event skipped", sse_event=event.event[:60], reason=_short(exc))

    async def _poll(self, reason: str) -> None:
        if self.state != "polling":
            self._set_state("polling", reason=f"no usable event stream: {reason}")
        failures = 0
        neither = False  # logged that /messages answers 404 too, in this run of failures
        while True:
            try:
                view = await fetch_messages(self.client, self.base_url, self.connect_timeout)
            except AgentAPIError as exc:
                failures += 1
                if exc.status == 404 and not neither:
                    neither = True
                    log.error(
                        "agentapi serves neither /events nor /messages: nothing to tail (check AGENTD_AGENTAPI_URL)",
                        url=self.base_url, events=reason, error=str(exc),
                    )
                elif failures == 1:
                    log.warning("agentapi poll failed", error=str(exc))
            else:
                if failures:
                    log.info("agentapi poll recovered", failures=failures)
                failures, neither = 0, False
                self._merge(view)
                await self._poll_status()
            await anyio.sleep(self.poll_interval)

    async def _poll_status(self) -> None:
        try:
            response = await self.client.get(f"{self.base_url}/status", timeout=self.connect_timeout)
            self._set_agent_status(response.json().get("status"))
        except (httpx.HTTPError, ValueError, AttributeError, RecursionError):
            pass  # the status only drives checkpoints; the messages are what matter


#: ``GET /events`` statuses that mean "this server has no event stream" (not "not now").
_NO_EVENT_STREAM = frozenset({404, 405, 501})


#: Consecutive 3xx/4xx answers from GET /events (other than the no-stream ones) before polling.
_REFUSALS_BEFORE_POLLING = 3


class _NoEvents(Exception):
    """``GET /events`` gives no usable event stream (see :data:`_NO_EVENT_STREAM`, or a 2xx
    that is not ``text/event-stream``): poll instead. The message says what it answered."""


def _short(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
