"""``vtuber-bot`` in a subprocess, with discord.py and twitchio pointed at the tests' fake
servers on this machine (``FAKE_DISCORD_PORT``, ``FAKE_TWITCH_PORT``): for multi-process
tests, where a monkeypatch in the test process would not reach.

    python -m tests.fake_launch [vtuber-bot arguments]
"""

from __future__ import annotations

import os
import sys


def _point_discord_at(port: str) -> None:
    import discord
    import yarl

    discord.http.Route.BASE = f"http://127.0.0.1:{port}/api/v10"
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(f"ws://127.0.0.1:{port}/gateway")


def _point_twitchio_at(port: str) -> None:
    import twitchio

    twitchio.http.Route.BASE = f"http://127.0.0.1:{port}/helix/"
    twitchio.http.Route.ID_BASE = f"http://127.0.0.1:{port}/"
    twitchio.eventsub.websockets.WSS = f"ws://127.0.0.1:{port}/ws"


def main() -> int:
    if port := os.environ.get("FAKE_DISCORD_PORT"):
        _point_discord_at(port)
    if port := os.environ.get("FAKE_TWITCH_PORT"):
        _point_twitchio_at(port)
    from bot.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
