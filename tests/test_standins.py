"""Tests of the stand-ins themselves (agentd.testing), over real loopback with httpx.

The fakes are the evidence every other test relies on, so each CONTRACT.md rule they encode is
checked here against the contract's wording: coderd's checks in order with their exact
messages (§1), agentapi's replay-then-live event stream (§2), and the process modes.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest
from httpx_sse import aconnect_sse

from agentd.testing import (
    SNAPSHOT_MAX_BYTES,
    BodyTooLarge,
    Exchange,
    FakeAgentAPI,
    FakeCoderd,
    conversations,
    go_parse_uuid,
    parse_rfc3339_strict,
    serve,
)
from agentd.testing.fake_agentapi import Message as FakeMessage

pytestmark = pytest.mark.anyio

TOKEN = "5f0c6a4e-agent-token"
TASK = "0b7e2c1a-3f4d-4e5f-8a9b-0c1d2e3f4a5b"
OTHER_TASK = "11111111-2222-4333-8444-555555555555"
T0 = "2026-01-01T00:00:00.123456789Z"
REPO_ROOT = Path(__file__).resolve().parents[1]


def payload(messages: list[dict] | None = None, **extra) -> bytes:
    body = {"messages": messages if messages is not None else [], **extra}
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def msg(i: int, content: str = "hi", role: str = "agent", t: str = T0) -> dict:
    return {"id": i, "content": content, "role": role, "time": t}


def padded_body(size: int, messages_value: str = "[]") -> bytes:
    """A JSON object of exactly ``size`` bytes whose padding is 3-byte box-drawing chars."""
    head = '{"messages":' + messages_value + ',"pad":"'
    tail = '"}'
    room = size - len(head.encode()) - len(tail.encode())
    body = (head + "─" * (room // 3) + "x" * (room % 3) + tail).encode("utf-8")
    assert len(body) == size
    return body


async def post(client: httpx.AsyncClient, coderd: FakeCoderd, body: bytes, *, task: str = TASK,
               query: str = "format=agentapi", token: str | None = TOKEN,
               timeout: float | None = None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["coder-session-token"] = token
    extra = {} if timeout is None else {"timeout": timeout}
    return await client.post(coderd.snapshot_url(task, query), content=body, headers=headers, **extra)


# ---------------------------------------------------------------------------------------------
# the HTTP layer


async def test_http_keepalive_capped_body_and_plain_response() -> None:
    seen: list[tuple[int, bool]] = []

    async def handler(ex: Exchange) -> None:
        try:
            body = await ex.read_body(limit=10)
            seen.append((len(body), False))
        except BodyTooLarge as exc:
            seen.append((len(exc.partial), True))
        await ex.respond(200, {"content-type": "text/plain", "x-test": "1"}, b"ok")

    async with serve(handler) as server, httpx.AsyncClient(timeout=30) as client:
        assert server.url == f"http://127.0.0.1:{server.port}"
        r1 = await client.post(server.url + "/a", content=b"x" * 10)
        r2 = await client.post(server.url + "/b", content=b"x" * 11)
        r3 = await client.post(server.url + "/c", content=b"y" * 200_000)
        assert [r.status_code for r in (r1, r2, r3)] == [200, 200, 200]
        assert r1.text == "ok" and r1.headers["x-test"] == "1"
        assert seen == [(10, False), (11, True), (11, True)]  # at most cap+1 bytes read
        assert server.connections_total == 1  # keep-alive, even after unread bodies


async def test_http_streaming_chunks_arrive_one_by_one() -> None:
    go_on = anyio.Event()

    async def handler(ex: Exchange) -> None:
        stream = await ex.start_stream(200, [("content-type", "text/plain")])
        await stream.send(b"first\n")
        with anyio.fail_after(30):
            await go_on.wait()
        await stream.send(b"second\n")
        await stream.end()

    async with serve(handler) as server, httpx.AsyncClient(timeout=30) as client:
        async with client.stream("GET", server.url + "/s") as resp:
            assert resp.headers["transfer-encoding"] == "chunked"
            chunks = resp.aiter_raw()
            assert await chunks.__anext__() == b"first\n"  # flushed before the handler goes on
            go_on.set()
            rest = b"".join([c async for c in chunks])
            assert rest == b"second\n"


async def test_http_faults_hang_abort_raw() -> None:
    async def handler(ex: Exchange) -> None:
        await ex.read_body()
        if ex.path == "/hang":
            await ex.hang()
        elif ex.path == "/abort":
            stream = await ex.start_stream(200)
            await stream.send(b"partial")
            await stream.abort()
        elif ex.path == "/reset":
            await ex.abort(reset=True)
        elif ex.path == "/boom":
            raise RuntimeError("handler bug")
        elif ex.path == "/raw":
            await ex.send_raw(b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 3\r\n\r\ntea")
        else:
            await ex.send_raw(b"garbage\r\n\r\n")

    async with serve(handler) as server, httpx.AsyncClient(timeout=30) as client:
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.url + "/hang", timeout=0.3)
        assert time.monotonic() - t0 < 20  # ended by the 0.3 s client timeout, not a hang
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("GET", server.url + "/abort") as resp:
                await resp.aread()
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await client.get(server.url + "/reset")
        r = await client.get(server.url + "/raw")
        assert (r.status_code, r.text) == (418, "tea")
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(server.url + "/garbage")
        r = await client.get(server.url + "/boom")
        assert r.status_code == 500  # a failing handler answers 500; the server carries on
        assert (await client.get(server.url + "/raw")).status_code == 418


async def test_http_expect_100_continue_like_curl() -> None:
    async def handler(ex: Exchange) -> None:
        body = await ex.read_body(limit=100)
        await ex.respond(200, {"content-type": "text/plain"}, str(len(body)).encode())

    async with serve(handler) as server:
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", server.port) as sock:
                await sock.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
                first = await sock.receive()
                assert first.startswith(b"HTTP/1.1 100 ")  # without waiting for the body
                await sock.send(b"hello")
                rest = b""
                while not rest.endswith(b"\r\n\r\n5"):
                    rest += await sock.receive()
                assert rest.startswith(b"HTTP/1.1 200 ")


async def test_http_exit_cancels_open_connections_and_rejects_non_loopback() -> None:
    started = anyio.Event()

    async def handler(ex: Exchange) -> None:
        started.set()
        await ex.hang()

    with anyio.fail_after(30):
        async with serve(handler) as server:
            async with anyio.create_task_group() as tg:

                async def client_call() -> None:
                    async with httpx.AsyncClient(timeout=30) as client:
                        with pytest.raises(httpx.HTTPError):
                            await client.get(server.url + "/")

                tg.start_soon(client_call)
                await started.wait()
                assert server.connections_open == 1
                await server.close_connections()
    with pytest.raises(ValueError):
        async with serve(handler, host="0.0.0.0"):
            pass


async def test_http_tls(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=20,
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve(ssl_context=ctx) as c, httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert)), timeout=5) as client:
        assert c.url.startswith("https://127.0.0.1:")
        r = await post(client, c, payload([msg(0)]))
        assert r.status_code == 204


# ---------------------------------------------------------------------------------------------
# FakeCoderd: CONTRACT.md §1


async def test_coderd_rules_apply_in_contract_order() -> None:
    """Each request breaks rule k and every later rule: the answer is rule k's."""
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    huge_invalid = b"{" + b"!" * 70_000
    async with coderd.serve() as c, httpx.AsyncClient(timeout=30) as client:

        async def check(expected_status: int, expected_message: str | None, **kw) -> dict:
            r = await post(client, c, kw.pop("body", huge_invalid), **kw)
            assert r.status_code == expected_status, r.text
            if expected_message is None:
                assert r.content == b""
                return {}
            data = r.json()
            assert set(data) <= {"message", "detail", "validations"}
            assert all(data.values()), f"coderd leaves out an empty detail or validations: {data}"
            assert data["message"] == expected_message
            return data

        await check(401, "You are signed out or your session has expired. Please sign in again to continue.",
                    token=None, task="nope", query="format=xml&x=1")
        await check(401, "Workspace agent not authorized.", token="wrong", task="nope", query="format=xml&x=1")
        d = await check(400, "Invalid task ID format.", task="not-a-uuid", query="format=xml&x=1")
        assert d["detail"] == "invalid UUID length: 10"
        d = await check(400, "Invalid query parameters.", task=OTHER_TASK, query="format=xml&x=1")
        assert d["validations"] == [{"field": "x", "detail": '"x" is not a valid query param'}]
        d = await check(400, "Invalid query parameters.", task=OTHER_TASK, query="")
        assert [v["field"] for v in d["validations"]] == ["format"]
        assert "required and cannot be empty" in d["validations"][0]["detail"]
        await check(400, "Invalid query parameters.", task=OTHER_TASK, query="format=")
        d = await check(400, "Invalid format parameter.", task=OTHER_TASK, query="format=xml")
        assert d["detail"] == 'Only "agentapi" format is currently supported, got "xml".'
        c.fail_store = True  # the database fails on the task lookup, before the body is read
        d = await check(500, "Internal error fetching task.", task=OTHER_TASK)
        assert d["detail"]
        c.fail_store = False
        d = await check(404, "Resource not found.", task=OTHER_TASK)
        assert d == {"message": "Resource not found."}
        d = await check(400, "Failed to decode request payload.", body=padded_body(65_537, "null"))
        assert d["detail"] == "http: request body too large"
        d = await check(400, "Failed to decode request payload.", body=b'{"messages":null,"x":}')
        assert d["detail"] != "http: request body too large"
        d = await check(400, "Invalid agentapi payload structure.", body=b'{"messages":null}')
        assert d["detail"] == 'Missing required "messages" field.'
        await check(400, "Invalid agentapi payload structure.", body=b'{"truncated":false}')
        d = await check(500, "Internal error storing snapshot.", body=payload([msg(0, "nul \u0000 byte")]))
        assert "22P05" in d["detail"]  # jsonb rejects U+0000
        await check(204, None, body=payload([]))  # an empty list is accepted
        assert [r.status for r in c.requests] == [401, 401, 400, 400, 400, 400, 400, 500, 404, 400, 400, 400, 400, 500, 204]
        assert [r.auth for r in c.requests[:3]] == ["missing", "invalid", "ok"]


