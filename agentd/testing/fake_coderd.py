"""FakeCoderd: an in-process stand-in for coderd's task log-snapshot endpoint (CONTRACT.md §1).

Route::

    POST /api/v2/workspaceagents/me/tasks/{task}/log-snapshot?format=agentapi
    Coder-Session-Token: <agent token>

The checks run in the order coderd runs them (CONTRACT.md §1, coderd's
``postWorkspaceAgentTaskLogSnapshot``); the first failure answers:

1. agent token (``Coder-Session-Token`` header) missing, wrong, or no longer valid -> 401. The
   token stops working once the workspace's stop build has completed (coder/coder PR 21538:
   :meth:`FakeCoderd.complete_stop_build`) and when the task, and its workspace with it, is
   deleted (:meth:`FakeCoderd.delete_task`)
2. ``{task}`` is not a UUID (Go ``uuid.Parse``) -> 400 "Invalid task ID format."
3. query lacks a non-empty ``format`` or has any other parameter -> 400
   "Invalid query parameters." (``validations`` name the fields)
4. ``format != "agentapi"`` -> 400 "Invalid format parameter."
5. the task lookup: the database fails (``fail_store=True``) -> 500 "Internal error fetching
   task.", before the body is read; task unknown / deleted / of another workspace (not in
   ``tasks``) -> 404 "Resource not found."
6. the body is read through Go's ``http.MaxBytesReader`` capped at 65 536 bytes and decoded by
   ``json.NewDecoder(...).Decode`` -> 400 "Failed to decode request payload." with detail
   "http: request body too large" when the JSON value does not end within the first 65 536
   bytes of a longer body; with another detail for any other decoding failure
7. ``messages`` missing or null (``[]`` is fine) -> 400 "Invalid agentapi payload structure."
8. the upsert: the payload is re-encoded as ``{"format": "agentapi", "data": {"messages":
   [...]}}`` into a PostgreSQL ``jsonb`` column, which rejects U+0000: a message holding it
   -> 500 "Internal error storing snapshot."
9. success: the snapshot is upserted for the task, stamped with this server's clock -> 204, no
   body.

Error bodies are ``{"message": str, "detail": str, "validations": [{"field", "detail"}]}``
with an empty ``detail`` or ``validations`` left out, as coderd's ``httpapi.Write`` does.

Decoding is as strict as Go's ``encoding/json`` into agentapi's ``GetMessagesResponse``, and a
little stricter where noted:

* the body must be valid UTF-8 (stricter: Go replaces bad bytes inside strings with U+FFFD);
* the first JSON value decides; bytes after it are ignored (Go's Decoder reads one value);
* top level must be an object or ``null`` (``null`` -> "Invalid agentapi payload structure.");
* keys match fields case-insensitively (Go), last duplicate wins; unknown keys are ignored;
* ``messages``: array or null; each element an object or null;
* ``id``: a JSON integer within int64 (``1.0``, ``1e2``, ``"1"``, ``true`` fail); null keeps 0;
* ``content``/``role``: strings (or null); roles are NOT checked here -- like coderd;
* ``time``: a JSON string holding strict RFC 3339 (Go ``time.Time.UnmarshalJSON``), or null.

Read-back: ``GET /api/v2/tasks/{user}/{task}/logs`` serves the stored snapshot only while the
task is ``paused``, ``pending`` or ``initializing`` (``task_status``; a task starts ``active``
and is paused when the stop build completes): 200 ``{"logs": [{"id", "content", "type":
"input"|"output", "time"}], "snapshot": true, "snapshot_at"}`` (no ``count``), or **500**
"Invalid snapshot data." when any stored role is not ``user``/``agent`` -- a bad role stored by
a client poisons the read-back (CONTRACT.md §1). While the task is active coderd reads the log
live from agentapi, which this stand-in does not: **409**. No token is checked on this route.

Fault injection: ``script`` (planned answers, one consumed per request before normal
handling), ``hang`` (read the request, never answer), ``max_rps`` (over R requests within one
second -> 503 with ``Retry-After``), ``feature=False`` (every route 404: a Coder without the
feature), ``fail_store`` (the database fails: 500 on the task lookup).

Coder's own refusals: ``no_route=True`` (every Tasks route unregistered, as coderd v2.36/v2.37
without ``CODER_ENABLE_AI_TASKS=true`` and later releases: the agent token is still checked,
401, then 404 ``{"message":"Route not found."}``); ``rate_limit=N`` (coderd's API rate limiter,
go-chi/httprate keyed by client address: over N requests in ``rate_window`` seconds, a sliding
window weighing the previous one, -> 429 ``{"message":"You've been rate limited for sending
more than N requests in 1m0s."}`` with ``Retry-After`` = the window in seconds and the
``X-Ratelimit-Limit``/``-Remaining``/``-Reset`` headers; coderd's default is 512 a minute).
``GET /api/v2/buildinfo`` answers ``{"version": version, ...}`` without a token, as coderd does.

Process mode::

    python -m agentd.testing.fake_coderd --port P --token-file F --task UUID [--task UUID ...]
        [--script 503,502,503:1,hang,close] [--hang] [--store-file F] [--request-log F]
        [--max-rps R] [--no-feature] [--no-route] [--rate-limit N [--rate-window S]]
        [--coder-version V] [--pid-file F]

prints ``coderd listening on http://127.0.0.1:P`` once listening; writes every stored snapshot to
``--store-file`` (JSON, rewritten atomically on each upsert) and one JSON line per answered
request to ``--request-log``. SIGTERM/SIGINT exit 0.
"""

from __future__ import annotations

import argparse
import codecs
import json
import json.decoder
import json.scanner
import math
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio

from .http import BodyTooLarge, Exchange, Served, Server, serve

__all__ = [
    "SNAPSHOT_MAX_BYTES",
    "FakeCoderd",
    "GoDecodeError",
    "RecordedRequest",
    "Snapshot",
    "decode_agentapi_payload",
    "go_parse_uuid",
    "main",
    "parse_rfc3339_strict",
]

