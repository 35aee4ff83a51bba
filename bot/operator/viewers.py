"""The dashboard's reads about one viewer and one reply: stats, linked identities, what the
persona remembers of them, recent history, the mood and intimacy chart, a full export; the
trace of a reply; GPU status and the system diagnosis."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from bot.runtime import Runtime

HISTORY_SHOWN = 30  # newest messages on a viewer's page


def _viewer(request: web.Request) -> tuple[str, str]:
    return request.match_info["platform"], request.match_info["user"]


class ViewerPages:
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def routes(self) -> list[Any]:
        base = "/api/viewer/{platform}/{user}"
        return [web.get(base, self.viewer), web.get(base + "/chart.png", self.chart),
                web.get(base + "/export", self.export),
                web.get("/api/trace/{message_id:\\d+}", self.trace),
                web.get("/api/gpu", self.gpu), web.get("/api/diagnose", self.diagnose)]

    async def viewer(self, request: web.Request) -> web.Response:
        platform, user = _viewer(request)
        stats = await self._runtime.stats(platform, user)
        data = await self._runtime.export(platform, user)
        if stats is None or data is None:
            raise web.HTTPNotFound(text=f"no viewer {platform}:{user}")
        messages = sorted(data.get("messages", []), key=lambda m: m["id"])[-HISTORY_SHOWN:]
        memories = await self._runtime.memories(platform, user)
        return web.json_response({
            "stats": stats,
            "memories": [{"id": m.id, "text": m.text} for m in memories],
            "identities": [{"platform": i["platform"], "platform_user_id": i["platform_user_id"],
                            "display_name": i["display_name"]}
                           for i in data.get("identities", [])],
            "messages": [{"id": m["id"], "role": m["role"], "content": m["content"],
                          "status": m["status"], "created_at": m["created_at"]}
                         for m in messages]}, dumps=_dumps)

    async def chart(self, request: web.Request) -> web.Response:
        png = await self._runtime.chart(*_viewer(request))
        if png is None:
            raise web.HTTPNotFound(text="no such viewer")
        return web.Response(body=png, content_type="image/png")

    async def export(self, request: web.Request) -> web.Response:
        platform, user = _viewer(request)
        data = await self._runtime.export(platform, user)
        if data is None:
            raise web.HTTPNotFound(text=f"no viewer {platform}:{user}")
        name = f"vtuber-export-{platform}-{user}.json".replace('"', "")
        return web.json_response(data, dumps=_dumps, headers={
            "Content-Disposition": f'attachment; filename="{name}"'})

    async def trace(self, request: web.Request) -> web.Response:
        trace = await self._runtime.trace(int(request.match_info["message_id"]))
        if trace is None:
            raise web.HTTPNotFound(text="no reply with that id")
        return web.json_response(trace, dumps=_dumps)

    async def gpu(self, _request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self._runtime.gpu_status),
                                 dumps=_dumps)

    async def diagnose(self, _request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self._runtime.diagnose),
                                 dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)
