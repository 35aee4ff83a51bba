"""Scale-out end to end (issue "Scale-out", acceptance 1): three `vtuber-bot run` processes on
one PostgreSQL and one OpenAI-compatible server — Discord shards 0 and 1 in one process each,
Twitch in a third — with the real discord.py and twitchio clients against fakes that speak
their protocols (the fake gateway routes each guild's events to its shard's connection). A busy
chat across both platforms: every message answered exactly once, none lost, each viewer's
order kept.

The model server is a fake that answers at once (tests/fake_openai.py): what is under test is
the processes sharing one database, and a CPU vLLM answering 200 messages took longer than any
fixed deadline on a busy 2-core machine. The openai backend meets real vLLM in
test_openai_backend.py. Every window the fleet relies on is set in its config below."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("discord")
pytest.importorskip("twitchio")

from memory.store import Store
from tests.fake_discord import BOT_USER, TWO_SHARD_GUILDS, FakeDiscord, channel_of, shard_of
from tests.fake_openai import FakeOpenAI
from tests.fake_twitch import CHANNEL_LOGIN, FakeTwitch
from tests.store_reads import messages_for
from tests.test_twitch import ENV as TWITCH_ENV

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = 200
GUILDS = TWO_SHARD_GUILDS
DISCORD_VIEWERS = 12  # per guild
TWITCH_VIEWERS = 12
# A restarted shard answers its own leftovers however long the test took to restart it.
LEFTOVERS_WITHIN_S = 3600


@dataclass(frozen=True)
class Viewer:
    platform: str
    platform_user_id: str
    guild: str | None = None  # Discord only


VIEWERS = ([Viewer("discord", f"41{g}{n:02d}", guild)
            for g, guild in enumerate(GUILDS) for n in range(DISCORD_VIEWERS)]
           + [Viewer("twitch", f"52{n:02d}") for n in range(TWITCH_VIEWERS)])


def _config(tmp_path: Path, pg_url: str, openai_url: str, lease_s: float = 15.0) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"""
models:
  llm:
    backend: openai
    openai: {{base_url: "{openai_url}", timeout_s: 120}}
  embedding: {{enabled: false}}
store: {{url: "{pg_url}", rag_enabled: false, role_lease_s: {lease_s}}}
vtuber:
  response: {{max_tokens: 8}}
limits: {{user_messages_per_minute: 1000, max_pending: 1000, stream_edit_interval_s: 0,
          reply_timeout_s: 120, answer_leftovers_within_s: {LEFTOVERS_WITHIN_S}}}
adapters:
  console: {{enabled: false}}
  discord: {{enabled: true}}
  twitch: {{enabled: true, channels: [{CHANNEL_LOGIN}], bot_is_moderator: true}}
