"""Settings: environment variables (as the Coder agent and systemd set them), overridden by flags.

Every setting is also a flag of the commands that use it (``--max-bytes`` for
``AGENTD_MAX_BYTES``); flags win. The flags, their help and their defaults are derived from
:class:`Settings` (``model_fields``): a field's ``description`` is its help, its
``json_schema_extra["metavar"]`` the flag's value name.

Missing or bad settings are one :class:`ConfigError` naming every one of them, each line with
its environment variable and flag, in plain words ("missing", "must be a whole number"); the
CLI prints them and exits 78 (EX_CONFIG, sysexits.h). The agent token is a
:class:`~pydantic.SecretStr`: its repr is ``SecretStr('**********')`` and it never appears in
an error.
"""

from __future__ import annotations

import errno
import os
import re
import ssl
import stat
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import httpx
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentd.exits import EX_CONFIG, ConfigError
from agentd.logs import redact
from agentd.paths import default_socket_path, default_state_dir
from agentd.snapshot import CODERD_MAX_BODY, MIN_MAX_BYTES

__all__ = ["ENV_NAMES", "EX_CONFIG", "ConfigError", "Settings", "default_state_dir", "flag_name", "load_settings"]

_TOKEN = re.compile(r"[!-~]+")  # printable ASCII: what an HTTP header value can carry as is


def _meta(metavar: str) -> Any:
    return {"metavar": metavar}


class Settings(BaseSettings):
    """agentd's settings. Environment names are given by each field's alias.

    Units: ``shutdown_timeout``, ``checkpoint_interval`` and ``child_stop_timeout`` in seconds,
    ``max_bytes`` in bytes. ``socket`` is the control socket's path (see
    :func:`agentd.paths.default_socket_path`).
    """

    model_config = SettingsConfigDict(env_prefix="AGENTD_", populate_by_name=True, extra="ignore", allow_inf_nan=False)

    coderd_url: str = Field(
        validation_alias=AliasChoices("CODER_AGENT_URL"), description="coderd's URL, as the Coder agent has it", json_schema_extra=_meta("URL")
    )
    agent_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("CODER_AGENT_TOKEN"),
        repr=False,
        description="the workspace's agent token (seen in ps as a flag: prefer the environment or a file)",
        json_schema_extra=_meta("TOKEN"),
    )
    agent_token_file: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("CODER_AGENT_TOKEN_FILE"),
        description="file holding the agent token (wins over the token)",
        json_schema_extra=_meta("PATH"),
    )
    task_id: UUID = Field(description="the task's id", json_schema_extra=_meta("UUID"))
    agentapi_url: str = Field(default="http://localhost:3284", description="agentapi's URL", json_schema_extra=_meta("URL"))
    max_messages: int = Field(default=10, ge=1, le=1000, description="messages the ring buffer keeps", json_schema_extra=_meta("N"))
    max_bytes: int = Field(
        default=CODERD_MAX_BODY,
        ge=MIN_MAX_BYTES,
        le=CODERD_MAX_BODY,
        description="snapshot body limit in bytes (coderd's cap)",
        json_schema_extra=_meta("BYTES"),
    )
    # Docker sends SIGKILL 10 s after SIGTERM; 8 s leaves room for start-up and exit.
    shutdown_timeout: float = Field(
        default=8.0, gt=0, le=3600, description="seconds from the stop signal to exit, retries included", json_schema_extra=_meta("SECONDS")
    )
    state_dir: Path = Field(
        default_factory=default_state_dir, description="where the buffer is kept across restarts", json_schema_extra=_meta("PATH")
    )
    checkpoint_interval: float = Field(
        default=60.0, ge=0, description="least seconds between uploads after finished turns; 0 turns them off", json_schema_extra=_meta("SECONDS")
    )
    # supervise: of shutdown_timeout, the time the child gets to exit after the snapshot.
    child_stop_timeout: float = Field(
        default=5.5, gt=0, le=3600, description="seconds the child gets to exit after the snapshot, within the shutdown timeout",
        json_schema_extra=_meta("SECONDS"),
    )
    socket: Path = Field(
        default_factory=lambda data: default_socket_path(data.get("state_dir") or default_state_dir()),
        description="control socket (default: $RUNTIME_DIRECTORY/agentd.sock, else in the state directory)",
        json_schema_extra=_meta("PATH"),
    )
    log_format: Literal["auto", "json", "console"] = Field(default="auto", description="auto: console on a terminal, else JSON lines")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="least level logged")
    ca_file: Path | None = Field(default=None, description="CA bundle (PEM) for coderd's TLS certificate", json_schema_extra=_meta("PATH"))
    # agentd run: probe agentapi and coderd at start-up (one request that stores nothing).
    startup_probe: bool = Field(default=True, description="run: probe agentapi and coderd at start-up (stores nothing)", json_schema_extra=_meta("BOOL"))

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
        if url.port is not None and not 0 < url.port <= 65_535:
            raise ValueError(f"port {url.port} is not in 1-65535")
        if url.query or url.fragment or "?" in value or "#" in value:
            raise ValueError("must be a base URL, without a query or fragment")
        return value

    @field_validator("ca_file")
    @classmethod
    def _usable_ca_file(cls, value: Path | None) -> Path | None:
        if value is not None:  # found now, not as a crash when the coderd client is made
            try:
                ssl.create_default_context(cafile=str(value))
            except OSError as exc:  # ssl.SSLError included: not a PEM bundle
                raise ValueError(f"cannot be used as a CA bundle: {exc.strerror or exc}") from None
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _read_token(self) -> Settings:
        secret = self.agent_token.get_secret_value() if self.agent_token is not None else None
        self.agent_token = SecretStr(read_token(secret, self.agent_token_file))
        return self

    def check_supervise(self) -> None:
        """For ``agentd supervise``: the child's stop time is part of the shutdown timeout.

        Raises :class:`ConfigError` when ``child_stop_timeout`` is not below ``shutdown_timeout``.
        """
        if self.child_stop_timeout >= self.shutdown_timeout:
            raise ConfigError(
                f"AGENTD_CHILD_STOP_TIMEOUT (--child-stop-timeout) must be below AGENTD_SHUTDOWN_TIMEOUT "
                f"({self.shutdown_timeout:g} s), of which it is the child's part; got {self.child_stop_timeout:g} s"
            )

    @property
    def token(self) -> str:
        """The agent token in clear, for the ``Coder-Session-Token`` header only."""
        assert self.agent_token is not None
        return self.agent_token.get_secret_value().strip()


