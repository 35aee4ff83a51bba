"""What the fake platform servers share: an aiohttp app on a free loopback port that records
every request and lets a test wait for the one it expects."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def json_response(data: Any, status: int = 200) -> web.Response:
    # discord.py parses a body only when Content-Type is exactly "application/json"
    # (aiohttp's content_type= would append "; charset=utf-8").
    return web.Response(body=json.dumps(data).encode("utf-8"), status=status,
                        headers={"Content-Type": "application/json"})


@dataclass
class LocalServer:
    port: int = 0
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    _ws: web.WebSocketResponse | None = None
    _runner: web.AppRunner | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        app = web.Application()
        self.routes(app)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        self._runner = web.AppRunner(app, access_log=None)  # its lines quote test secrets
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def record(self, method: str, path: str, body: Any) -> None:
        self.calls.append((method, path, body))
        self._changed.set()

    async def wait_until(self, predicate: Any, seconds: float = 15) -> None:
        """Wait until ``predicate()`` holds, re-checking after every request received."""
        async with asyncio.timeout(seconds):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def _unknown(self, request: web.Request) -> web.Response:
        self.record(request.method, request.path, None)
        return json_response({"message": "404: Not Found", "code": 0}, status=404)
