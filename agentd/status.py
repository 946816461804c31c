"""The daemon's status views, built from its parts: what ``agentd status`` gets over the control
socket, and the one line systemd shows (``STATUS=``).

The view also holds what would be sent now (``snapshot``): per message its id, role, bytes in
the body, where the cut is, and its first and last lines, so ``agentd status --body`` can show
the snapshot without storing it. Times are ISO 8601 UTC strings (``2026-12-01T07:00:00Z``),
sizes bytes of the encoded body.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any

from agentd.outcome import as_json as upload_view  # the one JSON shape of an upload outcome
from agentd.outcome import iso
from agentd.snapshot import TRUNCATION_MARKER, Snapshot, build_snapshot

if TYPE_CHECKING:
    from agentd.agentapi import AgentAPITail
    from agentd.buffer import RingBuffer
    from agentd.outcome import UploadOutcome
    from agentd.settings import Settings

#: Characters of a message's first and last line shown in the view.
LINE_CHARS = 120

_MARKER = re.compile(re.escape(TRUNCATION_MARKER).replace(re.escape("{n}"), r"(\d+)"))


def _edge_lines(text: str) -> tuple[str, str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "", ""
    return lines[0][:LINE_CHARS], lines[-1][:LINE_CHARS]


def snapshot_view(snapshot: Snapshot | None, held_ids: list[int], max_bytes: int) -> dict[str, Any]:
    """What would be sent now: ``messages`` (id, role, bytes, cut characters, first and last
    line), the body's ``bytes`` against ``max_bytes``, and ``left_out``: ids held, not sent."""
    if snapshot is None:
        return {"bytes": 0, "max_bytes": max_bytes, "messages": [], "cut_id": None, "left_out": held_ids}
    items = json.loads(snapshot.body)["messages"]
    messages = []
    for item in items:
        content = item["content"]
        marker = _MARKER.match(content)
        first, last = _edge_lines(content[marker.end() :] if marker else content)
        messages.append({
            "id": item["id"],
            "role": item["role"],
            "bytes": len(json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode()),
            "cut": int(marker.group(1)) if marker else 0,
            "first_line": first,
            "last_line": last,
        })
    sent = set(snapshot.message_ids)
    return {
        "bytes": snapshot.size,
        "max_bytes": max_bytes,
        "messages": messages,
        "cut_id": snapshot.truncated_id,
        "left_out": [i for i in held_ids if i not in sent],
    }


def view(
    settings: Settings,
    buffer: RingBuffer,
    tail: AgentAPITail,
    last_upload: UploadOutcome | None,
    *,
    started: float,
    persisted: bool,
    probe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``agentd status --json`` prints: messages held and to send, the source, the last
    upload, the start-up probe's verdicts (``probe``; None when it is off), and the snapshot as
    it would be sent now."""
    held = buffer.messages()
    snapshot = build_snapshot(held, settings.max_bytes)
    return {
        "messages": len(held),
        "to_send": len(snapshot.message_ids) if snapshot else 0,
        "bytes": snapshot.size if snapshot else 0,
        "newest_id": buffer.newest_id,
        "agent_status": tail.agent_status,
        # ``problem``: what keeps the tail from following the conversation, in one line naming
        # the fix (agentapi's Host allow-list, a URL serving neither endpoint), else None.
        "source": {
            "state": tail.state, "since": iso(tail.state_since), "url": settings.agentapi_url, "problem": tail.problem,
        },
        "last_upload": upload_view(last_upload),
        "task_id": str(settings.task_id),
        "pid": os.getpid(),
        "started": iso(started),
        "persisted": persisted,
        "probe": probe,
        "snapshot": snapshot_view(snapshot, [m.id for m in held], settings.max_bytes),
    }


def line(source_state: str, held: int, last_upload: UploadOutcome | None, coderd: str | None = None) -> str:
    """systemd's ``STATUS=`` line: ``agentapi connected; 10 messages; last upload stored``, and
    the start-up probe's few words on coderd (``coderd ready``) when there are some."""
    last = "none" if last_upload is None else ("stored" if last_upload.stored else "failed")
    text = f"agentapi {source_state}; {held} messages; last upload {last}"
    return f"{text}; {coderd}" if coderd else text
