"""The ingest floor: the least any reader of agentapi's event stream must do, in plain Python.

    python -m bench.floor URL MARKER_ID

Connects to ``URL/events`` over a plain socket (HTTP/1.1, the same request agentd makes),
undoes the chunked transfer encoding, splits the stream into events at blank lines and
``json.loads`` each event's ``data`` (decoded first: faster than ``json.loads`` on bytes). Prints ``ready`` once the replay is over (the first
``status_change``), then reads until a ``message_update`` with id ``MARKER_ID`` and prints
``done N`` (N: events decoded since ready). No validation, no caps, no ring buffer: what is
left is the socket, the de-chunking, the line split and the JSON decode, which agentd cannot
avoid either. The bench measures this process's CPU time between the two lines.
"""

from __future__ import annotations

import json
import socket
import sys
from urllib.parse import urlsplit


def main(argv: list[str]) -> int:
    url, marker = urlsplit(argv[0]), int(argv[1])
    sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 80))
    sock.sendall(
        b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nAccept-Encoding: identity\r\n\r\n"
    )
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    raw = raw[raw.index(b"\r\n\r\n") + 4 :]
    sse = b""
    ready, count = False, 0
    while True:
        # de-chunk what has arrived: the payloads of the complete chunks, joined once
        pos, pieces = 0, [sse]
        while (nl := raw.find(b"\r\n", pos)) >= 0:
            size = int(raw[pos:nl], 16)
            if len(raw) < nl + 4 + size:
                break
            pieces.append(raw[nl + 2 : nl + 2 + size])
            pos = nl + 4 + size
        raw = raw[pos:]
        sse = b"".join(pieces)
        # complete events: the event line, then the data line
        start = 0
        while (end := sse.find(b"\n\n", start)) >= 0:
            name_end = sse.find(b"\n", start, end)
            name = sse[start + 7 : name_end] if sse.startswith(b"event: ", start) else b"message"
            data = json.loads(sse[name_end + 7 : end].decode()) if sse.startswith(b"data: ", name_end + 1) else None
            start = end + 2
            if ready:
                count += 1
            if name == b"status_change" and not ready:
                ready = True
                print("ready", flush=True)
            elif name == b"message_update" and ready and isinstance(data, dict) and data.get("id") == marker:
                print(f"done {count}", flush=True)
                sock.close()
                return 0
        sse = sse[start:]
        chunk = sock.recv(262144)
        if not chunk:
            print("ended", flush=True)
            return 1
        raw += chunk


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
