"""The ring buffer: the last N messages of the conversation, bounded in count and in memory.

Pure: no I/O, no clocks. The agentapi tail feeds it two kinds of input:

* :meth:`RingBuffer.apply` - one ``message_update``: an upsert by id. agentapi rewrites the last
  message in place many times a second, each update carrying the full new content.
* :meth:`RingBuffer.sync` - a full view of the conversation (the replay after an SSE connect, a
  ``GET /messages`` poll, the final refresh at shutdown).

Memory stays bounded however large a message grows: the body limit is ``max_bytes`` and every
character costs at least one byte in the body, so no message ever needs more than its last
``max_bytes`` characters. The rest is dropped on entry and counted in ``Message.elided``.

The merge rule (README, "The merge rule") recognises the conversation by its content, not by
id arithmetic alone. agentd's ids are agentapi's plus a shift (:attr:`RingBuffer.offset`), which
only these facts change:

1. **Same message.** An incoming message with the same ``role``, the same ``time`` and the same
   or a growing content (or an older copy: a saved state can be older than the screen) as a
   held one *is* that message, whatever ids surround it; the longer copy is kept and the shift
   is re-derived from it (agentapi restarted with ``--state-file``, or agentd restarted). Only
   agentapi's newest agent message is rewritten in place, with a new ``time``: an agent update
   for the newest held message with content replaces it. User messages are never rewritten.
2. **No evidence.** A view with no content and none of the held messages (empty, or only a new
   empty placeholder: agentapi's message 0 until it loads its saved state, CONTRACT.md §2
   "Late state load") changes nothing; it puts the buffer on guard until content arrives.
   Updates older than the held window are then set aside (at most N) until one that is not
   tells which case it is.
3. **New conversation.** Content that contradicts the held messages is agentapi restarted
   without its state: a different message at or before a held message with content (other
   than that rewrite), a view with content ending before the newest held message and sharing
   none of it, or any content after a "no evidence" view that is not a held message. Its
   messages are numbered after the held ones, which stay.
   a. **Provisional when decided from a lone screen.** When the only evidence is agentapi's
      message 0 (an agent message: the PTY agent's fresh screen replacing the placeholder),
      the decision is provisional: agentapi 0.12 shows that screen with a new ``time`` one
      tick *before* it sends its saved messages (``pty_conversation.go`` copies the list before
      loading the state). Until the next evidence, the held messages and shift before it are
      kept (at most N more messages). A held message coming back undoes it: the held messages
      and the old numbering return and the screen is dropped (agentapi replaced it). Content
      it cannot be (another message than message 0 at an id the held window covers; in a view,
      anything beside message 0) confirms it, and so does a view without content once messages
      follow the screen. After agentd's own restart (nothing to undo with), a lone message 0
      of the newer numbering is dropped when held messages are found at an older one.
4. **A full view is the truth for its range.** A held message between two of the view's
   messages numbered alike, at an id the view lacks, is dropped (agentapi's ACP transport
   removes a failed prompt's empty placeholder with no event), and so is an empty placeholder
   after the view's newest message. Held messages older than the view stay, and so does held
   content newer than it (a final ``GET /messages`` one message short renumbers and
   duplicates nothing) or between two conversations' numberings; when the window is full,
   the view's own messages are kept first.
5. **int64.** If agentapi's ids would push an id outside 0 .. 2**63-1 (coderd decodes ``id`` as an
   int64), all held messages are renumbered 0, 1, 2, ... in their order, and the shift follows
   the message just stored.

The premise is agentapi's: two different messages never share role, time and text (it stamps
each with nanoseconds).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from itertools import pairwise

from agentd.messages import Message

_INT64_MAX = 2**63 - 1


def has_content(message: Message) -> bool:
    """False for an empty placeholder (agentapi's message 0 before the agent's screen, ACP's
    agent message before the first chunk): it carries nothing worth keeping or comparing."""
    return bool(message.content) or message.elided > 0


def same_message(held: Message, incoming: Message) -> bool:
    """True when ``incoming`` is ``held`` again: same role, same time, and the same text where
    both hold it, one a prefix of the other (it grew, or agentapi shows an older copy from its
    saved state). Either may have been clipped (see ``Message.elided``)."""
    if held.role != incoming.role or held.time != incoming.time:
        return False
    held_end = held.elided + len(held.content)
    incoming_end = incoming.elided + len(incoming.content)
    if held.elided == incoming.elided == 0:  # the usual case, without copying the text
        shorter, longer = sorted((held.content, incoming.content), key=len)
        return longer.startswith(shorter)
    start = max(held.elided, incoming.elided)  # compare where both hold the text
    end = min(held_end, incoming_end)
    if start >= end:
        return True  # no text in common to compare: role and time are all there is
    return held.content[start - held.elided : end - held.elided] == incoming.content[start - incoming.elided : end - incoming.elided]


def _longer(held: Message, incoming: Message) -> Message:
    """Of two copies of the same message, the one with more of it (the newer on a tie)."""
    return held if held.elided + len(held.content) > incoming.elided + len(incoming.content) else incoming


def _find_in(by_id: dict[int, Message], shift: int, message: Message) -> int | None:
    """The id in ``by_id`` of ``message`` by rule 1, preferring the one ``shift`` maps it to."""
    target = message.id + shift
    held = by_id.get(target)
    if held is not None and same_message(held, message):
        return target
    found = [i for i, h in by_id.items() if h.time == message.time and same_message(h, message)]
    return max(found) if found else None


def _first_screen(messages: list[Message]) -> bool:
    """True for a lone agent message 0 with content: the PTY agent's screen replacing agentapi's
    placeholder, which is all agentapi shows before it loads a saved state (rule 3a)."""
    return len(messages) == 1 and messages[0].id == 0 and messages[0].role == "agent" and has_content(messages[0])


@dataclass(frozen=True, slots=True)
class _Undo:
    """A provisional new conversation: the held messages and shift it replaced, and the id its
    first screen (agentapi's message 0) went to."""

    before: dict[int, Message]
    shift: int
    first: int


def _confirms(undo: _Undo, incoming: list[Message], view: bool) -> bool:
    """Rule 3a: content a restored state cannot show (``incoming`` holds no message of ``undo.before``)."""
    written = [m for m in incoming if has_content(m)]
    if view:
        return bool(written) and not _first_screen(written)
    oldest = min(undo.before, default=0)
    return any(m.id + undo.shift >= oldest and not (m.id == 0 and m.role == "agent") for m in written)


class RingBuffer:
    """The last ``max_messages`` messages by id, each at most ``max_chars`` characters long.

    ``version`` increases on every change (for persistence and checkpoints to notice);
    ``resets`` counts the new conversations recognised (agentapi restarted without its state).
    """

    def __init__(self, max_messages: int = 10, max_chars: int = 65_536) -> None:
        if max_messages < 1 or max_chars < 1:
            raise ValueError("max_messages and max_chars must be at least 1")
        self.max_messages = max_messages
        self.max_chars = max_chars
        self._by_id: dict[int, Message] = {}
        self._shift = 0  # agentd's id = agentapi's id + _shift, for agentapi's current conversation
        self._guard = False  # a view without content was seen: judge the next content by content
        self._outside = False  # an id outside int64 was stored (rule 5)
        self._aside: dict[int, Message] = {}  # updates older than the window while on guard
        self._undo: _Undo | None = None  # a provisional new conversation (rule 3a) and what it replaced
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

    @property
    def offset(self) -> int:
        """What is added to agentapi's ids (non-zero after agentapi restarted without its state).

        Never negative: a negative shift (only after rule 5 renumbered huge ids) reads as 0. That
        is safe to persist: the next view re-derives the shift from the messages it shares.
        """
        return max(0, self._shift)

    # -- writing -------------------------------------------------------------------------

    def restore(self, messages: Iterable[Message], offset: int = 0) -> None:
        """Load messages already in the buffer's own numbering (from the persisted state).

        ``offset`` is the :attr:`offset` they were saved with. The next view of the same
        conversation is recognised by content whatever it is; ``offset`` only places messages
        newer than every held one when the view shares none of them.
        """
        self._by_id.clear()
        self._aside.clear()
        self._guard = False
        self._undo = None
        for message in messages:
            self._store(message.id, self.clip(message))
        self._shift = max(0, offset)
        self._fit(self.newest_id)

    def clip(self, message: Message) -> Message:
        """``message`` with at most its last ``max_chars`` characters (the rest counted in ``elided``)."""
        if len(message.content) <= self.max_chars:
            return message
        cut = len(message.content) - self.max_chars
        return replace(message, content=message.content[cut:], elided=message.elided + cut)

    def apply(self, message: Message) -> bool:
        """Upsert one message in agentapi's numbering; return True if the buffer changed.

        A message older than the window (buffer full, id below the oldest held) is ignored.
        """
        version = self.version
        message = self.clip(message)
        if self._undo is not None:
            self._settle([message], view=False)
        if self._rewrites_newest(message):  # the hot path: the agent typing, many times a second
            target = message.id + self._shift
            self._store(target, message)
            return self.version != version
        found = self._find(message)
        if found is not None:  # rule 1, whatever its id says
            self._forget_first_screen(found - message.id)
            self._shift = found - message.id
            self._guard = False
            self._aside.clear()
            self._store(found, _longer(self._by_id[found], message))
            target = found
        elif self._guard:
            target = self._apply_on_guard(message)
        else:
            target = self._apply_live(message)
        self._fit(target)
        return self.version != version

    def sync(self, view: Iterable[Message]) -> bool:
        """Merge a full view of the conversation; return True if anything changed.

        Only the view's newest ``max_messages`` ids are stored (the buffer could hold no more);
        twice as many are compared with the held messages.
        """
        version = self.version
        wide = self._window(view, 2 * self.max_messages)  # a little more to recognise, the window to keep
        batch = wide[-self.max_messages :]
        if self._undo is not None:
            self._settle(wide, view=True)
        hits = self._matches(wide)
        if not hits and not any(has_content(m) for m in batch) and any(has_content(m) for m in self._by_id.values()):
            self._guard = True  # rule 2: agentapi lost or has not yet loaded its state
            return False
        if not batch:
            return False
        if hits:
            first = min(hits)
            self._forget_first_screen(hits[first] - first)
        if not hits and (self._guard or self._contradicts(batch)):
            self._new_conversation(batch[0].id, provisional=_first_screen(batch))
        self._guard = False
        self._aside.clear()
        self._merge(batch, hits)
        return self.version != version

    # -- the rule ----------------------------------------------------------------------------

    def _window(self, view: Iterable[Message], size: int) -> list[Message]:
        by_id: dict[int, Message] = {}
        for message in view:
            by_id[message.id] = message  # the last one wins, as with updates
        return [self.clip(by_id[i]) for i in sorted(by_id)[-size:]]

    def _rewrites_newest(self, message: Message) -> bool:
        """True for an agent update of the newest held id, an agent message, when no other held
        message has its role and time (so rule 1 cannot place it elsewhere)."""
        target = message.id + self._shift
        held = self._by_id.get(target)
        if self._guard or held is None or held.role != "agent" or message.role != "agent" or not self._last_written(target):
            return False
        return not any(h.time == message.time and h.role == message.role for i, h in self._by_id.items() if i != target)

    def _last_written(self, target: int) -> bool:
        """True if nothing but empty placeholders is held after ``target`` (agentapi's ACP
        transport may have removed them without an event)."""
        return all(not has_content(h) for i, h in self._by_id.items() if i > target)

    def _find(self, message: Message) -> int | None:
        """The held id of ``message`` by rule 1, preferring the one its id maps to."""
        return _find_in(self._by_id, self._shift, message)

    def _matches(self, batch: list[Message]) -> dict[int, int]:
        """agentapi id -> held id, for the view's messages agentd already holds (rule 1)."""
        hits: dict[int, int] = {}
        for message in batch:
            found = self._find(message)
            if found is not None:
                hits[message.id] = found
        return hits

    def _contradicts(self, batch: list[Message]) -> bool:
        """Rule 3 for a view sharing no held message: does it show another conversation?"""
        written = [i for i, h in self._by_id.items() if has_content(h)]
        if not written:
            return False
        last = max(written)
        if batch[-1].id + self._shift < last:
            return True  # a shorter view: agentapi started over
        for message in batch:
            target = message.id + self._shift
            held = self._by_id.get(target)
            if held is None or not has_content(held) or not has_content(message):
                continue
            if not (target == last and held.role == message.role == "agent"):  # other than the rewrite
                return True
        return False

    def _new_conversation(self, first: int, provisional: bool = False) -> None:
        """Rule 3: agentapi's conversation from now on is numbered after the held one.

        ``provisional`` (rule 3a): the only evidence is agentapi's message 0 showing a new
        screen; what the buffer held is kept aside until the next evidence settles it.
        """
        newest = self.newest_id
        if newest is not None:
            shift = newest + 1 - min(0, first)
            if provisional and self._undo is None:
                self._undo = _Undo(dict(self._by_id), self._shift, shift)
            self._shift = shift
            self.resets += 1
        self._guard = False

    def _settle(self, incoming: list[Message], view: bool) -> None:
        """Rule 3a: settle a provisional new conversation with the next evidence.

        A message held before it (rule 1) undoes it: agentapi loaded its saved state and the
        new screen was a transient one it replaced. Content it cannot be (another message than
        agentapi's message 0, at an id the held window covers; in a view, anything beside a
        lone message 0) confirms it; so does a view without content once messages follow it.
        """
        undo = self._undo
        assert undo is not None
        if any(_find_in(undo.before, undo.shift, m) is not None for m in incoming if has_content(m)):
            self._by_id, self._shift, self._undo = undo.before, undo.shift, None
            self._aside.clear()
            self.resets -= 1
            self.version += 1
        elif _confirms(undo, incoming, view) or (view and not any(map(has_content, incoming)) and self._grew(undo)):
            self._undo = None

    def _forget_first_screen(self, shift: int) -> None:
        """Rule 3a without its undo (agentd restarted in between): when held messages are found
        at an older numbering than ``shift``, a lone agentapi message 0 of the newer one was
        a screen agentapi replaced with its saved state, and is dropped."""
        first = self._shift
        if shift >= first or any(i > first for i in self._by_id):
            return
        held = self._by_id.get(first)
        if held is not None and held.role == "agent" and has_content(held):
            del self._by_id[first]
            self.version += 1

    def _grew(self, undo: _Undo) -> bool:
        """True if content is held after the provisional conversation's first screen."""
        return any(has_content(h) for i, h in self._by_id.items() if i > undo.first)

    def _apply_live(self, message: Message) -> int:
        """A live update that is no held message; returns the id it went to (or would have)."""
        target = message.id + self._shift
        held = self._by_id.get(target)
        rewrite = held is not None and held.role == message.role == "agent" and self._last_written(target)
        judged = bool(self._by_id) and target >= min(self._by_id)  # below the window: nothing to compare
        if judged and not rewrite and any(has_content(h) for i, h in self._by_id.items() if i >= target):
            if not has_content(message):
                return target  # an empty message over held content tells nothing
            self._new_conversation(message.id, provisional=_first_screen([message]))  # rule 3
            target = message.id + self._shift
        self._store(target, message)
        return target

    def _apply_on_guard(self, message: Message) -> int:
        """Rules 2-3 for a live update after a view without content: set aside or decide."""
        target = message.id + self._shift
        if not has_content(message):
            return target
        oldest = min(self._by_id)
        if target < oldest:  # older than the window: a late-loaded old message, or a new conversation
            self._aside[message.id] = message
            if len(self._aside) > self.max_messages:
                del self._aside[min(self._aside)]
            return target
        waiting = [self._aside[i] for i in sorted(self._aside)] + [message]
        self._new_conversation(waiting[0].id, provisional=_first_screen(waiting))
        self._aside.clear()
        for earlier in waiting:
            self._store(earlier.id + self._shift, earlier)
        return message.id + self._shift

    def _merge(self, batch: list[Message], hits: dict[int, int]) -> None:
        """Store the view (rule 4): it replaces what the buffer holds in its id range."""
        placed, moved = self._place(batch, hits)
        doomed = set(moved) | self._gaps(placed)
        for held_id in doomed:
            if self._by_id.pop(held_id, None) is not None:
                self.version += 1
        for target, message in placed:
            held = self._by_id.get(target)
            if held is not None and same_message(held, message):
                message = _longer(held, message)
            self._store(target, message, evict=False)
        self._trim({target for target, _ in placed[-self.max_messages :]})
        high = placed[-1][0]
        self._shift = high - batch[-1].id
        self._fit(high)

    def _place(self, batch: list[Message], hits: dict[int, int]) -> tuple[list[tuple[int, Message]], list[int]]:
        """Where each view message goes: a held message stays where it is; the others follow
        the nearest held one before them (before the first, the first one after them). Ids ascend in the
        view's order; a held message that cannot keep its place is moved (its old id returned)."""
        placed: list[tuple[int, Message]] = []
        moved: list[int] = []
        first = next((m.id for m in batch if m.id in hits), None)
        shift = self._shift if first is None else hits[first] - first
        for message in batch:
            target = hits.get(message.id, message.id + shift)
            if placed and target <= placed[-1][0]:
                if message.id in hits:
                    moved.append(target)
                target = placed[-1][0] + 1
            shift = target - message.id
            placed.append((target, message))
        return placed, moved

    def _gaps(self, placed: list[tuple[int, Message]]) -> set[int]:
        """Held ids the view shows are gone: between two of its messages numbered alike (an id
        agentapi removed), or an empty placeholder after its newest message."""
        gone: set[int] = set()
        keep = {target for target, _ in placed}
        high = placed[-1][0]
        for (low_t, low), (up_t, up) in pairwise(placed):
            if up_t - low_t == up.id - low.id and up_t - low_t > 1:
                gone.update(i for i in self._by_id if low_t < i < up_t and i not in keep)
        gone.update(i for i, m in self._by_id.items() if i > high and not has_content(m))
        return gone

    def _trim(self, shown: set[int]) -> None:
        """Back to ``max_messages`` after a view: what agentapi shows goes last, oldest first."""
        excess = len(self._by_id) - self.max_messages
        if excess > 0:
            order = sorted(self._by_id, key=lambda i: (i in shown, i))
            for held_id in order[:excess]:
                del self._by_id[held_id]
            self.version += 1

    def _store(self, target: int, message: Message, evict: bool = True) -> None:
        if message.id != target:
            message = replace(message, id=target)
        held = self._by_id.get(target)
        if held == message:
            return
        if evict and held is None and len(self._by_id) >= self.max_messages:
            oldest = min(self._by_id)
            if target < oldest:
                return  # older than the window
            del self._by_id[oldest]
        self._by_id[target] = message
        self.version += 1
        if not 0 <= target <= _INT64_MAX:
            self._outside = True

    def _fit(self, anchor: int | None) -> None:
        """Rule 5: renumber 0, 1, 2, ... if an id left int64; the shift follows ``anchor``."""
        if not self._outside or anchor is None:
            return
        self._outside = False
        ids = sorted(self._by_id)
        renumbered = {old: new for new, old in enumerate(ids)}
        self._by_id = {renumbered[old]: replace(self._by_id[old], id=renumbered[old]) for old in ids}
        moved_to = renumbered.get(anchor, sum(1 for old in ids if old < anchor))
        self._shift += moved_to - anchor
        self.version += 1