async def test_coderd_body_cap_is_65536_raw_bytes() -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve() as c, httpx.AsyncClient(timeout=30) as client:
        ok = await post(client, c, padded_body(SNAPSHOT_MAX_BYTES))
        assert ok.status_code == 204
        assert len(c.stored[TASK].body) == 65_536
        over = await post(client, c, padded_body(SNAPSHOT_MAX_BYTES + 1))
        assert over.status_code == 400
        assert over.json()["message"] == "Failed to decode request payload."
        assert over.json()["detail"] == "http: request body too large"
        assert over.headers["connection"] == "close"  # Go closes after MaxBytesReader trips
        assert len(c.requests[-1].body) == 65_537  # read at most cap + 1
        # Far over the cap: still a clean 400, not a reset connection.
        big = await post(client, c, padded_body(3_000_000))
        assert big.status_code == 400 and big.json()["detail"] == "http: request body too large"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (payload([msg(0)]), 204, None),
        (payload([msg(0, "─" * 100)], extra_key=[1, {"a": None}]), 204, None),  # unknown keys ignored
        (b'{"Messages":[{"ID":1,"Content":"x","ROLE":"user","Time":"2026-01-01T00:00:00Z"}]}', 204, None),
        (payload([msg(0)]) + b"\n trailing bytes are never read", 204, None),  # Go's Decoder reads one value
        (payload([msg(0, t="2026-01-01T01:00:00.5+01:00")]), 204, None),
        (payload([{"id": 3}]), 204, None),  # missing fields take Go's zero values
        (b'{"messages":[null]}', 204, None),
        (payload([msg(0) | {"id": 9_223_372_036_854_775_807}]), 204, None),
        (payload([msg(0) | {"id": 1.0}]), 400, "Failed to decode request payload."),
        (payload([msg(0) | {"id": "1"}]), 400, "Failed to decode request payload."),
        (b'{"messages":[{"id":1e2}]}', 400, "Failed to decode request payload."),
        (payload([msg(0) | {"id": 9_223_372_036_854_775_808}]), 400, "Failed to decode request payload."),
        (payload([msg(0) | {"id": True}]), 400, "Failed to decode request payload."),
        (payload([msg(0) | {"content": 5}]), 400, "Failed to decode request payload."),
        (payload([msg(0) | {"role": ["agent"]}]), 400, "Failed to decode request payload."),
        (payload([msg(0, t="2026-01-01 00:00:00Z")]), 400, "Failed to decode request payload."),
        (payload([msg(0, t="2026-01-01T00:00:00")]), 400, "Failed to decode request payload."),
        (payload([msg(0, t="2026-01-01t00:00:00z")]), 400, "Failed to decode request payload."),
        (payload([msg(0, t="2026-02-29T00:00:00Z")]), 400, "Failed to decode request payload."),
        (payload([msg(0, t="2026-01-01T24:00:00Z")]), 400, "Failed to decode request payload."),
        (payload([msg(0, t="2026-01-01T00:00:60Z")]), 400, "Failed to decode request payload."),
        (payload([msg(0, t="2026-01-01T00:00:00.Z")]), 400, "Failed to decode request payload."),
        (payload([msg(0, t="1767225600")]), 400, "Failed to decode request payload."),
        (b'{"messages":[{"time":"2026-01-01T00:00:00\\u005a"}]}', 400, "Failed to decode request payload."),
        (payload([msg(0) | {"time": 0}]), 400, "Failed to decode request payload."),
        (b'{"messages":[{"id":0,"content":"\xff\xfe"}]}', 400, "Failed to decode request payload."),
        (b'{"messages":[{"id":NaN}]}', 400, "Failed to decode request payload."),
        (b"[]", 400, "Failed to decode request payload."),
        (b'"messages"', 400, "Failed to decode request payload."),
        (b"", 400, "Failed to decode request payload."),
        (b'{"messages":{}}', 400, "Failed to decode request payload."),
        (b'{"messages":[1]}', 400, "Failed to decode request payload."),
        (b"null", 400, "Invalid agentapi payload structure."),
        (b'{"messages":[],"messages":null}', 400, "Invalid agentapi payload structure."),
    ],
)
async def test_coderd_decodes_like_go(body: bytes, status: int, message: str | None) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve() as c, httpx.AsyncClient(timeout=30) as client:
        r = await post(client, c, body)
        assert r.status_code == status, r.text
        if message is not None:
            assert r.json()["message"] == message
        else:
            assert r.content == b""


