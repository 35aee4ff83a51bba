"""Several bot processes on one PostgreSQL: what the database must keep correct across
processes (issue "Scale-out"). Each test starts real OS processes against the suite's
PostgreSQL server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from memory.store import Store

ROOT = Path(__file__).resolve().parent.parent
# One process's share of the work: ``tasks`` concurrent tasks, each applying ``updates``
# state changes (+1 intimacy, +1 conversation) to one viewer.
UPDATER = """
import asyncio, sys
from dataclasses import replace
from memory.store import Store
from memory.store.records import StateChange

def bump(before):
    return StateChange(replace(before, intimacy=before.intimacy + 1,
                               conversation_count=before.conversation_count + 1), "+1")

async def main(url, user, tasks, updates):
    store = await Store.open(url, auto_migrate=False)
    async def worker():
        for _ in range(updates):
            await store.update_state(user, "pell", "calm", bump)
    try:
        await asyncio.gather(*(worker() for _ in range(tasks)))
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
"""


@pytest.fixture
def pg_url(db_url: str) -> str:
    if not db_url.startswith("postgresql"):
        pytest.skip("several processes need PostgreSQL (SQLite allows one runtime)")
    return db_url


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_state_updates_from_two_processes_are_all_applied(pg_url: str) -> None:
    store = await Store.open(pg_url)
    try:
        user = await store.resolve_user("discord", "hot", "Hot")
        processes = [await asyncio.create_subprocess_exec(
            sys.executable, "-c", UPDATER, pg_url, str(user), "10", "25", cwd=ROOT,
            stderr=asyncio.subprocess.PIPE) for _ in range(2)]
        for process in processes:
            _out, err = await asyncio.wait_for(process.communicate(), 120)
            assert process.returncode == 0, err.decode()
        state = await store.get_state(user, "pell", "calm")
    finally:
        await store.close()
    assert (state.intimacy, state.conversation_count, state.version) == (500, 500, 500)


def test_run_picks_its_adapters_and_discord_shards(tmp_path: Path) -> None:
    """`run --adapters` and `--shard-ids/--shard-count`: one process per platform or per
    group of Discord shards; a wrong choice is a config error (78) before anything starts."""
    from tests.test_cli import SCRIPTED, vtuber

    config = tmp_path / "config.yaml"
    config.write_text(SCRIPTED + "adapters: {console: {enabled: true}}\n", encoding="utf-8")
    common = ("--config", str(config), "--data-dir", str(tmp_path / "d"), "run")
    not_enabled = vtuber(*common, "--adapters", "twitch")
    assert not_enabled.returncode == 78
    assert "--adapters: twitch not enabled in the config (enabled: console)" in (
        not_enabled.stderr)
    bad_shards = vtuber(*common, "--shard-ids", "0,5", "--shard-count", "2")
    assert bad_shards.returncode == 78 and "--shard-ids/--shard-count" in bad_shards.stderr
    assert vtuber(*common, "--adapters", "nowhere").returncode == 2  # argparse: usage error


def test_the_discord_client_runs_only_its_shards() -> None:
    pytest.importorskip("discord")
    import discord

    from adapters.discord_adapter.adapter import DiscordAdapter
    from bot.config import parse_config

    config = parse_config({"adapters": {"discord": {
        "enabled": True, "shard_ids": [0, 1], "shard_count": 4}}},
        env={"DISCORD_TOKEN": "fake-token"})
    adapter = DiscordAdapter(config, services=None)  # type: ignore[arg-type]
    assert isinstance(adapter.client, discord.AutoShardedClient)
    assert (adapter.client.shard_ids, adapter.client.shard_count) == ([0, 1], 4)
