"""Several bot processes on one PostgreSQL: what the database must keep correct across
processes (issue "Scale-out"). Each test starts real OS processes against the suite's
PostgreSQL server."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from memory.store import Store
from tests.store_reads import get_state, messages_for, record_incoming

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
        state = await get_state(store, user, "pell", "calm")
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


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_linked_viewer_on_two_processes_is_answered_in_arrival_order(
        pg_url: str, tmp_path: Path) -> None:
    """Two runtimes on one PostgreSQL (one per platform, as `run --adapters` would start):
    the viewer writes on Discord (a slow reply) and Twitch (a fast one) at once, three times.
    Each message waits for the one before it, whichever process has it: replies are stored
    in arrival order and the state counts every exchange once."""
    from bot.config import parse_config
    from bot.events import ChatEvent
    from bot.paths import DataPaths
    from bot.runtime import open_runtime
    from tests.sinks import RecordingSink

    def config(reply: str) -> object:
        return parse_config({
            "models": {"llm": {"backend": "scripted",
                               "scripted": {"replies": [reply], "chunk_delay_s": 0.05}},
                       "embedding": {"enabled": False}},
            "store": {"url": pg_url, "rag_enabled": False},
            "limits": {"user_messages_per_minute": 60}}, env={})

    slow, fast = config("一 二 三 四 五 六 七 八。"), config("好。")
    async with open_runtime(slow, DataPaths.resolve(tmp_path / "discord")) as on_discord, \
            open_runtime(fast, DataPaths.resolve(tmp_path / "twitch")) as on_twitch:
        store = on_discord.store
        user = await store.resolve_user("discord", "ann", "Ann")
        await store.link_identity(user, "twitch", "ann_tw", "Ann")

        async def say(runtime: Any, platform: str, who: str, text: str, after: float) -> Any:
            await asyncio.sleep(after)
            return await runtime.service.handle(ChatEvent(
                platform=platform, channel_id="c", platform_user_id=who,
                display_name="Ann", text=text, sink=RecordingSink()))

        replies = await asyncio.gather(*(
            say(on_discord, "discord", "ann", f"discord {i}", 0.3 * i) if i % 2 == 0 else
            say(on_twitch, "twitch", "ann_tw", f"twitch {i}", 0.3 * (i - 1) + 0.05)
            for i in range(6)))
        assert [r.status for r in replies] == ["answered"] * 6
        rows = [m for m in await messages_for(store, user)]
        state = await get_state(store, user, "pell", "calm")
    questions = [m.id for m in rows if m.role == "user"]
    answered_in = [m.reply_to_id for m in sorted(rows, key=lambda m: m.id)
                   if m.role == "assistant"]
    assert answered_in == sorted(questions)  # replies recorded in arrival order
    assert (state.conversation_count, state.version) == (6, 6)


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_restart_leaves_other_processes_platforms_alone(db_url: str,
                                                                tmp_path: Path) -> None:
    """A Discord-only process restarting on PostgreSQL leaves alone a Twitch message younger
    than twice the reply timeout (the Twitch process may be answering it now); on SQLite, the
    only process, what no adapter here can answer ends expired (crash)."""
    from datetime import UTC, datetime

    from bot.config import parse_config
    from bot.paths import DataPaths
    from bot.runtime import open_runtime

    store = await Store.open(db_url)
    try:
        user = await store.resolve_user("twitch", "tw", "Tw")
        message = await record_incoming(store,
            user_id=user, persona_id="pell", platform="twitch", channel_id="c",
            platform_message_id="m1", text="在嗎", created_at=datetime.now(UTC))
    finally:
        await store.close()
    config = parse_config({"models": {"llm": {"backend": "scripted"},
                                      "embedding": {"enabled": False}},
                           "store": {"url": db_url}}, env={})

    class DiscordOnly:
        name = "discord"

    async with open_runtime(config, DataPaths.resolve(tmp_path / "discord")) as runtime:
        await runtime._answer_leftovers([DiscordOnly()])  # type: ignore[list-item]
        stored = await runtime.store.get_message(message)
    assert stored is not None
    expected = "received" if db_url.startswith("postgresql") else "expired"
    assert stored.status == expected


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_sigkill_of_one_process_leaves_the_other_answering(pg_url: str,
                                                           tmp_path: Path) -> None:
    """Two `chat` processes on one PostgreSQL, one SIGKILLed under load: the other keeps
    answering; after the killed one restarts nothing is left `received` and no question has
    two replies."""
    import queue
    import subprocess
    import threading
    import time

    from tests.test_drills import REPLY, _after_restart, _chat_under_load, _pump, _write_config

    config = _write_config(tmp_path, pg_url)
    other = subprocess.Popen(
        [sys.executable, "-m", "bot", "--config", str(config), "--data-dir",
         str(tmp_path / "other"), "--log-level", "ERROR", "chat", "--user", "bee"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert other.stdin is not None and other.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump, args=(other.stdout, lines), daemon=True).start()

    def replies_from_other(count: int) -> int:
        for index in range(count):
            other.stdin.write(f"still there {index}\n")  # type: ignore[union-attr]
            other.stdin.flush()  # type: ignore[union-attr]
        seen, deadline = 0, time.monotonic() + 30
        while seen < count and time.monotonic() < deadline:
            try:
                seen += lines.get(timeout=1).count(REPLY)
            except queue.Empty:
                continue
        return seen

    try:
        assert replies_from_other(3) == 3  # up, and answering
        printed = _chat_under_load(config, tmp_path / "killed", rate=50, kill_after=60)
        assert sum(line.count(REPLY) for line in printed) > 10
        assert replies_from_other(5) == 5  # the kill did not touch it
    finally:
        other.kill()
        other.wait(timeout=10)
    time.sleep(2.5)  # past 2 x reply_timeout_s: nothing of the killed run is in flight
    state = asyncio.run(_after_restart(config, tmp_path / "killed"))
    questions = state["questions"]
    assert [q for q in questions if q.status == "received"] == []
    assert state["duplicates"] == []


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_role_runs_in_one_process_and_recovers_its_own_messages(
        pg_url: str, tmp_path: Path) -> None:
    """A runtime role ("discord[1/2]") is held by one process at a time. After its process
    died, the one taking the role again answers the messages that role took, however recent
    (no live process can be answering them); another role leaves them alone."""
    from datetime import UTC, datetime

    from bot.config import parse_config
    from bot.paths import DataPaths
    from bot.runtime import open_runtime
    from memory.store import IntakeItem
    from memory.store.roles import RoleTakenError

    config = parse_config({"models": {"llm": {"backend": "scripted"},
                                      "embedding": {"enabled": False}},
                           "store": {"url": pg_url}}, env={})
    async with open_runtime(config, DataPaths.resolve(tmp_path / "a"),
                            role="discord[1/2]") as first:
        with pytest.raises(RoleTakenError, match=r"already runs discord\[1/2\]"):
            async with open_runtime(config, DataPaths.resolve(tmp_path / "b"),
                                    role="discord[1/2]"):
                pass
        [taken] = await first.store.intake([IntakeItem(
            platform="discord", platform_user_id="ann", display_name="Ann", persona_id="pell",
            channel_id="c", platform_message_id="m1", text="在嗎", created_at=datetime.now(UTC),
            owner="discord[1/2]")])
    # Its process is gone (the role is free) and the message is a second old.
    async with open_runtime(config, DataPaths.resolve(tmp_path / "b"),
                            role="discord[0/2]") as other:
        assert other.service.leftovers == []  # not its role, and maybe in flight elsewhere
    async with open_runtime(config, DataPaths.resolve(tmp_path / "c"),
                            role="discord[1/2]") as again:
        assert [m.message_id for m in again.service.leftovers] == [taken.message_id]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_viewers_rate_limit_holds_across_processes(pg_url: str, tmp_path: Path) -> None:
    """One Discord viewer writing in two guilds that two shard processes serve: together
    they admit the viewer's per-minute budget once, not once each (checked in the database
    at intake); the rest are recorded dropped (rate_limited)."""
    from bot.config import parse_config
    from bot.events import ChatEvent
    from bot.paths import DataPaths
    from bot.runtime import open_runtime
    from tests.sinks import RecordingSink

    config = parse_config({"models": {"llm": {"backend": "scripted"},
                                      "embedding": {"enabled": False}},
                           "store": {"url": pg_url, "rag_enabled": False},
                           "limits": {"user_messages_per_minute": 3}}, env={})
    async with open_runtime(config, DataPaths.resolve(tmp_path / "s0"),
                            role="discord[0/2]") as shard0, \
            open_runtime(config, DataPaths.resolve(tmp_path / "s1"),
                         role="discord[1/2]") as shard1:
        replies = []
        for index in range(6):
            runtime = (shard0, shard1)[index % 2]
            replies.append(await runtime.service.handle(ChatEvent(
                platform="discord", channel_id=f"guild-{index % 2}", platform_user_id="ann",
                display_name="Ann", text=f"hi {index}", sink=RecordingSink(),
                message_id=f"m{index}")))
        user = await shard0.store.find_user("discord", "ann")
        assert user is not None
        stored = [m for m in await messages_for(shard0.store, user) if m.role == "user"]
    assert [(r.status, r.reason) for r in replies] == (
        [("answered", None)] * 3 + [("dropped", "rate_limited")] * 3)
    assert [(m.status, m.status_reason) for m in stored] == (
        [("answered", None)] * 3 + [("dropped", "rate_limited")] * 3)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_viewers_next_question_is_woken_when_the_one_before_ends(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes' stores on one database: a question waiting on the viewer's earlier one
    (taken by the other process) is woken by the database's notice when that one is answered,
    not by checking again: the fallback pause here is an hour. Its connection lost (a
    database restart), the store listens again by itself."""
    from memory.store import IntakeItem, conversations, wakeups

    monkeypatch.setattr(conversations, "ORDER_FALLBACK_S", 3600.0)
    monkeypatch.setattr(wakeups, "RECONNECT_PAUSES_S", (0.0,))
    first, second = await Store.open(db_url), await Store.open(db_url)
    try:
        now = datetime.now(UTC)
        taken = await first.intake([IntakeItem(
            platform="twitch", platform_user_id="ann", display_name="Ann", persona_id="pell",
            channel_id="c", platform_message_id=f"m{index}", text=f"q{index}",
            created_at=now, owner="twitch") for index in range(3)])
        user_id = taken[0].user_id
        for earlier, later in ((taken[0], taken[1]), (taken[1], taken[2])):
            assert earlier.message_id is not None and later.message_id is not None
            waiting = asyncio.create_task(second.wait_for_earlier(
                user_id, later.message_id, now - timedelta(minutes=1), timeout_s=3600))
            await _once(lambda: second._wakeups.watched(user_id))  # it checked, it waits
            await first.set_status(earlier.message_id, "answered")
            assert await asyncio.wait_for(waiting, 60) is True
            # A database restart, as far as the listening connection knows: the server ends
            # it. The next round is only woken if the store listens again by itself.
            listener = second._wakeups._connection
            await _terminate_backend(db_url, listener.get_server_pid())
            await _once(lambda gone=listener: second._wakeups._connection not in (None, gone))
    finally:
        await first.close()
        await second.close()


