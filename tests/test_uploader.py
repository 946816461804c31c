"""The uploader (agentd.coderd.CoderdUploader) against the strict stand-in coderd on loopback,
on asyncio and trio: what counts as stored, which answers are retried, and the sentence the
final log line carries for each of coderd's refusals (agentd.coderd.explain)."""

from __future__ import annotations

import uuid

import anyio
import httpx
import pytest

from agentd.coderd import CoderdUploader, UploadOutcome, explain
from agentd.messages import Message
from agentd.snapshot import build_snapshot
from agentd.testing import FakeCoderd

pytestmark = pytest.mark.anyio

TOKEN = "uploader-token-" + uuid.uuid4().hex
TASK = str(uuid.uuid4())
T0 = "2026-01-01T00:00:00Z"
MESSAGES = [Message(0, "user", "Fix the flaky test ╭─╮", T0), Message(1, "agent", "⏺ Done ✅", T0)]


async def upload(coderd: FakeCoderd, seconds: float = 30.0, task: str = TASK,
                 messages: list[Message] = MESSAGES) -> UploadOutcome:
    snapshot = build_snapshot(messages)
    assert snapshot is not None
    async with httpx.AsyncClient(trust_env=False) as client:
        uploader = CoderdUploader(client, coderd.url, TOKEN, uuid.UUID(task))
        return await uploader.upload(snapshot, anyio.current_time() + seconds)


async def test_204_is_stored_and_read_back_once_the_task_is_paused() -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve() as c:
        outcome = await upload(c)
        assert outcome.stored and outcome.status == 204 and outcome.attempts == 1
        assert c.stored[TASK].log_snapshot["format"] == "agentapi"
        assert [m["content"] for m in c.stored[TASK].messages] == [m.content for m in MESSAGES]
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{c.url}/api/v2/tasks/me/{TASK}/logs"
            assert (await client.get(url)).status_code == 409  # active: coderd reads agentapi live
            c.complete_stop_build()
            logs = (await client.get(url)).json()["logs"]
        assert [entry["type"] for entry in logs] == ["input", "output"]


async def test_after_the_stop_build_the_token_is_refused_once_naming_why() -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve() as c:
        c.complete_stop_build()
        outcome = await upload(c)
    assert not outcome.stored and outcome.status == 401 and outcome.attempts == 1
    assert "stop build" in outcome.reason and "CODER_AGENT_TOKEN" in outcome.reason
    assert "Workspace agent not authorized." in outcome.reason


async def test_a_deleted_task_is_refused_once() -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve() as c:
        c.delete_task(TASK)
        outcome = await upload(c)
    assert (outcome.stored, outcome.status, outcome.attempts) == (False, 401, 1)
    assert "deleted" in outcome.reason


async def test_the_two_404s_are_told_apart() -> None:
    no_route = FakeCoderd(token=TOKEN, tasks={TASK}, feature=False)
    async with no_route.serve() as c:
        off = await upload(c)
    wrong_task = FakeCoderd(token=TOKEN, tasks={TASK})
    async with wrong_task.serve() as c:
        other = await upload(c, task=str(uuid.uuid4()))
    assert (off.status, off.attempts, other.status, other.attempts) == (404, 1, 404, 1)
    assert "no log-snapshot endpoint" in off.reason and "CODER_ENABLE_AI_TASKS=true" in off.reason
    assert "Route not found." in off.reason
    assert "task id is wrong" in other.reason and "AGENTD_TASK_ID" in other.reason
    assert "Resource not found." in other.reason
    assert "CODER_ENABLE_AI_TASKS" not in other.reason


async def test_a_store_failure_is_retried_to_the_deadline() -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, fail_store=True)
    async with coderd.serve() as c:
        outcome = await upload(c, seconds=3.0)
    assert not outcome.stored and outcome.status == 500 and outcome.attempts >= 2
    assert "Internal error fetching task." in outcome.reason and "deadline" in outcome.reason


async def test_a_nul_character_is_refused_by_the_jsonb_upsert() -> None:
    """The stand-in answers as PostgreSQL's jsonb makes coderd answer: 500 on U+0000."""
    coderd = FakeCoderd(token=TOKEN, tasks={TASK})
    async with coderd.serve() as c:
        outcome = await upload(c, seconds=3.0, messages=[Message(0, "agent", "a\x00b", T0)])
    assert not outcome.stored and outcome.status == 500
    assert TASK not in c.stored
    assert all(r.message == "Internal error storing snapshot." for r in c.answered())


@pytest.mark.parametrize(
    ("answer", "stored"),
    [
        ((200, {"content-type": "text/html"}, b"<html>proxy login</html>"), False),
        ((200, {}, b""), False),
        ((201, {"content-type": "application/json"}, {"ok": True}), False),
    ],
)
async def test_only_204_counts_as_stored(answer: tuple[int, dict[str, str], object], stored: bool) -> None:
    coderd = FakeCoderd(token=TOKEN, tasks={TASK}, script=[answer] * 1000)
    async with coderd.serve() as c:
        outcome = await upload(c, seconds=3.0)
    assert outcome.stored is stored
    assert outcome.status == answer[0] and outcome.attempts >= 2, "retried: coderd never saw it"
    assert "not coderd's answer" in outcome.reason


def test_explain_names_the_fix_for_each_answer() -> None:
    cases = {
        (401, "Workspace agent not authorized."): "CODER_AGENT_TOKEN",
        (404, "Route not found."): "CODER_ENABLE_AI_TASKS=true",
        (404, "Resource not found."): "AGENTD_TASK_ID",
        (404, None): "CODER_AGENT_URL",
        (400, "Invalid task ID format."): "AGENTD_TASK_ID",
        (400, "Failed to decode request payload."): "agentd bug",
        (403, None): "AGENTD_TASK_ID",
        (200, None): "CODER_AGENT_URL",
        (None, None): "CODER_AGENT_URL",
        (500, "Internal error fetching task."): "database",
        (429, None): "rate limit",
        (418, None): "CODER_AGENT_URL",
    }
    for (status, message), fix in cases.items():
        sentence = explain(status, message)
        assert fix in sentence, (status, message, sentence)
        assert "\n" not in sentence
    assert explain(404, "Route not found.") != explain(404, "Resource not found.")
