"""``/overlay``: an OBS browser source showing the reply being generated as live subtitles:
who asked what, the persona's words under its own name, its mood toward that viewer (as the
persona names it), the newest lines when a reply is longer than the box.

The page listens to ``/overlay/events`` (server-sent events). Each event is a reply's text as
it stands after the output-safety stage (never raw model output), so the stream shows nothing
chat would not."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from importlib import resources
from typing import Any

from aiohttp import web

from bot.config import OverlayConfig
from bot.signals import FinalState, ReplyProgress

log = logging.getLogger(__name__)

QUEUE_LIMIT = 64  # events a slow browser may fall behind before the oldest are dropped
# Colours for moods the personas use; any other mood gets a stable colour from its name.
MOOD_COLOURS = {"happy": "#ffb703", "excited": "#fb8500", "calm": "#8ecae6",
                "neutral": "#adb5bd", "shy": "#f4acb7", "sad": "#577590",
                "angry": "#e63946", "curious": "#90be6d", "tired": "#9d8189"}


PREVIEW_SAMPLES = [
    {"name": "星空旅人", "question": "今天的星星好亮，燈塔上看得到嗎？", "persona": "燈芯佩兒",
     "mood": "excited", "mood_name": "興奮", "colour": MOOD_COLOURS["excited"],
     "text": "看得到喔！今晚的天空好清楚，北極星就在燈塔正上方～要不要一起數星星？"},
    {"name": "viewer42", "question": "Do you ever get lonely up there?", "persona": "Pell",
     "mood": "calm", "mood_name": "calm", "colour": MOOD_COLOURS["calm"],
     "text": "Sometimes, but then you all visit, and the lighthouse feels warm again. "
             "Thank you for coming tonight!"},
]


def mood_colour(mood: str | None, configured: dict[str, str]) -> str:
    if not mood:
        return MOOD_COLOURS["neutral"]
    if mood in configured:
        return configured[mood]
    if mood in MOOD_COLOURS:
        return MOOD_COLOURS[mood]
    hue = int(hashlib.sha256(mood.encode()).hexdigest()[:4], 16) % 360
    return f"hsl({hue} 70% 60%)"


class OverlayHub:
    """Fans reply progress out to every connected overlay page."""

    def __init__(self, config: OverlayConfig) -> None:
        self._config = config
        # Each open page's queue, and the platform it shows (None: every platform).
        self._listeners: dict[asyncio.Queue[str | None], str | None] = {}

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def message_final(self, state: FinalState) -> None:
        return None  # a reply's last progress event already says it is done

    def close(self) -> None:
        """End every open event stream (the server is stopping: it would wait for them)."""
        for queue in self._listeners:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    def reply_progress(self, progress: ReplyProgress) -> None:
        payload = json.dumps({
            "key": progress.key, "name": progress.display_name, "text": progress.text,
            "question": progress.question, "persona": progress.persona,
            "done": progress.done, "mood": progress.mood, "mood_name": progress.mood_name,
            "colour": mood_colour(progress.mood, self._config.mood_colors)},
            ensure_ascii=False)
        for queue, platform in self._listeners.items():
            if platform is not None and platform != progress.platform:
                continue
            if queue.qsize() >= QUEUE_LIMIT:  # a stalled page loses its oldest updates
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(payload)

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUE_LIMIT + 1)
        # `/overlay?platform=twitch`: a scene for one platform's stream.
        self._listeners[queue] = request.query.get("platform") or None
        try:
            await response.write(b": connected\n\n")
            while True:
                try:
                    payload = await asyncio.wait_for(queue.get(), timeout=15)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")  # proxies drop idle streams
                    continue
                if payload is None:
                    break
                await response.write(f"data: {payload}\n\n".encode())
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self._listeners.pop(queue, None)
        return response

    async def page(self, request: web.Request) -> web.Response:
        return self._html({"fadeAfterMs": int(self._config.fade_after_s * 1000)})

    async def preview(self, request: web.Request) -> web.Response:
        """The overlay cycling sample replies (no chat needed), for setting it up in OBS."""
        return self._html({"fadeAfterMs": 2500, "samples": PREVIEW_SAMPLES})

    def _html(self, settings: dict[str, Any]) -> web.Response:
        html = resources.files("bot.operator").joinpath("static/overlay.html").read_text(
            encoding="utf-8")
        html = (html.replace("/*SETTINGS*/{}", json.dumps(settings, ensure_ascii=False))
                .replace("/*EXTRA_CSS*/", self._config.css.replace("</", "<\\/")))
        return web.Response(text=html, content_type="text/html", charset="utf-8")


def overlay_routes(hub: OverlayHub) -> list[Any]:
    return [web.get("/overlay", hub.page), web.get("/overlay/preview", hub.preview),
            web.get("/overlay/events", hub.events)]