async def _terminate_backend(url: str, pid: int) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        await engine.dispose()


async def _once(condition: Any) -> None:
    """Until ``condition()`` holds (each check a turn of the event loop and 10 ms)."""
    while True:
        if condition():
            return
        await asyncio.sleep(0.01)


class _LeftoverSink:
    """A Discord-like adapter that answers adopted questions into a RecordingSink and runs
    until one is answered and recorded."""

    name = "discord"

    def __init__(self, runtime: Any = None) -> None:
        from tests.sinks import RecordingSink

        self.runtime = runtime
        self.sink = RecordingSink()
        self.answered = asyncio.Event()

    async def ready(self) -> None:
        return None

    def reply_sink(self, leftover: Any) -> Any:
        sink, answered = self.sink, self.answered

        class Answering:
            async def send(self, text: str) -> str:
                message_id = await sink.send(text)
                answered.set()
                return message_id

            async def typing(self) -> None:
                return None

        return Answering()

    async def run(self, handle: Any) -> None:
        await self.answered.wait()
        await _once(lambda: not self.runtime.service.pending)

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_stopped_processs_question_is_answered_by_a_live_one(
        db_url: str, tmp_path: Path) -> None:
    """A shard process takes a question and dies; it is never started again. The live process
    running the other shard adopts the question once the dead one's lease has run out, and
    answers it once (not at a restart that never comes); its own questions stay its own."""
    from bot.config import parse_config
    from bot.paths import DataPaths
    from bot.runtime import open_runtime
    from memory.store import IntakeItem

    dead = await Store.open(db_url)
    await dead.take_role("discord[1/2]", "gone-host", 1.0)
    [asked] = await dead.intake([IntakeItem(
        platform="discord", platform_user_id="ann", display_name="Ann", persona_id="pell",
        channel_id="c", platform_message_id="m1", text="在嗎？", created_at=datetime.now(UTC),
        owner="discord[1/2]")])
    await dead._db.close()  # killed: its lease is left to run out
    config = parse_config({"models": {"llm": {"backend": "scripted"},
                                      "embedding": {"enabled": False}},
                           "store": {"url": db_url, "rag_enabled": False,
                                     "role_lease_s": 1.0}}, env={})
    async with open_runtime(config, DataPaths.resolve(tmp_path / "live"),
                            role="discord[0/2]") as live:
        adapter = _LeftoverSink(live)
        await asyncio.wait_for(live.run_adapters([adapter]), 60)
        assert asked.message_id is not None
        question = await live.store.get_message(asked.message_id)
    assert question is not None and question.status == "answered"
    assert len(adapter.sink.sent) == 1
