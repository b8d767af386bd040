"""Configuration: every setting comes from the environment or a `.env` file."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import socket
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)

# The API's smallest thinking budget: smaller settings are raised to it.
MIN_THINKING_BUDGET = 1024
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A full model id: lowercase words, and at least one digit (a version); no "[...]" suffix.
_MODEL_ID = re.compile(r"(?=[a-z0-9._@:/-]*[0-9])[a-z0-9][a-z0-9._@:/-]*")
# A cookie-signing key shorter than this can be guessed offline from one signed cookie.
MIN_SECRET_KEY_LENGTH = 32


class SettingsError(Exception):
    """A setting is missing or invalid; the message names the variable."""


def _env(name: str) -> Any:
    """Bind a field to exactly one environment variable (and its field name for tests)."""
    return AliasChoices(name)


class Settings(BaseSettings):
    """All of blogchat's settings. The alias of each field is its environment variable."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
    )

    # Where things live.
    database_url: str = Field(
        default="",
        validation_alias=_env("DATABASE_URL"),
        description="SQLAlchemy URL of the database. Empty: a SQLite file under the data dir.",
    )
    database_schema: str | None = Field(
        default=None,
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        validation_alias=_env("BLOGCHAT_DATABASE_SCHEMA"),
        description="PostgreSQL schema to keep the tables in (several blogs in one database).",
    )
    data_dir: Path = Field(
        default=Path("data"),
        validation_alias=_env("BLOGCHAT_DATA_DIR"),
        description="Directory for the SQLite database and the generated secret key.",
    )
    content_dir: Path = Field(
        default=Path("content"),
        validation_alias=_env("BLOGCHAT_CONTENT_DIR"),
        description="Directory with `posts/*.md` and `authors.yaml`.",
    )
    personas_file: Path = Field(
        default=Path("config/personas.yaml"),
        validation_alias=_env("BLOGCHAT_PERSONAS_FILE"),
        description="YAML file that defines the assistant's personas.",
    )
    site_title: str = Field(
        default="blogchat",
        validation_alias=_env("BLOGCHAT_SITE_TITLE"),
        description="The blog's name, shown in the header and page titles.",
    )

    # Several instances (docs/deployment.md, "Several instances").
    redis_url: str | None = Field(
        default=None,
        validation_alias=_env("BLOGCHAT_REDIS_URL"),
        description=(
            "Redis URL (redis://host:6379/0) shared by several instances of one blog: chat "
            "events, turn ownership and rate limits live there. Unset: one instance. "
            "Requires PostgreSQL."
        ),
    )
    redis_prefix: str = Field(
        default="blogchat",
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        validation_alias=_env("BLOGCHAT_REDIS_PREFIX"),
        description="Prefix of every Redis key, so several blogs (or tests) share one Redis.",
    )
    redis_max_connections: int = Field(
        default=64,
        ge=4,
        le=10000,
        validation_alias=_env("BLOGCHAT_REDIS_MAX_CONNECTIONS"),
        description=(
            "Connections to Redis one instance opens at most, per pool (its chats' and its "
            "rate limits'); a command waits for a free one rather than fail."
        ),
    )
    chat_lease_seconds: float = Field(
        default=5.0,
        ge=1.0,
        le=300.0,
        validation_alias=_env("BLOGCHAT_CHAT_LEASE_SECONDS"),
        description=(
            "How long an instance's claim on a chat lasts without renewal: after it dies, "
            "another instance may take its chats over this much later."
        ),
    )
    instance_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        pattern=r"^[A-Za-z0-9_.-]{1,100}$",
        validation_alias=_env("BLOGCHAT_INSTANCE_ID"),
        description="This instance's name among several (unique). Default: host name and pid.",
    )

    # Security.
    secret_key: SecretStr | None = Field(
        default=None,
        validation_alias=_env("BLOGCHAT_SECRET_KEY"),
        description="Signs session cookies. Unset: generated once into the data dir.",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=_env("BLOGCHAT_ALLOWED_ORIGINS"),
        description="Extra origins (comma-separated) allowed to open the WebSocket.",
    )
    max_frame_bytes: int = Field(
        default=65536,
        ge=1024,
        le=16 * 1024 * 1024,
        validation_alias=_env("BLOGCHAT_MAX_FRAME_BYTES"),
        description="Largest WebSocket frame accepted from a client, in bytes.",
    )
    max_message_chars: int = Field(
        default=8000,
        ge=1,
        validation_alias=_env("BLOGCHAT_MAX_MESSAGE_CHARS"),
        description="Longest chat message a reader may send, in characters.",
    )

    # Abuse: accounts, requests and where they come from.
    login_failure_limit: int = Field(
        default=10,
        ge=1,
        validation_alias=_env("BLOGCHAT_LOGIN_FAILURE_LIMIT"),
        description="Failed sign-ins allowed per account and per client address in the window.",
    )
    login_failure_window: int = Field(
        default=900,
        ge=1,
        validation_alias=_env("BLOGCHAT_LOGIN_FAILURE_WINDOW"),
        description="The window of BLOGCHAT_LOGIN_FAILURE_LIMIT, in seconds.",
    )
    registration_limit: int = Field(
        default=10,
        ge=1,
        validation_alias=_env("BLOGCHAT_REGISTRATION_LIMIT"),
        description="Account registrations allowed per client address in the window.",
    )
    registration_window: int = Field(
        default=3600,
        ge=1,
        validation_alias=_env("BLOGCHAT_REGISTRATION_WINDOW"),
        description="The window of BLOGCHAT_REGISTRATION_LIMIT, in seconds.",
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        validation_alias=_env("BLOGCHAT_MAX_BODY_BYTES"),
        description="Largest request body accepted on any route, in bytes (larger: 413).",
    )
    body_timeout: float = Field(
        default=10.0,
        gt=0,
        validation_alias=_env("BLOGCHAT_BODY_TIMEOUT"),
        description="Seconds a request body may take to arrive (slower: 408).",
    )
    header_timeout: float = Field(
        default=10.0,
        gt=0,
        validation_alias=_env("BLOGCHAT_HEADER_TIMEOUT"),
        description="Seconds a request's headers may take to arrive before the connection closes.",
    )
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        validation_alias=_env("FORWARDED_ALLOW_IPS"),
        description="Proxies (addresses or networks, comma-separated) trusted for X-Forwarded-*.",
    )
    api_docs: bool = Field(
        default=False,
        validation_alias=_env("BLOGCHAT_API_DOCS"),
        description="Serve the interactive API docs at /api/docs (from local assets).",
    )

    # Realtime.
    ws_ping_interval: float = Field(
        default=20.0,
        gt=0,
        validation_alias=_env("BLOGCHAT_WS_PING_INTERVAL"),
        description="Seconds between WebSocket pings that detect dead connections.",
    )
    session_idle_seconds: float = Field(
        default=300.0,
        gt=0,
        validation_alias=_env("BLOGCHAT_SESSION_IDLE_SECONDS"),
        description="An idle chat session with no subscribers is closed after this long.",
    )
    batched_saves: bool = Field(
        default=True,
        validation_alias=_env("BLOGCHAT_BATCHED_SAVES"),
        description=(
            "Save every running answer of the process together, each second (false: each "
            "answer saves itself, the former way, kept for the benchmark's comparison)."
        ),
    )
    send_queue_limit: int = Field(
        default=10000,
        ge=16,
        validation_alias=_env("BLOGCHAT_SEND_QUEUE_LIMIT"),
        description="Events buffered for a slow connection before it is disconnected.",
    )
    send_queue_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=65536,
        validation_alias=_env("BLOGCHAT_SEND_QUEUE_BYTES"),
        description="Bytes of live frames buffered for a slow connection before it is closed.",
    )

    # What a stranger can spend (docs/deployment.md, "Limits").
    visitor_running_turns: int = Field(
        default=1,
        ge=1,
        validation_alias=_env("BLOGCHAT_VISITOR_RUNNING_TURNS"),
        description="Turns an anonymous visitor may have running at once; more wait in line.",
    )
    visitor_turns_per_hour: int = Field(
        default=20,
        ge=1,
        validation_alias=_env("BLOGCHAT_VISITOR_TURNS_PER_HOUR"),
        description="Messages an anonymous visitor may send per hour.",
    )
    visitor_tokens_per_day: int = Field(
        default=200000,
        ge=1,
        validation_alias=_env("BLOGCHAT_VISITOR_TOKENS_PER_DAY"),
        description="Tokens (input and output) an anonymous visitor's turns may use per day.",
    )
    address_running_turns: int = Field(
        default=2,
        ge=1,
        validation_alias=_env("BLOGCHAT_ADDRESS_RUNNING_TURNS"),
        description="Turns all anonymous visitors of one client address may have running at once.",
    )
    address_turns_per_hour: int = Field(
        default=60,
        ge=1,
        validation_alias=_env("BLOGCHAT_ADDRESS_TURNS_PER_HOUR"),
        description="Messages all anonymous visitors of one client address may send per hour.",
    )
    address_tokens_per_day: int = Field(
        default=1000000,
        ge=1,
        validation_alias=_env("BLOGCHAT_ADDRESS_TOKENS_PER_DAY"),
        description="Tokens all anonymous visitors of one client address may use per day.",
    )
    user_running_turns: int = Field(
        default=2,
        ge=1,
        validation_alias=_env("BLOGCHAT_USER_RUNNING_TURNS"),
        description="Turns a signed-in reader may have running at once; more wait in line.",
    )
    user_turns_per_day: int = Field(
        default=300,
        ge=1,
        validation_alias=_env("BLOGCHAT_USER_TURNS_PER_DAY"),
        description="Messages a signed-in reader may send per day.",
    )
    user_tokens_per_day: int = Field(
        default=2000000,
        ge=1,
        validation_alias=_env("BLOGCHAT_USER_TOKENS_PER_DAY"),
        description="Tokens a signed-in reader's turns may use per day.",
    )
    chat_queue_limit: int = Field(
        default=3,
        ge=0,
        validation_alias=_env("BLOGCHAT_CHAT_QUEUE_LIMIT"),
        description="Messages that may wait in a chat behind its running turn.",
    )
    chat_context_limit: int = Field(
        default=150000,
        ge=1,
        validation_alias=_env("BLOGCHAT_CHAT_CONTEXT_LIMIT"),
        description="Input tokens of a chat's last request past which it takes no more messages.",
    )
    visitor_connections: int = Field(
        default=16,
        ge=1,
        validation_alias=_env("BLOGCHAT_VISITOR_CONNECTIONS"),
        description="WebSockets one visitor may have open at once.",
    )
    address_connections: int = Field(
        default=64,
        ge=1,
        validation_alias=_env("BLOGCHAT_ADDRESS_CONNECTIONS"),
        description="WebSockets one client address may have open at once.",
    )
    turn_wait_seconds: float = Field(
        default=60.0,
        gt=0,
        validation_alias=_env("BLOGCHAT_TURN_WAIT_SECONDS"),
        description="A turn waiting this long for a free assistant ends with a retryable error.",
    )
    unwatched_seconds: float = Field(
        default=300.0,
        gt=0,
        validation_alias=_env("BLOGCHAT_UNWATCHED_SECONDS"),
        description="A chat nobody has watched for this long drops its waiting messages.",
    )

    # The Claude agent.
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=_env("ANTHROPIC_API_KEY"),
        description="Anthropic API key. Unset: the offline engine answers from search.",
    )
    anthropic_base_url: str | None = Field(
        default=None,
        validation_alias=_env("ANTHROPIC_BASE_URL"),
        description="Base URL of an Anthropic-compatible Messages API.",
    )
    engine: Literal["agent-sdk", "messages"] = Field(
        default="agent-sdk",
        validation_alias=_env("BLOGCHAT_ENGINE"),
        description=(
            "Which Claude engine runs the chats when an API key is set: `agent-sdk` (the "
            "Claude Agent SDK, one CLI process per active chat) or `messages` (the Messages "
            "API through the `anthropic` SDK, in process). docs/engines.md compares them."
        ),
    )
    model_haiku: str = Field(
        default="claude-haiku-4-5",
        validation_alias=_env("BLOGCHAT_MODEL_HAIKU"),
        description="Model id behind the `haiku` alias (the default).",
    )
    model_sonnet: str = Field(
        default="claude-sonnet-4-5",
        validation_alias=_env("BLOGCHAT_MODEL_SONNET"),
        description="Model id behind the `sonnet` alias.",
    )
    model_opus: str = Field(
        default="claude-opus-4-1",
        validation_alias=_env("BLOGCHAT_MODEL_OPUS"),
        description="Model id behind the `opus` alias.",
    )
    chat_titles: bool = Field(
        default=True,
        validation_alias=_env("BLOGCHAT_CHAT_TITLES"),
        description="Write a title for each chat after its first exchange.",
    )
    title_model: str | None = Field(
        default=None,
        validation_alias=_env("BLOGCHAT_TITLE_MODEL"),
        description="Model id that writes chat titles (default: the `haiku` model).",
    )
    max_turns: int = Field(
        default=8,
        ge=1,
        validation_alias=_env("BLOGCHAT_MAX_TURNS"),
        description="Most model round-trips (tool calls) the agent may make per reader message.",
    )
    thinking_budget: int = Field(
        default=2048,
        ge=0,
        validation_alias=_env("BLOGCHAT_THINKING_BUDGET"),
        description="Extended-thinking token budget per model call; 0 turns thinking off.",
    )
    max_live_clients: int = Field(
        default=8,
        ge=1,
        validation_alias=_env("BLOGCHAT_MAX_LIVE_CLIENTS"),
        description="Most agent processes alive at once; the least recently used is reclaimed.",
    )
    client_idle_seconds: float = Field(
        default=300.0,
        gt=0,
        validation_alias=_env("BLOGCHAT_CLIENT_IDLE_SECONDS"),
        description="An agent process idle this long is reclaimed.",
    )

    spare_processes: int = Field(
        default=1,
        ge=0,
        validation_alias=_env("BLOGCHAT_SPARE_PROCESSES"),
        description=(
            "Agent processes kept started ahead for new chats of the default persona, so a "
            "first answer does not wait for a process start (about 200 MB each). 0: none."
        ),
    )

    max_parallel_starts: int = Field(
        default=0,
        ge=0,
        validation_alias=_env("BLOGCHAT_MAX_PARALLEL_STARTS"),
        description="Most agent processes starting at once (it is CPU-bound). 0: one per CPU.",
    )
    agent_dir: Path | None = Field(
        default=None,
        validation_alias=_env("BLOGCHAT_AGENT_DIR"),
        description="Working and config directory of the agent processes. Unset: <data dir>/agent.",
    )
    agent_config_dir: Path | None = Field(
        default=None,
        validation_alias=_env("BLOGCHAT_AGENT_CONFIG_DIR"),
        description=(
            "This instance's own config, home and temp directories of its agent processes. "
            "Unset: the agent dir, or <agent dir>/instances/<instance id> with Redis."
        ),
    )
    stall_seconds: float = Field(
        default=60.0,
        gt=0,
        validation_alias=_env("BLOGCHAT_STALL_SECONDS"),
        description="A turn that gets nothing from the model for this long fails (or is retried).",
    )
    provider_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        validation_alias=_env("BLOGCHAT_PROVIDER_RETRIES"),
        description=(
            "Retries of a model request that failed (overloaded, rate limited, server error), "
            "and of a turn whose agent process failed before anything was streamed."
        ),
    )
    provider_retry_delay: float = Field(
        default=1.0,
        ge=0,
        validation_alias=_env("BLOGCHAT_PROVIDER_RETRY_DELAY"),
        description=(
            "Seconds before retrying a turn whose agent process failed; each next retry "
            "waits twice as long."
        ),
    )
    provider_retry_max_wait: float = Field(
        default=30.0,
        gt=0,
        validation_alias=_env("BLOGCHAT_PROVIDER_RETRY_MAX_WAIT"),
        description=(
            "Longest wait before a retry, whatever the provider's retry-after asks; a longer "
            "wait ends the turn with a retryable error instead."
        ),
    )
    max_output_tokens: int = Field(
        default=8192,
        ge=1,
        validation_alias=_env("BLOGCHAT_MAX_OUTPUT_TOKENS"),
        description=(
            "max_tokens of every model request; it must exceed the thinking budget when "
            "thinking is on."
        ),
    )
    agent_env_passthrough: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=_env("BLOGCHAT_AGENT_ENV_PASSTHROUGH"),
        description=(
            "Names of server environment variables (comma-separated, e.g. HTTPS_PROXY) that "
            "the agent processes may see besides their own. Default: none."
        ),
    )

    offline_tokens_per_second: float = Field(
        default=250.0,
        ge=0,
        validation_alias=_env("BLOGCHAT_OFFLINE_TOKENS_PER_SECOND"),
        description="How fast the offline engine streams its answer (0: as fast as it can).",
    )

    # Telemetry.
    braintrust_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=_env("BRAINTRUST_API_KEY"),
        description="Braintrust API key. Unset: telemetry is off and costs nothing.",
    )
    braintrust_project: str = Field(
        default="blogchat",
        validation_alias=_env("BRAINTRUST_PROJECT"),
        description="Braintrust project that receives the traces.",
    )
    braintrust_app_url: str | None = Field(
        default=None,
        validation_alias=_env("BRAINTRUST_APP_URL"),
        description="Braintrust app URL to log in at. Unset: https://www.braintrust.dev.",
    )
    braintrust_api_url: str | None = Field(
        default=None,
        validation_alias=_env("BRAINTRUST_API_URL"),
        description="Braintrust API URL that receives the traces. Unset: the one login returns.",
    )
    braintrust_org_name: str | None = Field(
        default=None,
        validation_alias=_env("BRAINTRUST_ORG_NAME"),
        description="Braintrust organization, for an API key that belongs to several.",
    )
    telemetry_flush_seconds: float = Field(
        default=5.0,
        gt=0,
        validation_alias=_env("BLOGCHAT_TELEMETRY_FLUSH_SECONDS"),
        description="At shutdown, how long pending traces may take to be sent before they go.",
    )

    log_level: str = Field(
        default="INFO",
        validation_alias=_env("BLOGCHAT_LOG_LEVEL"),
        description="Python logging level.",
    )

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().rstrip("/") for part in value.split(",") if part.strip()]
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not origin.startswith(("http://", "https://")):
                raise ValueError(f"origin {origin!r} must start with http:// or https://")
        return value

    @field_validator("secret_key")
    @classmethod
    def _check_secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty value means "not set": the generated key is used.
        if value is not None and 0 < len(value.get_secret_value()) < MIN_SECRET_KEY_LENGTH:
            raise ValueError(
                f"must be at least {MIN_SECRET_KEY_LENGTH} characters of random text "
                "(python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        return value

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        for proxy in value:
            if proxy == "*":
                continue
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"{proxy!r} is not an IP address, a network (10.0.0.0/8) or *"
                ) from None
        return value

    @field_validator("agent_env_passthrough", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("agent_env_passthrough")
    @classmethod
    def _check_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _VARIABLE_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return value

    @field_validator("model_haiku", "model_sonnet", "model_opus")
    @classmethod
    def _check_model_id(cls, value: str) -> str:
        # The agent CLI sends a full model id as it is, but maps an alias ("opus", a word
        # without a version) onto a model of its own choosing, and strips a "[1m]"-style
        # suffix: the provider would not get the model the app reports.
        if not _MODEL_ID.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a full model id (such as claude-opus-4-1): the agent "
                "sends only full ids as they are; aliases and [suffixes] are mapped"
            )
        return value

    @model_validator(mode="after")
    def _check_output_tokens(self) -> Settings:
        budget = self.thinking_budget and max(MIN_THINKING_BUDGET, self.thinking_budget)
        if budget and self.max_output_tokens <= budget:
            raise ValueError(
                f"BLOGCHAT_MAX_OUTPUT_TOKENS ({self.max_output_tokens}) must be greater "
                f"than the thinking budget ({budget})"
            )
        return self

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgres")):
            raise ValueError("only sqlite:// and postgresql:// URLs are supported")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _check_cluster_database(self) -> Settings:
        # Several instances share one database: a SQLite file cannot be shared.
        if self.redis_url and not self.database.startswith("postgresql"):
            raise ValueError(
                "BLOGCHAT_REDIS_URL (several instances) requires PostgreSQL: set DATABASE_URL "
                "to a postgresql:// URL, or unset BLOGCHAT_REDIS_URL to run one instance on SQLite"
            )
        return self

    @property
    def clustered(self) -> bool:
        """Whether this is one of several instances sharing Redis and PostgreSQL."""
        return self.redis_url is not None

    @property
    def rate_limit_storage(self) -> str:
        """Where rate limit counters live: Redis when several instances share them."""
        return self.redis_url or "memory://"

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {value!r}")
        return level

    @property
    def database(self) -> str:
        """The async SQLAlchemy URL of the database, with the driver filled in."""
        url = self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'blogchat.db'}"
        for prefix, driver in (
            ("postgres://", "postgresql+asyncpg://"),
            ("postgresql://", "postgresql+asyncpg://"),
            ("sqlite://", "sqlite+aiosqlite://"),
        ):
            if url.startswith(prefix):
                return driver + url.removeprefix(prefix)
        return url

    @property
    def claude_enabled(self) -> bool:
        """Whether chats run on Claude (credentials configured) or the offline engine."""
        return self.anthropic_api_key is not None and bool(
            self.anthropic_api_key.get_secret_value()
        )

    def signing_key(self) -> str:
        """The cookie-signing secret: configured, or generated once and kept in the data dir."""
        if self.secret_key is not None and self.secret_key.get_secret_value():
            return self.secret_key.get_secret_value()
        path = self.data_dir / "secret_key"
        if path.exists():
            return path.read_text().strip()
        log.warning(
            "BLOGCHAT_SECRET_KEY is not set: generated one into %s. "
            "Set BLOGCHAT_SECRET_KEY in production.",
            path,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(48)
        # Written privately (mkstemp: 0600) and linked into place in one step, so nobody
        # reads a half-written or world-readable key, and workers starting together all
        # end up with the key of whichever linked first.
        fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=".secret_key.")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(key + "\n")
            try:
                os.link(scratch, path)
            except FileExistsError:
                return path.read_text().strip()
        finally:
            os.unlink(scratch)
        return key

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable behind a field."""
        alias = cls.model_fields[field].validation_alias
        assert isinstance(alias, AliasChoices)
        return str(alias.choices[0])


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning a validation failure into a message naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:
                # A rule across settings: its message names the variables.
                problems.append(str(error["msg"]).removeprefix("Value error, "))
                continue
            field = str(error["loc"][0])
            name = Settings.env_name(field) if field in Settings.model_fields else field
            problems.append(f"{name}: {error['msg']}")
        raise SettingsError("invalid setting " + "; ".join(problems)) from None
