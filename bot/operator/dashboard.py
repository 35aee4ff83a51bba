"""``/dashboard``: the operator's live view (queue per platform, replies being generated, the
last messages with their final state and latency, the last warnings and errors) and controls
(pause or resume replying on a platform, reload the persona and knowledge, forget a viewer).
The page polls ``/api/status``; controls are POSTs."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import asdict
from importlib import resources
from typing import Any

from aiohttp import web

from bot.operator.problems import RecentProblems
from bot.operator.status import RuntimeView
from bot.signals import FinalState, ReplyProgress
from memory.errors import StoreError

log = logging.getLogger(__name__)


class Dashboard:
    def __init__(self, view: RuntimeView, recent: int, csrf_token: str,
                 problems: RecentProblems) -> None:
        self._view = view
        self._problems = problems
        self._csrf_token = csrf_token  # in the page: its control actions send it back
        self._recent: deque[FinalState] = deque(maxlen=recent)
        self._generating: dict[str, ReplyProgress] = {}

    def message_final(self, state: FinalState) -> None:
        self._recent.appendleft(state)

    def reply_progress(self, progress: ReplyProgress) -> None:
        if progress.done:
            self._generating.pop(progress.key, None)
        else:
            self._generating[progress.key] = progress

    def routes(self) -> list[Any]:
        return [web.get("/dashboard", self.page), web.get("/api/status", self.status),
                web.post("/api/control/pause/{platform}", self.pause),
                web.post("/api/control/resume/{platform}", self.resume),
                web.post("/api/control/forget", self.forget),
                web.post("/api/control/reload", self.reload)]

    async def page(self, _request: web.Request) -> web.Response:
        html = resources.files("bot.operator").joinpath("static/dashboard.html").read_text(
            encoding="utf-8").replace("__CSRF_TOKEN__", self._csrf_token)
        return web.Response(text=html, content_type="text/html", charset="utf-8")

    async def status(self, _request: web.Request) -> web.Response:
        return web.json_response({
            **self._view.summary(),
            "generating": [asdict(p) for p in self._generating.values()],
            "recent": await self._recent_messages(),
            "problems": self._problems.newest_first()})

    async def _recent_messages(self) -> list[dict[str, Any]]:
        """From the store (they survive a restart); while it is down, what this process saw."""
        try:
            return [dict(row) for row in await self._view.recent(self._recent.maxlen or 0)]
        except StoreError as exc:
            log.debug("dashboard: recent messages from memory (%s)", exc)
        return [{**asdict(s), "at": None, "latency_ms": round(s.latency_s * 1000, 1)}
                for s in self._recent]

    def _platform(self, request: web.Request) -> str:
        platform = request.match_info["platform"]
        if platform not in self._view.platforms:
            raise web.HTTPNotFound(text=f"no adapter named {platform!r} is running")
        return platform

    async def pause(self, request: web.Request) -> web.Response:
        platform = self._platform(request)
        self._view.pause(platform)
        log.info("dashboard: replying paused on %s", platform)
        return web.json_response({"paused": self._view.paused()})

    async def resume(self, request: web.Request) -> web.Response:
        platform = self._platform(request)
        self._view.resume(platform)
        log.info("dashboard: replying resumed on %s", platform)
        return web.json_response({"paused": self._view.paused()})

    async def reload(self, _request: web.Request) -> web.Response:
        """Persona and knowledge from their files; a file that does not load is refused
        (409, with the reason) and the persona in use stays."""
        refusal = await self._view.reload()
        if refusal is not None:
            return web.json_response({"reloaded": False, "refused": refusal}, status=409)
        return web.json_response({"reloaded": True})

    async def forget(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            platform, user = str(body["platform"]), str(body["platform_user_id"])
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(
                text='expected JSON {"platform": ..., "platform_user_id": ...}') from None
        deleted = await self._view.forget(platform, user)
        log.info("dashboard: forgot %s:%s", platform, user)
        return web.json_response({"deleted": deleted})
