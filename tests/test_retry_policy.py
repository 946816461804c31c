"""The upload retry policy's waits (agentd.coderd.CoderdUploader.retry_wait): pure, no I/O.

The fleet simulation (``python -m bench fleet``) measures what the policy does to 1 000
workspaces stopping at once; these tests pin the bounds a lone agentd relies on.
"""

from __future__ import annotations

import random
import uuid

import httpx
import pytest

from agentd.coderd import CoderdUploader


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
