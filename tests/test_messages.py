"""What coderd can read back: validation of agentapi messages."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentd.messages import (
    REPLACEMENT,
    InvalidMessage,
    clean_text,
    is_rfc3339,
    may_hold_surrogates,
    parse_message,
    parse_messages,
)

GOOD = {"id": 3, "role": "agent", "content": "hi", "time": "2026-01-01T00:00:00.123456789Z"}


def test_a_good_message_passes_through_exactly():
    message = parse_message(GOOD)
    assert (message.id, message.role, message.content, message.time) == (3, "agent", "hi", GOOD["time"])


def test_message_update_uses_the_message_key():
    data = {"id": 1, "role": "user", "message": "typed", "time": "2026-01-01T00:00:00Z"}
    assert parse_message(data, content_key="message").content == "typed"


@pytest.mark.parametrize(
    "change",
    [
        {"role": "system"},
        {"role": None},
        {"id": "3"},
        {"id": 3.0},
        {"id": True},
        {"id": 2**63},
        {"time": None},
        {"time": "yesterday"},
        {"time": "2026-13-01T00:00:00Z"},
        {"time": "2026-01-01 00:00:00Z"},
        {"content": 5},
    ],
)
def test_messages_coderd_could_not_read_back_are_refused(change):
    with pytest.raises(InvalidMessage):
        parse_message({**GOOD, **change})


def test_missing_time_is_refused():
    with pytest.raises(InvalidMessage):
        parse_message({k: v for k, v in GOOD.items() if k != "time"})


def test_lone_surrogates_become_replacement_characters():
    raw = json.loads('{"id":0,"role":"agent","content":"a\\ud800b\\ud83c\\udf89","time":"2026-01-01T00:00:00Z"}')
    message = parse_message(raw)
    assert message.content == "a\ufffdb🎉"
    message.content.encode("utf-8")


def test_parse_messages_keeps_the_good_and_names_the_bad():
    messages, problems = parse_messages({"messages": [GOOD, {**GOOD, "id": 4, "role": "tool"}]})
    assert [m.id for m in messages] == [3] and "role" in problems[0]


@pytest.mark.parametrize(
    "value,ok",
    [
        ("2026-01-01T00:00:00Z", True),
        ("2026-01-01T00:00:00.5+02:00", True),
        ("2026-02-30T00:00:00Z", False),
        ("2026-01-01T24:00:00Z", False),
        ("2026-01-01t00:00:00z", False),
        ("2026-01-01T00:00:00+25:00", False),
    ],
)
def test_rfc3339(value, ok):
    assert is_rfc3339(value) is ok


@given(st.text(alphabet=st.characters(categories=["Cs", "Cc", "Ll", "So", "Po"])), st.booleans())
def test_surrogate_prescan_never_misses_one(text, ascii_only):
    """The SSE hot path skips clean_text when the raw JSON has no surrogate or NUL escape: sound
    for any text (Cc includes U+0000)."""
    # What the tail sees: bytes off the wire, decoded as UTF-8 with replacement (as httpx does).
    wire = json.dumps({"message": text}, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    raw = wire.decode("utf-8", "replace")
    decoded = json.loads(raw)["message"]
    if not may_hold_surrogates(raw):
        assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in decoded)
        assert "\x00" not in decoded


@given(st.text(alphabet=st.characters(categories=["Cs", "Cc", "Lu", "So", "Zs"])))
def test_clean_text_leaves_nothing_coderd_cannot_store(text):
    cleaned = clean_text(text)
    cleaned.encode("utf-8")  # strict: no lone surrogate left
    assert "\x00" not in cleaned, "PostgreSQL jsonb rejects U+0000"
    if "\x00" not in text and not any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        assert cleaned is text, "clean text passes through untouched"
    assert len(cleaned) <= len(text)


@given(st.text(alphabet=st.sampled_from(["\x00", "a", "─", "\ud800", "\udf89", "\ud83c"]), max_size=40), st.booleans())
def test_nul_and_surrogates_from_the_wire_become_replacement_characters(text, ascii_only):
    """Through the tail's path (raw JSON, prescan, parse): what reaches the buffer is storable."""
    raw = json.dumps({"id": 0, "role": "agent", "message": text, "time": "2026-01-01T00:00:00Z"}, ensure_ascii=ascii_only)
    raw = raw.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    message = parse_message(json.loads(raw), content_key="message", clean=may_hold_surrogates(raw))
    message.content.encode("utf-8")
    assert "\x00" not in message.content
    assert message.content.count(REPLACEMENT) >= text.count("\x00")


def test_nul_becomes_a_replacement_character():
    raw = json.loads('{"id":0,"role":"agent","content":"a\\u0000b","time":"2026-01-01T00:00:00Z"}')
    assert parse_message(raw).content == "a\ufffdb"
    assert may_hold_surrogates('{"content":"a\\u0000b"}')
