"""Typed configuration, loaded from YAML and validated once at start-up.

The seed's keys (``models.llm.*``, ``models.embedding.*``, ``vtuber.response.*``) are accepted
unchanged. Unknown keys are errors (a typo must not silently fall back to a default). Secrets are
never read from the file: they come from the environment only (see ``Secrets``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from bot.adapter_config import AdaptersConfig
from bot.errors import ConfigError, MissingSecretError
from engine.config import (
    ConversionMode,
    EngineConfig,
    ModelsConfig,
    Section,
    describe_errors,
)
from engine.config import VTuberConfig as EngineVTuberConfig
from memory.urls import mask_url

DEFAULT_CONFIG_FILE = "config.yaml"


class ConversionOverrides(Section):
    """Chinese conversion per channel or per user, keyed "platform:id" (e.g. "discord:123")."""

    channels: dict[str, ConversionMode] = Field(default_factory=dict)
    users: dict[str, ConversionMode] = Field(default_factory=dict)

    def mode_for(self, platform: str, channel_id: str, user_id: str) -> str | None:
        return self.users.get(f"{platform}:{user_id}") or self.channels.get(
            f"{platform}:{channel_id}"
        )


class VTuberConfig(EngineVTuberConfig):
    """The engine's ``vtuber`` section plus the runtime's per-channel / per-user overrides."""

    conversion_overrides: ConversionOverrides = Field(default_factory=ConversionOverrides)


class StoreConfig(Section):
    # None means a SQLite file ``vtuber.db`` in the data dir. PostgreSQL:
    # "postgresql+asyncpg://user@host/db" (password through VTUBER_DATABASE_URL instead).
    url: str | None = None
    auto_migrate: bool = True
    # How long to wait for a SQLite file another process holds locked before giving up.
    busy_timeout_ms: int = Field(10_000, ge=0, le=600_000)
    # Several processes on one PostgreSQL: a process holds its role (platforms, shards) by a
    # lease it renews every third of this; killed or cut off, it loses the role this long
    # after its last renewal, and another process may take it.
    role_lease_s: float = Field(15.0, ge=1.0, le=600.0)
    # PostgreSQL: connections this process keeps, and how long a unit of work waits for one
    # before it fails (a big backlog wants more; the server's max_connections bounds them all).
    pool_size: int = Field(15, ge=2, le=500)
    pool_timeout_s: float = Field(30.0, gt=0, le=600)
    history_messages: int = Field(12, ge=0, le=200)
    history_token_budget: int = Field(1024, ge=0)
    # Retrieval (RAG): persona knowledge + this viewer's long-term memories, hybrid search.
    rag_enabled: bool = True
    rag_top_k: int = Field(3, ge=1, le=50)
    # Relevance floor: a chunk found only by meaning must be at least this similar (cosine,
    # -1..1) to the message; 0.3 suits the bundled MiniLM. -1 turns the floor off.
    rag_min_similarity: float = Field(0.3, ge=-1.0, le=1.0)
    # Keep viewers' longer messages as long-term memories (retrievable later, per viewer).
    remember_messages_min_chars: int = Field(12, ge=0)


class AdminsConfig(Section):
    discord_user_ids: list[int] = Field(default_factory=list)
    discord_role_ids: list[int] = Field(default_factory=list)
    twitch_logins: list[str] = Field(default_factory=list)


class LimitsConfig(Section):
    user_messages_per_minute: int = Field(6, ge=1)
    # Per channel, all viewers together; 0 = no channel limit. Over-limit messages are
    # stored as dropped.
    channel_messages_per_minute: int = Field(0, ge=0)
    max_pending: int = Field(64, ge=1)
    # None: as many as the engine batches (models.llm.max_batch_size in process; 32 to an
    # OpenAI-compatible server). Fewer would leave a GPU's batch slots empty under load.
    max_concurrent_generations: int | None = Field(None, ge=1)
    reply_timeout_s: float = Field(120.0, gt=0)
    # Platforms that can edit messages show the reply while it is generated, editing it at
    # most once per this many seconds. 0 turns streaming off.
    stream_edit_interval_s: float = Field(1.0, ge=0)
    # Busy chats: a message still waiting after this many seconds is dropped (0 = never).
    stale_after_s: float = Field(0.0, ge=0)
    # Overload: refuse a new message (dropped, busy) when, at the pace replies finished in the
    # last 10 s, it would wait longer than this for a generation slot; 0 = never.
    max_wait_s: float = Field(0.0, ge=0)
    # Overload of the bot itself (its store, its event loop): fewer messages are let in at
    # once while recent ones took longer than this from admission to recorded, the model's
    # time left out (bot.flow.OverheadLimit); refused ones end dropped (busy). 0 = off, the
    # default: on a machine whose store or CPU is slow at times it refuses messages a queue
    # would have answered; 3 suits a flooded channel on one process and SQLite.
    max_overhead_ms: float = Field(0.0, ge=0)
    # Answer only a viewer's newest waiting message; older waiting ones are dropped...
    per_user_queue_of_one: bool = False
    # ...or folded into that newest one, so a burst gets one answer that saw all of it.
    coalesce_bursts: bool = False
    # On SIGINT/SIGTERM: new messages are refused at once, in-flight replies get this long to
    # finish; what is still unfinished then ends expired (shutdown).
    shutdown_grace_s: float = Field(30.0, ge=0, le=600)
    # On start-up, messages an earlier run recorded but never finished (it crashed or was
    # killed) are answered once their platform is back, if younger than this; older ones end
    # expired (crash). 0 = expire them all.
    answer_leftovers_within_s: float = Field(60.0, ge=0)


class OverlayConfig(Section):
    # Seconds a finished reply stays on screen before it fades out.
    fade_after_s: float = Field(8.0, ge=0.5, le=600)
    # Extra CSS appended after the overlay's own (the OBS browser source's look).
    css: str = ""
    # Mood name -> CSS colour of the mood indicator (others get a colour from their name).
    mood_colors: dict[str, str] = Field(default_factory=dict)


class WebConfig(Section):
    """The operator's HTTP server inside ``run``: overlay, dashboard, metrics, health."""

    enabled: bool = False
    host: str = "127.0.0.1"  # anything else needs VTUBER_WEB_TOKEN
    port: int = Field(8765, ge=0, le=65535)  # 0: any free port (tests)
    recent_messages: int = Field(50, ge=1, le=1000)  # the dashboard's list
    overlay: OverlayConfig = Field(default_factory=OverlayConfig)


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"  # json: one object per line, for collectors