""", encoding="utf-8")
    return path


class Fleet:
    """The three bot processes, each logging to its own file."""

    def __init__(self, config: Path, tmp_path: Path, discord: FakeDiscord,
                 twitch: FakeTwitch) -> None:
        self._config, self._tmp = config, tmp_path
        self._env = {**os.environ, **TWITCH_ENV, "DISCORD_TOKEN": "fake-token",
                     "PYTHONPATH": str(ROOT), "FAKE_DISCORD_PORT": str(discord.port),
                     "FAKE_TWITCH_PORT": str(twitch.port)}
        self.processes: dict[str, asyncio.subprocess.Process] = {}

    def log(self, name: str) -> str:
        path = self._tmp / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    async def start(self, name: str, *options: str) -> None:
        data_dir = self._tmp / name
        data_dir.mkdir(exist_ok=True)
        with (self._tmp / f"{name}.log").open("a") as log:
            self.processes[name] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.fake_launch", "--config", str(self._config),
                "--data-dir", str(data_dir), "run", *options,
                cwd=data_dir, env=self._env, stdout=log, stderr=log)

    async def wait_for_line(self, name: str, text: str, within_s: float = 60,
                            times: int = 1) -> None:
        """Until ``text`` shows ``times`` times in the log (a restarted process appends)."""
        deadline = time.monotonic() + within_s
        while self.log(name).count(text) < times:
            process = self.processes[name]
            assert process.returncode is None, f"{name} exited:\n{self.log(name)}"
            assert time.monotonic() < deadline, f"{name}: no {text!r}:\n{self.log(name)}"
            await asyncio.sleep(0.2)

    async def kill(self, name: str) -> None:
        process = self.processes[name]
        process.kill()  # SIGKILL: no drain, no goodbye to the gateway
        await process.wait()

    async def stop(self) -> dict[str, int | None]:
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            try:
                codes[name] = await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                codes[name] = await process.wait()
        return codes


async def _wait(check: Callable[[], Any], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.5)


def _text(index: int) -> str:
    return f"第 {index} 個問題"


def _speaker(viewers: list[Viewer], index: int) -> Viewer:
    return viewers[(index * 7) % len(viewers)]


async def _say(discord: FakeDiscord, twitch: FakeTwitch, viewer: Viewer, index: int) -> None:
    text = _text(index)
    if viewer.platform == "twitch":
        await twitch.notify("channel.chat.message", twitch.chat_event(
            f"佩兒 {text}", user_id=viewer.platform_user_id, login=f"v{viewer.platform_user_id}"))
        return
    author = {"id": viewer.platform_user_id, "username": f"v{viewer.platform_user_id}",
              "discriminator": "0", "global_name": None, "avatar": None, "bot": False}
    assert viewer.guild is not None
    await discord.dispatch("MESSAGE_CREATE", discord.message_payload(
        f"<@{BOT_USER['id']}> {text}", author=author, mentions=[BOT_USER],
        guild_id=viewer.guild))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_two_discord_shards_and_twitch_answer_every_message_once_in_order(
        db_url: str, model_server: FakeOpenAI, fakes: tuple[FakeDiscord, FakeTwitch],
        tmp_path: Path) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("several processes need PostgreSQL")
    discord, twitch = fakes
    fleet = Fleet(_config(tmp_path, db_url, model_server.base_url), tmp_path, discord, twitch)
    try:
        await _start_all(fleet, discord)
        sent = await _chat(discord, twitch, VIEWERS, MESSAGES)
        await _wait_final(db_url, MESSAGES)
    finally:
        codes = await fleet.stop()  # drained: a reply sent twice has been sent by now
    rows = await _rows(db_url)
    assert codes == {"shard0": 0, "shard1": 0, "twitch": 0}, {
        name: fleet.log(name)[-2000:] for name in codes}
    _each_answered_once_in_order(rows, sent)
    # Each platform delivered exactly one reply per message, each guild's on its own shard.
    per_guild = Counter(v.guild for v in sent if v.platform == "discord")
    for guild in GUILDS:
        assert len(discord.posts_to(f"/channels/{channel_of(guild)}/messages")) == (
            per_guild[guild]), guild
    assert {shard_of(g, 2) for g in GUILDS} == {0, 1}
    assert len(twitch.sent_messages()) == sum(v.platform == "twitch" for v in sent)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_shard_process_killed_mid_chat_recovers_its_own_messages_on_restart(
        db_url: str, model_server: FakeOpenAI, fakes: tuple[FakeDiscord, FakeTwitch],
        tmp_path: Path) -> None:
    """Acceptance 4 with the platforms: shard 1's process is SIGKILLed with its messages
    still unanswered; shard 0 and Twitch keep answering; shard 1 restarted answers its own
    unfinished messages, and no question gets two replies."""
    if not db_url.startswith("postgresql"):
        pytest.skip("several processes need PostgreSQL")
    discord, twitch = fakes
    fleet = Fleet(_config(tmp_path, db_url, model_server.base_url), tmp_path, discord, twitch)
    survivors = [v for v in VIEWERS if v.guild != GUILDS[1]]
    _hold_shard1_questions(model_server)  # still being answered when shard 1 is killed
    try:
        await _start_all(fleet, discord)
        sent = await _chat(discord, twitch, VIEWERS, 40)
        await _wait_stored(db_url, 40)  # every message taken in (recorded) by its process
        await fleet.kill("shard1")
        model_server.release()
        sent += await _chat(discord, twitch, survivors, 40, first=40)
        await _all_final_for(db_url, survivors, sum(v in survivors for v in sent))
        await fleet.start("shard1", "--adapters", "discord", "--shard-ids", "1",
                          "--shard-count", "2")
        await _wait_final(db_url, len(sent))
    finally:
        await fleet.stop()
    rows = await _rows(db_url)
    assert "to be answered now" in fleet.log("shard1")  # it found its own leftovers
    _each_answered_once_in_order(rows, sent)
    _one_post_per_question(discord, sent)  # a reply sent just before the kill: not again
    assert len(twitch.sent_messages()) == sum(v.platform == "twitch" for v in sent)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_killed_shards_questions_are_answered_by_the_live_shard_while_it_stays_down(
        db_url: str, model_server: FakeOpenAI, fakes: tuple[FakeDiscord, FakeTwitch],
        tmp_path: Path) -> None:
    """Shard 1's process is SIGKILLed with questions it took still unanswered, and stays
    down: once its lease has run out (3 s here) shard 0's process adopts them (within the
    lease + 5 s) and answers them, each once, in each viewer's order."""
    if not db_url.startswith("postgresql"):
        pytest.skip("several processes need PostgreSQL")
    lease_s = 3.0
    discord, twitch = fakes
    fleet = Fleet(_config(tmp_path, db_url, model_server.base_url, lease_s), tmp_path,
                  discord, twitch)
    _hold_shard1_questions(model_server)
    try:
        await _start_all(fleet, discord)
        sent = await _chat(discord, twitch, VIEWERS, 40)
        await _wait_stored(db_url, 40)
        await fleet.kill("shard1")
        model_server.release()
        await fleet.wait_for_line("shard0", "a stopped process left waiting",
                                  within_s=lease_s + 5)
        await _wait_final(db_url, len(sent))
    finally:
        await fleet.stop()
    rows = await _rows(db_url)
    _each_answered_once_in_order(rows, sent)
    _one_post_per_question(discord, sent)  # a reply sent just before the kill: not again