async def test_coderd_upserts_with_its_own_clock_and_reads_back() -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve() as c, httpx.AsyncClient(timeout=30) as client:
        active = await client.get(f"{c.url}/api/v2/tasks/me/{TASK}/logs")
        assert active.status_code == 409, "an active task's log is read live from agentapi, not the snapshot"
        c.set_task_status(TASK, "pending")
        empty = await client.get(f"{c.url}/api/v2/tasks/me/{TASK}/logs")
        assert empty.json() == {"logs": [], "snapshot": True}
        c.set_task_status(TASK, "active")
        before = time.time()
        r1 = await post(client, c, payload([msg(0, "first", "user", "2020-01-01T00:00:00Z")]))
        first = c.stored[TASK]
        r2 = await post(client, c, payload([msg(0, "second", "user"), msg(1, "⏺ done ✅", "agent")]))
        assert (r1.status_code, r2.status_code) == (204, 204)
        assert r2.content == b""
        second = c.stored[TASK]
        assert [m["content"] for m in second.messages] == ["second", "⏺ done ✅"]
        assert before <= first.snapshot_at <= second.snapshot_at <= time.time()
        assert c.upserts[TASK] == 2
        assert second.messages[0]["time"] == T0  # re-marshalled as Go would
        assert second.log_snapshot == {"format": "agentapi", "data": {"messages": second.messages}}
        assert (await client.get(f"{c.url}/api/v2/tasks/me/{TASK}/logs")).status_code == 409
        c.complete_stop_build()  # the workspace stopped: the task is paused
        back = await client.get(f"{c.url}/api/v2/tasks/me/{TASK}/logs")
        assert back.status_code == 200
        data = back.json()
        assert "count" not in data
        assert data["snapshot"] is True and data["snapshot_at"].endswith("Z")
        assert data["logs"] == [
            {"id": 0, "content": "second", "type": "input", "time": T0},
            {"id": 1, "content": "⏺ done ✅", "type": "output", "time": T0},
        ]
        assert (await c.wait_stored(TASK, timeout=10)) is second


