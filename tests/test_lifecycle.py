"""The pure parts of the lifecycle: stop deadlines, the signal policy, the upload outcome's one
JSON shape, and redaction of URL userinfo. Hypothesis for the arithmetic and the policy."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentd import logs
from agentd.deadlines import EXIT_RESERVE, FINAL_REFRESH_TIMEOUT, MIN_STEP, refresh_timeout, step_timeout, stop_deadlines
from agentd.outcome import UploadOutcome, as_json, iso
from agentd.signals import IGNORED, REPEAT_WINDOW, STOP, Action, SignalPolicy

seconds = st.floats(min_value=0.01, max_value=3600, allow_nan=False)
clock = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


# -- deadlines -------------------------------------------------------------------------------------


@given(now=clock, shutdown=seconds)
def test_run_deadlines_keep_room_to_exit(now: float, shutdown: float) -> None:
    d = stop_deadlines(now, shutdown)
    assert d.end == now + shutdown
    assert now < d.upload < d.end
    assert d.end - d.upload == pytest.approx(min(EXIT_RESERVE, shutdown / 10))


@given(now=clock, shutdown=seconds, share=st.floats(min_value=0.01, max_value=0.99))
def test_supervise_deadlines_leave_the_child_its_time(now: float, shutdown: float, share: float) -> None:
    child = shutdown * share
    d = stop_deadlines(now, shutdown, child)
    assert d.end - d.upload == pytest.approx(child)
    assert now < d.upload < d.end


@given(now=clock, left=st.floats(min_value=-100, max_value=100, allow_nan=False))
def test_refresh_timeout_is_short_and_a_quarter_of_what_is_left(now: float, left: float) -> None:
    t = refresh_timeout(now, now + left)
    assert 0.0 <= t <= FINAL_REFRESH_TIMEOUT
    assert t <= max(0.0, left) / 4 + 1e-9


@given(now=clock, left=st.floats(min_value=-100, max_value=100, allow_nan=False),
       cap=st.none() | st.floats(min_value=0.2, max_value=50))
def test_step_timeout_is_bounded_below_and_by_its_cap(now: float, left: float, cap: float | None) -> None:
    t = step_timeout(now, now + left, cap)
    assert t >= min(MIN_STEP, cap if cap is not None else MIN_STEP)
    if cap is not None:
        assert t <= cap
    if left > MIN_STEP and (cap is None or cap >= left):
        assert t == pytest.approx(left)


# -- signals ---------------------------------------------------------------------------------------


def test_the_signals_and_what_they_mean() -> None:
    p = SignalPolicy()
    assert p.classify(signal.SIGUSR2, 0.0) is Action.IGNORE
    assert p.classify(signal.SIGALRM, 0.0) is Action.IGNORE
    assert p.classify(signal.SIGUSR1, 0.0) is Action.SNAPSHOT
    assert p.classify(signal.SIGUSR1, 0.5) is Action.REPEAT
    assert p.classify(signal.SIGUSR1, 1.5) is Action.SNAPSHOT
    assert p.classify(signal.SIGHUP, 2.0) is Action.STOP and p.stop_signal == signal.SIGHUP
    assert p.classify(signal.SIGTERM, 2.1) is Action.REPEAT  # a closing terminal: SIGHUP, then SIGTERM
    assert p.classify(signal.SIGINT, 3.5) is Action.GIVE_UP


@given(st.lists(st.tuples(st.sampled_from([*STOP, signal.SIGUSR1, *IGNORED]),
                          st.floats(min_value=0, max_value=0.2)), min_size=1, max_size=30))
def test_at_most_one_stop_and_give_up_only_a_window_after_it(deliveries: list[tuple[int, float]]) -> None:
    p = SignalPolicy()
    now, stop_at = 0.0, None
    for signum, gap in deliveries:
        now += gap
        action = p.classify(signum, now)
        if action is Action.STOP:
            assert stop_at is None, "a second STOP"
            stop_at = now
        if action is Action.GIVE_UP:
            assert stop_at is not None and now - stop_at >= REPEAT_WINDOW
        if signum in IGNORED:
            assert action is Action.IGNORE
    if any(s in STOP for s, _ in deliveries):
        assert stop_at is not None


@given(st.sampled_from(STOP), st.lists(st.floats(min_value=0, max_value=REPEAT_WINDOW * 0.99), max_size=20))
def test_the_same_signal_within_a_second_counts_once(signum: int, offsets: list[float]) -> None:
    p = SignalPolicy()
    assert p.classify(signum, 100.0) is Action.STOP
    for offset in sorted(offsets):
        assert p.classify(signum, 100.0 + offset) is Action.REPEAT


# -- the upload outcome ------------------------------------------------------------------------------

outcomes = st.builds(
    UploadOutcome,
    stored=st.booleans(),
    status=st.none() | st.integers(100, 599),
    attempts=st.integers(0, 100),
    bytes=st.integers(0, 65_536),
    messages=st.integers(0, 1000),
    reason=st.text(max_size=50),
    at=st.integers(0, 4_000_000_000).map(float),
)


@given(outcomes)
def test_one_json_shape_read_back_from_it_and_from_state_files(outcome: UploadOutcome) -> None:
    shown = outcome.as_json()
    assert shown["outcome"] == ("stored" if outcome.stored else "failed")
    assert shown["http_status"] == outcome.status and shown["time"] == iso(outcome.at)
    assert shown["time"].endswith("Z") and len(shown["time"]) == 20
    assert UploadOutcome.from_json(shown).as_json() == shown
    old = {"stored": outcome.stored, "status": outcome.status, "attempts": outcome.attempts, "bytes": outcome.bytes,
           "messages": outcome.messages, "reason": outcome.reason, "at": outcome.at}
    assert UploadOutcome.from_json(old) == outcome  # state files keep the field names
    assert as_json(None) is None


def test_the_snapshot_answer_and_status_show_the_same_shape() -> None:
    from agentd.daemon import StoreResult
    from agentd.status import upload_view

    o = UploadOutcome(True, 204, 1, 486, 4, "", 1_767_225_600.0)
    assert StoreResult("stored", o).as_dict()["outcome"] == upload_view(o) == {
        "outcome": "stored", "http_status": 204, "time": "2026-01-01T00:00:00Z", "bytes": 486, "messages": 4,
        "attempts": 1, "reason": None,
    }


def test_state_module_does_not_import_the_http_uploader() -> None:
    import ast
    from pathlib import Path

    import agentd.state

    tree = ast.parse(Path(agentd.state.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "agentd.coderd" not in imported and "agentd.outcome" in imported


# -- redaction -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://bob:hunter22@coder.example.com/api", "https://[REDACTED]@coder.example.com/api"),
        ('{"url":"http://u:p4ss@localhost:3284"}', '{"url":"http://[REDACTED]@localhost:3284"}'),
        ("URL('https://ghp_tokenvalue@github.com/a@b')", "URL('https://[REDACTED]@github.com/a@b')"),
        ("no userinfo: http://localhost:3284/messages", "no userinfo: http://localhost:3284/messages"),
        ("mail bob@example.com; http://host/a@b", "mail bob@example.com; http://host/a@b"),
    ],
)
def test_url_userinfo_is_redacted(text: str, shown: str) -> None:
    assert logs.redact(text) == shown


def test_url_secrets_are_hidden_even_without_their_url() -> None:
    logs.add_url_secrets("https://carol:pw-7f3a9c@coder.example.com")
    assert logs.redact("auth failed for pw-7f3a9c") == "auth failed for [REDACTED]"


def test_a_bad_url_setting_is_named_without_its_password() -> None:
    import uuid

    from agentd.settings import ConfigError, load_settings

    with pytest.raises(ConfigError) as caught:
        load_settings(coderd_url="ftp://bob:pw-in-a-bad-url@coder.example.com", agent_token="t0ken-value",
                      task_id=str(uuid.uuid4()))
    text = str(caught.value)
    assert "CODER_AGENT_URL" in text and "[REDACTED]@coder.example.com" in text
    assert "pw-in-a-bad-url" not in text