#: coderd's ``taskSnapshotMaxSize``: the raw request body cap, bytes.
SNAPSHOT_MAX_BYTES = 64 * 1024

SIGNED_OUT_MESSAGE = "You are signed out or your session has expired. Please sign in again to continue."

_SNAPSHOT_RE = re.compile(r"^/api/v2/workspaceagents/me/tasks/([^/]*)/log-snapshot$")
_READBACK_RE = re.compile(r"^/api/v2/tasks/([^/]+)/([^/]+)/logs$")
_BUILDINFO_PATH = "/api/v2/buildinfo"
_REDACTED_HEADERS = {"coder-session-token", "authorization", "cookie", "proxy-authorization"}

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


# ---------------------------------------------------------------------------------------------
# Go-compatible parsing helpers


class GoDecodeError(ValueError):
    """The body does not decode the way coderd's Go decoder would accept."""


def go_parse_uuid(s: str) -> str:
    """Parse like Go's ``github.com/google/uuid.Parse``; return the canonical lower-case form.

    Accepted: ``xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` (36), ``urn:uuid:`` + 36 (45),
    any 1 char + 36 + any 1 char (38, meant for ``{...}``: Go does not check the braces), and
    32 hex digits. Raises ValueError with Go's message otherwise.
    """
    n = len(s)
    if n == 36 + 9:
        if s[:9].lower() != "urn:uuid:":
            raise ValueError(f"invalid urn prefix: {s[:9]!r}")
        s = s[9:]
    elif n == 36 + 2:
        s = s[1:37]
    elif n == 32:
        if not re.fullmatch(r"[0-9a-fA-F]{32}", s):
            raise ValueError("invalid UUID format")
        h = s.lower()
        return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
    elif n != 36:
        raise ValueError(f"invalid UUID length: {n}")
    if s[8] != "-" or s[13] != "-" or s[18] != "-" or s[23] != "-":
        raise ValueError("invalid UUID format")
    h = s[0:8] + s[9:13] + s[14:18] + s[19:23] + s[24:36]
    if not re.fullmatch(r"[0-9a-fA-F]{32}", h):
        raise ValueError("invalid UUID format")
    h = h.lower()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _go_query_unescape(s: str) -> str:
    if _BAD_ESCAPE.search(s):
        raise ValueError("invalid URL escape")
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(s.replace("+", " ")).decode("utf-8", "surrogateescape")


def go_parse_query(raw: str) -> dict[str, list[str]]:
    """Parse a query string like Go's ``url.ParseQuery`` as used by ``r.URL.Query()``.

    Pairs split on ``&``; a key containing ``;`` or a bad %-escape is dropped silently (Go's
    ``Query()`` ignores the error); ``+`` means space; a key without ``=`` has value "".
    """
    out: dict[str, list[str]] = {}
    for part in raw.split("&"):
        if ";" in part:
            continue
        if part == "":
            continue
        key, _, value = part.partition("=")
        try:
            key = _go_query_unescape(key)
            value = _go_query_unescape(value)
        except ValueError:
            continue
        out.setdefault(key, []).append(value)
    return out


def _is_digits(s: str) -> bool:
    return len(s) > 0 and all("0" <= c <= "9" for c in s)


def _days_in(month: int, year: int) -> int:
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31