async def test_coderd_bad_role_is_stored_but_poisons_read_back() -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve() as c, httpx.AsyncClient(timeout=30) as client:
        r = await post(client, c, payload([msg(0, "ok", "user"), msg(1, "x", "system")]))
        assert r.status_code == 204  # the upload path does not check roles
        c.set_task_status(TASK, "paused")
        back = await client.get(f"{c.url}/api/v2/tasks/me/{TASK}/logs")
        assert back.status_code == 500
        assert back.json()["message"] == "Invalid snapshot data."
        assert back.json()["detail"] == 'invalid agentapi message role "system"'
        # A missing role is the empty string after Go decoding: also poison.
        await post(client, c, payload([{"id": 0, "content": "x", "time": T0}]))
        assert (await client.get(f"{c.url}/api/v2/tasks/me/{TASK}/logs")).status_code == 500


async def test_coderd_token_stops_working_after_the_stop_build_and_a_delete() -> None:
    """coder/coder PR 21538: the agent token works while the stop build runs, 401 once it has
    completed; deleting the task deletes its workspace, and the token with it."""
    async with httpx.AsyncClient(timeout=30) as client:
        coderd = FakeCoderd(token=TOKEN, tasks={TASK})
        async with coderd.serve() as c:
            assert (await post(client, c, payload([msg(0, "during the stop build")]))).status_code == 204
            c.complete_stop_build()
            late = await post(client, c, payload([msg(0, "after the stop build")]))
            assert late.status_code == 401
            assert late.json()["message"] == "Workspace agent not authorized."
            assert c.requests[-1].auth == "expired"
            assert c.stored[TASK].messages[0]["content"] == "during the stop build"
            assert c.task_status[TASK] == "paused"
        coderd = FakeCoderd(token=TOKEN, tasks={TASK})
        async with coderd.serve() as c:
            c.delete_task(TASK)
            gone = await post(client, c, payload([msg(0)]))
            assert gone.status_code == 401 and c.requests[-1].auth == "expired"
            assert TASK not in c.tasks and c.stored == {}


async def test_coderd_store_failure_answers_500_before_reading_the_body() -> None:
    """A database failure on the task lookup answers 500 whatever the body: nothing is decoded."""
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, fail_store=True)
    async with coderd.serve() as c, httpx.AsyncClient(timeout=30) as client:
        for body in (payload([msg(0)]), b"not json", padded_body(SNAPSHOT_MAX_BYTES + 10)):
            r = await post(client, c, body)
            assert r.status_code == 500
            assert r.json()["message"] == "Internal error fetching task."
        assert c.stored == {}


async def test_coderd_script_retry_after_close_and_hang() -> None:
    coderd = FakeCoderd(
        token=TOKEN, tasks={TASK},
        script=[503, (503, {"Retry-After": "1"}), (502, {}, b"<html>bad gateway</html>"), "close", None, 401],
    )
    async with coderd.serve() as c, httpx.AsyncClient(timeout=30) as client:
        r1 = await post(client, c, payload([msg(0)]))
        r2 = await post(client, c, payload([msg(0)]))
        r3 = await post(client, c, payload([msg(0)]))
        assert (r1.status_code, r2.status_code, r3.status_code) == (503, 503, 502)
        assert "retry-after" not in r1.headers and r2.headers["retry-after"] == "1"
        assert r3.text == "<html>bad gateway</html>"
        with pytest.raises(httpx.RemoteProtocolError):
            await post(client, c, payload([msg(0)]))
        r5 = await post(client, c, payload([msg(0)]))  # None: normal handling
        assert r5.status_code == 204
        r6 = await post(client, c, payload([msg(0)]))
        assert r6.status_code == 401
        assert (await post(client, c, payload([msg(0)]))).status_code == 204  # script used up
        assert [r.status for r in c.requests] == [503, 503, 502, None, 204, 401, 204]
        assert all(r.body == payload([msg(0)]) for r in c.requests)
        assert all(r.task == TASK for r in c.requests)
        assert c.requests[0].monotonic <= c.requests[-1].monotonic

        c.hang = True
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await post(client, c, payload([msg(1)]), timeout=0.3)  # would hang forever otherwise
        assert time.monotonic() - t0 < 20  # ended by the 0.3 s client timeout, not a hang
        assert c.requests[-1].status is None and c.requests[-1].body == payload([msg(1)])
        assert c.upserts[TASK] == 2


async def test_coderd_hang_flag_with_short_client_timeout() -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, hang=True)
    async with coderd.serve() as c, httpx.AsyncClient(timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await post(client, c, payload([msg(0)]))
        assert TASK not in c.stored


async def test_coderd_max_rps_answers_503_with_retry_after() -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, max_rps=2)
    async with coderd.serve() as c, httpx.AsyncClient(timeout=30) as client:
        statuses = [(await post(client, c, payload([msg(0)]))) for _ in range(4)]
        assert [r.status_code for r in statuses] == [204, 204, 503, 503]
        assert int(statuses[2].headers["retry-after"]) >= 1


async def test_coderd_without_the_feature_answers_404_everywhere() -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, feature=False)
    async with coderd.serve() as c, httpx.AsyncClient(timeout=30) as client:
        assert (await post(client, c, payload([msg(0)]))).status_code == 404
        assert (await client.get(f"{c.url}/api/v2/tasks/me/{TASK}/logs")).status_code == 404
        assert c.stored == {}


