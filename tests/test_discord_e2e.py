"""End to end: the real discord.py client against a local fake gateway + REST server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

discord = pytest.importorskip("discord")

from adapters.discord_adapter import DiscordAdapter  # noqa: E402
from bot.adapter_config import DiscordGuildConfig  # noqa: E402
from bot.config import parse_config  # noqa: E402
from bot.errors import BotError, PlatformUnreachableError  # noqa: E402
from bot.paths import DataPaths  # noqa: E402
from bot.runtime import open_runtime  # noqa: E402
from tests.fake_discord import (  # noqa: E402
    BOT_USER,
    CHANNEL_ID,
    GUILD_ID,
    VIEWER,
    FakeDiscord,
    point_discord_at,
)
from tests.sinks import settled  # noqa: E402
from tests.store_reads import messages_for  # noqa: E402


@pytest.fixture
async def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    server = FakeDiscord()
    await server.start()
    point_discord_at(server, monkeypatch)
    config = parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": ["你好呀～"]}},
                   "embedding": {"enabled": False}},
        "adapters": {"discord": {"enabled": True}},
        "limits": {"stream_edit_interval_s": 0},
    }, env={"DISCORD_TOKEN": "fake-token"})
    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
        adapter = DiscordAdapter(config, services=runtime)
        task = asyncio.create_task(adapter.run(runtime.service.handle))
        try:
            await asyncio.wait_for(server.connected.wait(), 20)
            await asyncio.wait_for(adapter.client.wait_until_ready(), 20)
            yield server, adapter, runtime
        finally:
            await adapter.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop()


async def test_connects_answers_a_mention_and_a_slash_command(live: Any) -> None:
    server, adapter, runtime = live
    assert server.identifies == 1
    assert adapter.client.get_guild(int(GUILD_ID)) is not None
    await server.dispatch("MESSAGE_CREATE", server.message_payload(
        f"<@{BOT_USER['id']}> 你好", author=VIEWER, mentions=[BOT_USER]))
    await server.wait_until(lambda: server.posts_to(f"/channels/{CHANNEL_ID}/messages"))
    [sent] = server.posts_to(f"/channels/{CHANNEL_ID}/messages")
    assert sent["content"] == "你好呀～"
    assert sent["allowed_mentions"] == {"parse": [], "replied_user": False}
    await runtime.service.settle()  # on SQLite the intake is written behind the reply
    assert await runtime.store.find_user("discord", VIEWER["id"]) is not None

    await server.dispatch("INTERACTION_CREATE", {
        "id": "7001", "application_id": BOT_USER["id"], "type": 2, "token": "tok",
        "version": 1, "guild_id": GUILD_ID, "channel_id": CHANNEL_ID,
        "channel": {"id": CHANNEL_ID, "type": 0, "guild_id": GUILD_ID, "name": "chat",
                    "position": 0, "permission_overwrites": []},
        "member": {"user": VIEWER, "roles": [], "joined_at": "2026-01-01T00:00:00+00:00",
                   # Manage Messages (8192): a moderator, who may see the GPU status.
                   "deaf": False, "mute": False, "flags": 0, "permissions": "8192"},
        "data": {"id": "900", "name": "gpu", "type": 1,
                 "options": [{"name": "status", "type": 1, "options": []}]},
        "locale": "en-US", "guild_locale": "zh-TW", "app_permissions": "0",
        "entitlements": [], "authorizing_integration_owners": {}, "context": 0,
        "attachment_size_limit": 10485760,
    })
    await server.wait_until(lambda: server.posts_to("/interactions/7001/tok/callback"))
    [callback] = server.posts_to("/interactions/7001/tok/callback")
    assert callback["type"] == 4
    assert callback["data"]["embeds"][0]["title"] == "GPU status"


async def test_a_send_discord_py_already_retried_is_not_retried_again(live: Any) -> None:
    """discord.py owns the retries of its routes (5 tries through 429s): a send that still
    fails gets the one fallback, not three more rounds of five."""
    server, _adapter, runtime = live
    server.refuse_posts = 5  # every try discord.py makes for the reply
    await server.dispatch("MESSAGE_CREATE", server.message_payload(
        f"<@{BOT_USER['id']}> 你好", author=VIEWER, mentions=[BOT_USER]))
    await server.wait_until(lambda: server.posts_to(f"/channels/{CHANNEL_ID}/messages"))
    await runtime.service.settle()
    [sent] = server.posts_to(f"/channels/{CHANNEL_ID}/messages")
    assert sent["content"] in runtime.engine.persona.fallback_lines
    assert server.post_attempts == 6  # discord.py's five for the reply, one for the fallback
    user_id = await runtime.store.find_user("discord", VIEWER["id"])
    assert user_id is not None
    [question, *_] = await messages_for(runtime.store, user_id)
    assert (question.status, question.status_reason) == ("failed", "send")


async def test_reconnects_without_answering_twice(live: Any) -> None:
    server, _adapter, _runtime = live
    first = server.message_payload(f"<@{BOT_USER['id']}> one", author=VIEWER,
                                   mentions=[BOT_USER])
    await server.dispatch("MESSAGE_CREATE", first)
    await server.wait_until(lambda: len(server.posts_to("/messages")) == 1)
    await server.drop_connection()
    await asyncio.wait_for(server.connected.wait(), 30)
    assert server.resumes + server.identifies >= 2
    await server.dispatch("MESSAGE_CREATE", server.message_payload(
        f"<@{BOT_USER['id']}> two", author=VIEWER, mentions=[BOT_USER]))
    await server.wait_until(lambda: len(server.posts_to("/messages")) == 2)
    await asyncio.sleep(0.5)
    assert len(server.posts_to("/messages")) == 2  # nothing answered twice


async def _login_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       server: FakeDiscord | None, token: str = "fake-token") -> BaseException:
    """Start the adapter against ``server`` (None: a port nobody listens on); return what
    ``run`` raised."""
    closed = server is None
    server = server or FakeDiscord()
    await server.start()
    if closed:
        await server.stop()
    monkeypatch.setattr(discord.http.Route, "BASE", f"{server.base}/api/v10")
    config = parse_config({"models": {"llm": {"backend": "scripted"},
                                      "embedding": {"enabled": False}},
                           "adapters": {"discord": {"enabled": True}}},
                          env={"DISCORD_TOKEN": token})
    try:
        async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
            adapter = DiscordAdapter(config, services=runtime)
            with pytest.raises(BotError) as info:
                await asyncio.wait_for(adapter.run(runtime.service.handle), 30)
            await adapter.close()
    finally:
        await server.stop()
    return info.value


async def test_rejected_token_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    from adapters.discord_adapter.adapter import DiscordLoginError

    error = await _login_error(tmp_path, monkeypatch, FakeDiscord(), token="wrong-token")
    assert isinstance(error, DiscordLoginError) and error.exit_code == 77
    assert "DISCORD_TOKEN" in str(error) and "\n" not in str(error)


async def test_discord_answering_503_at_login_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    error = await _login_error(tmp_path, monkeypatch, FakeDiscord(me_status=503))
    assert isinstance(error, PlatformUnreachableError) and error.exit_code == 69
    assert str(error) == "Discord answered HTTP 503 while logging in; try again later"


async def test_unreachable_discord_is_one_line(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    error = await _login_error(tmp_path, monkeypatch, None)
    assert isinstance(error, PlatformUnreachableError) and error.exit_code == 69
    assert str(error).startswith("cannot reach Discord (") and "\n" not in str(error)


async def test_per_guild_channel_and_language(live: Any) -> None:
    server, adapter, _runtime = live
    adapter.config.adapters.discord.guilds = {
        int(GUILD_ID): DiscordGuildConfig(channel_ids=[int(CHANNEL_ID)],
                                          chinese_conversion="off")}
    await server.dispatch("MESSAGE_CREATE", server.message_payload(
        "no mention here", author=VIEWER, mentions=[]))
    await server.wait_until(lambda: server.posts_to(f"/channels/{CHANNEL_ID}/messages"))


async def test_a_replayed_message_create_is_answered_once(live: Any) -> None:
    server, _adapter, runtime = live
    payload = server.message_payload(f"<@{BOT_USER['id']}> 你好", author=VIEWER,
                                      mentions=[BOT_USER], message_id="777")
    await server.dispatch("MESSAGE_CREATE", payload)
    await server.dispatch("MESSAGE_CREATE", payload)  # a gateway resume replays events
    await server.wait_until(lambda: server.posts_to(f"/channels/{CHANNEL_ID}/messages"))
    await asyncio.sleep(0.5)
    assert len(server.posts_to(f"/channels/{CHANNEL_ID}/messages")) == 1
    await runtime.service.flush()
    user_id = await runtime.store.find_user("discord", VIEWER["id"])
    rows = [m for m in await messages_for(runtime.store, user_id) if m.role == "user"]
    assert len(rows) == 1


async def test_a_message_a_crash_left_unanswered_is_answered_after_the_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The earlier run stored the message and died before answering; the restarted runtime
    replies to it (with a reference to it) once the real client is connected."""
    from datetime import UTC, datetime, timedelta

    from memory.store import IntakeItem

    server = FakeDiscord()
    await server.start()
    point_discord_at(server, monkeypatch)
    config = parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": ["剛剛斷線了，抱歉～"]}},
                   "embedding": {"enabled": False}},
        "adapters": {"console": {"enabled": False}, "discord": {"enabled": True}},
    }, env={"DISCORD_TOKEN": "fake-token"})
    paths = DataPaths.resolve(tmp_path)
    try:
        async with open_runtime(config, paths) as runtime:  # the run that crashed
            await runtime.store.intake([IntakeItem(
                "discord", VIEWER["id"], "Viewer", runtime.engine.persona.id, CHANNEL_ID,
                "8123", "還在嗎？", datetime.now(UTC) - timedelta(seconds=5))])
        async with open_runtime(config, paths) as runtime:
            adapter = DiscordAdapter(config, services=runtime)
            running = asyncio.create_task(runtime.run_adapters([adapter]))
            await server.wait_until(
                lambda: server.posts_to(f"/channels/{CHANNEL_ID}/messages"), 20)
            await settled(runtime.service)  # the answer is being recorded
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            user_id = await runtime.store.find_user("discord", VIEWER["id"])
            assert user_id is not None
            [question] = [m for m in await messages_for(runtime.store, user_id)
                          if m.role == "user"]
    finally:
        await server.stop()
    [sent] = server.posts_to(f"/channels/{CHANNEL_ID}/messages")
    assert sent["content"] == "剛剛斷線了，抱歉～"
    assert str(sent["message_reference"]["message_id"]) == "8123"
    assert sent["message_reference"]["fail_if_not_exists"] is False
    assert question.status == "answered"


