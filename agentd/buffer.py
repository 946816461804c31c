"""The ring buffer: the last N messages of the conversation, bounded in count and in memory.

Pure: no I/O, no clocks. The agentapi tail feeds it two kinds of input:

* :meth:`RingBuffer.apply` - one ``message_update``: an upsert by id. agentapi rewrites the last
  message in place many times a second, each update carrying the full new content.
* :meth:`RingBuffer.sync` - a full view of the conversation (the replay after an SSE connect, a
  ``GET /messages`` poll, the final refresh at shutdown).

Memory stays bounded however large a message grows: the body limit is ``max_bytes`` and every
character costs at least one byte in the body, so no message ever needs more than its last
``max_bytes`` characters. The rest is dropped on entry and counted in ``Message.elided``.

When agentapi restarts without its saved state its ids start over at 0. A full view whose newest
id is below the newest id already seen is such a restart: the new conversation is appended after
the one held (ids shifted past it), so the held messages are never replaced by an emptier view
and ids keep ascending.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from agentd.messages import Message


class RingBuffer:
    """The last ``max_messages`` messages by id, each at most ``max_chars`` characters long.

    ``version`` increases on every change (for persistence and checkpoints to notice).
    """

    def __init__(self, max_messages: int = 10, max_chars: int = 65_536) -> None:
        if max_messages < 1 or max_chars < 1:
            raise ValueError("max_messages and max_chars must be at least 1")
        self.max_messages = max_messages
        self.max_chars = max_chars
        self._by_id: dict[int, Message] = {}
        self._offset = 0  # added to agentapi's ids after a restart without state
        self._source_newest: int | None = None  # newest id seen from agentapi, its numbering
        self.version = 0
        self.resets = 0

    # -- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_id)

    def messages(self) -> list[Message]:
        """The held messages, ids ascending."""
        return [self._by_id[i] for i in sorted(self._by_id)]

    @property
    def newest_id(self) -> int | None:
        return max(self._by_id) if self._by_id else None

    # -- writing -------------------------------------------------------------------------

    def apply(self, message: Message) -> bool:
        """Upsert one message in agentapi's numbering; return True if the buffer changed.

        A message older than the window (buffer full, id below the oldest held) is ignored.
        """
        if self._source_newest is None or message.id > self._source_newest:
            self._source_newest = message.id
        return self._put(message)

    def sync(self, view: Iterable[Message]) -> bool:
        """Merge a full view of the conversation (ids ascending); return True if anything changed.

        An empty view, or one whose newest id is below the newest seen, means agentapi lost its
        state: the held messages stay and the new conversation is numbered after them.
        """
        view = list(view)
        view_newest = view[-1].id if view else None
        if self._source_newest is not None and (view_newest is None or view_newest < self._source_newest):
            self._restart_numbering()
        changed = False
        for message in view[-self.max_messages :]:
            changed |= self.apply(message)
        return changed

    @property
    def offset(self) -> int:
        """What is added to agentapi's ids (non-zero after agentapi restarted without its state)."""
        return self._offset

    def restore(self, messages: Iterable[Message], offset: int = 0) -> None:
        """Load messages already in the buffer's own numbering (from the persisted state).

        ``offset`` is the :attr:`offset` they were saved with: agentapi's own ids are the held
        ones minus it, so its next full view of the same conversation merges by id; a shorter
        one (agentapi restarted again without its state) is appended after.
        """
        self._offset = 0
        for message in messages:
            self._put(message)
        newest = self.newest_id
        self._offset = max(0, offset)
        self._source_newest = newest - self._offset if newest is not None and newest >= self._offset else None

    def _restart_numbering(self) -> None:
        newest = self.newest_id
        self._offset = 0 if newest is None else newest + 1
        self._source_newest = None
        self.resets += 1

    def clip(self, message: Message) -> Message:
        """``message`` with at most its last ``max_chars`` characters (the rest counted in ``elided``)."""
        if len(message.content) <= self.max_chars:
            return message
        cut = len(message.content) - self.max_chars
        return replace(message, content=message.content[cut:], elided=message.elided + cut)

    def _put(self, message: Message) -> bool:
        if self._offset:
            message = replace(message, id=message.id + self._offset)
        message = self.clip(message)
        held = self._by_id.get(message.id)
        if held == message:
            return False
        if held is None and len(self._by_id) >= self.max_messages:
            oldest = min(self._by_id)
            if message.id < oldest:
                return False
            del self._by_id[oldest]
        self._by_id[message.id] = message
        self.version += 1
        return True
