"""``agentd check [--json]``: would the snapshot be stored? Asked now, not found out at the stop.

Modelled on Vector's ``vector validate``: the resolved settings, each with where it came from
(``flag``, ``environment``, ``file`` for the agent token read from
``CODER_AGENT_TOKEN_FILE``, ``default``; the token itself is never shown), then one line per
peer from :mod:`agentd.probe`: agentapi (reachable, Host accepted, ``/events`` or polling, agent
type, transport, status, messages held) and coderd (the probe that stores nothing).

Exit status: 0 when the snapshot would be stored (coderd ready and agentapi readable), 1 when
not, 78 for bad settings (raised by the settings loader before this module runs). Nothing is
stored: the coderd probe's body is not JSON, so coderd's decoder refuses it before its upsert.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from agentd import probe
from agentd.daemon import agentapi_client, coderd_client
from agentd.logs import REDACTED, add_secret, redact
from agentd.settings import ENV_NAMES, Settings

EXIT_WOULD_STORE = 0
EXIT_WOULD_NOT_STORE = 1


@dataclass(frozen=True, slots=True)
class SettingLine:
    """One resolved setting: ``name`` (field), ``env``, ``flag``, ``value`` (text; the token
    redacted), ``source`` (``flag`` | ``environment`` | ``file`` | ``default``), ``origin`` (the
    token file's path when ``source`` is ``file``, else None)."""

    name: str
    env: str
    flag: str
    value: str
    source: str
    origin: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"env": self.env, "flag": self.flag, "value": self.value, "source": self.source, "origin": self.origin}


def _shown(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def resolved_settings(settings: Settings, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> list[SettingLine]:
    """Every setting with its value and where it came from.

    ``flags`` maps field names to the flag values given (None or absent: not given);
    ``environ`` defaults to ``os.environ``. The agent token's value is always ``[REDACTED]``.
    """
    env = os.environ if environ is None else environ
    lines = []
    for name in Settings.model_fields:
        env_name = ENV_NAMES.get(name, name)
        flag = "--" + name.replace("_", "-")
        value = _shown(getattr(settings, name))
        origin = None
        if flags.get(name) is not None:
            source = "flag"
        elif env.get(env_name):
            source = "environment"
        else:
            source = "default"
        if name == "agent_token":
            value = REDACTED
            if settings.agent_token_file is not None:  # the file wins over the variable
                source, origin = "file", str(settings.agent_token_file)
        lines.append(SettingLine(name, env_name, flag, value, source, origin))
    return lines


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The whole check: settings, both probes, and whether a snapshot would be stored."""

    settings: list[SettingLine]
    agentapi: probe.AgentAPIReport
    coderd: probe.CoderdVerdict

    @property
    def would_store(self) -> bool:
        return self.coderd.ready and self.agentapi.ok

    @property
    def exit_status(self) -> int:
        return EXIT_WOULD_STORE if self.would_store else EXIT_WOULD_NOT_STORE

    def as_dict(self) -> dict[str, Any]:
        return {
            "would_store": self.would_store,
            "settings": {line.name: line.as_dict() for line in self.settings},
            "agentapi": self.agentapi.as_dict(),
            "coderd": self.coderd.as_dict(),
        }

    def text(self) -> str:
        width = max(len(line.env) for line in self.settings)
        value_width = min(48, max(len(line.value) for line in self.settings))
        out = ["settings:"]
        for line in self.settings:
            where = {"flag": f"flag {line.flag}", "file": f"file {line.origin}"}.get(line.source, line.source)
            out.append(f"  {line.env:<{width}}  {line.value:<{value_width}}  [{where}]")
        out.append("peers:")
        out.append(f"  agentapi  {'ok  ' if self.agentapi.ok else 'FAIL'}  {self.agentapi.sentence}")
        coderd_mark = "ok  " if self.coderd.ready else "WAIT" if self.coderd.transient else "FAIL"
        out.append(f"  coderd    {coderd_mark}  {self.coderd.sentence}")
        if self.would_store:
            out.append("result: a snapshot would be stored")
        else:
            fix = "fix the lines marked FAIL" if not self.coderd.transient or not self.agentapi.ok else ""
            wait = "WAIT is passing: try again" if self.coderd.transient else ""
            out.append("result: a snapshot would NOT be stored; " + "; ".join(part for part in (fix, wait) if part))
        return "\n".join(out)


async def check(settings: Settings, flags: Mapping[str, Any], request_timeout: float = probe.PROBE_TIMEOUT) -> CheckResult:
    """Probe both peers at once (each request within ``request_timeout`` seconds). Stores nothing."""
    add_secret(settings.token)
    results: dict[str, Any] = {}
    async with agentapi_client(settings.agentapi_url) as api, coderd_client(settings) as coderd:

        async def agentapi_probe() -> None:
            results["agentapi"] = await probe.probe_agentapi(
                api, settings.agentapi_url, max_messages=settings.max_messages, max_bytes=settings.max_bytes, request_timeout=request_timeout
            )

        async def coderd_probe() -> None:
            results["coderd"] = await probe.probe_coderd(coderd, settings.coderd_url, settings.token, settings.task_id, request_timeout)

        async with anyio.create_task_group() as tg:
            tg.start_soon(agentapi_probe)
            tg.start_soon(coderd_probe)
    return CheckResult(resolved_settings(settings, flags), results["agentapi"], results["coderd"])


async def main(settings: Settings, flags: Mapping[str, Any], as_json: bool) -> tuple[int, str]:
    """``agentd check``: ``(exit status, text for stdout)``; the token redacted from the text."""
    result = await check(settings, flags)
    text = json.dumps(result.as_dict(), indent=2) if as_json else result.text()
    return result.exit_status, redact(text)


__all__ = ["CheckResult", "SettingLine", "check", "main", "resolved_settings"]