class Secrets(BaseModel):
    """Secrets, from the environment only. ``SecretStr`` masks them in repr and dumps."""

    model_config = ConfigDict(frozen=True)

    discord_token: SecretStr | None = None
    twitch_client_id: SecretStr | None = None
    twitch_client_secret: SecretStr | None = None
    twitch_bot_id: str | None = None
    twitch_access_token: SecretStr | None = None
    twitch_refresh_token: SecretStr | None = None
    openai_api_key: SecretStr | None = None
    database_url: SecretStr | None = None
    web_token: SecretStr | None = None

    def values(self) -> list[str]:
        """Every secret as plain text (for masking), with a database URL's password too."""
        found = []
        for value in self.model_dump().values():
            if isinstance(value, SecretStr):
                found.append(value.get_secret_value())
        if self.database_url is not None:
            password = urlsplit(self.database_url.get_secret_value()).password
            if password:
                found.append(password)
        return found

    @classmethod
    def from_env(cls, env: Mapping[str, str], openai_key_env: str = "OPENAI_API_KEY") -> Secrets:
        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        return cls(
            discord_token=get("DISCORD_TOKEN"),
            twitch_client_id=get("TWITCH_CLIENT_ID"),
            twitch_client_secret=get("TWITCH_CLIENT_SECRET"),
            twitch_bot_id=get("TWITCH_BOT_ID"),
            twitch_access_token=get("TWITCH_ACCESS_TOKEN"),
            twitch_refresh_token=get("TWITCH_REFRESH_TOKEN"),
            openai_api_key=get(openai_key_env),
            database_url=get("VTUBER_DATABASE_URL"),
            web_token=get("VTUBER_WEB_TOKEN"),
        )