async def test_coderd_never_records_the_token() -> None:
    secret = "s3cr3t-" + uuid.uuid4().hex
    coderd = FakeCoderd(token=secret, tasks={TASK})
    async with coderd.serve() as c, httpx.AsyncClient(timeout=30) as client:
        for token in (secret, "wrong-" + secret):
            await post(client, c, payload([msg(0)]), token=token)
        dump = repr(c.requests) + json.dumps([r.as_json() for r in c.requests])
        assert secret not in dump
        assert c.requests[0].headers["coder-session-token"] == "<redacted>"
        assert [r.auth for r in c.requests] == ["ok", "invalid"]


def test_go_uuid_and_rfc3339_parsers() -> None:
    canon = "0b7e2c1a-3f4d-4e5f-8a9b-0c1d2e3f4a5b"
    for form in (canon, canon.upper(), "urn:uuid:" + canon, "{" + canon + "}", "x" + canon + "y",
                 canon.replace("-", "")):
        assert go_parse_uuid(form) == canon
    for bad in ("", "not-a-uuid", canon[:-1] + "g", canon.replace("-", "+"), "urn:uxid:" + canon):
        with pytest.raises(ValueError):
            go_parse_uuid(bad)
    assert parse_rfc3339_strict("2026-01-01T00:00:00.123456789Z").marshal() == T0
    assert parse_rfc3339_strict("2025-01-01T00:00:00.500Z").marshal() == "2025-01-01T00:00:00.5Z"
    assert parse_rfc3339_strict("2024-02-29T23:59:59-00:00").marshal() == "2024-02-29T23:59:59Z"
    assert parse_rfc3339_strict("2024-02-29T23:59:59.1234567891+05:30").marshal() == "2024-02-29T23:59:59.123456789+05:30"
    for bad in ("2026-1-01T00:00:00Z", "2026-01-01T0:00:00Z", "2026-01-01T00:00:00+0100", "2026-13-01T00:00:00Z",
                "2026-01-01T00:00:00+01:60", "2026-01-01T00:00:00ZZ", "2026-01-01"):
        with pytest.raises(ValueError):
            parse_rfc3339_strict(bad)


# ---------------------------------------------------------------------------------------------
# FakeAgentAPI: CONTRACT.md §2


async def test_agentapi_messages_and_status() -> None:
    api = FakeAgentAPI(agent_type="claude", status="stable")
    api.add_message("agent", "╭─╮ hello ✻")
    api.add_message("user", "do it")
    async with api.serve() as a, httpx.AsyncClient(timeout=30) as client:
        msgs = (await client.get(a.url + "/messages")).json()
        assert [(m["id"], m["role"], m["content"]) for m in msgs["messages"]] == [
            (0, "agent", "╭─╮ hello ✻"), (1, "user", "do it")
        ]
        assert set(msgs["messages"][0]) == {"id", "content", "role", "time"}
        parse_rfc3339_strict(msgs["messages"][0]["time"])  # RFC 3339, Go-parsable
        status = (await client.get(a.url + "/status")).json()
        assert {k: status[k] for k in ("status", "agent_type", "transport")} == {
            "status": "stable", "agent_type": "claude", "transport": "pty"
        }
        assert (await client.get(a.url + "/nope")).status_code == 404
        assert a.requests["/messages"] == 1 and a.requests["/status"] == 1


async def test_agentapi_time_format_is_rfc3339_nano() -> None:
    # The first tick dates the PTY placeholder (message 0), which the first agent message fills.
    ticks = iter([1_767_225_500_000_000_000, 1_767_225_600_123_456_789, 1_767_225_600_500_000_000, 1_767_225_600_000_000_000])
    api = FakeAgentAPI(clock=lambda: next(ticks))
    for _ in range(3):
        api.add_message("agent", "x")
    assert [m.time for m in api.messages] == [T0, "2026-01-01T00:00:00.5Z", "2026-01-01T00:00:00Z"]


async def test_agentapi_events_replay_then_live() -> None:
    api = FakeAgentAPI(status="running")
    api.add_message("agent", "welcome")
    api.add_message("user", "question")
    async with api.serve() as a, httpx.AsyncClient(timeout=30) as client:
        async with aconnect_sse(client, "GET", a.url + "/events") as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            events = source.aiter_sse()

            async def next_event() -> tuple[str, dict]:
                with anyio.fail_after(30):
                    sse = await events.__anext__()
                return sse.event, json.loads(sse.data)

            e = [await next_event() for _ in range(3)]
            assert e[0] == ("message_update", {"id": 0, "role": "agent", "message": "welcome", "time": api.messages[0].time})
            assert e[1][0] == "message_update" and e[1][1]["id"] == 1 and e[1][1]["message"] == "question"
            assert "content" not in e[1][1]
            assert e[2] == ("status_change", {"status": "running", "agent_type": "claude"})
            await a.wait_for_subscribers(1)

            new_id = api.add_message("agent", "⏺ Work")
            api.update_last("⏺ Working…")
            api.update_last("⏺ Working… done ✅")
            api.set_status("running")  # unchanged: no event
            api.set_status("stable")
            api.agent_error("boom", level="warning")
            live = [await next_event() for _ in range(5)]
            assert [(k, d.get("id"), d.get("message")) for k, d in live[:3]] == [
                ("message_update", 2, "⏺ Work"),
                ("message_update", 2, "⏺ Working…"),
                ("message_update", 2, "⏺ Working… done ✅"),
            ]
            assert new_id == 2
            assert live[3] == ("status_change", {"status": "stable", "agent_type": "claude"})
            assert live[4][0] == "agent_error"
            assert {k: live[4][1][k] for k in ("message", "level")} == {"message": "boom", "level": "warning"}
            parse_rfc3339_strict(live[4][1]["time"])
        messages = (await client.get(a.url + "/messages")).json()["messages"]
        assert messages[-1]["content"] == "⏺ Working… done ✅"


