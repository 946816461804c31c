"""Test and demo stand-ins for agentd's two peers, independent of agentd's own code.

* :class:`FakeAgentAPI` -- agentapi (``/messages``, ``/status``, ``/events`` SSE), CONTRACT.md §2.
* :class:`FakeCoderd` -- coderd's log-snapshot endpoint with every CONTRACT.md §1 rule, in order.
* :func:`serve` / :class:`Exchange` -- the small anyio + h11 HTTP/1.1 server both run on, with
  fault injection (hang, abort mid-stream, raw bytes).
* :mod:`agentd.testing.conversations` -- realistic screen-text conversations.
* :mod:`agentd.testing.hostile` -- hostile peers on raw sockets (issue 9), for tests and ``python -m bench hostile``.

Both fakes also run as processes: ``python -m agentd.testing.fake_agentapi --help`` and
``python -m agentd.testing.fake_coderd --help``.
"""

import importlib
from typing import Any

# Names are imported lazily (PEP 562) so that ``python -m agentd.testing.fake_agentapi`` does
# not import its own module twice (runpy warns when the package already imported it).
_EXPORTS = {
    "demo_session": "conversations",
    "final_reply": "conversations",
    "generic_conversation": "conversations",
    "typing_steps": "conversations",
    "utf8_len": "conversations",
    "FakeAgentAPI": "fake_agentapi",
    "Message": "fake_agentapi",
    "format_rfc3339_nano": "fake_agentapi",
    "SNAPSHOT_MAX_BYTES": "fake_coderd",
    "FakeCoderd": "fake_coderd",
    "GoDecodeError": "fake_coderd",
    "RecordedRequest": "fake_coderd",
    "Snapshot": "fake_coderd",
    "decode_agentapi_payload": "fake_coderd",
    "go_parse_uuid": "fake_coderd",
    "parse_rfc3339_strict": "fake_coderd",
    "BodyTooLarge": "http",
    "ConnectionClosed": "http",
    "Exchange": "http",
    "Server": "http",
    "StreamingResponse": "http",
    "serve": "http",
}
_SUBMODULES = {"conversations", "fake_agentapi", "fake_coderd", "http"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)


__all__ = [
    "SNAPSHOT_MAX_BYTES",
    "BodyTooLarge",
    "ConnectionClosed",
    "Exchange",
    "FakeAgentAPI",
    "FakeCoderd",
    "GoDecodeError",
    "Message",
    "RecordedRequest",
    "Server",
    "Snapshot",
    "StreamingResponse",
    "decode_agentapi_payload",
    "demo_session",
    "final_reply",
    "format_rfc3339_nano",
    "generic_conversation",
    "go_parse_uuid",
    "parse_rfc3339_strict",
    "serve",
    "typing_steps",
    "utf8_len",
]