async def test_a_postgres_restart_under_load_answers_each_message_once(
        own_postgres: Any, model_server: FakeOpenAI, fakes: tuple[FakeDiscord, FakeTwitch],
        tmp_path: Path) -> None:
    """The three processes chatting while their PostgreSQL stops (immediate: a crash) and
    comes back: every message ends final, each viewer gets one reply or one fallback per
    message (none twice), and the processes keep their roles and go on answering."""
    discord, twitch = fakes
    url = own_postgres.create_database("restart")
    fleet = Fleet(_config(tmp_path, url, model_server.base_url, lease_s=5.0), tmp_path,
                  discord, twitch)
    try:
        await _start_all(fleet, discord)
        sent = await _chat(discord, twitch, VIEWERS, 40)
        await asyncio.to_thread(own_postgres.stop)
        sent += await _chat(discord, twitch, VIEWERS, 20, first=40)
        await asyncio.to_thread(own_postgres.resume)
        sent += await _chat(discord, twitch, VIEWERS, 40, first=60)
        await _wait_final(url, len(sent))
        alive = {name: p.returncode for name, p in fleet.processes.items()}
    finally:
        codes = await fleet.stop()
    assert alive == {"shard0": None, "shard1": None, "twitch": None}
    assert codes == {"shard0": 0, "shard1": 0, "twitch": 0}
    assert not any("ran out" in fleet.log(name) for name in codes)  # no role was lost
    rows = await _rows(url)
    expected = Counter((v.platform, v.platform_user_id) for v in sent)
    assert {key: len(questions) for key, (questions, _) in rows.items()} == expected
    for key, (questions, replies) in rows.items():  # at most one reply each
        answered = [r.reply_to_id for r in replies]
        assert len(answered) == len(set(answered)), key
        assert all(q.status != "received" for q in questions), key
    _one_post_per_question(discord, sent)  # one reply or one fallback, never two
    assert len(twitch.sent_messages()) == sum(v.platform == "twitch" for v in sent)
    # The later messages were answered: the roles are held and the processes work.
    later = {(v.platform, v.platform_user_id) for v in sent[60:]}
    assert all(any(q.status == "answered" for q in rows[key][0]) for key in later)


def _hold_shard1_questions(model_server: FakeOpenAI) -> None:
    """The model keeps shard 1's first questions unanswered until ``release``."""
    held = [_text(i) for i in range(40) if _speaker(VIEWERS, i).guild == GUILDS[1]]
    model_server.hold(lambda body: any(
        text in body["messages"][-1]["content"] for text in held))