#: Environment variable for each field (for error messages, the flags' help, the README's table).
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

_NO_TOKEN = "missing setting CODER_AGENT_TOKEN (--agent-token), or CODER_AGENT_TOKEN_FILE (--agent-token-file)"


def flag_name(field: str) -> str:
    """The flag of a setting: ``max_bytes`` -> ``--max-bytes``."""
    return "--" + field.replace("_", "-")


def _named(field: str) -> str:
    return f"{ENV_NAMES.get(field, field)} ({flag_name(field)})"


#: Bytes read of the token file at most: an agent token is well under a kilobyte.
TOKEN_FILE_LIMIT = 64 * 1024


def _read_small_file(path: Path) -> bytes:
    """A regular file's content, at most :data:`TOKEN_FILE_LIMIT` bytes, opened without blocking
    (a FIFO or a device is refused, not waited on or read forever). Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = os.read(fd, TOKEN_FILE_LIMIT + 1)
    finally:
        os.close(fd)
    if len(data) > TOKEN_FILE_LIMIT:
        raise OSError(errno.EFBIG, f"over {TOKEN_FILE_LIMIT} bytes: not a token")
    return data


def read_token(token: str | None, token_file: Path | None) -> str:
    """The agent token: the file's content when ``token_file`` is set (the deliberate choice),
    else ``token``. Raises ValueError with a whole line naming the setting."""
    if token_file is not None:
        try:
            token = _read_small_file(Path(token_file)).decode("utf-8", "replace").strip()
        except OSError as exc:
            raise ValueError(f"{_named('agent_token_file')}: cannot read {token_file}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"{_named('agent_token_file')}: {token_file} is empty")
    token = (token or "").strip()
    if not token:
        raise ValueError(_NO_TOKEN)
    if not _TOKEN.fullmatch(token):
        source = _named("agent_token_file" if token_file is not None else "agent_token")
        raise ValueError(f"{source}: must be printable ASCII without spaces (it is sent as an HTTP header)")
    return token


#: What each kind of validation failure means, in our words (pydantic's error types).
_WORDS = {
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "int_type": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "uuid_parsing": "must be a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)",
    "uuid_type": "must be a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be above {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be below {lt}",
    "literal_error": "must be one of {expected}",
}


def _describe(error: Any) -> str:
    """One line for one validation error, naming the environment variable and the flag."""
    loc = error.get("loc") or ()
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    if not loc:  # model-level: the token checks give whole lines
        return message
    field = _FIELD_BY_ENV.get(str(loc[0]), str(loc[0]))
    kind = error.get("type", "")
    if kind == "missing":
        return f"missing setting {_named(field)}"
    words = _WORDS.get(kind, "")
    if words:
        context = {key: f"{value:g}" if isinstance(value, float) else str(value) for key, value in (error.get("ctx") or {}).items()}
        message = words.format_map(context)
    elif kind != "value_error":
        message = "cannot be used as given"
    shown = "" if "token" in field else f", got {redact(str(error.get('input')))[:60]!r}"  # no URL's password
    return f"{_named(field)} {message}{shown}"


def _token_given(given: dict[str, Any]) -> tuple[str | None, Path | None]:
    token = given.get("agent_token") or os.environ.get("CODER_AGENT_TOKEN")
    token_file = given.get("agent_token_file") or os.environ.get("CODER_AGENT_TOKEN_FILE")
    return (str(token) if token else None), (Path(token_file) if token_file else None)


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, with ``overrides`` (flags; None means unset) on top.

    Raises :class:`ConfigError` naming every missing or bad setting, one line each.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        # A default worked out from another setting is not worked out when any setting is bad:
        # that is no problem of its own.
        errors = [e for e in exc.errors(include_url=False) if e.get("type") != "default_factory_not_called"]
    problems = [_describe(error) for error in errors]
    if all(error.get("loc") for error in errors):  # the token checks did not run: run them too
        try:
            read_token(*_token_given(given))
        except ValueError as token_error:
            problems.append(str(token_error))
    raise ConfigError(*dict.fromkeys(problems))
