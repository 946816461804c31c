"""Probes: is each peer ready, and if not, which setting to fix. Nothing is stored.

**coderd** (CONTRACT.md §1, "A probe that stores nothing"): one ``POST
{coderd}/api/v2/workspaceagents/me/tasks/{task}/log-snapshot?format=agentapi`` with the agent
token and a body that is not JSON. coderd checks the token, the task id, the query and that the
task exists in this agent's workspace before it reads the body, so the undecodable body then
gets 400 "Failed to decode request payload." and nothing is upserted: that answer means the
endpoint is ready. Every other answer maps to a :class:`CoderdVerdict` whose sentence names the
fix (:func:`coderd_answer_verdict`, :func:`coderd_transport_verdict`; pure functions).

**agentapi** (CONTRACT.md §2): ``GET /status`` (reachable, Host accepted, agent type, transport,
status), ``GET /events`` (an SSE stream, or polling), ``GET /messages`` (messages held, and what
the snapshot would carry). Every read is bounded (:data:`ANSWER_LIMIT`, :data:`MESSAGES_LIMIT`
bytes) and every request has a deadline. coderd's URL given as agentapi's is recognised.

Used by ``agentd check`` (:mod:`agentd.check`) and by ``agentd run`` at start-up
(:func:`watch_coderd`, which probes again with full-jitter backoff until coderd answers
definitively). The agent token is sent only as the ``Coder-Session-Token`` header and appears
in no verdict.
"""

from __future__ import annotations

import errno
import json
import socket
import ssl
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from uuid import UUID

import anyio
import httpx

from agentd.backoff import full_jitter
from agentd.coderd import RESOURCE_NOT_FOUND, ROUTE_NOT_FOUND, explain, parse_retry_after
from agentd.logs import get_logger
from agentd.messages import InvalidMessage, parse_messages
from agentd.snapshot import build_snapshot

log = get_logger("agentd.probe")

#: The probe's body: not JSON, so coderd's decoder fails before anything is stored.
PROBE_BODY = b"agentd probe: not JSON, so coderd stores nothing"
#: Bytes of an answer read (coderd's error bodies are a few hundred bytes).
ANSWER_LIMIT = 8_192
#: Bytes of agentapi's ``GET /messages`` read by the probe (one message can pass a megabyte).
MESSAGES_LIMIT = 32 * 1024 * 1024
#: Seconds one probe request may take.
PROBE_TIMEOUT = 5.0

#: coderd's messages that decide a verdict (CONTRACT.md §1).
DECODE_FAILED = "Failed to decode request payload."
INVALID_TASK_ID = "Invalid task ID format."
#: Go's net/http answer to plain HTTP sent to its TLS port.
HTTP_TO_HTTPS = "Client sent an HTTP request to an HTTPS server."


@dataclass(frozen=True, slots=True)
class CoderdVerdict:
    """What coderd's answer to the probe means.

    ``code`` is one of ``ready``, ``token_refused``, ``no_route``, ``wrong_task``,
    ``bad_task_id``, ``forbidden``, ``refused``, ``rate_limited``, ``server_error``,
    ``not_coderd``, ``tls_mismatch``, ``https_needed``, ``cert_untrusted``, ``unreachable``,
    ``timeout``. ``ready``: a snapshot would be stored. ``transient``: asking again later may
    answer otherwise (429, 5xx, unreachable, timeout). ``status`` is coderd's HTTP status (None
    when none came); ``sentence`` says what was found and names the fix; ``retry_after`` is
    coderd's ``Retry-After`` in seconds (None without one).
    """

    code: str
    ready: bool
    transient: bool
    status: int | None
    sentence: str
    retry_after: float | None = None

    @property
    def line(self) -> str:
        """The log line: ``coderd: <sentence>``."""
        return f"coderd: {self.sentence}"

    @property
    def short(self) -> str:
        """A few words for systemd's ``STATUS=``."""
        label = _SHORT.get(self.code, self.code.replace("_", " "))
        return f"coderd {label}" + (f" ({self.status})" if self.status and not self.ready else "")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "line": self.line}


