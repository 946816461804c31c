"""The persisted buffer: atomic, private, per task, and never a reason to crash."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from support import fill, json_lines

from agentd.coderd import UploadOutcome
from agentd.messages import Message
from agentd.settings import ConfigError
from agentd.state import MAX_STATE_BYTES, STATE_FILE, SavedState, StateStore, UnsafeStateDir

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
    assert sorted(p.name for p in store.dir.iterdir()) == [".state.lock", STATE_FILE], "no temp file left behind"


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


def state_events(stream) -> list[tuple[str, str]]:
    return [(d["level"], d["event"]) for d in json_lines(stream.getvalue()) if d.get("component") == "agentd.state"]


def test_unwritable_state_dir_warns_once_and_every_write_tries_again(tmp_path, log_stream):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = StateStore(blocker / "state", TASK)
    assert store.save(saved()) is False
    assert store.enabled is False
    assert store.save(saved()) is False
    assert [lvl for lvl, _ in state_events(log_stream)] == ["warning"], "one warning per run of failures"
    blocker.unlink()  # the obstacle goes: the next write works, and says so
    assert store.save(saved()) is True and store.enabled is True
    assert store.load().messages == saved().messages
    events = state_events(log_stream)
    assert [lvl for lvl, _ in events] == ["warning", "info"] and "again" in events[1][1], events


# -- the state dir is ours alone (issue 9 row 8) ------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_directories_are_created_0700_whatever_the_umask(tmp_path, umask):
    store = StateStore(tmp_path / "a" / "b" / "state", TASK)
    old = os.umask(umask)
    try:
        assert store.save(saved())
    finally:
        os.umask(old)
    for path in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "state"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, (path, oct(os.stat(path).st_mode))
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert store.load().messages == saved().messages


@pytest.mark.parametrize("where", ["state-dir", "parent"])
def test_a_world_writable_state_dir_or_parent_is_refused(tmp_path, where):
    parent = tmp_path / "shared"
    state_dir = parent / "state"
    state_dir.mkdir(parents=True)
    (state_dir if where == "state-dir" else parent).chmod(0o777)
    store = StateStore(state_dir, TASK)
    with pytest.raises(UnsafeStateDir) as caught:
        store.load()
    assert isinstance(caught.value, ConfigError), "exit 78 through the CLI's ConfigError path"
    text = str(caught.value)
    assert "\n" not in text and "AGENTD_STATE_DIR" in text and "every user" in text, text
    assert store.save(saved()) is False, "a write into it is refused too"
    assert not (state_dir / STATE_FILE).exists()


def test_a_world_writable_parent_with_the_sticky_bit_is_fine(tmp_path):
    parent = tmp_path / "tmp-like"
    parent.mkdir()
    parent.chmod(0o1777)
    store = StateStore(parent / "state", TASK)
    assert store.load() == SavedState()
    assert store.save(saved())


@pytest.mark.parametrize(("owner", "mode", "accepted"), [
    ("root", 0o2777, True),  # kubelet's emptyDir with fsGroup: root's, setgid, our group
    ("root", 0o0777, False),  # no fsGroup: not ours in any way
    ("other", 0o2777, False),
])
def test_a_kubernetes_emptydir_with_fsgroup_is_accepted(tmp_path, owner, mode, accepted):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory of root's with our group")
    volume = tmp_path / "emptydir"
    volume.mkdir()
    os.chown(volume, 0 if owner == "root" else 4242, os.getegid())
    volume.chmod(mode)
    store = StateStore(volume, TASK)
    if accepted:
        assert store.load() == SavedState() and store.save(saved())
    else:
        with pytest.raises(UnsafeStateDir):
            store.load()


def test_a_group_writable_dir_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another uid")
    parent = tmp_path / "theirs"
    parent.mkdir()
    os.chown(parent, 4242, 4242)
    parent.chmod(0o775)
    with pytest.raises(UnsafeStateDir, match="uid 4242"):
        StateStore(parent / "state", TASK).load()


def test_planted_temp_names_are_never_opened(tmp_path):
    """Symlinks and FIFOs at every temp name the old code used (and more) are left alone."""
    victim = tmp_path / "victim"
    victim.write_text("the victim's own content")
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    planted = [f".{STATE_FILE}.{pid}.tmp" for pid in (os.getpid(), os.getpid() + 1)]
    for name in planted:
        (state_dir / name).symlink_to(victim)
    os.mkfifo(state_dir / f".{STATE_FILE}.fifo.tmp")
    store = StateStore(state_dir, TASK)
    assert store.save(saved())
    assert victim.read_text() == "the victim's own content"
    assert all((state_dir / name).is_symlink() for name in planted)
    assert stat.S_ISREG(os.lstat(store.path).st_mode)


# -- state.json that is not a small regular file (issue 9 row 9) --------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "symlink-dev-zero", "symlink-to-a-state-file", "oversized"])
def test_state_json_that_is_not_a_small_regular_file_is_moved_aside(tmp_path, log_stream, kind):
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    path = state_dir / STATE_FILE
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "symlink-to-a-state-file":
        elsewhere = tmp_path / "elsewhere"
        StateStore(elsewhere, TASK).save(saved())
        path.symlink_to(elsewhere / STATE_FILE)
    else:
        with open(path, "wb") as f:
            f.truncate(MAX_STATE_BYTES + 1)  # sparse: no disk used
    store = StateStore(state_dir, TASK)
    result: list[SavedState] = []
    reader = threading.Thread(target=lambda: result.append(store.load()), daemon=True)
    reader.start()
    reader.join(20)  # a FIFO would block an open() without O_NONBLOCK forever
    assert not reader.is_alive(), "load() hung"
    assert result == [SavedState()]
    assert not os.path.lexists(path)
    aside = [p for p in state_dir.iterdir() if p.name.startswith(f"{STATE_FILE}.corrupt-")]
    assert len(aside) == 1
    events = state_events(log_stream)
    assert len(events) == 1 and events[0][0] == "warning" and "moved aside" in events[0][1], events
    assert store.save(saved()) and store.load().messages == saved().messages


# -- writes: serialised, and they come back after a full disk (rows 10, 11) --------------------------


def test_concurrent_saves_all_land_and_leave_one_valid_file(tmp_path):
    store = StateStore(tmp_path / "state", TASK)
    states = [SavedState([Message(i, "user", f"state {i} " + "─" * 2000, T)]) for i in range(16)]
    results: list[bool] = []
    barrier = threading.Barrier(len(states))

    def write(state: SavedState) -> None:
        barrier.wait(10)
        for _ in range(5):
            results.append(store.save(state))

    threads = [threading.Thread(target=write, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 80, "no write failed, persistence stays on"
    assert store.enabled
    assert store.load().messages in [s.messages for s in states]
    assert sorted(p.name for p in store.dir.iterdir()) == [".state.lock", STATE_FILE], "no temp file left"


def test_a_second_process_holding_the_lock_delays_the_write_and_then_it_lands(tmp_path):
    import fcntl

    store = StateStore(tmp_path / "state", TASK)
    assert store.save(saved())
    fd = os.open(store.dir / ".state.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done: list[bool] = []
    writer = threading.Thread(target=lambda: done.append(store.save(SavedState([Message(5, "agent", "later", T)]))))
    writer.start()
    writer.join(0.3)
    assert done == [], "the write waits for the lock"
    os.close(fd)  # released
    writer.join(30)
    assert done == [True]
    assert [m.id for m in store.load().messages] == [5]


def _mount_tiny_tmpfs(path: Path) -> str | None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs root and mount(8) for a 64 KiB tmpfs"
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(path)],
                         capture_output=True, text=True, timeout=20)
    if res.returncode != 0:
        return f"cannot mount a tmpfs here: {res.stderr.strip()[:200]}"
    return None




def test_a_full_disk_fails_once_and_the_next_write_after_freeing_space_lands(tmp_path, log_stream):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    problem = _mount_tiny_tmpfs(mnt)
    if problem:
        pytest.skip(problem)
    try:
        store = StateStore(mnt / "state", TASK)
        assert store.save(saved())
        filler = fill(mnt)
        bigger = SavedState([Message(i, "user", f"message {i} " + "x" * 3000, T) for i in range(15)])
        assert store.save(bigger) is False and store.enabled is False
        assert store.save(bigger) is False
        assert [p.name for p in store.dir.iterdir() if p.name.endswith(".tmp")] == [], "no temp file left to fill the disk"
        assert store.load().messages == saved().messages, "the older state is still whole"
        filler.unlink()
        assert store.save(bigger) is True and store.enabled is True
        assert store.load().messages == bigger.messages
        levels = [lvl for lvl, _ in state_events(log_stream)]
        assert levels == ["warning", "info"], levels
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


# -- the local-user attack (row 8), with a real second user ---------------------------------------------


def _make_user() -> str | None:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        return None
    name = f"agd{uuid.uuid4().hex[:8]}"
    res = subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], capture_output=True, timeout=30)
    return name if res.returncode == 0 else None


def test_another_local_user_cannot_make_root_write_through_planted_links(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: the attack is another local user against a root agentd")
    user = _make_user()
    if user is None:
        pytest.skip("useradd is missing or failed")
    try:
        victim = tmp_path / "victim"
        victim.write_text("root's file, not to be touched")
        os.chmod(victim, 0o600)
        before = victim.stat()
        # The attacker's ground: a world-writable, non-sticky parent (umask 000 used to make these).
        shared = Path("/tmp") / f"agentd-shared-{uuid.uuid4().hex[:8]}"
        shared.mkdir()
        shared.chmod(0o777)
        state_dir = shared / "state"
        try:
            # The attacker, as themselves, makes the state dir and plants links at the temp names.
            script = (
                "import os, sys\n"
                "d, victim, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
                "os.mkdir(d); os.chmod(d, 0o777)\n"
                "for p in range(pid - 50, pid + 50):\n"
                "    os.symlink(victim, os.path.join(d, f'.state.json.{p}.tmp'))\n"
                "os.symlink(victim, os.path.join(d, 'state.json'))\n"
            )
            res = subprocess.run(["python3", "-c", script, str(state_dir), str(victim), str(os.getpid())],
                                 user=user, capture_output=True, text=True, timeout=30)
            assert res.returncode == 0, res.stderr
            old = os.umask(0)
            try:
                store = StateStore(state_dir, TASK)
                with pytest.raises(UnsafeStateDir):
                    store.load()
                assert store.save(saved()) is False
            finally:
                os.umask(old)
            # Even a dir the attacker owns but cannot have others write (0755) gets nothing through:
            # writes never open or follow a planted name.
            os.chmod(shared, 0o755)
            subprocess.run(["chmod", "0755", str(state_dir)], user=user, check=True, timeout=30)
            store = StateStore(state_dir, TASK)
            assert store.load() == SavedState(), "the planted state.json symlink is not followed"
            assert store.save(saved())
            assert stat.S_ISREG(os.lstat(store.path).st_mode)
            assert store.load().messages == saved().messages
            assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
        finally:
            shutil.rmtree(shared, ignore_errors=True)
        after = victim.stat()
        assert victim.read_text() == "root's file, not to be touched"
        assert (after.st_mtime_ns, after.st_size, after.st_mode) == (before.st_mtime_ns, before.st_size, before.st_mode)
    finally:
        subprocess.run(["userdel", user], capture_output=True, timeout=30)
