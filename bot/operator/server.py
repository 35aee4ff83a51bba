"""The operator's HTTP server inside ``vtuber-bot run`` (opt-in: ``web.enabled``).

Bound to 127.0.0.1 by default. Anywhere else it needs a token (``VTUBER_WEB_TOKEN``), given
as ``Authorization: Bearer <token>`` or ``?token=`` (an OBS browser source can only do the
latter) and compared in constant time. Pages and reads are GETs; control actions are POSTs
under ``/api/control/``.

Without a token the loopback address is the only protection, and a web page the operator
opens can reach it: directly (cross-site requests) or under its own name (DNS rebinding, a
hostname of the attacker's that resolves to 127.0.0.1). So a request must name this server
in ``Host`` (a loopback name, or the bound address), and every control action carries the
per-process CSRF token the dashboard page is served with, which other sites cannot read.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from bot.config import AppConfig, WebConfig
from bot.operator.dashboard import Dashboard
from bot.operator.metrics import Metrics
from bot.operator.overlay import OverlayHub, overlay_routes
from bot.operator.problems import RecentProblems
from bot.operator.status import RuntimeView
from bot.operator.viewers import ViewerPages
from memory.errors import StoreError

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz"})  # a liveness probe carries no token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def binding_problems(config: AppConfig) -> list[str]:
    """Config errors that must stop ``run`` before anything starts (exit 78)."""
    web_config = config.web
    if web_config.enabled and not is_loopback(web_config.host) and (
            config.secrets.web_token is None):
        return [f"web.host: {web_config.host} is reachable from other machines; set "
                "VTUBER_WEB_TOKEN (the token every request must carry) or bind 127.0.0.1"]
    return []


def token_middleware(token: str | None) -> Any:
    expected = token.encode() if token else None

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or request.path in OPEN_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        given = (header.removeprefix("Bearer ").strip() if header.startswith("Bearer ")
                 else request.query.get("token", ""))
        if not hmac.compare_digest(given.encode(), expected):
            return web.json_response({"error": "a valid token is required"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
CSRF_HEADER = "X-CSRF-Token"


def host_allow_list(allowed: frozenset[str] | None) -> Any:
    """Refuse a request whose ``Host`` names another server (None: any name, a token
    protects the server)."""
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        name = urlsplit(f"//{request.host}").hostname or ""
        if allowed is not None and name not in allowed:
            return web.json_response({"error": "unknown Host"}, status=421)
        return await handler(request)

    return check


def csrf_check(csrf_token: str) -> Any:
    """Every request that changes something carries the token the dashboard was served
    with (``X-CSRF-Token``)."""
    expected = csrf_token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD", "OPTIONS") and not hmac.compare_digest(
                request.headers.get(CSRF_HEADER, "").encode(), expected):
            return web.json_response({"error": "control actions come from the dashboard "
                                               "(missing or wrong CSRF token)"}, status=403)
        return await handler(request)

    return check


@web.middleware
async def same_origin_controls(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A control action from a page of another site (a browser sends its Origin) is refused:
    without a token, any web page the operator opens could otherwise pause the bot or forget
    a viewer through the operator's own browser."""
    origin = request.headers.get("Origin")
    if request.method != "GET" and origin is not None and (
            urlsplit(origin).netloc != request.host):
        return web.json_response({"error": "control actions come from the dashboard's own "
                                           "origin"}, status=403)
    return await handler(request)


@web.middleware
async def store_unavailable(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The store failing under a page is a 503 with its one-line reason, not a traceback."""
    try:
        return await handler(request)
    except StoreError as exc:
        log.warning("%s %s: %s", request.method, request.path, exc)
        return web.json_response({"error": str(exc)}, status=503)


def build_app(web_config: WebConfig, token: str | None, view: RuntimeView,
              metrics: Metrics, overlay: OverlayHub,
              problems: RecentProblems | None = None) -> web.Application:
    csrf_token = secrets.token_urlsafe(24)
    names = None if token else LOOPBACK_NAMES | {web_config.host}
    app = web.Application(middlewares=[host_allow_list(names), same_origin_controls,
                                       token_middleware(token), csrf_check(csrf_token),
                                       store_unavailable])
    dashboard = Dashboard(view, web_config.recent_messages, csrf_token,
                          problems or RecentProblems(()))
    view.signals.connect(dashboard)
    viewers = ViewerPages(view.runtime)

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_request: web.Request) -> web.Response:
        checks = await view.readiness()
        not_ready = sorted(name for name, ok in checks.items() if not ok)
        return web.json_response({"ready": not not_ready, "not_ready": not_ready,
                                  "checks": checks}, status=503 if not_ready else 200)

    async def metrics_page(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4"})

    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz),
                    web.get("/metrics", metrics_page), *overlay_routes(overlay),
                    *dashboard.routes(), *viewers.routes()])
    return app


@asynccontextmanager
async def operator_server(config: AppConfig, view: RuntimeView) -> AsyncIterator[str | None]:
    """Serve while the block runs (nothing when ``web.enabled`` is off); yields the URL."""
    web_config = config.web
    if not web_config.enabled:
        yield None
        return
    metrics = Metrics(view.pending, view.store_up, view.adapters_ready, view.gpu_memory,
                      view.engine_counters, view.build_info())
    overlay = OverlayHub(web_config.overlay)
    view.signals.connect(metrics)
    view.signals.connect(overlay)
    token = (config.secrets.web_token.get_secret_value()
             if config.secrets.web_token is not None else None)
    problems = RecentProblems(config.secrets.values())
    logging.getLogger().addHandler(problems)  # the dashboard's error feed
    runner = web.AppRunner(build_app(web_config, token, view, metrics, overlay, problems),
                           access_log=None)  # its lines would quote ?token=
    await runner.setup()
    try:
        site = web.TCPSite(runner, web_config.host, web_config.port)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else web_config.port
        url = f"http://{web_config.host}:{port}"
        log.info("operator pages at %s (/overlay, /dashboard, /metrics, /readyz)", url)
        yield url
    finally:
        logging.getLogger().removeHandler(problems)
        view.signals.disconnect(metrics)
        view.signals.disconnect(overlay)
        overlay.close()
        await runner.cleanup()
