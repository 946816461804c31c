"""The upload retry policy's waits (agentd.coderd.CoderdUploader.retry_wait): pure, no I/O.

The fleet simulation (``python -m bench fleet``) measures what the policy does to 1 000
workspaces stopping at once; these tests pin the bounds a lone agentd relies on.
"""

from __future__ import annotations

import random
import uuid

import httpx
import pytest

from agentd.coderd import CoderdUploader, parse_retry_after


@pytest.fixture
def uploader() -> CoderdUploader:
    random.seed(1234)
    client = httpx.AsyncClient(trust_env=False)
    return CoderdUploader(client, "http://127.0.0.1:9", "token-1234", uuid.uuid4())


def waits(uploader: CoderdUploader, failures: int, retry_after: float | None, left: float, n: int = 2000) -> list[float]:
    out = [uploader.retry_wait(failures, retry_after, left) for _ in range(n)]
    assert all(w is not None for w in out)
    return out  # type: ignore[return-value]


def test_backoff_without_retry_after_starts_small_and_is_capped(uploader: CoderdUploader) -> None:
    for failures, window in [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (5, 4.0), (9, 4.0)]:
        got = waits(uploader, failures, None, left=60.0)
        assert min(got) >= 0.0 and max(got) <= window
        assert max(got) > 0.9 * window, "full jitter: the whole window is used"


def test_retry_after_is_a_floor_with_jitter_above_it(uploader: CoderdUploader) -> None:
    got = waits(uploader, 1, 1.0, left=60.0)
    assert min(got) >= 1.0 and max(got) <= 2.0
    assert max(got) - min(got) > 0.8, "a fleet told the same Retry-After must not come back in lockstep"
    # A lone agentd after 503, 502, 503 + Retry-After: 1 is back within 2 s (the fault tests' case).
    assert max(waits(uploader, 3, 1.0, left=60.0)) <= 2.0


def test_waits_end_before_the_deadline(uploader: CoderdUploader) -> None:
    left = 1.0  # min_attempt is 0.2: the next attempt must start within 0.8 s
    assert max(waits(uploader, 5, None, left)) <= left - uploader.min_attempt
    got = waits(uploader, 5, 0.5, left)
    assert min(got) >= 0.5 and max(got) <= left - uploader.min_attempt


def test_gives_up_when_retry_after_or_the_deadline_leaves_no_room(uploader: CoderdUploader) -> None:
    assert uploader.retry_wait(1, 30.0, left=4.0) is None  # coderd asks for more than is left
    assert uploader.retry_wait(1, 1.0, left=1.1) is None  # 1 s + min_attempt does not fit
    assert uploader.retry_wait(1, None, left=0.1) is None  # no time for another attempt
    assert uploader.retry_wait(1, 0.0, left=0.5) is not None  # Retry-After: 0 (or a past date)


# ---------------------------------------------------------------------------------------------
# Retry-After as coderd (or anything in between) may send it


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        ("²", None),  # "²".isdigit() is True; int("²") raises
        ("٣", None),  # an Arabic-Indic digit: int() would accept it, RFC 9110 does not
        ("1.5", None),
        ("-3", None),
        ("", None),
        (None, None),
        ("soon", None),
        ("9" * 5000, 86_400.0),  # bounded, and never int() of 5 000 digits
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),  # a date in the past
        ("Sun, 06 Nov 1994 08:49:37 GMT" + "x" * 10_000, None),
    ],
)
def test_parse_retry_after_accepts_ascii_seconds_or_a_date_only(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value) == seconds


def test_parse_retry_after_date_in_the_future_is_bounded() -> None:
    now = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now=now) == 86_400.0


def test_stop_and_wait_agree_whatever_order_tenacity_asks_them(uploader: CoderdUploader) -> None:
    """The uploader's tenacity ``stop`` (``out_of_time``) and ``wait`` share no state: a wait is
    only ever drawn where stop says another attempt fits, and then it fits before the deadline."""
    for retry_after in (None, 0.0, 0.5, 1.0, 3.0, 30.0):
        for left in (0.1, 0.5, 1.0, 1.3, 4.0, 60.0):
            for failures in (1, 3, 8):
                wait = uploader.retry_wait(failures, retry_after, left)
                assert (wait is None) == uploader.out_of_time(retry_after, left)
                if wait is not None:
                    assert (retry_after or 0.0) <= wait <= left - uploader.min_attempt