async def test_agentapi_without_events_answers_404() -> None:
    api = FakeAgentAPI(events=False)
    async with api.serve() as a, httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(a.url + "/events")).status_code == 404
        assert (await client.get(a.url + "/messages")).status_code == 200
        assert a.requests["/events"] == 1


async def test_agentapi_slow_subscriber_is_dropped_at_max_queue() -> None:
    api = FakeAgentAPI(max_queue=16)
    api.add_message("agent", "start")
    big = "─" * 30_000  # 90 000 bytes per event: the socket buffers fill quickly
    async with api.serve() as a, httpx.AsyncClient(timeout=30) as client:
        async with aconnect_sse(client, "GET", a.url + "/events") as source:
            events = source.aiter_sse()
            with anyio.fail_after(30):
                for _ in range(2):  # replay: message + status
                    await events.__anext__()
            await a.wait_for_subscribers(1)
            # Stop reading while the agent keeps rewriting its message.
            sent = 0
            with anyio.fail_after(30):
                while a.dropped_subscribers == 0:
                    sent += 1
                    api.update_last(f"{sent} {big}")
                    await anyio.lowlevel.checkpoint()
            assert a.subscribers == 0
            # The client resumes: it gets what was queued, then the stream just ends.
            received = 0
            with anyio.fail_after(30):
                async for sse in events:
                    assert sse.event == "message_update"
                    received += 1
            assert 0 < received < sent
        # Reconnecting replays the full, current state.
        async with aconnect_sse(client, "GET", a.url + "/events") as source:
            with anyio.fail_after(30):
                first = await source.aiter_sse().__anext__()
            assert json.loads(first.data)["message"].startswith(f"{sent} ")


async def test_agentapi_burst_beyond_max_queue_drops_even_a_reader() -> None:
    api = FakeAgentAPI(max_queue=4)
    async with api.serve() as a, httpx.AsyncClient(timeout=30) as client:
        async with aconnect_sse(client, "GET", a.url + "/events") as source:
            events = source.aiter_sse()
            with anyio.fail_after(30):
                await events.__anext__()  # the PTY placeholder, message 0
                await events.__anext__()  # status_change
            await a.wait_for_subscribers(1)
            for i in range(10):  # synchronous burst, no chance to drain; the first fills the placeholder (id 0)
                api.add_message("agent", f"m{i}")
            with anyio.fail_after(30):
                got = [json.loads(s.data)["id"] async for s in events]
            # The queued 4 (and the one a writer already waiting took straight away), then the end.
            assert got in ([0, 1, 2, 3], [0, 1, 2, 3, 4])
            assert a.dropped_subscribers == 1


async def test_agentapi_drop_inject_and_cut_streams() -> None:
    api = FakeAgentAPI()
    api.add_message("agent", "hello")
    async with api.serve() as a, httpx.AsyncClient(timeout=30) as client:
        # drop_subscribers: the stream ends cleanly
        async with aconnect_sse(client, "GET", a.url + "/events") as source:
            await a.wait_for_subscribers(1)
            api.drop_subscribers()
            with anyio.fail_after(30):
                kinds = [s.event async for s in source.aiter_sse()]
            assert kinds == ["message_update", "status_change"]
        assert a.subscribers == 0 and a.dropped_subscribers == 0
        # inject_raw: malformed event reaches the client as is
        async with aconnect_sse(client, "GET", a.url + "/events") as source:
            events = source.aiter_sse()
            with anyio.fail_after(30):
                await events.__anext__()
                await events.__anext__()
            api.inject_raw(b"event: message_update\ndata: {not json\n\n")
            with anyio.fail_after(30):
                bad = await events.__anext__()
            assert (bad.event, bad.data) == ("message_update", "{not json")
            # cut_streams_mid_event: half an event, then the connection closes
            api.cut_streams_mid_event()
            with pytest.raises(httpx.RemoteProtocolError):
                with anyio.fail_after(30):
                    async for _ in events:
                        pass
        assert a.subscribers == 0
        # A client that goes away is noticed even while nothing is sent.
        async with aconnect_sse(client, "GET", a.url + "/events"):
            await a.wait_for_subscribers(1)
        await a.wait_for(lambda: a.subscribers == 0)


async def test_agentapi_pty_start_placeholder_and_running() -> None:
    api = FakeAgentAPI()
    assert api.status == "running"
    assert [(m.id, m.role, m.content) for m in api.messages] == [(0, "agent", "")]
    async with api.serve() as a, httpx.AsyncClient(timeout=5) as client:
        assert [(m["id"], m["content"]) for m in (await client.get(a.url + "/messages")).json()["messages"]] == [(0, "")]
        assert (await client.get(a.url + "/status")).json()["status"] == "running"
    assert api.add_message("agent", "╭─ welcome ─╮") == 0  # the first screen fills message 0
    assert api.add_message("user", "hi") == 1
    assert api.add_message("agent", "") == 2  # only the untouched message 0 is filled in place


