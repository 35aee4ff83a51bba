"""What an answered message costs PostgreSQL: transactions (commits, rollbacks) and the pool's
connection checks, counted from ``pg_stat_database``.

    python -m benchmarks.pg_transactions [--messages 50]

The runtime as ``vtuber-bot run`` opens it on PostgreSQL (a scripted model, retrieval off,
ten viewers talking in turn), on a throw-away server started from the machine's PostgreSQL
binaries. Two runs on fresh databases: the pool's connection check as
shipped (one ``SELECT 1`` a checkout, ``memory/store/pg_ping.py``) and SQLAlchemy's own
pre-ping (``BEGIN``, ``;``, ``ROLLBACK``) as the baseline. A sink without idempotent sends
(as Twitch's) adds the send mark's commit to each message.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

from bot.config import parse_config
from bot.events import ChatEvent
from bot.paths import DataPaths
from bot.runtime import open_runtime
from memory.store import database

ROUND_TRIPS = {"SELECT 1 a checkout": 1, "pre-ping (BEGIN, ;, ROLLBACK)": 3}


class _Sink:
    async def send(self, text: str) -> str:
        return "m"

    async def edit(self, message_id: str, text: str) -> None:
        return None

    async def typing(self) -> None:
        return None


async def _counts(url: str) -> tuple[int, int]:
    import asyncpg

    name = url.rsplit("/", 1)[1]
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await connection.execute("SELECT pg_stat_force_next_flush()")
        row = await connection.fetchrow("SELECT xact_commit, xact_rollback FROM "
                                        "pg_stat_database WHERE datname = $1", name)
    finally:
        await connection.close()
    return int(row["xact_commit"]), int(row["xact_rollback"])


async def _session(url: str, messages: int) -> tuple[int, int]:
    """Commits and rollbacks of one runtime's life (open, ``messages`` answered, closed),
    counted once its connections have ended (a backend reports its counts as it exits)."""
    config = parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": ["好喔～"]}},
                   "embedding": {"enabled": False}},
        "store": {"url": url, "rag_enabled": False},
        "limits": {"user_messages_per_minute": 100_000}}, env={})
    commits, rollbacks = await _counts(url)
    async with open_runtime(config, DataPaths.resolve(Path(tempfile.mkdtemp()))) as runtime:
        for index in range(messages):
            await runtime.service.handle(ChatEvent(
                platform="twitch", channel_id="c", platform_user_id=f"v{index % 10}",
                display_name="v", text=f"hello {index}", sink=_Sink(),
                message_id=f"m{messages}-{index}"))
        await runtime.service.flush()
    await asyncio.sleep(1.0)  # the pool's backends exit and report
    after_commits, after_rollbacks = await _counts(url)
    return after_commits - commits - 1, after_rollbacks - rollbacks  # less _counts' own


async def _run(url: str, messages: int) -> tuple[float, float]:
    """A message's share: a runtime's life with ``messages`` answered, less one with none
    (opening, the lease, the listening connection, closing)."""
    await _session(url, 10)  # the schema, the viewers
    idle_commits, idle_rollbacks = await _session(url, 0)
    commits, rollbacks = await _session(url, messages)
    return (commits - idle_commits) / messages, (rollbacks - idle_rollbacks) / messages


async def _both(make_url: Any, messages: int) -> list[dict[str, Any]]:
    rows = []
    shipped = database.ping_on_checkout
    for label in ROUND_TRIPS:
        if label.startswith("pre-ping"):  # the baseline: SQLAlchemy's check in place of ours
            database.ping_on_checkout = _pre_ping
        try:
            commits, rollbacks = await _run(make_url(), messages)
        finally:
            database.ping_on_checkout = shipped
        rows.append({"check": label, "commits": round(commits, 2),
                     "rollbacks": round(rollbacks, 2)})
    return rows


def _pre_ping(sync_engine: Any) -> None:
    sync_engine.pool._pre_ping = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50)
    args = parser.parse_args(argv)
    from tests.pg_server import running_server

    with running_server("vtuber-pg-bench-") as server:
        if server is None:
            raise SystemExit("no PostgreSQL binaries on this machine")
        names = iter(("shipped", "baseline"))
        rows = asyncio.run(_both(lambda: server.create_database(next(names)), args.messages))
    print("| pool check | commits a message | rollbacks a message | round trips of checks "
          "a unit |\n| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['check']} | {row['commits']} | {row['rollbacks']} | "
              f"{ROUND_TRIPS[row['check']]} |")


if __name__ == "__main__":
    main()
