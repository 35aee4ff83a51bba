"""The Twitch adapter: EventSub chat messages become ChatEvents; replies go out through
Helix ``POST /chat/messages`` within Twitch's send limits, threaded to the parent message.
One process subscribes on its own websocket session; several share an EventSub conduit, each
holding some of its shards (``conduit.py``)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import twitchio
from twitchio import eventsub

from adapters.common.pieces import PiecesSent
from adapters.common.send_limiter import SendLimiter
from adapters.twitch_adapter.conduit import resolve_conduit, subscribe_conduit
from bot import commands
from bot.commands import Caller
from bot.config import AppConfig
from bot.errors import BotError, ConfigError, PlatformUnreachableError
from bot.events import (
    ChatEvent,
    DeliveryError,
    EventHandler,
    Leftover,
    ReplySink,
    Roles,
    RuntimeServices,
)

log = logging.getLogger(__name__)
PLATFORM = "twitch"
TWITCH_LIMIT = 500
# Twitch's chat send limits: 20 messages per 30 s for a normal bot account, 100 per 30 s where
# the bot is a moderator or the broadcaster.
TWITCH_USER_LIMIT = (20, 30.0)
TWITCH_MODERATOR_LIMIT = (100, 30.0)
TWITCH_TOO_FAST = "msg_ratelimit"  # the drop reason (IRC's NOTICE id) for a send over the limit


class TwitchLoginError(BotError):
    """Twitch refused the client credentials or the bot's user token."""

    exit_code = 77  # EX_NOPERM


class TwitchSink:
    """ReplySink over one channel: 500-character pieces, each through the send limiter."""

    supports_edits = False  # Twitch chat messages cannot be edited

    def __init__(self, broadcaster: twitchio.PartialUser, bot_id: str, limiter: SendLimiter,
                 reply_to: str | None) -> None:
        self._broadcaster = broadcaster
        self._bot_id = bot_id
        self._limiter = limiter
        self._reply_to = reply_to
        self._pieces = PiecesSent(TWITCH_LIMIT)

    async def send(self, text: str) -> str | None:
        for piece in self._pieces.still_to_send(text):
            await self._limiter.acquire()
            try:
                sent = await self._broadcaster.send_message(
                    piece, self._bot_id, token_for=self._bot_id,
                    reply_to_message_id=self._reply_to)
            except twitchio.HTTPException as exc:
                raise DeliveryError(f"Twitch answered {exc.status}: {exc}",
                                    retryable=exc.status == 429 or exc.status >= 500) from exc
            except twitchio.MessageRejectedError as exc:
                raise self._dropped(exc) from exc
            self._pieces.sent(sent.id)
        return self._pieces.first()

    def send_backlog_s(self) -> float:
        """How long a reply asked for now would wait for this channel's send limit."""
        return self._limiter.backlog_s()

    def _dropped(self, exc: twitchio.MessageRejectedError) -> DeliveryError:
        """Twitch took the message and did not post it (``is_sent: false``). Sent too fast:
        again once our window has passed; anything else (followers-only, a timeout, AutoMod)
        a retry would not change."""
        too_fast = exc.code == TWITCH_TOO_FAST
        if too_fast:
            self._limiter.fill()
        return DeliveryError(f"Twitch dropped the message ({exc.code}): {exc.message}",
                             retryable=too_fast)

    async def edit(self, message_id: str, text: str) -> None:
        await self.send(text)

    async def typing(self) -> None:
        return None


class _ChatEvents:
    """twitchio's hooks, handed to the adapter: the same on one session and on a conduit."""

    vtuber: TwitchAdapter  # twitchio.Client already has an "adapter" (its web server)

    async def setup_hook(self) -> None:
        assert isinstance(self, twitchio.Client)
        await self.vtuber.subscribe(self)

    async def event_message(self, payload: twitchio.ChatMessage) -> None:
        await self.vtuber.on_chat_message(payload)

    async def event_message_delete(self, payload: Any) -> None:
        await self.vtuber.on_message_deleted(str(payload.message_id))

    async def event_chat_clear(self, payload: Any) -> None:
        await self.vtuber.on_chat_cleared(str(payload.broadcaster.id), None)

    async def event_chat_clear_user(self, payload: Any) -> None:
        # Twitch sends this when a viewer is banned or timed out.
        await self.vtuber.on_chat_cleared(str(payload.broadcaster.id), str(payload.user.id))


class TwitchClient(_ChatEvents, twitchio.Client):
    def __init__(self, adapter: TwitchAdapter, **options: Any) -> None:
        super().__init__(**options)
        self.vtuber = adapter


class TwitchConduitClient(_ChatEvents, twitchio.AutoClient):
    def __init__(self, adapter: TwitchAdapter, **options: Any) -> None:
        super().__init__(**options)
        self.vtuber = adapter


