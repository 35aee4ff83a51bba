"""``/dashboard``: the operator's live view (queue per platform, replies being generated, the
last messages with their final state and latency, the last warnings and errors, the audit log)
and controls (say something as the persona, pause or resume a platform, edit or reset a
viewer's mood and intimacy, mute, forget them or one memory, reload), each recorded in the
audit log (``controls.py``). The page polls ``/api/status``; controls are POSTs of JSON."""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import asdict
from importlib import resources
from typing import Any

from aiohttp import web

from bot.delivery import DeliveryFailed
from bot.operator.controls import ControlRefused, Controls
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
        self._controls = Controls(view)

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
                web.post("/api/control/reload", self.reload),
                web.post("/api/control/say", self.say),
                web.post("/api/control/state", self.set_state),
                web.post("/api/control/mute", self.mute),
                web.post("/api/control/forget-memory", self.forget_memory),
                web.get("/api/audit", self.audit)]

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

    async def _control(self, action: str, target: str | None, detail: dict[str, Any],
                       run: Any) -> Any:
        """One audited control; a refusal is a 409 with its reason, a failed send a 502."""
        try:
            return await self._controls.audited(action, target, detail, run)
        except ControlRefused as exc:
            raise _json_error(web.HTTPConflict, str(exc)) from None
        except DeliveryFailed as exc:
            raise _json_error(web.HTTPBadGateway, str(exc)) from None

    async def pause(self, request: web.Request) -> web.Response:
        platform = self._platform(request)

        async def run() -> None:
            self._view.pause(platform)

        await self._control("pause", platform, {}, run)
        return web.json_response({"paused": self._view.paused()})

    async def resume(self, request: web.Request) -> web.Response:
        platform = self._platform(request)

        async def run() -> None:
            self._view.resume(platform)

        await self._control("resume", platform, {}, run)
        return web.json_response({"paused": self._view.paused()})

    async def reload(self, _request: web.Request) -> web.Response:
        """Persona and knowledge from their files; a file that does not load is refused
        (409, with the reason) and the persona in use stays."""
        async def run() -> None:
            refusal = await self._view.reload()
            if refusal is not None:
                raise ControlRefused(refusal)

        try:
            await self._controls.audited("reload", None, {}, run)
        except ControlRefused as exc:
            return web.json_response({"reloaded": False, "refused": str(exc)}, status=409)
        return web.json_response({"reloaded": True})

    async def forget(self, request: web.Request) -> web.Response:
        body = await _body(request, "platform", "platform_user_id")
        platform, user = str(body["platform"]), str(body["platform_user_id"])
        deleted = await self._control("forget", f"{platform}:{user}", {},
                                      lambda: self._view.forget(platform, user))
        return web.json_response({"deleted": deleted})

    async def say(self, request: web.Request) -> web.Response:
        body = await _body(request, "platform", "channel_id", "text")
        platform, channel, text = (str(body["platform"]), str(body["channel_id"]),
                                   str(body["text"]))
        message_id = await self._control(
            "say", f"{platform}:{channel}", {"text": text},
            lambda: self._controls.say(platform, channel, text))
        return web.json_response({"sent": True, "message_id": message_id})

    async def set_state(self, request: web.Request) -> web.Response:
        body = await _body(request, "platform", "platform_user_id")
        platform, user = str(body["platform"]), str(body["platform_user_id"])
        try:
            mood = None if body.get("mood") in (None, "") else str(body["mood"])
            intimacy = (None if body.get("intimacy") in (None, "")
                        else float(body["intimacy"]))
        except (TypeError, ValueError):
            raise _json_error(web.HTTPBadRequest, "intimacy must be a number") from None
        reset = bool(body.get("reset"))
        detail = {"mood": mood, "intimacy": intimacy, "reset": reset}
        state = await self._control(
            "reset state" if reset else "set state", f"{platform}:{user}", detail,
            lambda: self._controls.set_state(platform, user, mood=mood, intimacy=intimacy,
                                             reset=reset))
        return web.json_response({"mood": state.mood, "intimacy": state.intimacy})

    async def mute(self, request: web.Request) -> web.Response:
        body = await _body(request, "platform", "platform_user_id", "muted")
        platform, user, muted = (str(body["platform"]), str(body["platform_user_id"]),
                                 bool(body["muted"]))
        await self._control("mute" if muted else "unmute", f"{platform}:{user}", {},
                            lambda: self._controls.mute(platform, user, muted))
        return web.json_response({"muted": muted})

    async def forget_memory(self, request: web.Request) -> web.Response:
        body = await _body(request, "platform", "platform_user_id", "memory_id")
        platform, user = str(body["platform"]), str(body["platform_user_id"])
        try:
            memory_id = int(body["memory_id"])
        except (TypeError, ValueError):
            raise _json_error(web.HTTPBadRequest, "memory_id must be a number") from None
        await self._control("forget memory", f"{platform}:{user}", {"memory_id": memory_id},
                            lambda: self._controls.forget_memory(platform, user, memory_id))
        return web.json_response({"forgotten": memory_id})

    async def audit(self, request: web.Request) -> web.Response:
        limit = min(int(request.query.get("limit", "50") or 50), 500)
        entries = await self._view.runtime.store.operator_actions(limit)
        return web.json_response([{**asdict(e), "at": e.at.isoformat()} for e in entries])


async def _body(request: web.Request, *fields: str) -> dict[str, Any]:
    """The control's JSON object, with ``fields`` present; else a 400 saying what it wants."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or any(field not in body for field in fields):
        wanted = ", ".join(f'"{field}": ...' for field in fields)
        raise _json_error(web.HTTPBadRequest, f"expected JSON {{{wanted}}}")
    return body


def _json_error(kind: type[web.HTTPException], reason: str) -> web.HTTPException:
    return kind(text=json.dumps({"refused": reason}, ensure_ascii=False),
                content_type="application/json")