@pytest.mark.parametrize(("token", "exit_code"), [("wrong-token", 77), ("fake-token", None)])
async def test_run_checks_the_token_before_the_model_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str,
        exit_code: int | None) -> None:
    """``vtuber-bot run`` logs in once before the model loads: a wrong token is one line in
    a second; a right one goes on to open the runtime."""
    import argparse

    from bot import cli

    class ModelWouldLoad(Exception):
        pass

    def model_loads(*_args: Any, **_kwargs: Any) -> Any:
        raise ModelWouldLoad

    server = FakeDiscord()
    await server.start()
    monkeypatch.setattr(discord.http.Route, "BASE", f"{server.base}/api/v10")
    monkeypatch.setattr(cli, "open_runtime", model_loads)
    config = parse_config({"models": {"llm": {"backend": "scripted"},
                                      "embedding": {"enabled": False}},
                           "adapters": {"discord": {"enabled": True}}},
                          env={"DISCORD_TOKEN": token})
    args = argparse.Namespace(adapters=None, shard_ids=None, shard_count=None,
                              twitch_shard_ids=None, twitch_shard_count=None)
    try:
        with pytest.raises((BotError, ModelWouldLoad)) as info:
            await cli.cmd_run(args, config, DataPaths.resolve(tmp_path))
    finally:
        await server.stop()
    if exit_code is None:
        assert isinstance(info.value, ModelWouldLoad)
    else:
        assert isinstance(info.value, BotError) and info.value.exit_code == exit_code


async def test_a_reply_sent_again_for_the_same_question_is_posted_once(live: Any) -> None:
    """Another process answering a question again (it adopted it after a crash, or the
    crashed one restarted) sends the reply's pieces with the same nonces: Discord returns
    the messages posted the first time instead of posting them twice."""
    from adapters.discord_adapter.sink import DiscordSink

    server, adapter, _runtime = live
    channel = adapter.client.get_partial_messageable(int(CHANNEL_ID))
    question = discord.MessageReference(message_id=424242, channel_id=int(CHANNEL_ID))
    first = await DiscordSink(channel, reply_to=question).send("今晚的星星很亮。")
    again = await DiscordSink(channel, reply_to=question).send("今晚的月亮也很亮。")
    other = await DiscordSink(channel, reply_to=discord.MessageReference(
        message_id=434343, channel_id=int(CHANNEL_ID))).send("今晚的星星很亮。")
    posted = server.posts_to(f"/channels/{CHANNEL_ID}/messages")
    assert first == again and other != first
    assert [p["content"] for p in posted] == ["今晚的星星很亮。"] * 2
    assert posted[0]["nonce"] == "424242.0" and posted[0]["enforce_nonce"] is True
