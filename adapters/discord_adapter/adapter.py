"""The Discord adapter: a ``discord.Client`` whose messages become ChatEvents and whose app
commands call the runtime's services. Platform code stays in this package."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import discord
from discord import app_commands

from adapters.discord_adapter.commands import register_commands
from adapters.discord_adapter.roles import member_roles
from adapters.discord_adapter.sink import ChannelEdits, DiscordSink
from bot.config import AppConfig
from bot.errors import BotError, PlatformUnreachableError
from bot.events import ChatEvent, EventHandler, Leftover, ReplySink, RuntimeServices

log = logging.getLogger(__name__)
PLATFORM = "discord"


class DiscordLoginError(BotError):
    """Discord refused the token."""

    exit_code = 77  # EX_NOPERM


class _VTuberEvents:
    """Event handlers shared by the plain and the auto-sharded client."""

    adapter: DiscordAdapter
    tree: app_commands.CommandTree

    def _setup(self, adapter: DiscordAdapter) -> None:
        self.adapter = adapter
        self.tree = app_commands.CommandTree(self)  # type: ignore[arg-type]

    async def setup_hook(self) -> None:
        register_commands(self.tree, self.adapter.config, self.adapter.services)

    async def on_ready(self) -> None:
        client: Any = self
        log.info("connected to Discord as %s in %d guild(s)", client.user, len(client.guilds))

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self.adapter.on_message_deleted(str(payload.message_id))


def _client_options(options: dict[str, Any]) -> dict[str, Any]:
    intents = options.pop("intents", None) or discord.Intents.default()
    intents.message_content = True  # privileged: enable it in the developer portal
    return {"intents": intents, "allowed_mentions": discord.AllowedMentions.none(), **options}


class VTuberClient(_VTuberEvents, discord.Client):
    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**_client_options(options))
        self._setup(adapter)


class VTuberShardedClient(_VTuberEvents, discord.AutoShardedClient):
    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**_client_options(options))
        self._setup(adapter)


class DiscordAdapter:
    name = PLATFORM

    def __init__(self, config: AppConfig, *, services: RuntimeServices,
                 token: str | None = None, client_options: dict[str, Any] | None = None
                 ) -> None:
        self.config = config
        self.services = services
        secret = config.secrets.discord_token
        self._token = token or (secret.get_secret_value() if secret else "")
        self._edits = ChannelEdits()  # shared by the replies in each channel
        rules = config.adapters.discord
        options = dict(client_options or {})
        if rules.shard_ids is not None:  # this process runs some of several processes' shards
            options.update(shard_ids=rules.shard_ids, shard_count=rules.shard_count)
        client_class = (VTuberShardedClient if rules.sharded or rules.shard_ids is not None
                        else VTuberClient)
        self.client: discord.Client = client_class(self, **options)
        self._handle: EventHandler | None = None

    # -- events -----------------------------------------------------------------------------

    def _addressed(self, message: discord.Message) -> bool:
        me = self.client.user
        if message.guild is None:
            return True
        if me is not None and me in message.mentions:
            return True
        reference = message.reference
        if reference is not None and isinstance(reference.resolved, discord.Message):
            return me is not None and reference.resolved.author.id == me.id
        rules = self.config.adapters.discord
        guild = rules.guilds.get(message.guild.id)
        return (message.channel.id in rules.channel_ids
                or (guild is not None and message.channel.id in guild.channel_ids))

    def _clean_text(self, message: discord.Message) -> str:
        me = self.client.user
        text = message.content
        if me is not None:
            text = re.sub(rf"<@!?{me.id}>", "", text)
        return text.strip()

    def to_event(self, message: discord.Message) -> ChatEvent:
        author = message.author
        return ChatEvent(
            platform=PLATFORM,
            channel_id=str(message.channel.id),
            platform_user_id=str(author.id),
            display_name=author.display_name,
            text=self._clean_text(message),
            sink=DiscordSink(message.channel, reply_to=message, edits=self._edits),
            message_id=str(message.id),
            timestamp=message.created_at,
            addressed=self._addressed(message),
            is_bot=author.bot,
            is_self=self.client.user is not None and author.id == self.client.user.id,
            roles=member_roles(self.config, author),
            reply_to_message_id=(str(message.reference.message_id)
                                 if message.reference and message.reference.message_id
                                 else None),
            conversion_mode=self._guild_conversion(message),
        )

    def _guild_conversion(self, message: discord.Message) -> str | None:
        if message.guild is None:
            return None
        guild = self.config.adapters.discord.guilds.get(message.guild.id)
        return guild.chinese_conversion if guild is not None else None

    def _permitted(self, message: discord.Message) -> bool:
        """Allow/deny lists from the config (a blocked user's messages are not even stored)."""
        rules = self.config.adapters.discord
        author = message.author
        if author.id in rules.deny_user_ids:
            return False
        if isinstance(author, discord.Member) and any(
                role.id in rules.deny_role_ids for role in author.roles):
            return False
        if message.guild is None:
            return rules.allow_dms
        channel_id = message.channel.id
        if channel_id in rules.deny_channel_ids:
            return False
        return not rules.allow_channel_ids or channel_id in rules.allow_channel_ids

    async def on_message(self, message: discord.Message) -> None:
        if self._handle is None or message.author.bot:
            return  # ourselves and every other bot
        if not self._permitted(message):
            return
        event = self.to_event(message)
        if not event.addressed:
            return
        await self._handle(event)

    async def on_message_deleted(self, message_id: str) -> None:
        purged = await self.services.purge_message(PLATFORM, message_id)
        if purged:
            log.info("purged deleted Discord message %s from memory", message_id)

    # -- answering what an earlier run left unanswered ----------------------------------------

    async def ready(self) -> None:
        await self.client.wait_until_ready()

    def is_ready(self) -> bool:
        """The gateway sent READY and the connection is open (``/readyz``)."""
        return self.client.is_ready() and not self.client.is_closed()

    def channel_sink(self, channel_id: str) -> ReplySink:
        """A sink that posts into a channel, replying to nothing (the dashboard's "say")."""
        return DiscordSink(self.client.get_partial_messageable(int(channel_id)),
                           edits=self._edits)

    def reply_sink(self, leftover: Leftover) -> ReplySink | None:
        """A sink that replies to a stored message (crash recovery) without fetching it; if
        it was deleted meanwhile, the reply goes out without the reference."""
        if not leftover.channel_id:
            return None
        channel = self.client.get_partial_messageable(int(leftover.channel_id))
        reference = (channel.get_partial_message(int(leftover.platform_message_id))
                     .to_reference(fail_if_not_exists=False)
                     if leftover.platform_message_id else None)
        return DiscordSink(channel, reply_to=reference, edits=self._edits)

    # -- lifecycle ----------------------------------------------------------------------------

    @staticmethod
    async def check_credentials(config: AppConfig) -> None:
        """Log in once and out again (Discord's ``/users/@me``), before the model loads: a
        wrong token costs a second, not a model load."""
        secret = config.secrets.discord_token
        client = discord.Client(intents=discord.Intents.none())
        try:
            async with _login_errors():
                await client.login(secret.get_secret_value() if secret else "")
        finally:
            await client.close()

    async def run(self, handle: EventHandler) -> None:
        self._handle = handle
        async with _login_errors():
            await self.client.start(self._token)

    async def close(self) -> None:
        await self.client.close()


@asynccontextmanager
async def _login_errors() -> AsyncIterator[None]:
    """Discord's answers to a login, as the one-line errors the CLI exits with."""
    try:
        yield
    except discord.LoginFailure:  # 401 on login
        raise DiscordLoginError(
            "Discord rejected DISCORD_TOKEN (401 Unauthorized): check the bot token"
        ) from None
    except discord.HTTPException as exc:
        raise PlatformUnreachableError.http("Discord", exc.status) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise PlatformUnreachableError.network("Discord", exc) from None