async def test_agentapi_host_allow_list_like_agentapi() -> None:
    api = FakeAgentAPI()
    async with api.serve() as a, httpx.AsyncClient(timeout=5) as client:
        for host in ("localhost", f"localhost:{a.port}", "127.0.0.1", f"127.0.0.1:{a.port}", "[::1]", f"[::1]:{a.port}"):
            assert (await client.get(a.url + "/status", headers={"host": host})).status_code == 200, host
        for host in ("agentapi", f"agentapi:{a.port}", "example.com", "127.0.0.2"):
            r = await client.get(a.url + "/events", headers={"host": host})
            assert (r.status_code, r.text) == (400, "Invalid host header\n"), host
            assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert a.host_refused == 4 and a.subscribers_total == 0
        api.allowed_hosts = ("agentapi",)
        assert (await client.get(a.url + "/status", headers={"host": "agentapi:3284"})).status_code == 200
        assert (await client.get(a.url + "/status")).status_code == 400  # 127.0.0.1 no longer listed
        api.allowed_hosts = ("*",)
        assert (await client.get(a.url + "/status", headers={"host": "anything"})).status_code == 200


async def _events_until(events, n: int) -> list[tuple[str, dict]]:
    """The next ``n`` events of the ``aiter_sse()`` iterator ``events``, data decoded."""
    out = []
    with anyio.fail_after(5):
        while len(out) < n:
            sse = await events.__anext__()
            out.append((sse.event, json.loads(sse.data)))
    return out


async def test_agentapi_errors_are_kept_and_replayed_after_the_status() -> None:
    api = FakeAgentAPI()
    for i in range(105):
        api.agent_error(f"error {i}")
    assert len(api.errors) == 100 and api.errors[0]["message"] == "error 5"  # the newest 100
    async with api.serve() as a, httpx.AsyncClient(timeout=5) as client:
        for _ in range(2):  # on every connect
            async with aconnect_sse(client, "GET", a.url + "/events") as source:
                got = await _events_until(source.aiter_sse(), 102)
            assert [k for k, _ in got[:2]] == ["message_update", "status_change"]
            assert [d["message"] for _, d in got[2:]] == [f"error {i}" for i in range(5, 105)]


async def test_agentapi_late_state_load_resends_the_saved_messages() -> None:
    api = FakeAgentAPI()
    saved = [FakeMessage(id=i, role="agent" if i % 2 == 0 else "user", content=f"saved {i}", time=T0) for i in range(3)]
    async with api.serve() as a, httpx.AsyncClient(timeout=5) as client:
        async with aconnect_sse(client, "GET", a.url + "/events") as source:
            events = source.aiter_sse()
            first = await _events_until(events, 2)
            assert first[0] == ("message_update", {"id": 0, "role": "agent", "message": "", "time": api.messages[0].time})
            api.restore_state(saved)
            later = await _events_until(events, 3)
        assert [(d["id"], d["message"], d["time"]) for _, d in later] == [(i, f"saved {i}", T0) for i in range(3)]
        msgs = (await client.get(a.url + "/messages")).json()["messages"]
        assert [(m["id"], m["content"]) for m in msgs] == [(i, f"saved {i}") for i in range(3)]
    assert api.add_message("user", "new") == 3


async def test_agentapi_acp_starts_empty_and_a_failed_prompt_leaves_a_gap() -> None:
    api = FakeAgentAPI(transport="acp")
    assert api.messages == [] and api.status == "stable"
    async with api.serve() as a, httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(a.url + "/status")).json()["transport"] == "acp"
        async with aconnect_sse(client, "GET", a.url + "/events") as source:
            events = source.aiter_sse()
            assert (await _events_until(events, 1))[0][0] == "status_change"  # no messages to replay
            api.send_prompt("first")  # 0 user, 1 agent placeholder
            api.update_last("answer")
            api.set_status("stable")
            api.send_prompt("second")  # 2 user, 3 agent placeholder
            api.fail_prompt()  # 3 removed, no event
            api.send_prompt("third")  # 4 user, 5 agent
            got = await _events_until(events, 12)
        assert [d.get("id") for k, d in got if k == "message_update"] == [0, 1, 1, 2, 3, 4, 5]
        ids = [m["id"] for m in (await client.get(a.url + "/messages")).json()["messages"]]
        assert ids == [0, 1, 2, 4, 5]


async def test_agentapi_stop_refuses_waits_then_ends_streams_abruptly() -> None:
    api = FakeAgentAPI(shutdown_wait=0.3)
    api.add_message("agent", "hello")
    async with httpx.AsyncClient(timeout=5) as client:
        async with api.serve() as a:
            url = a.url
            async with aconnect_sse(client, "GET", url + "/events") as source:
                events = source.aiter_sse()
                with anyio.fail_after(5):
                    await events.__anext__()
                    await events.__anext__()
                t0 = time.monotonic()
                await api.stop()
                assert 0.25 <= time.monotonic() - t0 < 3, "waited shutdown_wait for the open stream"
                with pytest.raises(httpx.ConnectError):
                    await client.get(url + "/status")  # the listener is closed
                with pytest.raises(httpx.RemoteProtocolError), anyio.fail_after(5):  # no terminating chunk
                    async for _ in events:
                        pass


