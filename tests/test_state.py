"""The persisted buffer: atomic, private, per task, and never a reason to crash."""

from __future__ import annotations

import json
import os
import stat
import uuid

from agentd.coderd import UploadOutcome
from agentd.messages import Message
from agentd.state import STATE_FILE, SavedState, StateStore

T = "2026-01-01T00:00:00.5Z"
TASK = uuid.uuid4()


def saved():
    outcome = UploadOutcome(True, 204, 1, 123, 2, "", 1_700_000_000.0)
    return SavedState([Message(0, "user", "hi ─ 🎉", T), Message(1, "agent", "tail", T, elided=7)], "ab" * 32, outcome)


def test_round_trip_is_exact_and_private(tmp_path):
    store = StateStore(tmp_path / "state", TASK)
    assert store.save(saved())
    mode = stat.S_IMODE(os.stat(store.path).st_mode)
    assert mode == 0o600
    loaded = store.load()
    assert loaded.messages == saved().messages and loaded.acked == "ab" * 32 and loaded.last_upload == saved().last_upload
    assert [p.name for p in store.dir.iterdir()] == [STATE_FILE], "no temp file left behind"


def test_missing_file_is_an_empty_start(tmp_path):
    assert StateStore(tmp_path, TASK).load() == SavedState()


def test_corrupt_file_is_moved_aside(tmp_path):
    (tmp_path / STATE_FILE).write_text('{"version": 1, "task_id": "x", "messages": [')
    store = StateStore(tmp_path, TASK)
    assert store.load() == SavedState()
    assert not (tmp_path / STATE_FILE).exists()
    assert any(p.name.startswith(f"{STATE_FILE}.corrupt-") for p in tmp_path.iterdir())
    assert store.save(saved()), "a fresh file can be written after a corrupt one"


def test_invalid_message_in_file_counts_as_corrupt(tmp_path):
    data = {"version": 1, "task_id": str(TASK), "messages": [{"id": 0, "role": "system", "content": "", "time": T}]}
    (tmp_path / STATE_FILE).write_text(json.dumps(data))
    assert StateStore(tmp_path, TASK).load().messages == []


def test_another_tasks_state_is_ignored(tmp_path):
    StateStore(tmp_path, uuid.uuid4()).save(saved())
    assert StateStore(tmp_path, TASK).load() == SavedState()
    assert (tmp_path / STATE_FILE).exists(), "left in place, not destroyed"


def test_unwritable_state_dir_degrades_to_memory_only(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = StateStore(blocker / "state", TASK)
    assert store.save(saved()) is False
    assert store.enabled is False
    assert store.save(saved()) is False, "no retry storm: memory-only from then on"
