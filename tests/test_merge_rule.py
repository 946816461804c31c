"""The merge rule as properties (hypothesis): a simulated agentapi 0.12 goes through restarts with
and without its saved state (the late load behind the empty placeholder), ACP removals with
gaps and reused ids, in-place rewrites, short and windowed views, huge ids and agentd restarts,
while the ring buffer follows it through live updates and full views.

Every message the simulation creates carries a unique tag (``<uN>``, N its creation order) at
the start of its content, so "stored twice", "lost" and "out of order" can be checked exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.buffer import RingBuffer
from agentd.messages import Message

INT64_MAX = 2**63 - 1
TAG = re.compile(r"<u(\d+)>")


def tag(message: Message) -> int | None:
    m = TAG.match(message.content)
    return int(m.group(1)) if m else None


@dataclass
class AgentAPI:
    """What agentapi 0.12 shows: ``messages`` (its ids), plus a saved state and a late load."""

    acp: bool = False
    messages: list[Message] = field(default_factory=list)
    next_id: int = 0
    clock: int = 0
    created: int = 0
    saved: list[Message] | None = None
    loading: list[Message] | None = None
    lost: bool = False  # a restart from an older save lost messages: their branch has no order
    renumbered: bool = False  # ids reached int64's end: agentd renumbers (rule 5), shifts differ
    restamped: bool = False  # a PTY rewrite left a copy with another time (the rule's known limit)

    def now(self) -> str:
        self.clock += 1
        return f"2026-01-01T00:00:{self.clock // 10**9:02d}.{self.clock % 10**9:09d}Z"

    def add(self, role: str, text: str | None) -> Message | None:
        if self.next_id > INT64_MAX or self.loading is not None:  # not ready before the late load
            return None
        if text is None:
            content = ""
        else:
            self.created += 1
            content = f"<u{self.created}> {text}"
        message = Message(self.next_id, role, content, self.now())
        self.messages.append(message)
        self.next_id += 1
        return message

    def grow(self, text: str, restamp: bool) -> Message | None:
        """Rewrite the newest message in place if it is the agent's (PTY restamps its time, ACP
        does not); agentapi never rewrites a user message."""
        if not self.messages or self.messages[-1].role != "agent":
            return None
        last = self.messages[-1]
        restamp = restamp and not self.acp
        if restamp and last.content and (self.lost or any(m.time == last.time for m in self.saved or ())):
            # The saved copy keeps the old time (or agentd holds messages agentapi lost after
            # it): see test_a_restamped_copy_of_the_newest_agent_message_is_stored_twice.
            self.restamped = True
        if last.content:
            content = last.content + text
        else:  # the placeholder gets its first text: now it is a message of its own
            self.created += 1
            content = f"<u{self.created}> {text}"
        grown = replace(last, content=content, time=self.now() if restamp else last.time)
        self.messages[-1] = grown
        return grown

    def fail(self, reuse: bool) -> None:
        """ACP: a failed prompt removes the empty agent placeholder, with no event."""
        if self.messages and self.messages[-1].role == "agent" and not self.messages[-1].content:
            self.messages.pop()
            if reuse:
                self.next_id -= 1

    def restart(self, with_state: bool) -> None:
        self.loading = list(self.saved) if with_state and self.saved is not None else None
        self.lost |= self.loading is not None and self.loading != self.messages
        self.messages, self.next_id = [], 0
        if not self.acp:  # PTY: message 0, agent, empty, until the screen (or the saved state) shows
            self.messages.append(Message(0, "agent", "", self.now()))
            self.next_id = 1

    def load(self) -> list[Message]:
        """The late load: the saved conversation appears with its ids and times, re-sent."""
        if self.loading is None:
            return []
        self.messages, self.loading = self.loading, None
        self.next_id = self.messages[-1].id + 1 if self.messages else 0
        return list(self.messages)


ops = st.one_of(
    st.tuples(st.just("user"), st.text("abc─", min_size=1, max_size=5)),
    st.tuples(st.just("agent"), st.text("xyz│", min_size=1, max_size=5)),
    st.tuples(st.just("placeholder"), st.none()),
    st.tuples(st.just("grow"), st.booleans()),
    st.tuples(st.just("fail"), st.booleans()),
    st.tuples(st.just("save"), st.none()),
    st.tuples(st.just("restart"), st.booleans()),
    st.tuples(st.just("load"), st.none()),
    st.tuples(st.just("pty_restart_with_state"), st.sampled_from(["update", "view", "placeholder"])),
    st.tuples(st.just("disconnect"), st.none()),
    st.tuples(st.just("reconnect"), st.none()),
    st.tuples(st.just("poll"), st.none()),
    st.tuples(st.just("short"), st.none()),
    st.tuples(st.just("huge"), st.integers(0, 3)),
    st.tuples(st.just("agentd_restart"), st.none()),
)


@dataclass
class Run:
    api: AgentAPI
    buffer: RingBuffer
    connected: bool = True
    trusted_view: bool = False  # the last step merged an honest full view
    missed: bool = False  # updates were lost while disconnected (until the next full view)

    def deliver(self, *messages: Message | None) -> None:
        for message in messages:
            if message is None:
                continue
            if self.connected:
                self.buffer.apply(message)
            else:
                self.missed = True

    def view(self, messages: list[Message]) -> None:
        self.buffer.sync(messages)

    def step(self, op: str, arg: object) -> None:
        api, self.trusted_view = self.api, False
        if op in ("user", "agent"):
            self.deliver(api.add(op, str(arg)))
        elif op == "placeholder":
            self.deliver(api.add("agent", None))
        elif op == "grow":
            self.deliver(api.grow("+", restamp=bool(arg)))
        elif op == "fail":
            api.fail(reuse=bool(arg))
        elif op == "save":
            api.saved = list(api.messages)
        elif op == "restart":
            api.restart(with_state=bool(arg))
            self.reconnect(api.messages[-self.buffer.max_messages :])
        elif op == "restart_saved":  # agentapi saved its state at shutdown (its default with --state-file)
            api.saved = list(api.messages)
            self.step("restart", True)
        elif op == "load":
            self.deliver(*api.load())
        elif op == "pty_restart_with_state":
            self.pty_restart_with_state(str(arg))
        else:
            self.observe(op, arg)

    def observe(self, op: str, arg: object) -> None:
        """The rest: huge ids, and agentd's side (losing the stream, reconnecting, polling,
        restarting)."""
        api = self.api
        if op == "huge":
            api.next_id = max(api.next_id, INT64_MAX - int(arg))  # type: ignore[call-overload]
            api.renumbered = True
        elif op == "disconnect":
            self.connected = False
        elif op == "reconnect":  # the tail keeps the replay's newest max_messages
            self.reconnect(api.messages[-self.buffer.max_messages :])
        elif op == "poll":
            self.reconnect(list(api.messages))
        elif op == "short" and len(api.messages) >= 2:  # a hostile final GET /messages (issue 8 case 9)
            self.view(api.messages[:-1])
        elif op == "agentd_restart":
            again = RingBuffer(self.buffer.max_messages, self.buffer.max_chars)
            again.restore(self.buffer.messages(), self.buffer.offset)
            self.buffer = again
            self.reconnect(api.messages[-again.max_messages :])

    def pty_restart_with_state(self, seen: str) -> None:
        """agentapi's PTY conversation restarted with ``--state-file`` (pty_conversation.go): the
        lone empty message 0; once the agent's screen is ready, message 0 rewritten with the fresh
        screen and a new time; a tick later the saved messages 0..N with their ids and times.
        agentd sees the fresh screen as a live update, or in a view (it connected or polled in
        that tick), or only the placeholder before it."""
        api = self.api
        if api.acp:
            return
        if self.missed:  # agentd is connected when agentapi stops (see test_a_missed_restamp_...)
            self.reconnect(list(api.messages))
        api.saved = list(api.messages)  # agentapi saves its state at shutdown
        api.restart(with_state=True)
        self.reconnect(api.messages[-self.buffer.max_messages :])  # the placeholder
        screen = api.grow("fresh banner", restamp=True)
        if seen == "update":
            self.deliver(screen)
        elif seen == "view":
            self.reconnect(list(api.messages))
        self.deliver(*api.load())
        self.trusted_view = False

    def reconnect(self, view: list[Message]) -> None:
        self.connected, self.missed = True, False
        self.view(view)
        self.trusted_view = True


def check(run: Run) -> None:
    buffer, api = run.buffer, run.api
    held = buffer.messages()
    ids = [m.id for m in held]
    assert ids == sorted(set(ids)), "ids strictly ascending"
    assert all(0 <= i <= INT64_MAX for i in ids), "ids within int64"
    assert len(held) <= buffer.max_messages, "never longer than max_messages"
    assert all(len(m.content) <= buffer.max_chars for m in held), "memory bounded per message"
    assert len(getattr(buffer, "_aside", ())) <= buffer.max_messages, "updates set aside are bounded too"
    undo = getattr(buffer, "_undo", None)
    assert undo is None or len(undo.before) <= buffer.max_messages, "what a provisional restart keeps is bounded"
    assert buffer.offset >= 0
    tags = [t for t in map(tag, held) if t is not None]
    assert len(tags) == len(set(tags)) or api.restamped, f"a message stored twice: {held}"
    current = {tag(m) for m in api.messages}
    shown_tags = [t for t in tags if t in current]
    assert shown_tags == sorted(shown_tags), f"held messages out of agentapi's order: {held}"
    if not api.lost and not api.restamped:
        assert tags == sorted(tags), f"held messages out of the order agentapi created them: {held}"
    if not api.lost and not api.restamped and not api.renumbered and not run.missed:  # agentd saw all agentapi showed
        at = {tag(m): m.id for m in api.messages if tag(m) is not None}
        flags = [tag(m) in at for m in held if tag(m) is not None]
        assert True not in flags or all(flags[flags.index(True) :]), (
            f"a message agentapi no longer shows held between ones it shows: {held} / {api.messages}"
        )
        shifts = {m.id - at[tag(m)] for m in held if tag(m) in at}
        assert len(shifts) <= 1, f"ids jump: agentapi's messages are not numbered alike: {held} / {api.messages}"
    if run.trusted_view:
        shown = [m for m in api.messages[-buffer.max_messages :] if m.content]
        by_tag = {tag(m): m for m in held}
        kept = [m for m in shown if tag(m) in by_tag]
        # The held copy is agentapi's, or a longer one of the same message (its saved state was older).
        assert all(by_tag[tag(m)].content.startswith(m.content) for m in kept), "a held message not updated"
        assert kept == shown[len(shown) - len(kept) :], "a message agentapi shows lost in the middle"
        if shown:
            assert kept and kept[-1] == shown[-1], "agentapi's newest message is held"
        if all(t in current for t in by_tag if t is not None):
            assert kept == shown, "every message agentapi shows is held (within the last N)"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=60), st.integers(1, 6), st.booleans())
def test_any_sequence_of_views_and_updates(steps, max_messages, acp):
    run = Run(AgentAPI(acp=acp), RingBuffer(max_messages))
    run.api.restart(with_state=False)  # agentapi starts: PTY shows message 0, ACP nothing
    run.reconnect(run.api.messages)
    for op, arg in steps:
        run.step(op, arg)
        check(run)
    run.reconnect(list(run.api.messages))  # the final GET /messages at the stop
    check(run)


restart_ops = st.one_of(
    st.tuples(st.just("user"), st.text("abc", min_size=1, max_size=3)),
    st.tuples(st.just("agent"), st.text("xyz", min_size=1, max_size=3)),
    st.tuples(st.just("grow"), st.just(True)),
    st.tuples(st.just("pty_restart_with_state"), st.sampled_from(["update", "view", "placeholder"])),
    st.tuples(st.just("restart"), st.just(False)),
    st.tuples(st.just("restart_saved"), st.none()),
    st.tuples(st.just("load"), st.none()),
    st.tuples(st.just("poll"), st.none()),
    st.tuples(st.just("reconnect"), st.none()),
    st.tuples(st.just("agentd_restart"), st.none()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(restart_ops, max_size=40), st.integers(1, 6))
def test_pty_restarts_with_and_without_state(steps, max_messages):
    """The PTY transport's restarts, often: with ``--state-file`` agentapi shows its placeholder,
    then the agent's fresh screen as message 0 (new time), then a tick later its saved messages;
    without it, the fresh screen and new messages. agentd ends with what agentapi holds: no
    screen it replaced, and the restored messages at their old ids (checked in ``check``)."""
    run = Run(AgentAPI(), RingBuffer(max_messages))
    run.api.restart(with_state=False)
    run.reconnect(run.api.messages)
    for op, arg in steps:
        run.step(op, arg)
        check(run)
    run.reconnect(list(run.api.messages))
    check(run)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=40), st.integers(1, 4), st.integers(1, 12))
def test_memory_stays_bounded_with_clipped_messages(steps, max_messages, max_chars):
    """Tiny ``max_chars``: every message is clipped (tags cut off), the bounds still hold."""
    run = Run(AgentAPI(), RingBuffer(max_messages, max_chars=max_chars))
    for op, arg in steps:
        run.step(op, arg)
        held = run.buffer.messages()
        assert len(held) <= max_messages and all(len(m.content) <= max_chars for m in held)
        assert [m.id for m in held] == sorted({m.id for m in held})
        assert all(0 <= m.id <= INT64_MAX for m in held)


@pytest.mark.parametrize("max_messages", [3, 10])
def test_restart_with_state_late_load_stores_nothing_twice(max_messages):
    run = Run(AgentAPI(), RingBuffer(max_messages))
    for op, arg in [("restart", False), ("grow", True), ("user", "q1"), ("agent", "a1"), ("user", "q2"),
                    ("agent", "a2"), ("save", None), ("restart", True), ("load", None), ("user", "q3"),
                    ("poll", None)]:
        run.step(op, arg)
        check(run)
    assert run.buffer.resets == 0
    assert [m.content for m in run.buffer.messages()] == [m.content for m in run.api.messages][-max_messages:]


# -- the numbered cases of issue 8, one by one ---------------------------------------------------


def msg(i: int, role: str, text: str, second: int) -> Message:
    return Message(i, role, text, f"2026-01-01T00:00:{second:02d}.000000001Z")


OLD = [msg(0, "agent", "welcome", 0), msg(1, "user", "q1", 1), msg(2, "agent", "a1", 2)]


def held(buffer: RingBuffer) -> list[tuple[int, str]]:
    return [(m.id, m.content) for m in buffer.messages()]


def test_case_1_restart_with_state_behind_the_placeholder_stores_nothing_twice():
    buffer = RingBuffer(10)
    buffer.sync(OLD)
    assert buffer.sync([msg(0, "agent", "", 30)]) is False, "the lone placeholder is not a restart"
    for message in OLD:  # the late load re-sends 0..2 with their ids and times
        buffer.apply(message)
    buffer.apply(msg(3, "user", "q2", 31))
    buffer.sync([*OLD, msg(3, "user", "q2", 31)])
    assert held(buffer) == [(0, "welcome"), (1, "q1"), (2, "a1"), (3, "q2")]
    assert buffer.resets == 0


SEVEN = [msg(i, "user" if i % 2 else "agent", f"m{i}", i) for i in range(7)]


@pytest.mark.parametrize("max_messages", [10, 4])
@pytest.mark.parametrize("seen", ["update", "view"])
def test_case_1_the_fresh_screen_before_the_late_load_is_dropped(max_messages, seen):
    """agentapi 0.12.1, PTY, --state-file (seen with the real server): the placeholder; once the
    agent's screen is ready, message 0 rewritten with the fresh screen and a new time; a tick
    later the saved 0..6 with their ids and times. agentd ends with exactly what agentapi holds."""
    buffer = RingBuffer(max_messages)
    buffer.sync(SEVEN)
    buffer.sync([msg(0, "agent", "", 30)])
    fresh = msg(0, "agent", "new banner", 31)
    buffer.apply(fresh) if seen == "update" else buffer.sync([fresh])
    for message in SEVEN:
        buffer.apply(message)
    turn = [msg(7, "user", "q", 40), msg(8, "agent", "a", 41)]
    for message in turn:
        buffer.apply(message)
    assert held(buffer) == [(m.id, m.content) for m in [*SEVEN, *turn]][-max_messages:]
    assert buffer.resets == 0 and buffer.offset == 0
    buffer.sync([*SEVEN, *turn])  # the final GET /messages
    assert held(buffer) == [(m.id, m.content) for m in [*SEVEN, *turn]][-max_messages:]


def test_case_1_the_fresh_screen_is_dropped_after_an_agentd_restart_too():
    buffer = RingBuffer(10)
    buffer.sync(SEVEN)
    buffer.sync([msg(0, "agent", "", 30)])
    buffer.apply(msg(0, "agent", "new banner", 31))
    again = RingBuffer(10)  # agentd restarted in that tick: only the messages and offset persist
    again.restore(buffer.messages(), buffer.offset)
    again.sync([msg(0, "agent", "new banner", 31)])  # its replay
    for message in [*SEVEN, msg(7, "user", "q", 40)]:
        again.apply(message)
    assert held(again) == [(i, f"m{i}") for i in range(7)] + [(7, "q")]


@pytest.mark.parametrize("seen", ["update", "view"])
def test_a_fresh_screen_followed_by_new_messages_is_a_new_conversation(seen):
    """Without a state file the fresh screen is followed by new messages, not restored ones:
    appended after the held conversation (the banner may well read the same as the old one)."""
    buffer = RingBuffer(10)
    buffer.sync(SEVEN)
    buffer.sync([msg(0, "agent", "", 30)])
    fresh = msg(0, "agent", "m0", 31)
    buffer.apply(fresh) if seen == "update" else buffer.sync([fresh])
    buffer.apply(msg(1, "user", "fresh question", 32))
    buffer.sync([])  # agentapi restarted once more (ACP: nothing): nothing is undone now
    buffer.apply(msg(0, "user", "third conversation", 33))
    assert held(buffer)[7:] == [(7, "m0"), (8, "fresh question"), (9, "third conversation")]
    assert buffer.resets == 2


@pytest.mark.xfail(strict=True, reason="known: a PTY rewrite restamps the newest agent message; a "
                   "copy of it with another time (an older save, or a rewrite agentd missed) reads as new")
def test_a_restamped_copy_of_the_newest_agent_message_is_stored_twice():
    buffer = RingBuffer(10)
    buffer.sync([msg(0, "agent", "banner", 0), msg(1, "user", "q", 1), msg(2, "agent", "a", 2)])
    buffer.apply(msg(2, "agent", "a, longer", 3))  # the PTY rewrite restamps it; the save was before
    buffer.apply(msg(3, "user", "q2", 4))
    buffer.sync([msg(0, "agent", "", 30)])  # agentapi restarted with that older save
    for message in [msg(0, "agent", "banner", 0), msg(1, "user", "q", 1), msg(2, "agent", "a", 2)]:
        buffer.apply(message)  # its late load
    assert [c for _, c in held(buffer)] == ["banner", "q", "a, longer", "q2"]


def test_case_1_the_late_load_of_a_long_conversation_sets_old_updates_aside():
    """Updates older than the window arrive first in a late load: they are neither stored nor
    taken for a new conversation; the first held one settles it."""
    conversation = [msg(i, "user" if i % 2 else "agent", f"m{i}", i) for i in range(12)]
    buffer = RingBuffer(4)
    buffer.sync(conversation)
    buffer.sync([msg(0, "agent", "", 40)])
    for message in conversation:
        buffer.apply(message)
    assert held(buffer) == [(i, f"m{i}") for i in range(8, 12)] and buffer.resets == 0


def test_restart_without_state_is_appended_after_the_held_conversation():
    buffer = RingBuffer(10)
    buffer.sync(OLD)
    buffer.sync([msg(0, "agent", "", 30)])  # PTY start: the placeholder
    buffer.apply(msg(0, "agent", "welcome again", 31))  # the agent's screen: the placeholder rewritten
    buffer.apply(msg(1, "user", "fresh question", 32))
    buffer.sync([msg(0, "agent", "welcome again", 31), msg(1, "user", "fresh question", 32)])
    assert held(buffer) == [*((m.id, m.content) for m in OLD), (3, "welcome again"), (4, "fresh question")]
    assert buffer.resets == 1


def test_case_5_acp_removal_leaves_a_gap_and_the_view_is_the_truth_for_its_range():
    buffer = RingBuffer(10)
    live = [msg(0, "user", "q1", 0), msg(1, "agent", "a1", 1), msg(2, "user", "q2", 2), msg(3, "agent", "", 3)]
    for message in live:
        buffer.apply(message)
    # The prompt failed: agentapi removed the placeholder (no event); the next prompt got ids 4, 5.
    view = [*live[:3], msg(4, "user", "q3", 4), msg(5, "agent", "a3", 5)]
    buffer.sync(view)
    assert held(buffer) == [(0, "q1"), (1, "a1"), (2, "q2"), (4, "q3"), (5, "a3")]
    # Removed at the end (ids reused later): the stale placeholder goes too.
    buffer.apply(msg(6, "user", "q4", 6))
    buffer.apply(msg(7, "agent", "", 7))
    buffer.sync([*view, msg(6, "user", "q4", 6)])
    assert [i for i, _ in held(buffer)] == [0, 1, 2, 4, 5, 6]


def test_case_8_the_pty_start_placeholder_is_held_until_the_screen_replaces_it():
    buffer = RingBuffer(10)
    buffer.sync([msg(0, "agent", "", 0)])
    assert held(buffer) == [(0, "")]
    buffer.apply(msg(0, "agent", "welcome", 1))
    assert held(buffer) == [(0, "welcome")] and buffer.resets == 0


def test_case_9_a_final_view_one_message_short_renumbers_nothing():
    buffer = RingBuffer(10)
    stream = [msg(i, "user" if i % 2 else "agent", f"message {i}", i) for i in range(10)]
    for message in stream:
        buffer.apply(message)
    buffer.sync(stream[:9])
    assert held(buffer) == [(i, f"message {i}") for i in range(10)] and buffer.resets == 0


def test_case_10_huge_ids_then_a_restart_stay_within_int64():
    buffer = RingBuffer(10)
    buffer.sync([msg(INT64_MAX - 1, "user", "q", 0), msg(INT64_MAX, "agent", "a", 1)])
    buffer.sync([msg(0, "user", "after the restart", 2)])  # a reconnect to a new conversation
    buffer.apply(msg(1, "agent", "answer", 3))
    assert held(buffer) == [(0, "q"), (1, "a"), (2, "after the restart"), (3, "answer")]
    assert buffer.offset == 2
    buffer.sync([msg(0, "user", "after the restart", 2), msg(1, "agent", "answer", 3)])  # replayed: same
    assert len(buffer) == 4 and buffer.newest_id == 3


def test_an_agentd_restart_recognises_the_conversation_it_saved():
    buffer = RingBuffer(10)
    buffer.sync(OLD)
    buffer.sync([])  # agentapi (ACP) came back empty
    buffer.apply(msg(0, "user", "new", 10))
    buffer.apply(msg(1, "agent", "reply", 11))
    again = RingBuffer(10)
    again.restore(buffer.messages(), buffer.offset)
    again.sync([msg(0, "user", "new", 10), msg(1, "agent", "reply", 11)])  # the replay after agentd's restart
    assert held(again) == held(buffer) == [(0, "welcome"), (1, "q1"), (2, "a1"), (3, "new"), (4, "reply")]
    again.apply(msg(2, "user", "one more", 12))
    assert again.newest_id == 5
