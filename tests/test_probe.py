"""The probes (issue 10): each coderd answer against the stand-in coderd, the agentapi probe, and
``agentd run``'s start-up probe (log line, ``agentd status``, ``STATUS=``, backoff).

Every coderd case talks to a real :class:`FakeCoderd` (or a small server answering as the
unkind peer would) on 127.0.0.1 and checks that the probe stored nothing.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import assert_token_absent, clean_env, daemon_in_task, free_port, json_lines, wait_status, wait_until

from agentd import probe
from agentd.settings import load_settings
from agentd.testing import FakeAgentAPI, FakeCoderd, serve
from agentd.testing.fake_coderd import go_duration
from agentd.testing.http import Exchange

pytestmark = pytest.mark.anyio

TOKEN = "agt-" + uuid.uuid4().hex  # distinctive: any leak is unmistakable
TASK = str(uuid.uuid4())


def assert_nothing_stored(coderd: FakeCoderd) -> None:
    assert coderd.stored == {} and coderd.upserts == {}


@asynccontextmanager
async def answering(status: int, content_type: str | None, body: bytes) -> AsyncIterator[str]:
    """A server on 127.0.0.1 answering every request with this; yields its URL."""

    async def handle(ex: Exchange) -> None:
        with suppress(Exception):  # a body over the limit: answer anyway
            await ex.read_body(limit=100_000)
        headers = [("content-type", content_type)] if content_type else []
        await ex.respond(status, headers, body)

    async with serve(handle) as server:
        yield server.url


async def coderd_probe(url: str, token: str = TOKEN, task: str = TASK) -> probe.CoderdVerdict:
    async with httpx.AsyncClient() as client:
        verdict = await probe.probe_coderd(client, url, token, task, request_timeout=10.0)
    assert_token_absent(TOKEN, verdict.sentence, json.dumps(verdict.as_dict()))
    return verdict


# ---------------------------------------------------------------------------------------------
# coderd: each answer


async def test_ready_answers_400_decode_and_stores_nothing(anyio_backend: str) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve():
        verdict = await coderd_probe(coderd.url)
    assert (verdict.code, verdict.ready, verdict.transient, verdict.status) == ("ready", True, False, 400)
    assert verdict.line == f"coderd: log-snapshot endpoint ready for task {TASK}"
    assert_nothing_stored(coderd)
    [request] = coderd.requests
    assert request.method == "POST" and request.query == "format=agentapi" and request.message == "Failed to decode request payload."
    assert request.headers["coder-session-token"] == "<redacted>"  # the token was sent, as a header


async def test_bad_token_names_the_token_settings(anyio_backend: str) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve():
        verdict = await coderd_probe(coderd.url, token="not-the-" + TOKEN[::-1])
    assert (verdict.code, verdict.ready, verdict.transient, verdict.status) == ("token_refused", False, False, 401)
    assert "CODER_AGENT_TOKEN" in verdict.sentence and "Workspace agent not authorized." in verdict.sentence
    assert_nothing_stored(coderd)


async def test_no_route_checks_the_token_first_then_names_the_flag_and_the_version(anyio_backend: str) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, no_route=True, version="v2.37.1")
    async with coderd.serve():
        refused = await coderd_probe(coderd.url, token="wrong")
        verdict = await coderd_probe(coderd.url)
    assert refused.code == "token_refused"  # coderd checks the token before routing the group
    assert (verdict.code, verdict.ready, verdict.transient, verdict.status) == ("no_route", False, False, 404)
    assert "CODER_ENABLE_AI_TASKS=true" in verdict.sentence and "v2.37.1" in verdict.sentence
    assert "removed" in verdict.sentence
    assert [r.message for r in coderd.requests if r.path.endswith("/log-snapshot")] == [
        "Workspace agent not authorized.", "Route not found."
    ]
    assert_nothing_stored(coderd)


async def test_url_ending_in_api_v2_is_named(anyio_backend: str) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve():
        verdict = await coderd_probe(coderd.url + "/api/v2")
    assert verdict.code == "no_route" and "ends in /api/v2" in verdict.sentence
    assert "CODER_ENABLE_AI_TASKS" not in verdict.sentence


async def test_wrong_task_is_not_the_missing_route(anyio_backend: str) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    other = str(uuid.uuid4())
    async with coderd.serve():
        verdict = await coderd_probe(coderd.url, task=other)
    assert (verdict.code, verdict.status, verdict.transient) == ("wrong_task", 404, False)
    assert other in verdict.sentence and "AGENTD_TASK_ID" in verdict.sentence
    assert "CODER_ENABLE_AI_TASKS" not in verdict.sentence


async def test_bad_task_id(anyio_backend: str) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve():
        verdict = await coderd_probe(coderd.url, task="not-a-uuid")
    assert (verdict.code, verdict.status, verdict.transient) == ("bad_task_id", 400, False)
    assert "AGENTD_TASK_ID" in verdict.sentence


async def test_rate_limited_answers_429_as_coderd_does(anyio_backend: str) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, rate_limit=1)
    async with coderd.serve():
        first = await coderd_probe(coderd.url)
        second = await coderd_probe(coderd.url)
        async with httpx.AsyncClient() as client:
            third = await client.get(f"{coderd.url}/api/v2/buildinfo")
    assert first.ready
    assert (second.code, second.ready, second.transient, second.status) == ("rate_limited", False, True, 429)
    assert second.retry_after == 60.0
    assert "You've been rate limited for sending more than 1 requests in 1m0s." in second.sentence
    assert third.status_code == 429 and third.headers["retry-after"] == "60"  # every /api/v2 route counts
    assert {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= set(third.headers)
    assert_nothing_stored(coderd)


async def test_rate_limiter_admits_again_after_its_window(anyio_backend: str) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, rate_limit=1, rate_window=1.0)
    async with coderd.serve():
        assert (await coderd_probe(coderd.url)).ready
        limited = await coderd_probe(coderd.url)
        assert limited.code == "rate_limited" and "in 1s." in limited.sentence
        codes = []
        with anyio.fail_after(30):
            for _ in range(150):  # the sliding window lets one in again within about 2 s
                codes.append((await coderd_probe(coderd.url)).code)
                if codes[-1] == "ready":
                    break
                await anyio.sleep(0.2)
        assert codes[-1] == "ready" and set(codes[:-1]) <= {"rate_limited"}
    assert_nothing_stored(coderd)


async def test_no_route_mode_unregisters_the_read_back_too(anyio_backend: str) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, no_route=True)
    async with coderd.serve(), httpx.AsyncClient() as client:
        answer = await client.get(f"{coderd.url}/api/v2/tasks/me/{TASK}/logs")
        info = await client.get(f"{coderd.url}/api/v2/buildinfo")
    assert answer.status_code == 404 and answer.json()["message"] == "Route not found."
    assert info.status_code == 200 and info.json()["version"] == coderd.version


def test_go_duration_text() -> None:
    assert [go_duration(s) for s in (1, 30, 60, 90, 3600)] == ["1s", "30s", "1m0s", "1m30s", "1h0m0s"]


@pytest.mark.parametrize("answer", [500, (502, {}, b"<html><body>bad gateway</body></html>"), (503, {"Retry-After": "7"})])
async def test_server_errors_are_transient(anyio_backend: str, answer: Any) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, script=[answer])
    async with coderd.serve():
        where = f"127.0.0.1:{coderd.port}"
        verdict = await coderd_probe(coderd.url)
    assert verdict.code == "server_error" and verdict.transient and not verdict.ready
    assert verdict.status in (500, 502, 503) and where in verdict.sentence
    if verdict.status == 503:
        assert verdict.retry_after == 7.0


async def test_unreachable_port_names_host_and_port(anyio_backend: str) -> None:
    port = free_port()
    verdict = await coderd_probe(f"http://127.0.0.1:{port}")
    assert (verdict.code, verdict.transient, verdict.status) == ("unreachable", True, None)
    assert f"127.0.0.1:{port}" in verdict.sentence and "connection refused" in verdict.sentence
    assert "Error" not in verdict.sentence  # no exception class names


async def test_tls_spoken_to_a_plain_port(anyio_backend: str) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve():
        where = f"127.0.0.1:{coderd.port}"
        verdict = await coderd_probe(f"https://{where}")
    assert (verdict.code, verdict.transient) == ("tls_mismatch", False)
    assert "http://" in verdict.sentence and where in verdict.sentence


async def test_plain_http_to_a_go_tls_port(anyio_backend: str) -> None:
    async with answering(400, None, b"Client sent an HTTP request to an HTTPS server.\n") as url:
        verdict = await coderd_probe(url)
    assert verdict.code == "https_needed" and "https://" in verdict.sentence


@pytest.mark.parametrize(
    "status,content_type,body",
    [
        (200, "text/html; charset=utf-8", b"<!doctype html><title>Coder</title>"),
        (404, "text/html", b"<html>not found</html>"),
        (404, "application/problem+json", b'{"title":"Not Found","status":404,"detail":"no route"}'),
        (204, None, b""),
    ],
)
async def test_an_answer_that_is_not_coderd(anyio_backend: str, status: int, content_type: str | None, body: bytes) -> None:
    async with answering(status, content_type, body) as url:
        verdict = await coderd_probe(url)
    assert (verdict.code, verdict.ready, verdict.transient) == ("not_coderd", False, False)
    assert "CODER_AGENT_URL" in verdict.sentence and str(status) in verdict.sentence


async def test_agentapi_url_given_as_coderds(anyio_backend: str) -> None:
    api = FakeAgentAPI()
    async with api.serve():
        verdict = await coderd_probe(api.url)
    assert verdict.code == "not_coderd"


async def test_a_hanging_coderd_times_out(anyio_backend: str) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, hang=True)
    async with coderd.serve(), httpx.AsyncClient() as client:
        verdict = await probe.probe_coderd(client, coderd.url, TOKEN, TASK, request_timeout=0.5)
    assert (verdict.code, verdict.transient) == ("timeout", True) and "0.5 s" in verdict.sentence


async def test_the_answer_read_is_bounded(anyio_backend: str) -> None:
    huge = b'{"message":"' + b"x" * 5_000_000 + b'"}'
    async with answering(400, "application/json", huge) as url:
        verdict = await coderd_probe(url)
    assert verdict.code == "not_coderd"  # cut at ANSWER_LIMIT bytes: no longer JSON
    assert len(verdict.sentence) < 1000


def test_an_untrusted_certificate_names_the_ca_setting() -> None:
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")
    exc = httpx.ConnectError("")
    exc.__cause__ = cause
    verdict = probe.coderd_transport_verdict(exc, "https://coder.example.com", 5.0)
    assert (verdict.code, verdict.transient) == ("cert_untrusted", False)
    assert "AGENTD_CA_FILE" in verdict.sentence and "coder.example.com:443" in verdict.sentence


@given(
    status=st.integers(100, 599),
    content_type=st.sampled_from(["application/json", "text/html", "text/plain", "", "application/json; charset=utf-8"]),
    body=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda m, d: json.dumps({"message": m, "detail": d}).encode(), st.text(max_size=50), st.text(max_size=50)),
        st.sampled_from([b'{"message":"Failed to decode request payload."}', b'{"message":"Route not found."}', b"[1,2]", b"null"]),
    ),
)
def test_every_answer_maps_to_one_sentence(status: int, content_type: str, body: bytes) -> None:
    verdict = probe.coderd_answer_verdict(status, content_type, body, coderd_url="http://c.example:8080", task_id=TASK)
    assert verdict.sentence and "\n" not in verdict.sentence.strip()
    assert verdict.ready == (verdict.code == "ready")
    if verdict.ready:
        assert status == 400 and b"Failed to decode request payload." in body
    assert verdict.transient == (status == 429 or status >= 500)


# ---------------------------------------------------------------------------------------------
# coderd: probing again with backoff


async def test_watch_probes_again_until_coderd_answers_definitively(anyio_backend: str, log_stream: io.StringIO) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, script=[503, (429, {"Retry-After": "0"}), "reset"])
    seen: list[str] = []
    async with coderd.serve(), httpx.AsyncClient() as client:
        with anyio.fail_after(60):
            final = await probe.watch_coderd(client, coderd.url, TOKEN, TASK, lambda v: seen.append(v.code), base=0.01, cap=0.05)
    assert final.ready and seen == ["server_error", "rate_limited", "unreachable", "ready"]
    events = [e["event"] for e in json_lines(log_stream.getvalue())]
    assert events.count(f"coderd: log-snapshot endpoint ready for task {TASK}") == 1
    assert_nothing_stored(coderd)


async def test_watch_stops_at_a_definitive_refusal(anyio_backend: str, log_stream: io.StringIO) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, no_route=True)
    async with coderd.serve(), httpx.AsyncClient() as client:
        with anyio.fail_after(30):
            final = await probe.watch_coderd(client, coderd.url, TOKEN, TASK, lambda v: None, base=0.01, cap=0.05)
    assert final.code == "no_route"
    [line] = [e for e in json_lines(log_stream.getvalue()) if e["event"].startswith("coderd:")]
    assert line["level"] == "error" and "Route not found." in line["event"]
    assert len([r for r in coderd.requests if r.path.endswith("/log-snapshot")]) == 1


# ---------------------------------------------------------------------------------------------
# agentapi


async def agentapi_probe(url: str, **kwargs: Any) -> probe.AgentAPIReport:
    async with httpx.AsyncClient() as client:
        return await probe.probe_agentapi(client, url, request_timeout=10.0, **kwargs)


async def test_agentapi_ready_with_sse(anyio_backend: str) -> None:
    api = FakeAgentAPI(agent_type="claude")
    for i in range(12):
        api.add_message("agent" if i % 2 == 0 else "user", f"message {i}: ╭─ box ─╮")  # agent first: agentapi's PTY message 0
    async with api.serve():
        where = f"127.0.0.1:{api.port}"
        report = await agentapi_probe(api.url, max_messages=10)
    assert (report.code, report.ok, report.events, report.agent_type, report.transport) == ("ok", True, "sse", "claude", "pty")
    assert report.messages == 12 and report.snapshot_messages == 10 and report.snapshot_bytes and report.snapshot_bytes > 0
    assert where in report.sentence and "12 messages held" in report.sentence


async def test_agentapi_without_events_is_polled_and_empty_is_said(anyio_backend: str) -> None:
    api = FakeAgentAPI(events=False)
    async with api.serve():
        report = await agentapi_probe(api.url)
    # agentapi's PTY start: only its empty placeholder, message 0.
    assert report.ok and report.events == "polling" and report.messages == 1
    assert "GET /events answered 404" in report.sentence and "no message with content yet" in report.sentence


async def test_agentapi_refusing_the_host_header(anyio_backend: str) -> None:
    async with answering(400, "text/plain; charset=utf-8", b"Invalid host header\n") as url:
        report = await agentapi_probe(url)
    assert (report.code, report.ok, report.status) == ("host_refused", False, 400)
    assert "--allowed-hosts 127.0.0.1" in report.sentence and "AGENTAPI_ALLOWED_HOSTS" in report.sentence
    assert "localhost" in report.sentence


async def test_agentapi_unreachable(anyio_backend: str) -> None:
    port = free_port()
    report = await agentapi_probe(f"http://127.0.0.1:{port}")
    assert (report.code, report.ok) == ("unreachable", False)
    assert f"127.0.0.1:{port}" in report.sentence and "connection refused" in report.sentence


async def test_coderds_url_given_as_agentapis(anyio_backend: str) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, version="v2.31.2")
    async with coderd.serve():
        report = await agentapi_probe(coderd.url)
    assert (report.code, report.ok) == ("coderd_url", False)
    assert "is coderd v2.31.2, not agentapi" in report.sentence and "AGENTD_AGENTAPI_URL" in report.sentence


async def test_an_html_page_is_not_agentapi(anyio_backend: str) -> None:
    async with answering(200, "text/html", b"<html>hello</html>") as url:
        report = await agentapi_probe(url)
    assert (report.code, report.ok) == ("not_agentapi", False) and "AGENTD_AGENTAPI_URL" in report.sentence


# ---------------------------------------------------------------------------------------------
# agentd run: the start-up probe


class Handle:
    def __init__(self, log_stream: io.StringIO) -> None:
        self.log_stream = log_stream
        self.done = anyio.Event()
        self.status: int | None = None
        self.exited: float | None = None

    def output(self) -> str:
        return self.log_stream.getvalue()

    def events(self) -> list[str]:
        return [e.get("event", "") for e in json_lines(self.output())]


@pytest.fixture
def run_daemon(short_dir: Path, log_stream: io.StringIO) -> Callable[..., Any]:
    @asynccontextmanager
    async def start(coderd_url: str, agentapi_url: str, token: str = TOKEN) -> AsyncIterator[Handle]:
        settings = load_settings(
            coderd_url=coderd_url, agent_token=token, task_id=TASK, agentapi_url=agentapi_url,
            state_dir=str(short_dir / "state"), socket=str(short_dir / "agentd.sock"), shutdown_timeout=8.0,
            checkpoint_interval=0, log_format="json", log_level="info", startup_probe=True,
        )
        handle = Handle(log_stream)
        async with daemon_in_task(settings, handle, lambda: '"agentd started"' in handle.output(), "agentd's start line"):
            yield handle
        assert_token_absent(TOKEN, handle.output())

    return start


async def stop(handle: Handle) -> int:
    os.kill(os.getpid(), signal.SIGTERM)
    await wait_until(handle.done.is_set, 30, "the daemon to return")
    assert handle.status is not None
    return handle.status


async def test_startup_probe_logs_ready_and_the_stop_still_stores(anyio_backend: str, run_daemon: Any, short_dir: Path) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    api = FakeAgentAPI()
    api.add_message("agent", "hello ╭─╮")  # fills agentapi's PTY message 0
    async with coderd.serve(), api.serve(), run_daemon(coderd.url, api.url) as handle:
        status = await wait_status(short_dir / "agentd.sock", lambda s: (s["probe"] or {}).get("coderd") is not None, 30)
        assert status["probe"]["coderd"]["code"] == "ready"
        await wait_until(lambda: any(e.startswith("agentapi: reachable") for e in handle.events()), 30, "the agentapi line")
        shown = await anyio.run_process(
            [sys.executable, "-m", "agentd", "status", "--socket", str(short_dir / "agentd.sock")], env=clean_env(), check=False
        )
        assert shown.returncode == 0, shown.stderr
        assert f"coderd:        log-snapshot endpoint ready for task {TASK}" in shown.stdout.decode()
        assert_nothing_stored(coderd)  # the probe stores nothing
        assert await stop(handle) == 0
    assert f"coderd: log-snapshot endpoint ready for task {TASK}" in handle.events()
    assert coderd.stored[TASK].messages[0]["content"] == "hello ╭─╮"


async def test_startup_probe_problem_in_status_and_systemd_status(
    anyio_backend: str, run_daemon: Any, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "notify"))
    received: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                received.append(notify.recv(65536).decode())
            except BlockingIOError:
                return received

    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    api = FakeAgentAPI()
    try:
        async with coderd.serve(), api.serve(), run_daemon(coderd.url, api.url, token="wrong-token") as handle:
            status = await wait_status(short_dir / "agentd.sock", lambda s: (s["probe"] or {}).get("coderd") is not None, 30)
            assert status["probe"]["coderd"]["code"] == "token_refused"
            await wait_until(lambda: any("coderd refuses the agent token (401)" in m for m in drain()), 30, "STATUS=")
            assert "READY=1" in received
            await stop(handle)
    finally:
        notify.close()
    [line] = [e for e in json_lines(handle.output()) if e.get("event", "").startswith("coderd:")]
    assert line["level"] == "error" and "CODER_AGENT_TOKEN" in line["event"]


async def test_startup_probe_does_not_hold_ready_or_the_stop(anyio_backend: str, run_daemon: Any, short_dir: Path) -> None:
    """coderd hangs the probe: READY comes anyway, and SIGTERM's upload is not held by it."""
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, script=["hang"])
    api = FakeAgentAPI()
    api.add_message("agent", "kept")  # fills agentapi's PTY message 0
    async with coderd.serve(), api.serve(), run_daemon(coderd.url, api.url) as handle:
        await coderd.wait_for(lambda: len(coderd.requests) >= 1, 30)
        await wait_status(short_dir / "agentd.sock", lambda s: s["messages"] == 1, 30)
        started = time.monotonic()
        assert await stop(handle) == 0
        assert time.monotonic() - started < 8.0  # within the shutdown timeout, not after the probe's
    assert coderd.stored[TASK].messages[0]["content"] == "kept"