class AppConfig(Section):
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    vtuber: VTuberConfig = Field(default_factory=VTuberConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    adapters: AdaptersConfig = Field(default_factory=AdaptersConfig)
    admins: AdminsConfig = Field(default_factory=AdminsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    # Filled from the environment, never from YAML (a `secrets:` key in YAML is an error).
    secrets: Secrets = Field(default_factory=Secrets, exclude=True)

    def engine_config(self) -> EngineConfig:
        """The engine's view of this config: the same section objects, plus the API key from
        the environment (``engine`` imports nothing from ``bot``)."""
        models = self.models
        key = self.secrets.openai_api_key
        if key is not None:
            openai = models.llm.openai.model_copy(update={"api_key": key})
            models = models.model_copy(update={"llm": models.llm.model_copy(
                update={"openai": openai})})
        return EngineConfig(models=models, vtuber=self.vtuber)

    def masked_dump(self) -> dict[str, Any]:
        """Config as shown to people: secrets reduced to set/unset."""
        data = self.model_dump()
        data["secrets"] = {
            name: ("***" if value is not None else None)
            for name, value in self.secrets.model_dump().items()
        }
        if data["store"]["url"]:
            data["store"]["url"] = mask_url(data["store"]["url"])
        return data


def format_validation_error(error: ValidationError) -> list[str]:
    """One line per problem: key path, the bad value, and what is allowed."""
    return describe_errors(error)


def _yaml_secrets(data: dict[str, Any]) -> list[str]:
    """Secrets written into the YAML file (they belong in the environment)."""
    problems = []
    if "secrets" in data:
        problems.append("secrets: secrets are read from the environment only "
                        "(DISCORD_TOKEN, TWITCH_CLIENT_ID, ...); remove this section")
    openai: Any = data
    for key in ("models", "llm", "openai"):
        openai = openai.get(key) if isinstance(openai, dict) else None
    if isinstance(openai, dict) and "api_key" in openai:
        problems.append("models.llm.openai.api_key: the key is read from the environment "
                        "variable named by models.llm.openai.api_key_env; remove it here")
    return problems


def parse_config(data: Any, env: Mapping[str, str] | None = None,
                 source: str = "config") -> AppConfig:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): expected a mapping of sections, got "
                           f"{type(data).__name__}"], source)
    if problems := _yaml_secrets(data):
        raise ConfigError(problems, source)
    try:
        config = AppConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc), source) from None
    environ = os.environ if env is None else env
    config.secrets = Secrets.from_env(environ, config.models.llm.openai.api_key_env)
    return config


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> AppConfig:
    """Load ``path``; with None, ``./config.yaml`` if present, else the embedded defaults."""
    if path is None:
        default = Path(DEFAULT_CONFIG_FILE)
        if not default.is_file():
            return parse_config({}, env, source="built-in defaults")
        path = default
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"--config: file not found: {path}"], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"--config: cannot read {path}: {exc}"], str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: invalid YAML{where}: {problem}"], str(path)) from None
    return parse_config(data, env, source=str(path))


# Which secret each platform adapter needs, checked before any client is built.
REQUIRED_SECRETS: dict[str, tuple[tuple[str, str], ...]] = {
    "discord": (("discord_token", "DISCORD_TOKEN"),),
    "twitch": (
        ("twitch_client_id", "TWITCH_CLIENT_ID"),
        ("twitch_client_secret", "TWITCH_CLIENT_SECRET"),
        ("twitch_bot_id", "TWITCH_BOT_ID"),
        ("twitch_access_token", "TWITCH_ACCESS_TOKEN"),
        ("twitch_refresh_token", "TWITCH_REFRESH_TOKEN"),
    ),
}


def check_secrets(config: AppConfig, adapter_names: list[str]) -> None:
    """Raise MissingSecretError (one line per missing variable) for the adapters to start."""
    problems = [
        f"adapters.{name}.enabled is true but the environment variable {env_name} is not set"
        for name in adapter_names
        for field, env_name in REQUIRED_SECRETS.get(name, ())
        if getattr(config.secrets, field) is None
    ]
    if problems:
        raise MissingSecretError(problems, "environment")


def changes_needing_restart(old: AppConfig, new: AppConfig) -> list[str]:
    """What a reload from ``old`` to ``new`` cannot apply to a running bot."""
    restart = [name for name in ("models", "store", "adapters", "web")
               if getattr(new, name) != getattr(old, name)]
    applied_live = {"persona", "moderation"}
    if new.vtuber.model_dump(exclude=applied_live) != old.vtuber.model_dump(
            exclude=applied_live):
        restart.append("vtuber (but vtuber.persona and vtuber.moderation)")
    if new.limits.max_concurrent_generations != old.limits.max_concurrent_generations:
        restart.append("limits.max_concurrent_generations")
    return restart
