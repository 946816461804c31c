"""Building the log-snapshot request body: the trimming policy. Pure: no I/O.

The body is exactly the shape of agentapi's ``GET /messages`` response,
``{"messages":[{"id":..,"content":..,"role":..,"time":..}, ...]}``, encoded as compact UTF-8
JSON (non-ASCII characters are sent as themselves, not as ``\\u2500``-style escapes: a box-drawing
character costs 3 bytes instead of 6).

coderd reads the raw request body through a hard cap of 65 536 bytes (CONTRACT.md §1), so
sizes here are always the encoded bytes actually sent, never characters. The policy:

1. Messages are taken newest first and kept whole while they fit.
2. The first message that does not fit is cut: its **tail** is kept behind a visible marker,
   filling the budget that is left. Older messages are left out, so the snapshot is always one
   contiguous stretch of the conversation, ending at its newest text.
3. The newest message is always present; if it alone is too big, it is the one that is cut.
4. A cut starts at a line boundary when one is within the first 256 characters of the kept
   tail (terminal screens read better that way), and never inside a code point.
5. Empty messages (agentapi's PTY placeholder before the agent's first screen, an ACP reply
   not yet written) are left out: there is nothing in them to read. A conversation with
   nothing else yields no snapshot: uploading it would replace a good stored one.
6. When the newest message is the agent's and must be cut, the question it answers (the
   newest user message before it) is kept too, in front of it: whole if it takes at most
   :func:`question_share` of the budget (1/8), else cut the same way to exactly that share.
   The answer's tail fills the rest, so the 90 % fill is unchanged. Messages between the
   two are left out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from agentd.messages import Message

#: coderd's hard cap on the raw log-snapshot request body, bytes (CONTRACT.md §1).
CODERD_MAX_BODY = 65_536

#: The smallest body limit agentd accepts, bytes: room for one message's envelope and marker.
MIN_MAX_BYTES = 1_024

#: Put in front of a message's kept tail; ``{n}`` is the number of characters cut.
TRUNCATION_MARKER = "[agentd: {n} earlier characters truncated]\n"

_HEAD = b'{"messages":['
_TAIL = b"]}"
_LINE_SNAP = 256  # characters: how far into the kept tail a line boundary is looked for
_MIN_TAIL_BYTES = 64  # a partial older message smaller than this is left out instead


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A ready request body and what it holds.

    ``body`` is the exact bytes to POST (``len(body) <= max_bytes``); ``message_ids`` the ids
    it carries, ascending; ``truncated_id`` the id of the message whose head was cut, if any;
    ``question_id`` the id of the user's message kept beside a cut answer (rule 6), which may
    carry a cut of its own (its content then starts with the marker).
    """

    body: bytes
    message_ids: tuple[int, ...]
    truncated_id: int | None
    question_id: int | None = None

    @property
    def size(self) -> int:
        """Body size in bytes."""
        return len(self.body)

    @property
    def newest_id(self) -> int:
        return self.message_ids[-1]


def _json_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _cost(text: str) -> int:
    """Bytes ``text`` takes inside a JSON string (escapes included, quotes excluded)."""
    return len(_json_str(text).encode("utf-8")) - 2


def encode_message(message: Message, content: str | None = None) -> bytes:
    """One message object as sent, with ``content`` in place of the message's own if given."""
    text = message.content if content is None else content
    return (
        f'{{"id":{message.id},"content":{_json_str(text)},'
        f'"role":{_json_str(message.role)},"time":{_json_str(message.time)}}}'
    ).encode()


def _tail_start(text: str, budget: int) -> int:
    """Smallest index ``i`` such that ``text[i:]`` costs at most ``budget`` bytes.

    Every character costs at least one byte, so ``i >= len(text) - budget``. JSON escaping is
    per character, so costs add up over a split; the search only ever encodes the half it
    moves over, O(len) in all.
    """
    n = len(text)
    lo = max(0, n - budget)  # candidate start; may not fit
    lo_cost = _cost(text[lo:])
    if lo_cost <= budget:
        return lo
    hi, hi_cost = n, 0  # invariant: text[lo:] does not fit, text[hi:] fits and costs hi_cost
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_cost = _cost(text[mid:hi]) + hi_cost
        if mid_cost <= budget:
            hi, hi_cost = mid, mid_cost
        else:
            lo = mid
    return hi


