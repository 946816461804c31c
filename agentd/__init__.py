"""agentd: keeps a Coder task's agentapi conversation and stores it in coderd when the workspace stops.

Data flows source -> buffer -> sink, driven by one lifecycle:

- ``agentd.agentapi``: the source, tailing agentapi (SSE, or polling without ``/events``);
- ``agentd.messages``, ``agentd.buffer``, ``agentd.snapshot``: the pure core (validation, ring
  buffer, trimming to coderd's 65 536-byte body limit);
- ``agentd.coderd``: the sink, uploading to coderd's log-snapshot endpoint with retries;
- ``agentd.daemon``: the orchestrator owning signals, deadlines and the shutdown sequence.
"""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it, `agentd --version` prints it