def _one_post_per_question(discord: FakeDiscord, sent: list[Viewer]) -> None:
    for guild in GUILDS:
        posted = len(discord.posts_to(f"/channels/{channel_of(guild)}/messages"))
        assert posted == sum(v.guild == guild for v in sent), guild


async def _start_all(fleet: Fleet, discord: FakeDiscord) -> None:
    for shard in (0, 1):
        await fleet.start(f"shard{shard}", "--adapters", "discord",
                          "--shard-ids", str(shard), "--shard-count", "2")
    await fleet.start("twitch", "--adapters", "twitch")
    for name in ("shard0", "shard1"):
        await fleet.wait_for_line(name, "connected to Discord")
    await fleet.wait_for_line("twitch", "subscribed to chat in")
    assert sorted(discord.shard_connections) == [0, 1]


async def _chat(discord: FakeDiscord, twitch: FakeTwitch, viewers: list[Viewer], count: int,
                first: int = 0) -> list[Viewer]:
    """``count`` messages at ~40 msg/s, each viewer writing again and again."""
    sent = []
    for index in range(first, first + count):
        viewer = _speaker(viewers, index)
        await _say(discord, twitch, viewer, index)
        sent.append(viewer)
        await asyncio.sleep(0.025)
    return sent


async def _wait_final(db_url: str, count: int) -> None:
    """Until ``count`` user messages are final."""
    await _wait_count(db_url, count, final=True)


async def _wait_stored(db_url: str, count: int) -> None:
    """Until ``count`` user messages are stored, final or not."""
    await _wait_count(db_url, count, final=False)


async def _wait_count(db_url: str, count: int, *, final: bool) -> None:
    store = await Store.open(db_url, auto_migrate=False)
    try:
        async def reached() -> bool:
            return await _user_messages(store, final=final) == count

        await _wait(reached, 240, f"not {count} messages {'final' if final else 'stored'}")
    finally:
        await store.close()


async def _rows(db_url: str) -> dict[tuple[str, str], Any]:
    store = await Store.open(db_url, auto_migrate=False)
    try:
        return await _rows_by_viewer(store)
    finally:
        await store.close()


async def _all_final_for(db_url: str, viewers: list[Viewer], count: int) -> None:
    """Wait until ``viewers`` have ``count`` answered questions between them."""
    store = await Store.open(db_url, auto_migrate=False)
    try:
        async def answered() -> bool:
            rows = await _rows_by_viewer(store, viewers)
            return sum(q.status == "answered" for qs, _ in rows.values() for q in qs) == count

        await _wait(answered, 240, "the live processes stopped answering")
    finally:
        await store.close()


def _each_answered_once_in_order(rows: dict[tuple[str, str], Any], sent: list[Viewer]) -> None:
    """Every message stored once and answered once, by one reply, in each viewer's order."""
    expected = Counter((v.platform, v.platform_user_id) for v in sent)
    assert {key: len(questions) for key, (questions, _) in rows.items()} == expected
    for key, (questions, replies) in rows.items():
        assert [q.status for q in questions] == ["answered"] * len(questions), key
        answered = [r.reply_to_id for r in replies]
        assert sorted(answered) == [q.id for q in questions], key  # once each
        assert answered == [q.id for q in questions], key  # and in the viewer's order


async def _user_messages(store: Store, *, final: bool) -> int:
    from sqlalchemy import func, select

    from memory.models import Message

    query = select(func.count()).select_from(Message).where(Message.role == "user")
    if final:
        query = query.where(Message.status != "received")
    async with store.database.read() as session:
        return int(await session.scalar(query) or 0)


async def _rows_by_viewer(store: Store, viewers: list[Viewer] = VIEWERS
                          ) -> dict[tuple[str, str], tuple[list[Any], list[Any]]]:
    """Per (platform, platform user id): the viewer's questions and the replies to them, each
    in the order they were stored."""
    rows = {}
    for viewer in viewers:
        user_id = await store.find_user(viewer.platform, viewer.platform_user_id)
        if user_id is None:
            continue
        stored = await messages_for(store, user_id)
        rows[(viewer.platform, viewer.platform_user_id)] = (
            [m for m in stored if m.role == "user"],
            [m for m in stored if m.role == "assistant"])
    return rows