async def test_startup_probe_waits_quietly_for_a_starting_agentapi(anyio_backend: str, run_daemon: Any) -> None:
    """agentapi starts listening after agentd (supervise's child, a sidecar): no false alarm."""
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    api = FakeAgentAPI()
    api.add_message("user", "late")
    port = free_port()
    async with coderd.serve(), run_daemon(coderd.url, f"http://127.0.0.1:{port}") as handle:
        await anyio.sleep(1.0)  # agentapi is still starting: nothing listens yet
        async with api.serve(port=port):
            await wait_until(lambda: any(e.startswith("agentapi: reachable") for e in handle.events()), 30, "the agentapi line")
            assert await stop(handle) == 0
    assert not [e for e in handle.events() if e.startswith("agentapi: cannot reach")]


async def test_startup_probe_names_agentapis_host_allow_list(anyio_backend: str, run_daemon: Any, short_dir: Path) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    refusing = answering(400, "text/plain; charset=utf-8", b"Invalid host header\n")
    async with coderd.serve(), refusing as url, run_daemon(coderd.url, url) as handle:
        await wait_until(lambda: any("--allowed-hosts" in e for e in handle.events()), 60, "the Host line")
        status = await wait_status(short_dir / "agentd.sock", lambda s: bool(s["source"]["problem"]), 30)
        await stop(handle)
    # One line says it (the tail's; the probe agrees in silence), and `agentd status` keeps it.
    said = [e for e in json_lines(handle.output()) if "--allowed-hosts" in e.get("event", "") and e.get("level") in ("warning", "error")]
    assert len(said) == 1, said
    assert "--allowed-hosts 127.0.0.1" in said[0]["event"]
    assert "--allowed-hosts 127.0.0.1" in (status["source"]["problem"] or "")