_SHORT = {
    "ready": "ready",
    "token_refused": "refuses the agent token",
    "no_route": "has no log-snapshot endpoint",
    "wrong_task": "does not know the task",
    "bad_task_id": "refuses the task id",
    "rate_limited": "rate limited",
    "not_coderd": "URL answers but is not coderd",
    "tls_mismatch": "TLS to a plain port",
    "https_needed": "needs https",
    "cert_untrusted": "certificate not trusted",
}


# ---------------------------------------------------------------------------------------------
# coderd: mapping answers to verdicts (pure)


def host_port(url: str) -> str:
    """``host:port`` of ``url``, the scheme's default port filled in."""
    parsed = httpx.URL(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    return f"{host}:{port}"


def _error_body(content_type: str, body: bytes) -> dict[str, Any] | None:
    """coderd's JSON error body (``{"message", "detail", "validations"}``), or None when the
    answer is not one (HTML, plain text, another JSON shape)."""
    if "json" not in content_type.lower():
        return None
    try:
        data = json.loads(body.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        return None
    return data


def _one_line(value: Any, limit: int = 200) -> str:
    """``value`` as text on one line (a peer's text may hold newlines), at most ``limit`` characters."""
    return " ".join(str(value).split())[:limit]


def _quoted(data: dict[str, Any]) -> str:
    message = _one_line(data.get("message", ""))
    detail = _one_line(data.get("detail") or "")
    return f'"{message}"' + (f" ({detail})" if detail else "")


def _describe_answer(status: int, content_type: str, body: bytes) -> str:
    kind = content_type.partition(";")[0].strip() or "no content type"
    text = body[:80].decode("utf-8", "replace").strip().replace("\n", " ")
    return f"{status} {kind}" + (f" ({text!r})" if text and "html" not in kind else "")


def _no_route(status: int, coderd_url: str, where: str, version: str | None) -> CoderdVerdict:
    path = httpx.URL(coderd_url).path.rstrip("/")
    if path.endswith("/api/v2") or "/api/" in path + "/":
        sentence = (
            f'no log-snapshot route at {where} ("Route not found."): CODER_AGENT_URL ends in {path}; '
            "give coderd's base URL without it (e.g. https://coder.example.com)"
        )
    else:
        who = f"coderd {version}" if version else "coderd"
        sentence = f'{who} at {where} answered 404 "Route not found.": {explain(404, ROUTE_NOT_FOUND)} (the Tasks ESR keeps it to mid-2027)'

    return CoderdVerdict("no_route", False, False, status, sentence)


def coderd_answer_verdict(
    status: int,
    content_type: str,
    body: bytes,
    *,
    coderd_url: str,
    task_id: UUID | str,
    retry_after: float | None = None,
    version: str | None = None,
) -> CoderdVerdict:
    """Map coderd's HTTP answer to the probe to a verdict (CONTRACT.md §1).

    ``body`` is the start of the answer (bounded by the caller); ``version`` is coderd's build
    version when known (from ``/api/v2/buildinfo``), used to name it in the no-route sentence.
    """
    where = host_port(coderd_url)
    data = _error_body(content_type, body)
    if status == 429:
        said = _quoted(data) if data else _describe_answer(status, content_type, body)
        sentence = (
            f"coderd at {where} rate limited the probe (429 {said}): passing; agentd asks again later "
            "(workspaces behind one address share coderd's per-minute API budget)"
        )
        return CoderdVerdict("rate_limited", False, True, status, sentence, retry_after)
    if status >= 500:
        said = _quoted(data) if data else _describe_answer(status, content_type, body)
        sentence = f"coderd at {where} answered {status} {said}: a fault on coderd's side (or its proxy's); agentd asks again later"
        return CoderdVerdict("server_error", False, True, status, sentence, retry_after)
    if data is None:
        return _not_coderd(status, content_type, body, where)
    return _coderd_error_verdict(status, data, coderd_url, where, str(task_id), version)


def _not_coderd(status: int, content_type: str, body: bytes, where: str) -> CoderdVerdict:
    if HTTP_TO_HTTPS.encode() in body[:200]:
        sentence = f"{where} speaks TLS but CODER_AGENT_URL says http://: use https://"
        return CoderdVerdict("https_needed", False, False, status, sentence)
    if 200 <= status < 300:
        what = f"answered {status} to a body that is not JSON"
    else:
        what = f"answered {_describe_answer(status, content_type, body)}"
    sentence = f"the server at {where} is not coderd's log-snapshot endpoint (it {what}): check CODER_AGENT_URL"
    return CoderdVerdict("not_coderd", False, False, status, sentence)


#: coderd's refusals the probe names, by (status, message); None matches any message.
_REFUSALS: dict[tuple[int, str | None], str] = {
    (401, None): "token_refused",
    (404, RESOURCE_NOT_FOUND): "wrong_task",
    (400, INVALID_TASK_ID): "bad_task_id",
    (403, None): "forbidden",
}


def _coderd_error_verdict(
    status: int, data: dict[str, Any], coderd_url: str, where: str, task: str, version: str | None
) -> CoderdVerdict:
    message = data.get("message")
    if status == 400 and message == DECODE_FAILED:
        return CoderdVerdict("ready", True, False, status, f"log-snapshot endpoint ready for task {task}")
    if status == 404 and message == ROUTE_NOT_FOUND:
        return _no_route(status, coderd_url, where, version)
    # The upload's final log line says the same (coderd.explain): one table for both.
    kind = _REFUSALS.get((status, message)) or _REFUSALS.get((status, None))
    if kind is not None:
        sentence = f"coderd at {where} answered {status} {_quoted(data)} for task {task}: {explain(status, str(message))}"
        return CoderdVerdict(kind, False, False, status, sentence)
    sentence = f"coderd at {where} refused the probe ({status} {_quoted(data)}): a coderd this agentd does not know; check CODER_AGENT_URL"
    return CoderdVerdict("refused", False, False, status, sentence)


# ---------------------------------------------------------------------------------------------
# coderd: mapping transport failures to verdicts (pure)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes (``__cause__`` or ``__context__``; an exception group's first
    exception: trio reports a refused connection as a group of one), at most 8."""
    out: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(out) < 8:
        out.append(cause)
        group = isinstance(cause, BaseExceptionGroup) and cause.exceptions
        cause = cause.exceptions[0] if group else cause.__cause__ or cause.__context__  # type: ignore[attr-defined]
    return out


def connection_cause(exc: BaseException, request_timeout: float) -> str:
    """Why a connection failed, in words: refused, name not found, timed out, or the text of
    the first cause that has one. No exception class names."""
    chain = _chain(exc)
    for cause in chain:
        if isinstance(cause, socket.gaierror):
            return "host name not found"
        if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED:
            return "connection refused (nothing listens there)"
        if isinstance(cause, (TimeoutError, httpx.TimeoutException)):
            return f"no answer within {request_timeout:g} s"
    for cause in chain:
        text = str(cause).strip()
        if text:
            return "connection refused (nothing listens there)" if "refused" in text.lower() else text[:160]
    return "the connection failed"


def coderd_transport_verdict(exc: BaseException, coderd_url: str, request_timeout: float) -> CoderdVerdict:
    """Map a failed probe request (no HTTP answer) to a verdict."""
    where = host_port(coderd_url)
    chain = _chain(exc)
    if any(isinstance(c, ssl.SSLCertVerificationError) for c in chain):
        reason = next(str(c) for c in chain if isinstance(c, ssl.SSLCertVerificationError))
        sentence = f"coderd's TLS certificate at {where} is not trusted ({reason[:160]}): set AGENTD_CA_FILE to the CA bundle that signed it"
        return CoderdVerdict("cert_untrusted", False, False, None, sentence)
    tls = next((c for c in chain if isinstance(c, ssl.SSLError)), None)
    if tls is not None and coderd_url.startswith("https://"):
        reason = getattr(tls, "reason", None) or str(tls)
        sentence = (
            f"the TLS handshake with {where} failed ({str(reason).lower().replace('_', ' ')[:120]}): "
            "the port speaks plain HTTP? then CODER_AGENT_URL should start with http://"
        )
        return CoderdVerdict("tls_mismatch", False, False, None, sentence)
    if any(isinstance(c, (TimeoutError, httpx.TimeoutException)) for c in chain):
        return CoderdVerdict("timeout", False, True, None, f"no answer from coderd at {where} within {request_timeout:g} s: agentd asks again later")
    cause = connection_cause(exc, request_timeout)
    sentence = f"cannot reach coderd at {where}: {cause}; check CODER_AGENT_URL (agentd asks again later)"
    return CoderdVerdict("unreachable", False, True, None, sentence)


# ---------------------------------------------------------------------------------------------
# requests


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The first ``limit`` bytes of the body, decoded if gzip/deflate (still bounded)."""
    raw = bytearray()
    async for chunk in response.aiter_raw():
        raw += chunk
        if len(raw) >= limit:
            break
    data = bytes(raw[:limit])
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("gzip", "deflate"):
        try:
            return zlib.decompressobj(47).decompress(data, limit)  # 47: zlib or gzip header
        except zlib.error:
            return b""
    return data


async def _buildinfo_version(client: httpx.AsyncClient, base_url: str, request_timeout: float) -> str | None:
    """coderd's version from ``GET /api/v2/buildinfo`` (no token needed), or None."""
    try:
        with anyio.fail_after(request_timeout):
            async with client.stream("GET", f"{base_url}/api/v2/buildinfo", timeout=request_timeout) as response:
                body = await _read_bounded(response, ANSWER_LIMIT)
        data = json.loads(body) if response.status_code == 200 else None
    except (httpx.HTTPError, TimeoutError, ValueError, RecursionError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version[:60] if isinstance(version, str) and version else None


async def probe_coderd(
    client: httpx.AsyncClient, coderd_url: str, token: str, task_id: UUID | str, request_timeout: float = PROBE_TIMEOUT
) -> CoderdVerdict:
    """One probe of coderd's log-snapshot endpoint for ``task_id``; never raises for coderd's
    failures. Sends :data:`PROBE_BODY` (not JSON: nothing is stored); reads at most
    :data:`ANSWER_LIMIT` bytes of the answer; the whole probe takes at most about
    2 × ``request_timeout`` seconds (a second request, ``/api/v2/buildinfo``, only on "Route not found.").
    """
    url = f"{coderd_url}/api/v2/workspaceagents/me/tasks/{task_id}/log-snapshot"
    headers = {"Coder-Session-Token": token, "Content-Type": "text/plain", "Accept-Encoding": "identity"}
    try:
        with anyio.fail_after(request_timeout):
            async with client.stream(
                "POST", url, params={"format": "agentapi"}, content=PROBE_BODY, headers=headers, timeout=request_timeout
            ) as response:
                body = await _read_bounded(response, ANSWER_LIMIT)
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        return coderd_transport_verdict(exc, coderd_url, request_timeout)
    status = response.status_code
    content_type = response.headers.get("content-type", "")
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    version = None
    if status == 404 and ROUTE_NOT_FOUND.encode() in body:
        version = await _buildinfo_version(client, coderd_url, request_timeout)
    return coderd_answer_verdict(
        status, content_type, body, coderd_url=coderd_url, task_id=task_id, retry_after=retry_after, version=version
    )


async def watch_coderd(
    client: httpx.AsyncClient,
    coderd_url: str,
    token: str,
    task_id: UUID | str,
    on_verdict: Callable[[CoderdVerdict], None],
    *,
    base: float = 1.0,
    cap: float = 60.0,
    request_timeout: float = PROBE_TIMEOUT,
) -> CoderdVerdict:
    """Probe until coderd answers definitively (anything but a transient verdict); return that.

    ``on_verdict`` gets every verdict. One log line per change of verdict: ``coderd: log-snapshot
    endpoint ready for task <uuid>`` at info, a problem at error (warning while transient).
    Between probes, full-jitter backoff (:func:`agentd.backoff.full_jitter`, ``base``/``cap``
    seconds), never sooner than coderd's ``Retry-After``.
    """
    failures = 0
    last_code = ""
    while True:
        verdict = await probe_coderd(client, coderd_url, token, task_id, request_timeout)
        on_verdict(verdict)
        if verdict.code != last_code:
            last_code = verdict.code
            level = log.info if verdict.ready else log.warning if verdict.transient else log.error
            level(verdict.line, http_status=verdict.status, probe=verdict.code)
        if not verdict.transient:
            return verdict
        failures += 1
        await anyio.sleep(full_jitter(failures, base, cap, floor=min(verdict.retry_after or 0.0, cap)))


# ---------------------------------------------------------------------------------------------
# agentapi


@dataclass(frozen=True, slots=True)
class AgentAPIReport:
    """What agentapi's probe found.

    ``code``: ``ok``, ``unreachable``, ``host_refused``, ``coderd_url`` (coderd's URL given as
    agentapi's), ``not_agentapi``, ``messages_unreadable``. ``ok`` is True when agentapi answered as agentapi does.
    ``events`` is ``sse`` or ``polling`` (None when not probed); ``messages`` the messages held
    (None when not read); ``snapshot_messages``/``snapshot_bytes`` what a snapshot built now
    would carry. ``sentence`` says it in words, naming the fix when not ok.
    """

    url: str
    code: str
    ok: bool
    sentence: str
    status: int | None = None
    agent_type: str | None = None
    transport: str | None = None
    agent_status: str | None = None
    events: str | None = None
    messages: int | None = None
    snapshot_messages: int | None = None
    snapshot_bytes: int | None = None

    @property
    def line(self) -> str:
        return f"agentapi: {self.sentence}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "line": self.line}


def _is_agentapi_status(data: Any) -> bool:
    return isinstance(data, dict) and data.get("status") in ("running", "stable")


def _looks_like_coderd(content_type: str, body: bytes) -> bool:
    """coderd's error shape (``{"message": ...}``, no huma ``title``/``$schema``)."""
    data = _error_body(content_type, body)
    return data is not None and "title" not in data and "$schema" not in data


async def _get_json(client: httpx.AsyncClient, url: str, request_timeout: float, limit: int) -> tuple[int, str, bytes]:
    with anyio.fail_after(request_timeout):
        async with client.stream("GET", url, timeout=request_timeout, headers={"Accept-Encoding": "identity"}) as response:
            body = await _read_bounded(response, limit)
    return response.status_code, response.headers.get("content-type", ""), body


async def _events_mode(client: httpx.AsyncClient, url: str, request_timeout: float) -> str:
    """``sse`` when ``GET /events`` opens an event stream, else ``polling`` (with the answer)."""
    try:
        with anyio.fail_after(request_timeout):
            async with client.stream("GET", f"{url}/events", timeout=request_timeout) as response:
                kind = response.headers.get("content-type", "").partition(";")[0].strip()
                status = response.status_code
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        return f"polling (GET /events failed: {connection_cause(exc, request_timeout)})"
    if status == 200 and kind == "text/event-stream":
        return "sse"
    return f"polling (GET /events answered {status})"


async def _not_agentapi(client: httpx.AsyncClient, url: str, where: str, status: int, content_type: str, body: bytes,
                        request_timeout: float) -> AgentAPIReport:
    version = await _buildinfo_version(client, url, request_timeout)
    if version or _looks_like_coderd(content_type, body):
        sentence = (
            f"{url} is coderd{' ' + version if version else ''}, not agentapi: set AGENTD_AGENTAPI_URL to agentapi's "
            "address (default http://localhost:3284) and CODER_AGENT_URL to coderd's"
        )
        return AgentAPIReport(url, "coderd_url", False, sentence, status)
    sentence = f"the server at {where} is not agentapi (GET /status answered {_describe_answer(status, content_type, body)}): check AGENTD_AGENTAPI_URL"
    return AgentAPIReport(url, "not_agentapi", False, sentence, status)


def _host_refused(url: str, where: str, status: int) -> AgentAPIReport:
    host = httpx.URL(url).host
    sentence = (
        f'agentapi at {where} refuses the Host header "{host}" (400 Invalid host header): start agentapi with '
        f"--allowed-hosts {host} (or AGENTAPI_ALLOWED_HOSTS={host}), or use http://localhost:{where.rsplit(':', 1)[1]}"
    )
    return AgentAPIReport(url, "host_refused", False, sentence, status)


async def _held(client: httpx.AsyncClient, url: str, request_timeout: float, max_messages: int, max_bytes: int) -> dict[str, Any]:
    """Messages held and what a snapshot would carry; ``{"problem": ...}`` when unreadable."""
    try:
        status, _kind, body = await _get_json(client, f"{url}/messages", request_timeout, MESSAGES_LIMIT + 1)
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        return {"problem": f"GET /messages failed: {connection_cause(exc, request_timeout)}"}
    if status != 200:
        return {"problem": f"GET /messages answered {status}"}
    if len(body) > MESSAGES_LIMIT:
        return {"problem": f"GET /messages is over {MESSAGES_LIMIT // 2**20} MiB: not counted"}
    try:
        messages, _problems = parse_messages(json.loads(body))
    except (ValueError, InvalidMessage, RecursionError) as exc:
        return {"problem": f"GET /messages is unusable: {str(exc)[:120]}"}
    snapshot = build_snapshot(sorted(messages, key=lambda m: m.id)[-max_messages:], max_bytes)
    return {
        "messages": len(messages),
        "snapshot_messages": len(snapshot.message_ids) if snapshot else 0,
        "snapshot_bytes": snapshot.size if snapshot else 0,
    }


def _ok_sentence(where: str, facts: dict[str, Any], held: dict[str, Any]) -> str:
    agent = f"agent {facts['agent_type'] or 'unknown'} ({facts['transport'] or 'pty'}), {facts['agent_status']}"
    events = "events by SSE" if facts["events"] == "sse" else facts["events"]
    if "problem" in held:
        return f"reachable at {where}, {agent}, {events}; but {held['problem']}"
    if not held["messages"]:
        return f"reachable at {where}, {agent}, {events}; the conversation is empty (nothing to store yet)"
    if not held["snapshot_messages"]:  # agentapi's empty placeholder (PTY start, state not loaded yet)
        return f"reachable at {where}, {agent}, {events}; no message with content yet (nothing to store yet)"
    return (
        f"reachable at {where}, {agent}, {events}; {_count(held['messages'], 'message')} held, a snapshot now "
        f"would carry {held['snapshot_messages']} ({held['snapshot_bytes']} bytes)"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


async def probe_agentapi(
    client: httpx.AsyncClient, url: str, *, max_messages: int = 10, max_bytes: int = 65_536, request_timeout: float = PROBE_TIMEOUT
) -> AgentAPIReport:
    """Probe the agentapi at ``url``; never raises for agentapi's failures.

    Each request is cut after ``request_timeout`` seconds; ``/messages`` is read up to
    :data:`MESSAGES_LIMIT` bytes. ``max_messages``/``max_bytes`` shape the would-be snapshot.
    """
    where = host_port(url)
    try:
        status, content_type, body = await _get_json(client, f"{url}/status", request_timeout, ANSWER_LIMIT)
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        sentence = f"cannot reach agentapi at {where}: {connection_cause(exc, request_timeout)}; check AGENTD_AGENTAPI_URL and that agentapi runs"
        return AgentAPIReport(url, "unreachable", False, sentence)
    if status == 400 and b"invalid host header" in body[:200].lower():
        return _host_refused(url, where, status)
    try:
        data = json.loads(body) if status == 200 else None
    except (ValueError, RecursionError):
        data = None
    if not _is_agentapi_status(data):
        return await _not_agentapi(client, url, where, status, content_type, body, request_timeout)
    assert isinstance(data, dict)
    facts = {
        "agent_type": str(data.get("agent_type") or "")[:40] or None,
        "transport": str(data.get("transport") or "")[:20] or None,
        "agent_status": data["status"],
        "events": await _events_mode(client, url, request_timeout),
    }
    held = await _held(client, url, request_timeout, max_messages, max_bytes)
    return AgentAPIReport(
        url, "messages_unreadable" if "problem" in held else "ok", "problem" not in held, _ok_sentence(where, facts, held), status,
        facts["agent_type"], facts["transport"], facts["agent_status"], "sse" if facts["events"] == "sse" else "polling",
        held.get("messages"), held.get("snapshot_messages"), held.get("snapshot_bytes"),
    )
