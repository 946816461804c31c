"""Settings: environment variables (as the Coder agent and systemd set them), overridden by flags.

Every setting is also an ``agentd run`` flag; flags win. A missing or invalid setting is a
:class:`ConfigError` whose text is one line naming it; the CLI prints it and exits 78
(EX_CONFIG, sysexits.h). The agent token is a :class:`~pydantic.SecretStr`: its repr is
``SecretStr('**********')`` and it never appears in an error.
"""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import httpx

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentd.control import default_socket_path
from agentd.snapshot import CODERD_MAX_BODY, MIN_MAX_BYTES

EX_CONFIG = 78  # sysexits.h: configuration error


_TOKEN = re.compile(r"[!-~]+")  # printable ASCII: what an HTTP header value can carry as is


class ConfigError(Exception):
    """A missing or invalid setting; ``str()`` is one line naming the variable and the flag."""


def default_state_dir() -> Path:
    """systemd's ``$STATE_DIRECTORY`` (first entry), else ``$XDG_STATE_HOME/agentd``, else
    ``~/.local/state/agentd``."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME")
    return Path(xdg) / "agentd" if xdg else Path.home() / ".local" / "state" / "agentd"


class Settings(BaseSettings):
    """agentd's settings. Environment names are given by each field's alias.

    Units: ``shutdown_timeout`` and ``checkpoint_interval`` in seconds, ``max_bytes`` in bytes.
    ``socket`` is the control socket's path (see :func:`agentd.control.default_socket_path`).
    """

    model_config = SettingsConfigDict(env_prefix="AGENTD_", populate_by_name=True, extra="ignore", allow_inf_nan=False)

    coderd_url: str = Field(validation_alias=AliasChoices("CODER_AGENT_URL"))
    agent_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("CODER_AGENT_TOKEN"), repr=False
    )
    agent_token_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("CODER_AGENT_TOKEN_FILE")
    )
    task_id: UUID
    agentapi_url: str = "http://localhost:3284"
    max_messages: int = Field(default=10, ge=1, le=1000)
    max_bytes: int = Field(default=CODERD_MAX_BODY, ge=MIN_MAX_BYTES, le=CODERD_MAX_BODY)
    # Docker sends SIGKILL 10 s after SIGTERM; 8 s leaves room for start-up and exit.
    shutdown_timeout: float = Field(default=8.0, gt=0, le=3600)
    state_dir: Path = Field(default_factory=default_state_dir)
    checkpoint_interval: float = Field(default=60.0, ge=0)
    # supervise: of shutdown_timeout, the time the child gets to exit after the snapshot.
    child_stop_timeout: float = Field(default=3.0, gt=0, le=3600)
    socket: Path | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    ca_file: Path | None = None
    # agentd run: probe agentapi and coderd at start-up (one request that stores nothing).
    startup_probe: bool = True

    @field_validator("coderd_url", "agentapi_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("ca_file")
    @classmethod
    def _usable_ca_file(cls, value: Path | None) -> Path | None:
        if value is not None:  # found now, not as a crash when the coderd client is made
            try:
                ssl.create_default_context(cafile=str(value))
            except OSError as exc:  # ssl.SSLError included: not a PEM bundle
                raise ValueError(f"cannot use it as a CA bundle: {exc.strerror or exc}") from None
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _read_token(self) -> Settings:
        if self.agent_token_file is not None:  # the file wins: it is the deliberate choice
            try:
                token = self.agent_token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"cannot read {self.agent_token_file}: {exc.strerror}") from None
            if not token:
                raise ValueError(f"{self.agent_token_file} is empty")
            self.agent_token = SecretStr(token)
        if self.agent_token is None or not self.agent_token.get_secret_value().strip():
            raise ValueError("set CODER_AGENT_TOKEN or CODER_AGENT_TOKEN_FILE")
        if not _TOKEN.fullmatch(self.token):
            raise ValueError("the agent token must be printable ASCII without spaces (it is sent as an HTTP header)")
        if self.socket is None:
            self.socket = default_socket_path(self.state_dir)
        return self

    def check_supervise(self) -> None:
        """For ``agentd supervise``: the child's stop time is part of the shutdown timeout.

        Raises :class:`ConfigError` when ``child_stop_timeout`` is not below ``shutdown_timeout``.
        """
        if self.child_stop_timeout >= self.shutdown_timeout:
            raise ConfigError(
                f"invalid setting AGENTD_CHILD_STOP_TIMEOUT ({self.child_stop_timeout:g} s): must be below "
                f"AGENTD_SHUTDOWN_TIMEOUT ({self.shutdown_timeout:g} s), of which it is the child's part"
            )

    @property
    def token(self) -> str:
        """The agent token in clear, for the ``Coder-Session-Token`` header only."""
        assert self.agent_token is not None
        return self.agent_token.get_secret_value().strip()


#: Environment variable for each field (for error messages and the README's table).
ENV_NAMES = {
    "coderd_url": "CODER_AGENT_URL",
    "agent_token": "CODER_AGENT_TOKEN",
    "agent_token_file": "CODER_AGENT_TOKEN_FILE",
    **{
        name: f"AGENTD_{name.upper()}"
        for name in Settings.model_fields
        if name not in ("coderd_url", "agent_token", "agent_token_file")
    },
}

_FIELD_BY_ENV = {env: field for field, env in ENV_NAMES.items()}


def _describe(error: dict[str, Any]) -> str:
    loc = error.get("loc") or ()
    field = _FIELD_BY_ENV.get(str(loc[0]), str(loc[0])) if loc else ""
    message = error.get("msg", "invalid").removeprefix("Value error, ")
    if not field:  # model-level: the token checks
        names = "CODER_AGENT_TOKEN / CODER_AGENT_TOKEN_FILE"
        return f"invalid setting {names} (--agent-token / --agent-token-file): {message}"
    env = ENV_NAMES.get(field, field)
    flag = "--" + field.replace("_", "-")
    if error.get("type") == "missing":
        return f"missing setting {env} ({flag})"
    shown = "" if "token" in field else f" (got {str(error.get('input'))[:60]!r})"
    return f"invalid setting {env} ({flag}): {message}{shown}"


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, with ``overrides`` (flags; None means unset) on top.

    Raises :class:`ConfigError` with one line naming the first bad setting.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors(include_url=False)[0])) from None
