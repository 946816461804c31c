"""The ring buffer: upserts by id, the window, bounded memory, and agentapi restarts."""

from __future__ import annotations

from agentd.buffer import RingBuffer
from agentd.messages import Message

T = "2026-01-01T00:00:00Z"


def m(i, text="x", role="agent"):
    """Message ``i``; agentapi stamps each message with its own time (nanoseconds)."""
    return Message(i, role, text, f"2026-01-01T00:00:00.{i:09d}Z")


def test_rewrites_in_place_replace_the_message():
    buffer = RingBuffer(10)
    buffer.apply(m(0, "hello", "user"))
    for n in range(1, 50):
        buffer.apply(m(1, "typing" * n))
    assert [x.id for x in buffer.messages()] == [0, 1]
    assert buffer.messages()[-1].content == "typing" * 49


def test_keeps_the_last_n_by_id_and_ignores_older():
    buffer = RingBuffer(10)
    for i in range(15):
        buffer.apply(m(i))
    assert [x.id for x in buffer.messages()] == list(range(5, 15))
    assert buffer.apply(m(2, "late")) is False
    assert [x.id for x in buffer.messages()] == list(range(5, 15))


def test_memory_is_bounded_however_large_a_message_grows():
    buffer = RingBuffer(10, max_chars=1_000)
    buffer.apply(m(0, "a" * 5_000 + "TAIL"))
    held = buffer.messages()[0]
    assert len(held.content) == 1_000 and held.content.endswith("TAIL") and held.elided == 4_004


def test_unchanged_update_is_not_a_change():
    buffer = RingBuffer(10)
    assert buffer.apply(m(0, "same")) is True
    version = buffer.version
    assert buffer.apply(m(0, "same")) is False
    assert buffer.version == version


def test_replay_of_the_same_conversation_does_not_duplicate():
    buffer = RingBuffer(10)
    view = [m(i, f"text {i}") for i in range(4)]
    buffer.sync(view)
    buffer.sync(view)  # a reconnect replays everything again
    assert [x.id for x in buffer.messages()] == [0, 1, 2, 3]
    assert buffer.resets == 0


def test_agentapi_restarted_without_state_is_appended_not_replacing():
    buffer = RingBuffer(10)
    buffer.sync([m(i, f"old {i}") for i in range(5)])
    buffer.sync([])  # agentapi came back empty
    buffer.sync([m(0, "new 0", "user"), m(1, "new 1")])
    held = buffer.messages()
    assert [x.id for x in held] == [0, 1, 2, 3, 4, 5, 6]
    assert [x.content for x in held[-2:]] == ["new 0", "new 1"]
    assert buffer.resets == 1
    buffer.apply(m(1, "new 1, rewritten"))  # live updates use agentapi's numbering
    assert buffer.messages()[-1].content == "new 1, rewritten" and len(buffer) == 7


def test_shorter_view_without_an_empty_one_is_a_restart_too():
    buffer = RingBuffer(10)
    buffer.sync([m(i) for i in range(6)])
    buffer.sync([m(0, "fresh", "user")])
    assert [x.content for x in buffer.messages()][-1] == "fresh"
    assert buffer.newest_id == 6
