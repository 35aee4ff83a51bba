"""A local stand-in for Discord: the gateway websocket and the REST routes the bot uses.

It speaks the real protocol (HELLO → IDENTIFY → READY/GUILD_CREATE, heartbeats, RESUME) with
plain-text JSON frames, and records every REST call, so the real discord.py client can be run
against it with ``Route.BASE`` and ``DiscordWebSocket.DEFAULT_GATEWAY`` pointed here.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from tests.local_server import LocalServer, json_response
from tests.rate_limits import DiscordBuckets

# Guild ids chosen so that Discord's routing ((id >> 22) % 2) puts one on each of two shards.
TWO_SHARD_GUILDS = (str(2 << 22), str(3 << 22))
BOT_ID = "1000"
DISCORD_EPOCH_MS = 1_420_070_400_000
GUILD_ID = "2000"
CHANNEL_ID = "3000"
VIEWER = {"id": "4000", "username": "viewer", "discriminator": "0", "global_name": "Viewer",
          "avatar": None, "bot": False}
BOT_USER = {"id": BOT_ID, "username": "pell", "discriminator": "0", "global_name": "Pell",
            "avatar": None, "bot": True, "verified": True, "flags": 0, "mfa_enabled": False}


_json = json_response


def _with(headers: dict[str, str], response: web.Response) -> web.Response:
    response.headers.update(headers)
    return response


def shard_of(guild_id: str, shard_count: int) -> int:
    """Discord's routing: a guild's events go to shard ``(guild_id >> 22) % shard_count``."""
    return (int(guild_id) >> 22) % shard_count


def channel_of(guild_id: str) -> str:
    """The one text channel of each fake guild (the default guild keeps ``CHANNEL_ID``)."""
    return CHANNEL_ID if guild_id == GUILD_ID else str(int(guild_id) + 1)


@dataclass
class FakeDiscord(LocalServer):
    # Several guilds and shards: each gateway connection gets the guilds of the shard it
    # identified as, and a guild's events go to its shard's connection only.
    guilds: tuple[str, ...] = (GUILD_ID,)
    shard_count: int = 1
    shard_connections: dict[int, web.WebSocketResponse] = field(default_factory=dict)
    identifies: int = 0
    resumes: int = 0
    _seq: itertools.count = field(default_factory=lambda: itertools.count(1))
    _ids: itertools.count = field(default_factory=lambda: itertools.count(9000))
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    me_status: int | None = None  # answer the login request with this error status
    # Cleared: IDENTIFY gets no READY until it is set (a gateway that is slow to accept us).
    ready_allowed: asyncio.Event = field(default_factory=asyncio.Event)
    _pending_ready: asyncio.Task[None] | None = None
    # Per-route rate limits with Discord's headers and 429s; None: unlimited.
    buckets: DiscordBuckets | None = None
    # The next this many message posts are answered 429 (a limit Discord keeps reporting).
    refuse_posts: int = 0
    post_attempts: int = 0
    # (channel, nonce) -> the message a post with enforce_nonce created
    created_by_nonce: dict[tuple[str, Any], dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ready_allowed.set()

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/api/v10/users/@me", self._me)
        app.router.add_get("/api/v10/oauth2/applications/@me", self._application)
        app.router.add_get("/api/v10/gateway/bot", self._gateway_bot)
        app.router.add_get("/api/v10/gateway", self._gateway_bot)
        app.router.add_post("/api/v10/channels/{channel}/messages", self._post_message)
        app.router.add_post("/api/v10/channels/{channel}/typing", self._typing)
        app.router.add_patch("/api/v10/channels/{channel}/messages/{message}", self._edit)
        app.router.add_post("/api/v10/interactions/{id}/{token}/callback", self._callback)

    # -- REST ---------------------------------------------------------------------------------

    async def _me(self, request: web.Request) -> web.Response:
        if self.me_status is not None:
            return web.Response(status=self.me_status, text="upstream connect error")
        if request.headers.get("Authorization") != "Bot fake-token":
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        return _json(BOT_USER)

    async def _application(self, request: web.Request) -> web.Response:
        return _json({"id": BOT_ID, "name": "Pell", "icon": None, "description": "",
                      "bot_public": True, "bot_require_code_grant": False,
                      "verify_key": "0" * 64, "flags": 0, "owner": VIEWER,
                      "summary": "", "team": None})

    async def _gateway_bot(self, request: web.Request) -> web.Response:
        return _json({"url": f"ws://127.0.0.1:{self.port}/gateway", "shards": 1,
                      "session_start_limit": {"total": 1000, "remaining": 999,
                                              "reset_after": 0, "max_concurrency": 1}})

    def snowflake(self) -> str:
        """A Discord id made now: clients read a message's time from it (ms since 2015)."""
        return str(((time.time_ns() // 1_000_000 - DISCORD_EPOCH_MS) << 22) | (
            next(self._ids) & 0x3FFFFF))

    def message_payload(self, content: str, *, author: dict, mentions: list[dict],
                        message_id: str | None = None,
                        guild_id: str = GUILD_ID) -> dict[str, Any]:
        return {"id": message_id or self.snowflake(), "channel_id": channel_of(guild_id),
                "guild_id": guild_id, "author": author, "content": content,
                "timestamp": datetime.now(UTC).isoformat(), "edited_timestamp": None,
                "tts": False, "mention_everyone": False, "mentions": mentions,
                "mention_roles": [], "attachments": [], "embeds": [], "pinned": False,
                "type": 0, "flags": 0,
                "member": {"roles": [], "joined_at": "2026-01-01T00:00:00+00:00",
                           "deaf": False, "mute": False, "flags": 0}}

    def _limited(self, route: str, request: web.Request) -> tuple[web.Response | None,
                                                                   dict[str, str]]:
        """The 429 for a request over its bucket (None: allowed), and the headers."""
        if self.buckets is None:
            return None, {}
        allowed, headers, retry_after = self.buckets.take(
            f"{route}:{request.match_info.get('channel')}")
        if allowed:
            return None, headers
        self._changed.set()
        body = {"message": "You are being rate limited.", "retry_after": retry_after,
                "global": False}
        return web.Response(body=json.dumps(body).encode(), status=429,
                            headers={"Content-Type": "application/json", **headers}), headers

    async def _post_message(self, request: web.Request) -> web.Response:
        self.post_attempts += 1
        if self.refuse_posts > 0:
            self.refuse_posts -= 1
            body = {"message": "You are being rate limited.", "retry_after": 0.01,
                    "global": False}
            return _with({"Via": "1.1 google"}, _json(body, status=429))
        refused, headers = self._limited("messages", request)
        if refused is not None:
            return refused
        body = await request.json()
        # Discord's enforce_nonce: a nonce seen in the channel returns that message again.
        nonce = (request.match_info["channel"], body["nonce"]) if body.get(
            "enforce_nonce") and body.get("nonce") is not None else None
        if nonce is not None and nonce in self.created_by_nonce:
            self.record("POST (nonce seen)", request.path, body)
            return _with(headers, _json(self.created_by_nonce[nonce]))
        self.record("POST", request.path, body)
        created = self.message_payload(body.get("content") or "", author=BOT_USER, mentions=[])
        if nonce is not None:
            self.created_by_nonce[nonce] = created
        return _with(headers, _json(created))

    async def _edit(self, request: web.Request) -> web.Response:
        refused, headers = self._limited("edit", request)
        if refused is not None:
            return refused
        body = await request.json()
        self.record("PATCH", request.path, body)
        return _with(headers, _json(self.message_payload(
            body.get("content") or "", author=BOT_USER, mentions=[],
            message_id=request.match_info["message"])))

    async def _typing(self, request: web.Request) -> web.Response:
        refused, headers = self._limited("typing", request)
        if refused is not None:
            return refused
        self.record("POST", request.path, None)
        return web.Response(status=204, headers=headers)

    async def _callback(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.record("POST", request.path, body)
        return _json({"interaction": {"id": request.match_info["id"], "type": 2}})

    # -- gateway ------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 2000}}))
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            frame = json.loads(message.data)
            if frame["op"] == 1:
                await ws.send_str(json.dumps({"op": 11}))
            elif frame["op"] == 2:
                self.identifies += 1
                shard = (frame["d"].get("shard") or [0, 1])[0]
                self.shard_connections[shard] = ws
                if self.ready_allowed.is_set():
                    await self._ready(ws, shard)
                else:  # heartbeats go on being acknowledged meanwhile
                    self._pending_ready = asyncio.create_task(
                        self._ready_once_allowed(ws, shard))
            elif frame["op"] == 6:
                self.resumes += 1
                # The session ids READY hands out name their shard ("session-<shard>").
                shard = int(frame["d"]["session_id"].rsplit("-", 1)[1])
                self.shard_connections[shard] = ws
                await self.dispatch("RESUMED", {}, ws)
                self.connected.set()
        return ws

    async def _ready_once_allowed(self, ws: web.WebSocketResponse, shard: int) -> None:
        await self.ready_allowed.wait()
        await self._ready(ws, shard)

    async def _ready(self, ws: web.WebSocketResponse, shard: int) -> None:
        mine = [g for g in self.guilds if shard_of(g, self.shard_count) == shard]
        await self.dispatch("READY", {
            "v": 10, "user": BOT_USER, "guilds": [{"id": g, "unavailable": True} for g in mine],
            "session_id": f"session-{shard}",
            "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway",
            "application": {"id": BOT_ID, "flags": 0}, "private_channels": [],
            "relationships": [], "presences": [], "shard": [shard, self.shard_count],
        }, ws)
        for guild_id in mine:
            await self.dispatch("GUILD_CREATE", self._guild(guild_id), ws)
        self.connected.set()

    def _guild(self, guild_id: str) -> dict[str, Any]:
        channel_id = channel_of(guild_id)
        return {
            "id": guild_id, "name": "Lighthouse", "owner_id": "1", "icon": None,
            "unavailable": False, "member_count": 2, "large": False, "features": [],
            "roles": [{"id": guild_id, "name": "@everyone", "permissions": "1024",
                       "position": 0, "color": 0, "hoist": False, "managed": False,
                       "mentionable": False, "flags": 0}],
            "channels": [{"id": channel_id, "type": 0, "name": "chat", "position": 0,
                          "guild_id": guild_id, "permission_overwrites": [], "nsfw": False,
                          "parent_id": None}],
            "members": [{"user": VIEWER, "roles": [], "joined_at": "2026-01-01T00:00:00+00:00",
                         "deaf": False, "mute": False, "flags": 0}],
            "emojis": [], "stickers": [], "threads": [], "stage_instances": [],
            "guild_scheduled_events": [], "voice_states": [], "presences": [],
            "verification_level": 0, "default_message_notifications": 0,
            "explicit_content_filter": 0, "mfa_level": 0, "system_channel_flags": 0,
            "premium_tier": 0, "preferred_locale": "zh-TW", "nsfw_level": 0,
            "joined_at": "2026-01-01T00:00:00+00:00",
        }

    async def dispatch(self, event: str, data: dict[str, Any],
                       ws: web.WebSocketResponse | None = None) -> None:
        """Send an event on ``ws``, else on the connection of the event's guild's shard (the
        latest connection when the event names no guild)."""
        if ws is None and "guild_id" in data:
            ws = self.shard_connections.get(shard_of(data["guild_id"], self.shard_count))
        target = ws or self._ws
        assert target is not None, "no gateway connection"
        await target.send_str(json.dumps({"op": 0, "t": event, "s": next(self._seq),
                                          "d": data}))

    async def drop_connection(self) -> None:
        """Close the socket like a gateway restart; the client must come back by itself."""
        self.connected.clear()
        assert self._ws is not None
        await self._ws.close(code=4000, message=b"server restart")

    def posts_to(self, path_part: str) -> list[Any]:
        return [body for method, path, body in self.calls
                if method == "POST" and path_part in path and body is not None]


def point_discord_at(server: FakeDiscord, monkeypatch: Any) -> None:
    """Send discord.py's REST calls and gateway connection to ``server``."""
    import discord
    import yarl

    monkeypatch.setattr(discord.http.Route, "BASE", f"{server.base}/api/v10")
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                        yarl.URL(f"ws://127.0.0.1:{server.port}/gateway"))