class TwitchAdapter:
    name = PLATFORM

    def __init__(self, config: AppConfig, *, services: RuntimeServices,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.services = services
        secrets = config.secrets
        self._access = _secret(secrets.twitch_access_token)
        self._refresh = _secret(secrets.twitch_refresh_token)
        self.bot_id = secrets.twitch_bot_id or ""
        self._login: dict[str, Any] = {
            "client_id": _secret(secrets.twitch_client_id),
            "client_secret": _secret(secrets.twitch_client_secret),
            "bot_id": self.bot_id, "fetch_client_user": False}
        # On a conduit, the client that runs is made in ``run`` (it needs the conduit's id).
        self.client: twitchio.Client = TwitchClient(self, **self._login)
        self._limiters: dict[str, SendLimiter] = {}
        self._rng = rng or random.Random()
        self._handle: EventHandler | None = None
        self.bot_login = ""
        self._subscribed = asyncio.Event()

    # -- connection -------------------------------------------------------------------------

    async def subscribe(self, client: twitchio.Client) -> None:
        """Called by twitchio's setup hook: register the bot's token, then subscribe to chat
        (and deletions) of every configured channel over the EventSub websocket."""
        if self._access:
            validated = await client.add_token(self._access, self._refresh)
            self.bot_login = validated.login or ""
        users = await _channels(client, self.config)
        subscriptions = [subscription for user in users for subscription in (
            eventsub.ChatMessageSubscription(broadcaster_user_id=user.id, user_id=self.bot_id),
            eventsub.ChatMessageDeleteSubscription(broadcaster_user_id=user.id,
                                                   user_id=self.bot_id),
            eventsub.ChatClearSubscription(broadcaster_user_id=user.id, user_id=self.bot_id),
            eventsub.ChatClearUserMessagesSubscription(broadcaster_user_id=user.id,
                                                       user_id=self.bot_id))]
        if isinstance(client, twitchio.AutoClient):
            await subscribe_conduit(client, subscriptions)
        else:
            for subscription in subscriptions:
                await client.subscribe_websocket(payload=subscription, token_for=self.bot_id)
        log.info("subscribed to chat in %s%s", ", ".join(u.name or u.id for u in users),
                 self._shards_held())
        self._subscribed.set()

    async def ready(self) -> None:
        await self._subscribed.wait()

    def is_ready(self) -> bool:
        """Subscribed to chat on an EventSub session (``/readyz``)."""
        return self._subscribed.is_set()

    def channel_sink(self, channel_id: str) -> ReplySink:
        """A sink that posts into a channel, replying to nothing (the dashboard's "say"),
        within the same send limit as the replies there."""
        return TwitchSink(self.client.create_partialuser(channel_id), self.bot_id,
                          self._limiter(channel_id), reply_to=None)

    def reply_sink(self, leftover: Leftover) -> ReplySink | None:
        """A sink that replies to a stored message (crash recovery)."""
        if not leftover.channel_id:
            return None
        broadcaster = self.client.create_partialuser(leftover.channel_id)
        return TwitchSink(broadcaster, self.bot_id, self._limiter(leftover.channel_id),
                          reply_to=leftover.platform_message_id)

    @staticmethod
    async def check_credentials(config: AppConfig) -> None:
        """Log in (an app token from the client id and secret), validate the bot's user token
        and look the channels up, before the model loads: a typo costs a second."""
        access, refresh, client_id, client_secret = (
            _secret(config.secrets.twitch_access_token),
            _secret(config.secrets.twitch_refresh_token),
            _secret(config.secrets.twitch_client_id),
            _secret(config.secrets.twitch_client_secret))
        client = twitchio.Client(client_id=client_id, client_secret=client_secret,
                                 bot_id=config.secrets.twitch_bot_id or "",
                                 fetch_client_user=False)
        try:
            async with _login_errors():
                await client.login(load_tokens=False, save_tokens=False)
                if access:
                    await client.add_token(access, refresh)
                await _channels(client, config)
        finally:
            await client.close(save_tokens=False)

    async def run(self, handle: EventHandler) -> None:
        self._handle = handle
        rules = self.config.adapters.twitch
        async with _login_errors():
            if rules.shard_ids is not None:
                self.client = TwitchConduitClient(
                    self, conduit_id=await self._conduit_id(), shard_ids=rules.shard_ids,
                    **self._login)
            # No OAuth web adapter and no token file: tokens live in the environment only.
            await self.client.start(with_adapter=False, load_tokens=False, save_tokens=False)

    async def _conduit_id(self) -> str:
        client = twitchio.Client(**self._login)
        try:
            await client.login(load_tokens=False, save_tokens=False)
            return await resolve_conduit(client, self.config.adapters.twitch)
        finally:
            await client.close(save_tokens=False)

    def _shards_held(self) -> str:
        rules = self.config.adapters.twitch
        if rules.shard_ids is None:
            return ""
        return (f" (conduit shards {', '.join(map(str, rules.shard_ids))} of "
                f"{rules.shard_count})")

    async def close(self) -> None:
        await self.client.close()

    # -- chat -------------------------------------------------------------------------------

    def _limiter(self, broadcaster_id: str) -> SendLimiter:
        """One send limiter per channel, matching Twitch's chat limits for this bot."""
        if broadcaster_id not in self._limiters:
            rules = self.config.adapters.twitch
            limit, window = (TWITCH_MODERATOR_LIMIT if rules.bot_is_moderator
                             else TWITCH_USER_LIMIT)
            if rules.send_limit is not None:
                limit, window = rules.send_limit, rules.send_window_s
            # 10% headroom: Twitch counts when messages arrive, and network jitter can bunch
            # sends that left within the window's edge.
            self._limiters[broadcaster_id] = SendLimiter(limit, window * 1.1)
        return self._limiters[broadcaster_id]

    def _addressed(self, message: twitchio.ChatMessage) -> bool:
        text = message.text.casefold()
        names = [n.casefold() for n in self.services.persona_info()["call_names"]]
        if self.bot_login:
            names.append(f"@{self.bot_login.casefold()}")
        if any(name in text for name in names):
            return True
        reply = message.reply
        if reply is not None and str(reply.parent_user.id) == self.bot_id:
            return True
        chance = self.config.adapters.twitch.random_reply_chance
        return chance > 0 and self._rng.random() < chance

    def _roles(self, message: twitchio.ChatMessage) -> Roles:
        chatter = message.chatter
        admins = {login.casefold() for login in self.config.admins.twitch_logins}
        return Roles(is_admin=(chatter.name or "").casefold() in admins,
                     is_moderator=chatter.moderator, is_broadcaster=chatter.broadcaster)

    async def on_chat_message(self, message: twitchio.ChatMessage) -> None:
        chatter = message.chatter
        login = (chatter.name or "").casefold()
        ignored = {name.casefold() for name in self.config.adapters.twitch.ignored_bots}
        if self._handle is None or str(chatter.id) == self.bot_id or login in ignored:
            return
        broadcaster = message.broadcaster
        sink = TwitchSink(broadcaster, self.bot_id, self._limiter(str(broadcaster.id)),
                          reply_to=message.id)
        roles = self._roles(message)
        text = message.text.strip()
        if text.startswith("!"):
            await self._command(text, message, roles, sink)
            return
        if not self._addressed(message):
            return
        await self._handle(ChatEvent(
            platform=PLATFORM, channel_id=str(broadcaster.id),
            platform_user_id=str(chatter.id),
            display_name=chatter.display_name or login, text=text, sink=sink,
            message_id=message.id, addressed=True, roles=roles,
            reply_to_message_id=message.reply.parent_message_id if message.reply else None,
        ))

    async def _command(self, text: str, message: twitchio.ChatMessage, roles: Roles,
                       sink: TwitchSink) -> None:
        """``!word [word] [argument]`` onto the command table; words that name none of ours
        are left alone (another bot's ``!uptime``)."""
        found = commands.find(PLATFORM, text[1:].split())
        if found is None:
            return
        command, rest = found
        chatter = message.chatter
        if not self.services.allow_command(PLATFORM, str(chatter.id)):
            return  # over the viewer's chat budget: commands are not a way around it
        caller = Caller(PLATFORM, str(chatter.id), chatter.name or str(chatter.id), roles)
        argument = command.argument
        value = commands.chat_argument(argument, rest)
        if argument is not None and argument.required and value is None:
            await sink.send(f"Usage: !{command.name} {argument.name.upper()}")
            return
        result = await command.run(self.services, commands.Invocation(
            caller, value, confirm_hint=f"!{command.name} confirm"))
        await sink.send(result.plain_text(" | "))

    async def on_chat_cleared(self, channel_id: str, user_id: str | None) -> None:
        purged = await self.services.purge_messages(PLATFORM, channel_id, user_id)
        log.info("moderation: purged %d message(s) in %s%s", purged, channel_id,
                 f" from {user_id}" if user_id else "")

    async def on_message_deleted(self, message_id: str) -> None:
        if await self.services.purge_message(PLATFORM, message_id):
            log.info("purged deleted Twitch message %s from memory", message_id)


def _secret(value: Any) -> str:
    return value.get_secret_value() if value is not None else ""


async def _channels(client: twitchio.Client, config: AppConfig) -> list[twitchio.User]:
    """The configured channels' users; a login Twitch does not know is a config error (the bot
    would report ready and answer nothing there)."""
    channels = config.adapters.twitch.channels
    users = list(await client.fetch_users(logins=channels)) if channels else []
    found = {(user.name or "").casefold() for user in users}
    unknown = [login for login in channels if login.casefold() not in found]
    if unknown:
        raise ConfigError([f"adapters.twitch.channels: Twitch knows no channel "
                           f"{', '.join(map(repr, unknown))}; check the spelling"])
    return users


@asynccontextmanager
async def _login_errors() -> AsyncIterator[None]:
    """Twitch's answers to a login, as the one-line errors the CLI exits with."""
    try:
        yield
    except twitchio.HTTPException as exc:
        if exc.status in (400, 401, 403):
            raise TwitchLoginError(
                f"Twitch rejected the credentials (HTTP {exc.status}): check TWITCH_CLIENT_ID"
                ", TWITCH_CLIENT_SECRET and TWITCH_ACCESS_TOKEN") from None
        # Only the status: twitchio's text can quote the token URL with the client secret.
        raise PlatformUnreachableError.http("Twitch", exc.status) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise PlatformUnreachableError.network("Twitch", exc) from None