async def test_agentapi_drops_a_subscriber_whose_write_blocks() -> None:
    api = FakeAgentAPI(write_timeout=0.5, max_queue=100_000)
    api.add_message("agent", "start")
    big = "─" * 200_000
    async with api.serve() as a:
        async with await anyio.connect_tcp("127.0.0.1", a.port) as sock:
            await sock.send(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await a.wait_for_subscribers(1)
            with anyio.fail_after(20):  # never read: the socket buffers fill and a write blocks
                while a.dropped_subscribers == 0:
                    api.update_last(big)
                    await anyio.sleep(0.05)
            assert a.subscribers == 0


async def test_agentapi_restart_on_the_same_port() -> None:
    api = FakeAgentAPI()
    api.add_message("agent", "before restart")
    async with api.serve() as a:
        port = a.port
    async with httpx.AsyncClient(timeout=2) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/messages")
        async with api.serve(port=port) as a:
            r = await client.get(f"http://127.0.0.1:{port}/messages")
            assert r.json()["messages"][0]["content"] == "before restart"
            assert a.url == f"http://127.0.0.1:{port}"


def test_conversations_are_realistic() -> None:
    session = conversations.demo_session()
    assert len(session) == 12
    assert [r for r, _ in session] == ["agent", "user"] * 6
    text = "".join(c for _, c in session)
    for ch in "╭─╮│╰╯⏺✻":
        assert ch in text
    steps = list(conversations.typing_steps())
    assert len(steps) > 5
    assert all(steps[i + 1].startswith(steps[i]) for i in range(len(steps) - 1))
    assert conversations.utf8_len(steps[-1]) > 65_536 > len(steps[-1])  # bytes, not characters
    assert conversations.utf8_len(conversations.final_reply(1_100_000)) > 1_100_000


# ---------------------------------------------------------------------------------------------
# process modes (real processes; run once, not per backend)


def _start(args: list[str], ready_prefix: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)  # never block without a timeout
    line = proc.stdout.readline() if ready else ""
    if not line.startswith(ready_prefix):
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise AssertionError(f"no ready line, got {line!r}; stderr: {err}")
    return proc, line.strip().split(" on ", 1)[1]


def _wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_fake_agentapi_process_signals_and_restart(tmp_path: Path) -> None:
    state, siglog, pidfile = tmp_path / "state.json", tmp_path / "signals.log", tmp_path / "pid"
    args = ["agentd.testing.fake_agentapi", "--port", "0", "--messages", "3", "--state-file", str(state),
            "--signal-log", str(siglog), "--pid-file", str(pidfile)]
    proc, url = _start(args, "agentapi listening on http://127.0.0.1:")
    try:
        assert int(pidfile.read_text()) == proc.pid
        msgs = httpx.get(url + "/messages", timeout=5).json()["messages"]
        assert [m["id"] for m in msgs] == [0, 1, 2]
        t0 = time.time()
        proc.send_signal(signal.SIGUSR1)
        _wait_until(lambda: state.exists() and siglog.exists() and "SIGUSR1" in siglog.read_text())
        name, stamp = siglog.read_text().split()
        assert name == "SIGUSR1" and t0 - 1 <= float(stamp) <= time.time()
        saved = json.loads(state.read_text())
        reference = {"version", "messages", "initial_prompt", "initial_prompt_sent"}
        assert set(saved) == reference and saved["version"] == 1
        assert [(m["id"], m["message"], m["role"], m["time"]) for m in saved["messages"]] == [
            (m["id"], m["content"], m["role"], m["time"]) for m in msgs
        ]
        assert httpx.get(url + "/status", timeout=5).status_code == 200  # still running
    finally:
        code = _stop(proc)
    assert code == 0
    assert [line.split()[0] for line in siglog.read_text().splitlines()] == ["SIGUSR1", "SIGTERM"]
    # Restart with the saved state (no --messages): the same conversation comes back.
    proc, url2 = _start(["agentd.testing.fake_agentapi", "--port", "0", "--state-file", str(state),
                         "--state-load-delay", "1.5"], "agentapi listening on http://127.0.0.1:")
    try:
        # agentapi loads its state late: first only the empty placeholder, then the saved messages.
        first_view = httpx.get(url2 + "/messages", timeout=5).json()["messages"]
        assert [(m["id"], m["role"], m["content"]) for m in first_view] == [(0, "agent", "")]
        _wait_until(lambda: httpx.get(url2 + "/messages", timeout=5).json()["messages"] == msgs, timeout=15)
    finally:
        assert _stop(proc) == 0


@pytest.mark.slow
def test_fake_coderd_process_stores_to_file(tmp_path: Path) -> None:
    token_file, store = tmp_path / "token", tmp_path / "store.json"
    token_file.write_text(TOKEN + "\n")
    log = tmp_path / "requests.jsonl"
    proc, url = _start(
        ["agentd.testing.fake_coderd", "--port", "0", "--token-file", str(token_file), "--task", TASK,
         "--script", "503:1", "--store-file", str(store), "--request-log", str(log)],
        "coderd listening on http://127.0.0.1:",
    )
    try:
        target = f"{url}/api/v2/workspaceagents/me/tasks/{TASK}/log-snapshot?format=agentapi"
        headers = {"Coder-Session-Token": TOKEN}
        r1 = httpx.post(target, content=payload([msg(0, "╭─╮")]), headers=headers, timeout=5)
        assert (r1.status_code, r1.headers["retry-after"]) == (503, "1")
        r2 = httpx.post(target, content=payload([msg(0, "╭─╮")]), headers=headers, timeout=5)
        assert r2.status_code == 204
        data = json.loads(store.read_text())
        assert data[TASK]["messages"] == [msg(0, "╭─╮")]
        assert data[TASK]["upserts"] == 1
        _wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 2)
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        assert [x["status"] for x in lines] == [503, 204]
        assert TOKEN not in log.read_text()
    finally:
        assert _stop(proc) == 0
