"""A local stand-in for Twitch: the id server (token, validate), Helix (users, EventSub
subscriptions, conduits and their shards, chat messages) and the EventSub websocket, recording
every request. A notification for a conduit subscription goes to one enabled shard's session,
as Twitch spreads a conduit's events over its shards."""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.local_server import LocalServer, json_response
from tests.rate_limits import SlidingWindow

BOT_ID = "900"
BOT_LOGIN = "pellbot"
CHANNEL_ID = "100"
CHANNEL_LOGIN = "lighthouse"
BOT_TOKEN = "bot-user-token"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


_json = json_response


@dataclass
class FakeTwitch(LocalServer):
    keepalive_s: float = 3.0
    sent_at: list[float] = field(default_factory=list)
    subscriptions: list[dict[str, Any]] = field(default_factory=list)
    sessions: int = 0
    reject_credentials: bool = False
    token_status: int | None = None  # answer the token endpoint with this error status
    send_keepalives: bool = True
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    welcomed: asyncio.Event = field(default_factory=asyncio.Event)
    # Twitch's chat limit per channel; a message over it is dropped (a violation).
    chat_limit: SlidingWindow | None = None
    unknown_logins: frozenset[str] = frozenset()  # channels Helix does not find
    dropped: list[dict[str, Any]] = field(default_factory=list)
    conduits: dict[str, int] = field(default_factory=dict)  # conduit id → shard count
    # (conduit id, shard id) → the websocket session its events go to, while connected
    shards: dict[tuple[str, str], str] = field(default_factory=dict)
    _sessions: dict[str, web.WebSocketResponse] = field(default_factory=dict)
    # Set: a chat message is posted, and the answer to its request waits until this is set.
    hold_chat: asyncio.Event | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/oauth2/token", self._token)
        app.router.add_get("/oauth2/validate", self._validate)
        app.router.add_get("/helix/users", self._users)
        app.router.add_post("/helix/eventsub/subscriptions", self._subscribe)
        app.router.add_post("/helix/chat/messages", self._chat)
        app.router.add_get("/helix/eventsub/conduits", self._get_conduits)
        app.router.add_post("/helix/eventsub/conduits", self._create_conduit)
        app.router.add_patch("/helix/eventsub/conduits", self._resize_conduit)
        app.router.add_get("/helix/eventsub/conduits/shards", self._get_shards)
        app.router.add_patch("/helix/eventsub/conduits/shards", self._update_shards)
        app.router.add_get("/ws", self._websocket)

    # -- id server and Helix ---------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        self.record("POST", request.path, dict(request.query))
        if self.reject_credentials:
            return _json({"status": 400, "message": "invalid client secret"}, status=400)
        if self.token_status is not None:
            return web.Response(status=self.token_status, text="Service Unavailable")
        return _json({"access_token": "app-token", "expires_in": 5000000,
                      "token_type": "bearer"})

    async def _validate(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").split(" ")[-1]
        self.record("GET", request.path, token)
        if token == BOT_TOKEN:
            return _json({"client_id": "cid", "login": BOT_LOGIN, "user_id": BOT_ID,
                          "scopes": ["user:read:chat", "user:write:chat", "user:bot"],
                          "expires_in": 5000000})
        if token == "app-token":
            return _json({"client_id": "cid", "scopes": [], "expires_in": 5000000})
        return _json({"status": 401, "message": "invalid access token"}, status=401)

    async def _users(self, request: web.Request) -> web.Response:
        self.record("GET", request.path, dict(request.query))
        logins = request.query.getall("login", [])
        return _json({"data": [{
            "id": CHANNEL_ID if login == CHANNEL_LOGIN else "101", "login": login,
            "display_name": login.title(), "type": "", "broadcaster_type": "partner",
            "description": "", "profile_image_url": "", "offline_image_url": "",
            "view_count": 0, "created_at": "2020-01-01T00:00:00Z"} for login in logins
            if login not in self.unknown_logins]})

    async def _subscribe(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.record("POST", request.path, body)
        if body["transport"]["method"] == "conduit" and any(
                s["type"] == body["type"] and s["condition"] == body["condition"]
                and s["transport"] == body["transport"] for s in self.subscriptions):
            return _json({"error": "Conflict", "status": 409,
                          "message": "subscription already exists"}, status=409)
        subscription = {"id": f"sub-{next(self._ids)}", "status": "enabled",
                        "type": body["type"], "version": body["version"],
                        "condition": body["condition"], "created_at": _now(),
                        "transport": {**body["transport"], "connected_at": _now()},
                        "cost": 0}
        self.subscriptions.append(subscription)
        return _json({"data": [subscription], "total": len(self.subscriptions),
                      "total_cost": 0, "max_total_cost": 10}, status=202)

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.chat_limit is not None and not self.chat_limit.admit(
                str(body.get("broadcaster_id"))):
            self.dropped.append(body)
            self._changed.set()
            return _json({"data": [{"message_id": "", "is_sent": False, "drop_reason": {
                "code": "msg_ratelimit",
                "message": "Your message was not sent because you are sending messages too "
                           "quickly."}}]})
        self.sent_at.append(asyncio.get_running_loop().time())
        self.record("POST", request.path, body)
        if self.hold_chat is not None:
            await self.hold_chat.wait()
        return _json({"data": [{"message_id": f"sent-{next(self._ids)}", "is_sent": True,
                                "drop_reason": None}]})

    # -- EventSub websocket --------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        self.sessions += 1
        self._changed.set()
        session = f"session-{self.sessions}"
        await self._send({"message_type": "session_welcome"}, {"session": {
            "id": session, "status": "connected", "connected_at": _now(),
            "keepalive_timeout_seconds": int(self.keepalive_s * 2) or 10,
            "reconnect_url": None}})
        self._sessions[session] = ws
        self.welcomed.set()
        keepalive = asyncio.create_task(self._keepalive(ws))
        try:
            async for _message in ws:
                pass
        finally:
            keepalive.cancel()
            del self._sessions[session]
            for key in [k for k, v in self.shards.items() if v == session]:
                del self.shards[key]  # websocket_disconnected: its events go elsewhere
            self._changed.set()
        return ws

    async def _keepalive(self, ws: web.WebSocketResponse) -> None:
        while not ws.closed:
            await asyncio.sleep(self.keepalive_s)
            if self.send_keepalives and not ws.closed:
                await self._send({"message_type": "session_keepalive"}, {}, ws)

    async def _send(self, metadata: dict[str, Any], payload: dict[str, Any],
                    ws: web.WebSocketResponse | None = None) -> None:
        target = ws or self._ws
        assert target is not None
        await target.send_str(json.dumps({
            "metadata": {"message_id": f"evt-{next(self._ids)}", "message_timestamp": _now(),
                         **metadata},
            "payload": payload}))

    async def notify(self, sub_type: str, event: dict[str, Any],
                     envelope_id: str | None = None, shard: int | None = None) -> None:
        """Send a notification; the same ``envelope_id`` twice is Twitch redelivering it.
        For a conduit's subscription it goes to ``shard``'s session, or (None) to an enabled
        shard picked by the event's message id."""
        subscription = next(s for s in reversed(self.subscriptions) if s["type"] == sub_type)
        metadata = {"message_type": "notification", "subscription_type": sub_type,
                    "subscription_version": subscription["version"]}
        if envelope_id is not None:
            metadata["message_id"] = envelope_id
        target = None
        if subscription["transport"]["method"] == "conduit":
            key = str(event.get("message_id", ""))
            target = self._sessions[self._shard_session(
                subscription["transport"]["conduit_id"], shard, key)]
        await self._send(metadata, {"subscription": subscription, "event": event}, target)

    def _shard_session(self, conduit_id: str, shard: int | None, key: str) -> str:
        enabled = sorted((int(shard_id), session) for (conduit, shard_id), session
                         in self.shards.items() if conduit == conduit_id)
        assert enabled, f"no shard of {conduit_id} is connected"
        if shard is not None:
            return dict(enabled)[shard]
        return enabled[sum(key.encode()) % len(enabled)][1]

    def shard_of(self, message_id: str, conduit_id: str | None = None) -> int:
        """The shard a notification for ``message_id`` goes to now."""
        conduit = conduit_id or next(iter(self.conduits))
        session = self._shard_session(conduit, None, message_id)
        return next(int(k[1]) for k, v in self.shards.items() if v == session)

    # -- conduits ------------------------------------------------------------------------------

    def _conduit_list(self) -> list[dict[str, Any]]:
        return [{"id": cid, "shard_count": count} for cid, count in self.conduits.items()]

    async def _get_conduits(self, request: web.Request) -> web.Response:
        self.record("GET", request.path, dict(request.query))
        return _json({"data": self._conduit_list()})

    async def _create_conduit(self, request: web.Request) -> web.Response:
        self.record("POST", request.path, dict(request.query))
        conduit_id = f"conduit-{next(self._ids)}"
        self.conduits[conduit_id] = int(request.query["shard_count"])
        return _json({"data": [{"id": conduit_id, "shard_count": self.conduits[conduit_id]}]})

    async def _resize_conduit(self, request: web.Request) -> web.Response:
        self.record("PATCH", request.path, dict(request.query))
        conduit_id = request.query["id"]
        self.conduits[conduit_id] = int(request.query["shard_count"])
        return _json({"data": [{"id": conduit_id, "shard_count": self.conduits[conduit_id]}]})

    def _shard(self, conduit_id: str, shard_id: str) -> dict[str, Any]:
        session = self.shards.get((conduit_id, shard_id))
        if session is None:
            return {"id": shard_id, "status": "websocket_disconnected",
                    "transport": {"method": "websocket"}}
        return {"id": shard_id, "status": "enabled",
                "transport": {"method": "websocket", "session_id": session,
                              "connected_at": _now()}}

    async def _get_shards(self, request: web.Request) -> web.Response:
        self.record("GET", request.path, dict(request.query))
        conduit_id = request.query["conduit_id"]
        return _json({"data": [self._shard(conduit_id, str(i))
                               for i in range(self.conduits.get(conduit_id, 0))],
                      "pagination": {}})

    async def _update_shards(self, request: web.Request) -> web.Response:
        body = await request.json()
        conduit_id = request.query["conduit_id"]
        self.record("PATCH", request.path, {"conduit_id": conduit_id, **body})
        done, errors = [], []
        for shard in body["shards"]:
            shard_id, session = str(shard["id"]), shard["transport"].get("session_id")
            if int(shard_id) >= self.conduits.get(conduit_id, 0) or session not in self._sessions:
                errors.append({"id": shard_id, "message": "invalid shard or session",
                               "code": "invalid_parameter"})
                continue
            self.shards[(conduit_id, shard_id)] = session
            done.append(self._shard(conduit_id, shard_id))
        return _json({"data": done, "errors": errors}, status=202)

    def chat_event(self, text: str, *, user_id: str = "200", login: str = "viewer",
                   badges: list[str] = (), message_id: str | None = None) -> dict[str, Any]:
        return {
            "broadcaster_user_id": CHANNEL_ID, "broadcaster_user_login": CHANNEL_LOGIN,
            "broadcaster_user_name": "Lighthouse", "chatter_user_id": user_id,
            "chatter_user_login": login, "chatter_user_name": login.title(),
            "message_id": message_id or f"msg-{next(self._ids)}",
            "message": {"text": text, "fragments": [
                {"type": "text", "text": text, "cheermote": None, "emote": None,
                 "mention": None}]},
            "message_type": "text", "color": "#FF8800",
            "badges": [{"set_id": badge, "id": "1", "info": ""} for badge in badges],
            "cheer": None, "reply": None, "channel_points_custom_reward_id": None,
            "channel_points_animation_id": None, "source_broadcaster_user_id": None,
            "source_broadcaster_user_login": None, "source_broadcaster_user_name": None,
            "source_message_id": None, "source_badges": None, "is_source_only": None,
        }

    async def drop_keepalives(self) -> None:
        """Stop keepalives on the current session: the client must give up on it and
        reconnect by itself."""
        self.welcomed.clear()
        self.send_keepalives = False

    def sent_messages(self) -> list[dict[str, Any]]:
        return [body for method, path, body in self.calls
                if method == "POST" and path == "/helix/chat/messages"]
