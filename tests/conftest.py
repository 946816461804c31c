"""Shared pytest configuration."""

import os

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (derandomize): a CI run can only fail for a
# change in the code, never for a new draw. `HYPOTHESIS_PROFILE=explore` draws new ones (a fresh
# random search, as a developer runs it to look for trouble); a failure found there becomes a
# deterministic test.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every ``pytest.mark.anyio`` test on both asyncio and trio."""
    return request.param


# -- shared harness fixtures (helpers in tests/support.py) --------------------------------------

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import support  # noqa: E402


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory under /tmp, removed after (Unix socket paths must stay under 108 bytes)."""
    with support.short_dir_context() as path:
        yield path


@pytest.fixture
def log_stream(monkeypatch: pytest.MonkeyPatch):
    """agentd's JSON log for in-process runs, captured; the environment cleaned and structlog's
    configuration restored after."""
    with support.captured_log(monkeypatch) as stream:
        yield stream
