"""The adapters' sections of the config: console, Discord, Twitch."""

from __future__ import annotations

from pydantic import Field, model_validator

from engine.config import ConversionMode, Section


class Sharded(Section):
    """A platform's work split over processes: this one runs ``shard_ids`` of
    ``shard_count`` (None: all of it)."""

    shard_ids: list[int] | None = None
    shard_count: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _shards_fit(self) -> Sharded:
        if self.shard_ids is not None and (
                self.shard_count is None or not all(0 <= i < self.shard_count
                                                    for i in self.shard_ids)):
            raise ValueError(f"shard_ids {self.shard_ids} need a shard_count above each of them")
        return self


class ConsoleAdapterConfig(Section):
    enabled: bool = True
    user: str = "viewer"


class DiscordGuildConfig(Section):
    """Settings of one Discord server (guild), keyed by its id under adapters.discord.guilds."""

    channel_ids: list[int] = Field(default_factory=list)  # answer every message here
    chinese_conversion: ConversionMode | None = None


class DiscordAdapterConfig(Sharded):
    """Several processes: each runs some of the gateway's shards (`run --shard-ids 0,1
    --shard-count 4`)."""

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


class TwitchAdapterConfig(Sharded):
    """Several processes: chat comes over an EventSub conduit of ``shard_count`` shards, each
    process holding some (`run --twitch-shard-ids 0 --twitch-shard-count 2`)."""

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
    # The conduit the shards share; unset: the one the client id has, which the process
    # holding shard 0 creates if there is none (the others wait up to conduit_wait_s for it).
    conduit_id: str | None = None
    conduit_wait_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _has_channels(self) -> TwitchAdapterConfig:
        if self.enabled and not self.channels:
            raise ValueError("channels is empty: list the channel logins the bot joins "
                             "(an enabled Twitch bot with none reports ready and answers "
                             "nothing)")
        return self


class AdaptersConfig(Section):
    console: ConsoleAdapterConfig = Field(default_factory=ConsoleAdapterConfig)
    discord: DiscordAdapterConfig = Field(default_factory=DiscordAdapterConfig)
    twitch: TwitchAdapterConfig = Field(default_factory=TwitchAdapterConfig)

    def enabled_names(self, include_console: bool = True) -> list[str]:
        names = [name for name in ("console", "discord", "twitch") if getattr(self, name).enabled]
        return names if include_console else [n for n in names if n != "console"]
