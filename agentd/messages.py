"""The conversation message, and the rules for what coderd can read back.

Pure: no I/O. Every message that enters agentd goes through :func:`parse_message`, so the
ring buffer only ever holds messages coderd can store *and* serve again (CONTRACT.md §1:
the upload path does not check roles, but read-back fails with 500 on any role other than
``user``/``agent``, and Go's JSON decoder wants ``id`` as an int64 and ``time`` as RFC 3339).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: Roles coderd's read-back accepts (CONTRACT.md §1); anything else poisons the stored snapshot.
ROLES = frozenset({"user", "agent"})

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# RFC 3339 as Go's time.Time.UnmarshalJSON accepts it: upper-case T and Z, optional fraction
# (agentapi sends at most 9 fractional digits).
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(Z|[+-](\d{2}):(\d{2}))",
    re.ASCII,
)


class InvalidMessage(ValueError):
    """A message coderd could not store or read back; the text says which field and why."""


@dataclass(frozen=True, slots=True)
class Message:
    """One conversation message, as agentapi's ``GET /messages`` returns it.

    ``id`` is the message's index in the conversation (0, 1, 2, ...). ``time`` is the RFC 3339
    string exactly as agentapi sent it (never re-formatted). ``content`` is valid Unicode with no
    lone surrogates and no U+0000. ``elided`` counts leading characters already dropped by the ring buffer
    (which never needs more of a message than fits in the body limit); the snapshot builder puts
    a visible marker where they were.
    """

    id: int
    role: str
    content: str
    time: str
    elided: int = 0


def is_rfc3339(value: str) -> bool:
    """True if ``value`` is an RFC 3339 timestamp Go's ``time.Time`` decoder accepts."""
    m = _RFC3339.fullmatch(value)
    if m is None:
        return False
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if m.group(9) is not None and (int(m.group(9)) > 23 or int(m.group(10)) > 59):
        return False
    try:
        datetime(year, month, day, hour, minute, second)
    except ValueError:
        return False
    return True


#: What U+0000 becomes: coderd stores the snapshot in a PostgreSQL ``jsonb`` column, which
#: rejects U+0000 (the upsert fails with 500, CONTRACT.md §1 Storage). Lone surrogates become it too.
REPLACEMENT = "\ufffd"


def clean_text(text: str) -> str:
    """Return ``text`` as Unicode coderd can store: valid UTF-8, and no U+0000.

    JSON may carry lone UTF-16 surrogates (``"\\ud800"``), which cannot be sent as UTF-8:
    surrogate pairs are joined into their code point, lone ones become U+FFFD. U+0000 (a
    ``"\\u0000"`` escape) becomes U+FFFD too, since PostgreSQL's ``jsonb`` rejects it.
    """
    if "\x00" in text:
        text = text.replace("\x00", REPLACEMENT)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# A JSON text can only decode to a lone surrogate through a \uD800-\uDFFF escape, and to U+0000
# only through a \u0000 escape (JSON forbids raw control characters inside strings).
_NEEDS_CLEANING = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")


def may_hold_surrogates(json_text: str) -> bool:
    """False when decoding ``json_text`` (valid Unicode) cannot yield a surrogate or U+0000:
    then :func:`clean_text` has nothing to do (a scan of the raw text is ~200 x cheaper).

    Sound for text that :func:`json.loads` accepts in its default strict mode, which refuses
    raw control characters (U+0000 included) inside strings.
    """
    return _NEEDS_CLEANING.search(json_text) is not None


def parse_message(obj: Any, *, content_key: str = "content", clean: bool = True) -> Message:
    """Validate one agentapi message object and return it as a :class:`Message`.

    ``obj`` is a decoded JSON object: an item of ``GET /messages`` (``content_key="content"``)
    or the data of an SSE ``message_update`` event (``content_key="message"``).

    Raises :class:`InvalidMessage` when coderd could not read it back: ``id`` not an integer in
    int64 range, ``role`` not ``user``/``agent``, content not a string, ``time`` missing or not
    RFC 3339. ``clean=False`` skips :func:`clean_text` when the caller knows, from
    :func:`may_hold_surrogates`, that there is nothing to clean.
    """
    if not isinstance(obj, dict):
        raise InvalidMessage(f"message is {type(obj).__name__}, not an object")
    mid = obj.get("id")
    if not isinstance(mid, int) or isinstance(mid, bool) or not _INT64_MIN <= mid <= _INT64_MAX:
        raise InvalidMessage(f"id {mid!r:.40} is not an int64")
    role = obj.get("role")
    if role not in ROLES:
        raise InvalidMessage(f"message {mid}: role {role!r:.40} is not 'user' or 'agent'")
    content = obj.get(content_key)
    if not isinstance(content, str):
        raise InvalidMessage(f"message {mid}: {content_key} is {type(content).__name__}, not a string")
    time = obj.get("time")
    if not isinstance(time, str) or not is_rfc3339(time):
        raise InvalidMessage(f"message {mid}: time {time!r:.60} is not RFC 3339")
    return Message(id=mid, role=role, content=clean_text(content) if clean else content, time=time)


def parse_messages(obj: Any) -> tuple[list[Message], list[str]]:
    """Parse a ``GET /messages`` body (``{"messages": [...]}``).

    Returns ``(messages, problems)``: the valid messages in the order given, and one line per
    message that was kept out. Raises :class:`InvalidMessage` if the body has no ``messages`` list.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise InvalidMessage("body has no 'messages' list")
    messages: list[Message] = []
    problems: list[str] = []
    for item in obj["messages"]:
        try:
            messages.append(parse_message(item))
        except InvalidMessage as exc:
            problems.append(str(exc))
    return messages, problems