@dataclass(frozen=True)
class GoTime:
    """A parsed RFC 3339 time: UTC nanoseconds since 0001-01-01 are not needed; we keep the
    fields and the zone offset (seconds) and can render Go's ``RFC3339Nano`` marshal form."""

    year: int
    month: int
    day: int
    hour: int
    minute: int
    second: int
    nanosecond: int
    offset: int  # seconds east of UTC

    def marshal(self) -> str:
        """Go's ``time.Time.MarshalJSON`` text (RFC3339Nano, trailing zeros trimmed)."""
        out = f"{self.year:04d}-{self.month:02d}-{self.day:02d}T{self.hour:02d}:{self.minute:02d}:{self.second:02d}"
        if self.nanosecond:
            out += "." + f"{self.nanosecond:09d}".rstrip("0")
        if self.offset == 0:
            return out + "Z"
        sign = "+" if self.offset > 0 else "-"
        hh, mm = divmod(abs(self.offset) // 60, 60)
        return f"{out}{sign}{hh:02d}:{mm:02d}"


ZERO_TIME = GoTime(1, 1, 1, 0, 0, 0, 0, 0)


def parse_rfc3339_strict(s: str) -> GoTime:
    """Parse ``s`` as Go's ``time.Time.UnmarshalJSON`` does (Go >= 1.20, strict RFC 3339).

    ``YYYY-MM-DDTHH:MM:SS[.frac|,frac]Z`` or ``...±hh:mm``: upper-case ``T`` and ``Z``,
    two-digit fields in range (day checked against the month, seconds 0-59), at least one
    fractional digit after the separator (more than 9 are accepted and truncated), zone hour
    < 24 and minute < 60. Raises ValueError otherwise.
    """
    def bad(why: str) -> ValueError:
        return ValueError(f"parsing time {json.dumps(s)} as RFC 3339: {why}")

    if len(s) < 19:
        raise bad("too short")
    fields = (s[0:4], s[5:7], s[8:10], s[11:13], s[14:16], s[17:19])
    if not all(_is_digits(f) for f in fields):
        raise bad("bad digits")
    if not (s[4] == "-" and s[7] == "-" and s[10] == "T" and s[13] == ":" and s[16] == ":"):
        raise bad("bad separators")
    year, month, day, hour, minute, second = (int(f) for f in fields)
    if not 1 <= month <= 12:
        raise bad("month out of range")
    if not 1 <= day <= _days_in(month, year):
        raise bad("day out of range")
    if hour > 23:
        raise bad("hour out of range")
    if minute > 59:
        raise bad("minute out of range")
    if second > 59:
        raise bad("second out of range")
    rest = s[19:]
    nanos = 0
    if rest[:1] in (".", ","):
        n = 1
        while n < len(rest) and "0" <= rest[n] <= "9":
            n += 1
        digits = rest[1:n]
        if not digits:
            raise bad("fractional second needs digits")
        nanos = int((digits + "000000000")[:9])
        rest = rest[n:]
    if rest == "Z":
        offset = 0
    elif len(rest) == 6 and rest[0] in "+-" and rest[3] == ":" and _is_digits(rest[1:3]) and _is_digits(rest[4:6]):
        oh, om = int(rest[1:3]), int(rest[4:6])
        if oh > 23 or om > 59:
            raise bad("time zone offset out of range")
        offset = (oh * 3600 + om * 60) * (1 if rest[0] == "+" else -1)
    else:
        raise bad("bad time zone")
    return GoTime(year, month, day, hour, minute, second, nanos, offset)


# -- JSON: find the end of the first value (Go's Decoder.readValue) -------------------------------

class _Truncated(Exception):
    """The data ended before the JSON value did."""


class _Syntax(Exception):
    """A JSON syntax error."""


_WS = b" \t\r\n"


def _skip_ws(b: bytes, i: int) -> int:
    n = len(b)
    while i < n and b[i] in _WS:
        i += 1
    return i


def _scan_string(b: bytes, i: int) -> int:
    """``b[i]`` is the opening quote; return the index after the closing quote."""
    n = len(b)
    i += 1
    while True:
        if i >= n:
            raise _Truncated()
        c = b[i]
        if c == 0x22:  # "
            return i + 1
        if c == 0x5C:  # backslash
            if i + 1 >= n:
                raise _Truncated()
            e = b[i + 1]
            if e in b'"\\/bfnrt':
                i += 2
                continue
            if e == 0x75:  # u
                for k in range(4):
                    if i + 2 + k >= n:
                        raise _Truncated()
                    if b[i + 2 + k] not in b"0123456789abcdefABCDEF":
                        raise _Syntax(f"invalid character in \\u escape at offset {i + 2 + k}")
                i += 6
                continue
            raise _Syntax(f"invalid escape at offset {i + 1}")
        if c < 0x20:
            raise _Syntax(f"invalid control character in string literal at offset {i}")
        i += 1


def _scan_number(b: bytes, i: int, top: bool, at_eof: bool) -> int:
    n = len(b)

    def need(j: int) -> int:
        if j >= n:
            raise _Truncated()
        return b[j]

    def digit(c: int) -> bool:
        return 0x30 <= c <= 0x39

    j = i
    if b[j] == 0x2D:  # -
        j += 1
        if not digit(need(j)):
            raise _Syntax(f"invalid character in numeric literal at offset {j}")
    if b[j] == 0x30:
        j += 1
    else:
        while j < n and digit(b[j]):
            j += 1
    if j < n and b[j] == 0x2E:  # .
        j += 1
        if not digit(need(j)):
            raise _Syntax(f"invalid character after decimal point at offset {j}")
        while j < n and digit(b[j]):
            j += 1
    if j < n and b[j] in b"eE":
        j += 1
        if need(j) in b"+-":
            j += 1
        if not digit(need(j)):
            raise _Syntax(f"invalid character in exponent at offset {j}")
        while j < n and digit(b[j]):
            j += 1
    if j >= n and top and not at_eof:
        raise _Truncated()  # Go needs one more byte to know a top-level number ended
    return j


def _scan_literal(b: bytes, i: int, top: bool, at_eof: bool) -> int:
    for word in (b"true", b"false", b"null"):
        if b[i] == word[0]:
            for k, ch in enumerate(word):
                if i + k >= len(b):
                    raise _Truncated()
                if b[i + k] != ch:
                    raise _Syntax(f"invalid character in literal at offset {i + k}")
            j = i + len(word)
            if j >= len(b) and top and not at_eof:
                raise _Truncated()
            return j
    raise _Syntax(f"invalid character looking for beginning of value at offset {i}")


def _scan_value_end(b: bytes, i: int, at_eof: bool) -> int:
    """Index just past the JSON value starting at ``b[i]`` (no leading whitespace).

    Raises _Truncated if ``b`` ends first, _Syntax on a syntax error. Iterative, so deep
    nesting does not hit Python's recursion limit.
    """
    n = len(b)
    stack: list[int] = []
    VALUE, KEY, AFTER = 0, 1, 2
    state = VALUE
    while True:
        if state == VALUE:
            if i >= n:
                raise _Truncated()
            c = b[i]
            if c == 0x7B:  # {
                stack.append(c)
                i = _skip_ws(b, i + 1)
                if i >= n:
                    raise _Truncated()
                if b[i] == 0x7D:
                    stack.pop()
                    i += 1
                    state = AFTER
                else:
                    state = KEY
                continue
            if c == 0x5B:  # [
                stack.append(c)
                i = _skip_ws(b, i + 1)
                if i >= n:
                    raise _Truncated()
                if b[i] == 0x5D:
                    stack.pop()
                    i += 1
                    state = AFTER
                else:
                    state = VALUE
                continue
            if c == 0x22:
                i = _scan_string(b, i)
            elif c == 0x2D or 0x30 <= c <= 0x39:
                i = _scan_number(b, i, not stack, at_eof)
            else:
                i = _scan_literal(b, i, not stack, at_eof)
            state = AFTER
            continue
        if state == KEY:
            if i >= n:
                raise _Truncated()
            if b[i] != 0x22:
                raise _Syntax(f"invalid character looking for beginning of object key string at offset {i}")
            i = _skip_ws(b, _scan_string(b, i))
            if i >= n:
                raise _Truncated()
            if b[i] != 0x3A:  # :
                raise _Syntax(f"invalid character after object key at offset {i}")
            i = _skip_ws(b, i + 1)
            state = VALUE
            continue
        # AFTER a value
        if not stack:
            return i
        i = _skip_ws(b, i)
        if i >= n:
            raise _Truncated()
        c = b[i]
        if c == 0x2C:  # ,
            i = _skip_ws(b, i + 1)
            state = KEY if stack[-1] == 0x7B else VALUE
        elif (c == 0x7D and stack[-1] == 0x7B) or (c == 0x5D and stack[-1] == 0x5B):
            stack.pop()
            i += 1
        else:
            where = "object key:value pair" if stack[-1] == 0x7B else "array element"
            raise _Syntax(f"invalid character after {where} at offset {i}")


# -- JSON: Go struct semantics ---------------------------------------------------------------------

class _Obj(list):  # type: ignore[type-arg]
    """A JSON object as an ordered list of (key, value) pairs (duplicates kept)."""


class _Float(str):
    """A JSON number with a fraction or exponent (raw text)."""


class _BigInt(str):
    """A JSON integer too long to convert safely (raw text)."""


class _RawStr(str):
    """A JSON string value that also remembers its raw source text between the quotes."""

    raw: str


def _parse_int(s: str) -> int | _BigInt:
    return _BigInt(s) if len(s) > 40 else int(s)


def _parse_string(s: str, end: int, strict: bool = True) -> tuple[_RawStr, int]:
    value, new_end = json.decoder.scanstring(s, end, strict)  # type: ignore[attr-defined]
    out = _RawStr(value)
    out.raw = s[end : new_end - 1]
    return out, new_end


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid literal {name}")


class _GoishDecoder(json.JSONDecoder):
    def __init__(self) -> None:
        super().__init__(
            object_pairs_hook=_Obj,
            parse_float=_Float,
            parse_int=_parse_int,
            parse_constant=_reject_constant,
            strict=True,
        )
        self.parse_string = _parse_string
        self.scan_once = json.scanner.py_make_scanner(self)  # type: ignore[attr-defined]


def _fold(key: str) -> str:
    """Go's case-insensitive field matching for our ASCII field names (incl. ſ->s, K->k)."""
    return "".join("s" if ch == "ſ" else "k" if ch == "\u212a" else ch.lower() if ch.isascii() else ch for ch in key)


def _go_type(v: Any) -> str:
    if isinstance(v, _Obj):
        return "object"
    if isinstance(v, list):
        return "array"
    if isinstance(v, str) and not isinstance(v, (_Float, _BigInt)):
        return "string"
    if isinstance(v, bool):
        return "bool"
    return "number"


def _decode_message(v: Any, base: dict[str, Any], index: int) -> dict[str, Any]:
    if v is None:
        return dict(base)
    if not isinstance(v, _Obj):
        raise GoDecodeError(
            f"json: cannot unmarshal {_go_type(v)} into Go struct field GetMessagesResponse.messages of type agentapisdk.Message"
        )
    msg = dict(base)
    for key, val in v:
        name = _fold(key)
        where = f"GetMessagesResponse.messages.{name}"
        if name == "id":
            if val is None:
                continue
            if isinstance(val, bool) or not isinstance(val, (int, _Float, _BigInt)) or isinstance(val, _RawStr):
                raise GoDecodeError(f"json: cannot unmarshal {_go_type(val)} into Go struct field {where} of type int64")
            if isinstance(val, (_Float, _BigInt)) or not INT64_MIN <= val <= INT64_MAX:
                raise GoDecodeError(f"json: cannot unmarshal number {val} into Go struct field {where} of type int64")
            msg["id"] = int(val)
        elif name in ("content", "role"):
            if val is None:
                continue
            if not isinstance(val, _RawStr):
                kind = "agentapisdk.ConversationRole" if name == "role" else "string"
                raise GoDecodeError(f"json: cannot unmarshal {_go_type(val)} into Go struct field {where} of type {kind}")
            msg[name] = str(val)
        elif name == "time":
            if val is None:
                continue
            if not isinstance(val, _RawStr):
                raise GoDecodeError("Time.UnmarshalJSON: input is not a JSON string")
            try:
                msg["time"] = parse_rfc3339_strict(val.raw).marshal()
            except ValueError as exc:
                raise GoDecodeError(str(exc)) from exc
        # unknown keys are ignored, like Go
    return msg


_ZERO_MESSAGE: dict[str, Any] = {"id": 0, "content": "", "role": "", "time": ZERO_TIME.marshal()}


def decode_agentapi_payload(data: bytes, at_eof: bool = True) -> list[dict[str, Any]] | None:
    """Decode a log-snapshot body the way coderd does; return its messages or None.

    ``data`` is what the server could read: the whole body if ``at_eof``, else the first
    65 536 bytes of a longer body. Returns the list of messages normalised as Go would
    re-marshal them (``{"id": int, "content": str, "role": str, "time": RFC3339Nano str}``;
    missing fields take Go's zero values), or None when ``messages`` is missing or null.
    Raises GoDecodeError (message = Go-like detail) when decoding fails; when the value does
    not end inside ``data`` and not ``at_eof`` the detail is "http: request body too large".
    """
    start = _skip_ws(data, 0)
    if start >= len(data):
        raise GoDecodeError("EOF" if at_eof else "http: request body too large")
    try:
        end = _scan_value_end(data, start, at_eof)
    except _Truncated:
        raise GoDecodeError("unexpected EOF" if at_eof else "http: request body too large") from None
    except _Syntax as exc:
        raise GoDecodeError(str(exc)) from None
    try:
        text = codecs.decode(data[start:end], "utf-8", "strict")
    except UnicodeDecodeError as exc:
        raise GoDecodeError(f"invalid UTF-8 in request body at offset {start + exc.start}") from None
    try:
        value = _GoishDecoder().decode(text)
    except (ValueError, RecursionError) as exc:
        raise GoDecodeError(f"invalid JSON: {exc}") from None
    if value is None:
        return None
    if not isinstance(value, _Obj):
        raise GoDecodeError(f"json: cannot unmarshal {_go_type(value)} into Go value of type agentapisdk.GetMessagesResponse")
    messages: list[dict[str, Any]] | None = None
    backing: list[dict[str, Any]] = []
    for key, val in value:
        if _fold(key) != "messages":
            continue
        if val is None:
            messages = None
            continue
        if not isinstance(val, list) or isinstance(val, _Obj):
            raise GoDecodeError(
                f"json: cannot unmarshal {_go_type(val)} into Go struct field GetMessagesResponse.messages of type []agentapisdk.Message"
            )
        if not val:
            backing = []
            messages = []
            continue
        # Go decodes into the existing slice elements (a duplicate key reuses them).
        for i, item in enumerate(val):
            base = backing[i] if i < len(backing) else _ZERO_MESSAGE
            decoded = _decode_message(item, base, i)
            if i < len(backing):
                backing[i] = decoded
            else:
                backing.append(decoded)
        messages = [dict(m) for m in backing[: len(val)]]
    return messages


# ---------------------------------------------------------------------------------------------
# the fake server


@dataclass
class Snapshot:
    """One stored snapshot: ``log_snapshot`` (what coderd's ``task_snapshots.log_snapshot``
    jsonb column holds: ``{"format": "agentapi", "data": {"messages": [...]}}``), ``body`` (the
    raw request body bytes read), ``snapshot_at`` (float, this server's ``time.time()`` when
    stored, seconds)."""

    log_snapshot: dict[str, Any]
    body: bytes
    snapshot_at: float

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The stored messages (``{"id","content","role","time"}`` dicts as coderd re-marshals them)."""
        messages: list[dict[str, Any]] = self.log_snapshot["data"]["messages"]
        return messages

    @property
    def snapshot_at_rfc3339(self) -> str:
        """``snapshot_at`` as RFC 3339 UTC with microseconds."""
        return datetime.fromtimestamp(self.snapshot_at, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class RecordedRequest:
    """One request as received: ``method``, ``path`` (raw), ``query`` (raw, no "?"),
    ``headers`` (dict, lower-case names; credentials replaced by "<redacted>"), ``body``
    (bytes read; at most 65 537 on the snapshot route), ``time`` (``time.time()``, s) and
    ``monotonic`` (``time.monotonic()``, s) on arrival, ``status`` (int answered; None if
    never answered), ``message`` (the error body's "message", if any), ``task`` (the path's
    task segment or None), ``auth`` ("ok" | "missing" | "invalid" | None if not checked)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    time: float
    monotonic: float
    body: bytes = b""
    status: int | None = None
    message: str | None = None
    task: str | None = None
    auth: str | None = None

    def as_json(self) -> dict[str, Any]:
        """JSON-friendly form (body as its length in bytes plus a UTF-8 preview)."""
        return {
            "method": self.method, "path": self.path, "query": self.query, "headers": self.headers,
            "time": self.time, "monotonic": self.monotonic, "body_bytes": len(self.body),
            "status": self.status, "message": self.message, "task": self.task, "auth": self.auth,
        }


ScriptEntry = Any  # int | (status, headers) | (status, headers, body) | "hang" | "close" | "reset" | None


@dataclass
class FakeCoderd(Served):
    """In-process coderd stand-in for the log-snapshot route (see the module docstring).

    Constructor: ``token`` (str, the agent token expected in ``Coder-Session-Token``),
    ``tasks`` (task UUIDs of this agent's workspace; others answer 404), ``feature`` (False ->
    every route 404, an old Coder), ``script`` (list of planned answers, consumed one per
    request except read-backs, before normal handling: ``503`` | ``(503, {"Retry-After":
    "1"})`` | ``(status, headers, body)`` with body bytes/str/JSON-able | ``"hang"`` (read the
    request, never answer) | ``"close"`` (read it, close without answer) | ``"reset"`` (read
    it, TCP RST) | ``None`` (handle normally)), ``hang`` (every request hangs),
    ``max_rps`` (admit at most R requests per sliding second, then 503 + Retry-After),
    ``fail_store`` (the database fails: 500 "Internal error fetching task." before the body is
    read), ``token_valid`` (False: the agent token no longer works, 401), ``task_status``
    (``dict[task_id, status]``, "active" unless set; read-back serves the snapshot only while
    paused, pending or initializing), ``on_store(task, snapshot)`` and ``on_request(recorded)``
    callbacks.

    Read-back for assertions: ``stored`` (``dict[task_id, Snapshot]``, task ids canonical
    lower-case), ``requests`` (list of :class:`RecordedRequest`, in arrival order),
    ``upserts`` (``Counter``-like dict of successful stores per task).
    """

    token: str = "agent-token"
    tasks: set[str] = field(default_factory=set)
    feature: bool = True
    script: list[ScriptEntry] = field(default_factory=list)
    hang: bool = False
    max_rps: float | None = None
    fail_store: bool = False
    no_route: bool = False
    rate_limit: int | None = None
    rate_window: float = 60.0
    version: str = "v2.30.0+fake"
    token_valid: bool = True
    task_status: dict[str, str] = field(default_factory=dict)
    on_store: Callable[[str, Snapshot], None] | None = None
    on_request: Callable[[RecordedRequest], None] | None = None
    stored: dict[str, Snapshot] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    upserts: dict[str, int] = field(default_factory=dict)
    server: Server | None = field(default=None, repr=False)
    _window: deque[float] = field(default_factory=deque, repr=False)
    _rate_counts: dict[float, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.tasks = {go_parse_uuid(str(t)) for t in self.tasks}
        self.script = list(self.script)

    # -- conveniences --------------------------------------------------------------------------

    def add_task(self, task: str) -> str:
        """Register a task of this workspace; returns its canonical id."""
        canon = go_parse_uuid(str(task))
        self.tasks.add(canon)
        return canon

    def delete_task(self, task: str) -> None:
        """Delete a task and, with it, its workspace: the task is gone (404 "Resource not
        found." to any other agent) and this workspace's agent token no longer works (401)."""
        canon = go_parse_uuid(str(task))
        self.tasks.discard(canon)
        self.task_status.pop(canon, None)
        self.token_valid = False

    def complete_stop_build(self) -> None:
        """The workspace's stop build has completed: the agent token no longer works (401 from
        now on, coder/coder PR 21538) and every task of the workspace is paused (its snapshot
        is what read-back serves)."""
        self.token_valid = False
        for task in self.tasks:
            self.task_status[task] = "paused"

    def set_task_status(self, task: str, status: str) -> None:
        """Set a task's status (``active``, ``paused``, ``pending``, ``initializing``, ``error``...)."""
        self.task_status[go_parse_uuid(str(task))] = status

    def snapshot_url(self, task: str, query: str = "format=agentapi") -> str:
        """Full URL of the log-snapshot route for ``task``."""
        return f"{self.url}/api/v2/workspaceagents/me/tasks/{task}/log-snapshot" + (f"?{query}" if query else "")

    def answered(self, status: int | None = None) -> list[RecordedRequest]:
        """Recorded requests that were answered (with ``status``, if given)."""
        return [r for r in self.requests if r.status is not None and (status is None or r.status == status)]

    async def wait_stored(self, task: str, timeout: float = 30.0) -> Snapshot:
        """Wait until a snapshot for ``task`` is stored; return it."""
        canon = go_parse_uuid(str(task))
        await self.wait_for(lambda: canon in self.stored, timeout)
        return self.stored[canon]

    @asynccontextmanager
    async def serve(self, port: int = 0, host: str = "127.0.0.1", ssl_context: Any = None) -> AsyncIterator[FakeCoderd]:
        """Serve on ``host``:``port`` (0 = any free port), HTTPS with ``ssl_context``.
        Yields ``self`` (``coderd.url``, ``coderd.port``)."""
        async with serve(self.handle, host=host, port=port, ssl_context=ssl_context) as server:
            self.server = server
            try:
                yield self
            finally:
                self.server = None

    # -- HTTP --------------------------------------------------------------------------------------

    async def handle(self, ex: Exchange) -> None:
        """The HTTP handler (usable with :func:`agentd.testing.http.serve` directly)."""
        headers: dict[str, str] = {}
        for name, value in ex.headers:
            headers[name] = "<redacted>" if name in _REDACTED_HEADERS else value
        rec = RecordedRequest(
            method=ex.method, path=ex.path, query=ex.query, headers=headers,
            time=time.time(), monotonic=time.monotonic(),
        )
        self.requests.append(rec)
        try:
            await self._route(ex, rec)
        finally:
            if rec.status is not None and self.on_request is not None:
                self.on_request(rec)

    async def _answer(self, ex: Exchange, rec: RecordedRequest, status: int, message: str | None = None,
                      detail: str = "", validations: list[dict[str, str]] | None = None,
                      headers: list[tuple[str, str]] | None = None) -> None:
        rec.status = status
        if message is None:
            await ex.respond(status, headers or [])
            return
        rec.message = message
        body: dict[str, Any] = {"message": message}
        if detail:
            body["detail"] = detail
        if validations:
            body["validations"] = validations
        await ex.respond_json(status, body, headers)

    async def _read_all(self, ex: Exchange, rec: RecordedRequest) -> None:
        try:
            rec.body = await ex.read_body(limit=SNAPSHOT_MAX_BYTES)
        except BodyTooLarge as exc:
            rec.body = exc.partial

    async def _route(self, ex: Exchange, rec: RecordedRequest) -> None:
        readback = _READBACK_RE.match(ex.path)
        if readback and ex.method == "GET" and self.feature and not self.no_route:
            await self._readback(ex, rec, readback.group(2))
            return
        snap = _SNAPSHOT_RE.match(ex.path)
        if snap:
            rec.task = snap.group(1)
        # Fault injection first: planned answers, hangs, rate limit.
        if self.script:
            entry = self.script.pop(0)
            if entry is not None:
                await self._scripted(ex, rec, entry)
                return
        if self.hang:
            await self._read_all(ex, rec)
            await ex.hang()
            return
        if self.max_rps is not None:
            now = time.monotonic()
            while self._window and now - self._window[0] >= 1.0:
                self._window.popleft()
            if len(self._window) >= self.max_rps:
                wait = max(1, math.ceil(1.0 - (now - self._window[0])))
                await self._read_all(ex, rec)
                await self._answer(ex, rec, 503, "Service Unavailable.", "rate limited by FakeCoderd(max_rps)",
                                   headers=[("retry-after", str(wait))])
                return
            self._window.append(now)
        if await self._rate_limited(ex, rec) or await self._buildinfo(ex, rec):
            return
        if not self.feature or not snap:
            await self._answer(ex, rec, 404, "Route not found.")
            return
        if ex.method != "POST":
            await self._answer(ex, rec, 405, "Method not allowed.")
            return
        await self._log_snapshot(ex, rec, snap.group(1))

    async def _buildinfo(self, ex: Exchange, rec: RecordedRequest) -> bool:
        """``GET /api/v2/buildinfo`` (no token, as coderd): answer and return True."""
        if ex.path != _BUILDINFO_PATH or ex.method != "GET":
            return False
        rec.status = 200
        await ex.respond_json(200, {"external_url": self.url, "version": self.version, "dashboard_url": self.url,
                                    "workspace_proxy": False, "agent_api_version": "2.0"})
        return True

    async def _rate_limited(self, ex: Exchange, rec: RecordedRequest) -> bool:
        """coderd's API rate limiter (go-chi/httprate ``Limit``): answer 429 and return True
        when the weighted count of this window and the last reaches ``rate_limit``."""
        if self.rate_limit is None or self.rate_limit <= 0:
            return False
        now = time.time()
        window = self.rate_window
        current = math.floor(now / window) * window
        for start in [k for k in self._rate_counts if k < current - window]:
            del self._rate_counts[start]
        previous = self._rate_counts.get(current - window, 0)
        rate = round(previous * (window - (now - current)) / window + self._rate_counts.get(current, 0))
        headers = [("x-ratelimit-limit", str(self.rate_limit)), ("x-ratelimit-reset", str(int(current + window)))]
        if rate + 1 > self.rate_limit:
            await self._read_all(ex, rec)
            headers += [("x-ratelimit-remaining", str(self.rate_limit - rate)), ("retry-after", str(int(window)))]
            message = f"You've been rate limited for sending more than {self.rate_limit} requests in {go_duration(window)}."
            await self._answer(ex, rec, 429, message, headers=headers)
            return True
        self._rate_counts[current] = self._rate_counts.get(current, 0) + 1
        return False

    async def _scripted(self, ex: Exchange, rec: RecordedRequest, entry: ScriptEntry) -> None:
        await self._read_all(ex, rec)
        if entry == "hang":
            await ex.hang()
            return
        if entry in ("close", "reset"):
            await ex.abort(reset=entry == "reset")
            return
        headers: list[tuple[str, str]] = []
        body: Any = None
        if isinstance(entry, tuple):
            status = int(entry[0])
            if len(entry) > 1 and entry[1]:
                hdrs = entry[1]
                headers = list(hdrs.items()) if isinstance(hdrs, dict) else list(hdrs)
            if len(entry) > 2:
                body = entry[2]
        else:
            status = int(entry)
        rec.status = status
        if status in (204, 304) or status < 200:
            await ex.respond(status, headers)
        elif body is None:
            await self._answer(ex, rec, status, f"Scripted {status} response.", "FakeCoderd script", headers=headers)
        elif isinstance(body, (bytes, bytearray)):
            await ex.respond(status, headers, bytes(body))
        elif isinstance(body, str):
            await ex.respond(status, [("content-type", "text/plain; charset=utf-8"), *headers], body.encode())
        else:
            await ex.respond_json(status, body, headers)

    async def _log_snapshot(self, ex: Exchange, rec: RecordedRequest, raw_task: str) -> None:
        # 1. agent token (coderd's ExtractWorkspaceAgentAndLatestBuild middleware)
        token = ex.header("coder-session-token")
        if not token:
            rec.auth = "missing"
            await self._read_all(ex, rec)
            await self._answer(ex, rec, 401, SIGNED_OUT_MESSAGE, 'Cookie "coder_session_token" must be provided.')
            return
        if token != self.token or not self.token_valid:
            rec.auth = "invalid" if token != self.token else "expired"
            await self._read_all(ex, rec)
            await self._answer(
                ex, rec, 401, "Workspace agent not authorized.",
                "The agent cannot authenticate until the workspace provision job has been completed. "
                "If the job is no longer running, this agent is invalid.",
            )
            return
        rec.auth = "ok"
        if self.no_route:  # the Tasks routes are not registered: the agent group's NotFound
            await self._read_all(ex, rec)
            await self._answer(ex, rec, 404, "Route not found.")
            return
        # 2. task id
        try:
            task = go_parse_uuid(raw_task)
        except ValueError as exc:
            await self._read_all(ex, rec)
            await self._answer(ex, rec, 400, "Invalid task ID format.", str(exc))
            return
        # 3. query: format required and non-empty, no other parameter
        query = go_parse_query(ex.query)
        validations: list[dict[str, str]] = []
        fmt = query.get("format", [""])[0]
        if fmt == "":
            validations.append({"field": "format", "detail": 'Query param "format" is required and cannot be empty'})
        for key in sorted(query):
            if key != "format":
                validations.append({"field": key, "detail": f"{json.dumps(key)} is not a valid query param"})
        if validations:
            await self._read_all(ex, rec)
            await self._answer(ex, rec, 400, "Invalid query parameters.", validations=validations)
            return
        # 4. format value
        if fmt != "agentapi":
            await self._read_all(ex, rec)
            await self._answer(ex, rec, 400, "Invalid format parameter.",
                               f'Only "agentapi" format is currently supported, got {json.dumps(fmt)}.')
            return
        # 5. task lookup (a database failure answers before the body is read); the task exists,
        #    is not deleted, and is in this agent's workspace
        if self.fail_store:
            await self._read_all(ex, rec)
            await self._answer(ex, rec, 500, "Internal error fetching task.",
                               "FakeCoderd(fail_store=True): the database is unavailable")
            return
        if task not in self.tasks:
            await self._read_all(ex, rec)
            await self._answer(ex, rec, 404, "Resource not found.")
            return
        # 6. body through MaxBytesReader(65 536) + json.Decoder
        over = False
        try:
            body = await ex.read_body(limit=SNAPSHOT_MAX_BYTES)
        except BodyTooLarge as exc:
            body, over = exc.partial, True
        rec.body = body
        # Go closes the connection after a request that tripped MaxBytesReader.
        close = [("connection", "close")] if over else None
        try:
            messages = decode_agentapi_payload(body[:SNAPSHOT_MAX_BYTES], at_eof=not over)
        except GoDecodeError as exc:
            await self._answer(ex, rec, 400, "Failed to decode request payload.", str(exc), headers=close)
            return
        # 7. messages present
        if messages is None:
            await self._answer(ex, rec, 400, "Invalid agentapi payload structure.",
                               'Missing required "messages" field.', headers=close)
            return
        # 8. upsert, re-encoded into a jsonb column: PostgreSQL's jsonb rejects U+0000
        if any("\x00" in m["content"] or "\x00" in m["role"] for m in messages):
            await self._answer(ex, rec, 500, "Internal error storing snapshot.",
                               "ERROR: unsupported Unicode escape sequence (SQLSTATE 22P05): "
                               "\\u0000 cannot be converted to text.", headers=close)
            return
        log_snapshot = {"format": "agentapi", "data": {"messages": messages}}
        snapshot = Snapshot(log_snapshot=log_snapshot, body=body, snapshot_at=time.time())
        self.stored[task] = snapshot
        self.upserts[task] = self.upserts.get(task, 0) + 1
        if self.on_store is not None:
            self.on_store(task, snapshot)
        # 9. success
        await self._answer(ex, rec, 204, headers=close)

    async def _readback(self, ex: Exchange, rec: RecordedRequest, raw_task: str) -> None:
        try:
            task = go_parse_uuid(raw_task)
        except ValueError:
            task = None
        rec.task = raw_task
        if task is None or task not in self.tasks:
            await self._answer(ex, rec, 404, "Resource not found.")
            return
        status = self.task_status.get(task, "active")
        if status not in ("paused", "pending", "initializing"):
            await self._answer(ex, rec, 409, f"Task is {status}: its log is read live from agentapi.",
                               "FakeCoderd serves the log snapshot only while the task is paused, pending or initializing.")
            return
        snap = self.stored.get(task)
        if snap is None:
            rec.status = 200
            await ex.respond_json(200, {"logs": [], "snapshot": True})
            return
        logs = []
        for m in snap.messages:
            if m["role"] == "user":
                kind = "input"
            elif m["role"] == "agent":
                kind = "output"
            else:
                await self._answer(ex, rec, 500, "Invalid snapshot data.",
                                   f"invalid agentapi message role {json.dumps(m['role'])}")
                return
            logs.append({"id": m["id"], "content": m["content"], "type": kind, "time": m["time"]})
        rec.status = 200
        await ex.respond_json(200, {"logs": logs, "snapshot": True, "snapshot_at": snap.snapshot_at_rfc3339})


def go_duration(seconds: float) -> str:
    """Go's ``time.Duration.String()`` for whole seconds: ``1m0s``, ``30s``, ``1h0m0s``."""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


# ---------------------------------------------------------------------------------------------
# process mode

def parse_script(text: str) -> list[ScriptEntry]:
    """Parse ``--script``: comma-separated ``STATUS``, ``STATUS:RETRY_AFTER`` (seconds),
    ``hang``, ``close``, ``reset`` or ``ok`` (handle normally). E.g. ``503,503:1,502,ok``."""
    out: list[ScriptEntry] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if item in ("hang", "close", "reset"):
            out.append(item)
        elif item == "ok":
            out.append(None)
        elif ":" in item:
            status, retry = item.split(":", 1)
            out.append((int(status), {"Retry-After": retry}))
        else:
            out.append(int(item))
    return out


def _write_atomic(path: str, data: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _store_file_json(coderd: FakeCoderd) -> str:
    return json.dumps(
        {
            task: {
                "messages": snap.messages,
                "log_snapshot": snap.log_snapshot,
                "snapshot_at": snap.snapshot_at,
                "snapshot_at_rfc3339": snap.snapshot_at_rfc3339,
                "body_bytes": len(snap.body),
                "upserts": coderd.upserts.get(task, 0),
            }
            for task, snap in coderd.stored.items()
        },
        ensure_ascii=False,
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m agentd.testing.fake_coderd",
        description="Fake coderd log-snapshot endpoint for tests and the demo (127.0.0.1 only).",
    )
    p.add_argument("--port", type=int, default=0, help="TCP port (0 = any free port)")
    p.add_argument("--token-file", required=True, help="file holding the agent token (whitespace stripped)")
    p.add_argument("--task", action="append", default=[], help="task UUID of this workspace (repeatable)")
    p.add_argument("--script", default="", help="planned answers, e.g. 503,503:1,502,hang,close,reset,ok")
    p.add_argument("--hang", action="store_true", help="read every request, never answer")
    p.add_argument("--max-rps", type=float, help="answer 503 + Retry-After beyond R requests per second")
    p.add_argument("--no-feature", action="store_true", help="every route 404 (Coder without the feature)")
    p.add_argument("--fail-store", action="store_true", help="the database fails: 500 on the task lookup")
    p.add_argument("--no-route", action="store_true",
                   help='Tasks routes unregistered: token checked, then 404 "Route not found." (no CODER_ENABLE_AI_TASKS)')
    p.add_argument("--rate-limit", type=int, help="coderd's API rate limiter: over N requests per window -> 429")
    p.add_argument("--rate-window", type=float, default=60.0, help="the rate limiter's window, seconds (default 60)")
    p.add_argument("--coder-version", default="v2.30.0+fake", help="version in GET /api/v2/buildinfo")
    p.add_argument("--store-file", help="JSON file rewritten with every stored snapshot")
    p.add_argument("--request-log", help="append one JSON line per answered request")
    p.add_argument("--pid-file", help="write the process id here")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return p.parse_args(argv)


async def _amain(args: argparse.Namespace) -> int:
    token = await anyio.Path(args.token_file).read_text(encoding="utf-8")
    token = token.strip()
    coderd = FakeCoderd(
        token=token, tasks=set(args.task), feature=not args.no_feature, script=parse_script(args.script),
        hang=args.hang, max_rps=args.max_rps, fail_store=args.fail_store,
        no_route=args.no_route, rate_limit=args.rate_limit, rate_window=args.rate_window, version=args.coder_version,
    )
    if args.store_file:
        store_file = args.store_file
        coderd.on_store = lambda _task, _snap: _write_atomic(store_file, _store_file_json(coderd))
    if args.request_log:
        log_path = args.request_log

        def log_request(rec: RecordedRequest) -> None:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec.as_json(), ensure_ascii=False) + "\n")

        coderd.on_request = log_request
    if args.pid_file:
        _write_atomic(args.pid_file, f"{os.getpid()}\n")
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with coderd.serve(port=args.port):
            print(f"coderd listening on {coderd.url}", flush=True)
            async for _signum in signals:
                break
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m agentd.testing.fake_coderd``; returns the exit status."""
    args = _parse_args(argv)
    return anyio.run(_amain, args, backend=args.backend)


if __name__ == "__main__":
    sys.exit(main())