def _cut(message: Message, room: int, min_tail: int) -> bytes | None:
    """The message with its head cut so that it encodes to at most ``room`` bytes.

    Returns None when not even the envelope, the marker and ``min_tail`` bytes of content fit.
    """
    total = message.elided + len(message.content)
    envelope = len(encode_message(message, ""))
    marker_cost = _cost(TRUNCATION_MARKER.format(n=total))  # the longest the marker can be
    budget = room - envelope - marker_cost
    if budget < min_tail:
        return None
    text = message.content
    start = _tail_start(text, budget)
    newline = text.find("\n", start, start + _LINE_SNAP)
    if newline != -1 and newline + 1 < len(text):
        start = newline + 1
    content = TRUNCATION_MARKER.format(n=message.elided + start) + text[start:]
    return encode_message(message, content)


def build_snapshot(messages: Sequence[Message], max_bytes: int = CODERD_MAX_BODY) -> Snapshot | None:
    """Build the request body from ``messages`` (ids ascending, as the ring buffer holds them).

    Empty messages are left out; returns None when nothing else is left (rule 5). The result is at most ``max_bytes`` bytes for any content. Raises ValueError
    if ``max_bytes`` is below :data:`MIN_MAX_BYTES`.
    """
    if max_bytes < MIN_MAX_BYTES:
        raise ValueError(f"max_bytes must be at least {MIN_MAX_BYTES}, got {max_bytes}")
    messages = [m for m in messages if m.content or m.elided]  # rule 5
    if not messages:
        return None
    budget = max_bytes - len(_HEAD) - len(_TAIL)
    kept = _with_question(messages, budget)
    if kept is None:
        kept = _newest_first(messages, budget)
    if kept is None:  # the newest message's envelope alone is over the limit (a huge id or time)
        return None
    parts, ids, truncated_id, question_id = kept
    return Snapshot(
        body=_HEAD + b",".join(parts) + _TAIL,
        message_ids=tuple(ids),
        truncated_id=truncated_id,
        question_id=question_id,
    )


_Kept = tuple[list[bytes], list[int], int | None, int | None]  # parts, ids, truncated_id, question_id


def _newest_first(messages: Sequence[Message], budget: int) -> _Kept | None:
    """Rules 1-3: whole messages newest first, then the tail of the first that does not fit."""
    parts: list[bytes] = []
    ids: list[int] = []
    truncated_id = None
    used = 0
    for message in reversed(messages):
        comma = 1 if parts else 0
        encoded = encode_message(message) if not message.elided else None
        if encoded is not None and used + comma + len(encoded) <= budget:
            parts.append(encoded)
            ids.append(message.id)
            used += comma + len(encoded)
            continue
        cut = _cut(message, budget - used - comma, _MIN_TAIL_BYTES if parts else 0)
        if cut is not None:
            parts.append(cut)
            ids.append(message.id)
            truncated_id = message.id
        break
    if not parts:
        return None
    parts.reverse()
    ids.reverse()
    return parts, ids, truncated_id, None


def question_share(budget: int) -> int:
    """Bytes the question may take beside a cut answer: 1/8 of ``budget``, at least 512 bytes
    (room for a short question's envelope and marker), at most half of it."""
    return min(max(budget // 8, 512), budget // 2)


def _with_question(messages: Sequence[Message], budget: int) -> _Kept | None:
    """Rule 6: when the newest message is the agent's and must be cut, the user's message it
    answers (the newest user message before it) goes first, whole or cut to
    :func:`question_share`; the answer's tail fills the rest. None when this does not apply."""
    answer = messages[-1]
    if answer.role != "agent" or (not answer.elided and len(encode_message(answer)) <= budget):
        return None
    question = next((m for m in reversed(messages[:-1]) if m.role == "user"), None)
    if question is None:
        return None
    whole = encode_message(question) if not question.elided else None
    share = question_share(budget)
    asked = whole if whole is not None and len(whole) <= share else _cut(question, share, 0)
    if asked is None:
        return None
    cut = _cut(answer, budget - len(asked) - 1, 0)
    if cut is None:
        return None
    return [asked, cut], [question.id, answer.id], answer.id, question.id
