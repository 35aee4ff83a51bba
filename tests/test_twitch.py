"""The real twitchio 3 client against a local fake EventSub websocket + Helix + id server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

twitchio = pytest.importorskip("twitchio")

from adapters.twitch_adapter import TwitchAdapter  # noqa: E402
from bot.config import parse_config  # noqa: E402
from bot.errors import BotError, PlatformUnreachableError  # noqa: E402
from bot.paths import DataPaths  # noqa: E402
from bot.runtime import open_runtime  # noqa: E402
from tests.fake_twitch import (  # noqa: E402
    BOT_ID,
    BOT_TOKEN,
    CHANNEL_ID,
    CHANNEL_LOGIN,
    FakeTwitch,
)
from tests.rate_limits import SlidingWindow  # noqa: E402
from tests.sinks import settled  # noqa: E402
from tests.store_reads import messages_for  # noqa: E402

ENV = {"TWITCH_CLIENT_ID": "tw-client-id-5127", "TWITCH_CLIENT_SECRET": "tw-client-secret-5127",
       "TWITCH_BOT_ID": BOT_ID, "TWITCH_ACCESS_TOKEN": BOT_TOKEN,
       "TWITCH_REFRESH_TOKEN": "tw-refresh-5127"}


def _point_twitchio_at(server: FakeTwitch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(twitchio.http.Route, "BASE", f"{server.base}/helix/")
    monkeypatch.setattr(twitchio.http.Route, "ID_BASE", f"{server.base}/")
    monkeypatch.setattr(twitchio.eventsub.websockets, "WSS", f"ws://127.0.0.1:{server.port}/ws")


@pytest.fixture
async def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    options = getattr(request, "param", {})
    server = FakeTwitch(keepalive_s=options.get("keepalive_s", 3.0))
    await server.start()
    _point_twitchio_at(server, monkeypatch)
    config = parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": ["嗨～今晚也很亮喔"]}},
                   "embedding": {"enabled": False}},
        "adapters": {"twitch": {"enabled": True, "channels": [CHANNEL_LOGIN],
                                **options.get("twitch", {})}},
        "store": {"remember_messages_min_chars": 0},
        "limits": {"user_messages_per_minute": 1000, "max_pending": 1000,
                   **options.get("limits", {})},
    }, env=ENV)
    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
        adapter = TwitchAdapter(config, services=runtime)
        task = asyncio.create_task(adapter.run(runtime.service.handle))
        try:
            await server.wait_until(lambda: len(server.subscriptions) >= 4, 20)
            yield server, adapter, runtime
        finally:
            await adapter.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop()


async def test_subscribes_and_replies_to_a_mention(live: Any) -> None:
    server, _adapter, runtime = live
    types = sorted(s["type"] for s in server.subscriptions)
    assert types == ["channel.chat.clear", "channel.chat.clear_user_messages",
                     "channel.chat.message", "channel.chat.message_delete"]
    for subscription in server.subscriptions:
        assert subscription["condition"] == {"broadcaster_user_id": CHANNEL_ID,
                                             "user_id": BOT_ID}
        assert subscription["transport"]["method"] == "websocket"
    event = server.chat_event("佩兒 你好", message_id="parent-1")
    await server.notify("channel.chat.message", event)
    await server.wait_until(lambda: server.sent_messages())
    [sent] = server.sent_messages()
    assert sent["broadcaster_id"] == CHANNEL_ID and sent["sender_id"] == BOT_ID
    assert sent["message"] == "嗨～今晚也很亮喔"
    assert sent["reply_parent_message_id"] == "parent-1"
    await runtime.service.settle()  # on SQLite the intake is written behind the reply
    user_id = await runtime.store.find_user("twitch", "200")
    assert user_id is not None
    [question, answer] = await messages_for(runtime.store, user_id)
    assert question.status == "answered" and answer.role == "assistant"
    assert not await asyncio.to_thread(Path(".tio.tokens.json").exists)  # no token file


async def test_unaddressed_and_known_bots_are_ignored(live: Any) -> None:
    server, _adapter, runtime = live
    await server.notify("channel.chat.message", server.chat_event("just chatting"))
    await server.notify("channel.chat.message",
                        server.chat_event("佩兒 !commands", user_id="300", login="nightbot"))
    await asyncio.sleep(0.5)
    assert server.sent_messages() == []
    assert await runtime.store.find_user("twitch", "300") is None


async def test_diagnose_is_for_moderators(live: Any) -> None:
    server, _adapter, _runtime = live
    await server.notify("channel.chat.message", server.chat_event("!diagnose"))
    await server.wait_until(lambda: len(server.sent_messages()) == 1)
    assert "Only moderators" in server.sent_messages()[0]["message"]
    await server.notify("channel.chat.message",
                        server.chat_event("!diagnose", user_id="201", login="mod",
                                          badges=["moderator"]))
    await server.wait_until(lambda: len(server.sent_messages()) == 2)
    assert server.sent_messages()[1]["message"].startswith("issues:")


async def test_redelivered_chat_messages_are_answered_once(live: Any) -> None:
    server, _adapter, runtime = live
    event = server.chat_event("佩兒 你好", message_id="dup-1")
    await server.notify("channel.chat.message", event, envelope_id="evt-same")
    await server.notify("channel.chat.message", event, envelope_id="evt-same")  # redelivery
    await server.notify("channel.chat.message", event)  # the same chat message, new envelope
    await server.wait_until(lambda: server.sent_messages())
    await asyncio.sleep(0.5)
    assert len(server.sent_messages()) == 1
    await runtime.service.flush()
    user_id = await runtime.store.find_user("twitch", "200")
    rows = [m for m in await messages_for(runtime.store, user_id) if m.role == "user"]
    assert len(rows) == 1


@pytest.mark.parametrize("live", [{"twitch": {"send_limit": 5, "send_window_s": 1.0}}],
                         indirect=True)
async def test_a_reply_twitch_dropped_for_sending_too_fast_goes_out_after_the_window(
        live: Any) -> None:
    """Twitch's own count is stricter than the bot's (another client on the account, say):
    the message it drops (``is_sent: false``, ``msg_ratelimit``) is sent again once the
    bot's window has passed, never hammered; the viewer gets their reply."""
    server, _adapter, runtime = live
    server.chat_limit = SlidingWindow(1, 1.0)
    for viewer in ("v1", "v2"):
        await server.notify("channel.chat.message", server.chat_event(
            f"佩兒 你好 {viewer}", user_id=viewer, login=viewer))
    await server.wait_until(lambda: len(server.sent_messages()) >= 2, 15)
    assert len(server.dropped) == 1
    await runtime.service.flush()
    for viewer in ("v1", "v2"):
        user_id = await runtime.store.find_user("twitch", viewer)
        [row] = [m for m in await messages_for(runtime.store, user_id) if m.role == "user"]
        assert row.status == "answered"


@pytest.mark.parametrize("live", [{"limits": {"user_messages_per_minute": 3}}],
                         indirect=True)
async def test_commands_spend_the_chat_budget(live: Any) -> None:
    server, _adapter, _runtime = live
    for attempt in range(8):
        await server.notify("channel.chat.message", server.chat_event(f"!link WRONG{attempt}"))
    await asyncio.sleep(1.0)
    assert len(server.sent_messages()) == 3  # the rest were refused without a word


async def test_forget_asks_for_confirmation_first(live: Any) -> None:
    server, _adapter, runtime = live
    await server.notify("channel.chat.message", server.chat_event("佩兒 你好"))
    await server.wait_until(lambda: len(server.sent_messages()) == 1)
    await runtime.service.settle()  # on SQLite the intake is written behind the reply
    assert await runtime.store.find_user("twitch", "200") is not None
    await server.notify("channel.chat.message", server.chat_event("!forget"))
    await server.wait_until(lambda: len(server.sent_messages()) == 2)
    assert "!forget confirm" in server.sent_messages()[1]["message"]
    assert await runtime.store.find_user("twitch", "200") is not None  # nothing deleted yet
    await server.notify("channel.chat.message", server.chat_event("!forget confirm"))
    await server.wait_until(lambda: len(server.sent_messages()) == 3)
    assert "deleted" in server.sent_messages()[2]["message"]
    assert await runtime.store.find_user("twitch", "200") is None


async def test_deleted_message_is_purged(live: Any) -> None:
    server, _adapter, runtime = live
    await server.notify("channel.chat.message",
                        server.chat_event("佩兒 我的秘密", message_id="secret-1"))
    await server.wait_until(lambda: server.sent_messages())
    await runtime.service.settle()  # on SQLite the intake is written behind the reply
    await server.notify("channel.chat.message_delete", {
        "broadcaster_user_id": CHANNEL_ID, "broadcaster_user_login": CHANNEL_LOGIN,
        "broadcaster_user_name": "Lighthouse", "target_user_id": "200",
        "target_user_login": "viewer", "target_user_name": "Viewer",
        "message_id": "secret-1"})
    user_id = await runtime.store.find_user("twitch", "200")

    for _ in range(200):  # the notification is handled in the client's own task
        rows = await messages_for(runtime.store, user_id)
        if rows[0].status == "purged":
            break
        await asyncio.sleep(0.05)
    assert rows[0].status == "purged" and rows[0].content == ""


@pytest.mark.parametrize("live", [{"keepalive_s": 1.0}], indirect=True)
async def test_keepalive_loss_reconnects_and_resubscribes(live: Any) -> None:
    server, _adapter, _runtime = live
    await server.notify("channel.chat.message", server.chat_event("佩兒 one"))
    await server.wait_until(lambda: len(server.sent_messages()) == 1)
    before = len(server.subscriptions)
    await server.drop_keepalives()
    # twitchio checks every 10 s (its floor) for 15 s of silence: up to ~25 s to notice.
    await server.wait_until(lambda: server.sessions >= 2, 45)
    server.send_keepalives = True
    await server.wait_until(lambda: len(server.subscriptions) >= before + 4, 20)
    assert {s["transport"]["session_id"] for s in server.subscriptions[before:]} == {
        "session-2"}
    await server.notify("channel.chat.message", server.chat_event("佩兒 two"))
    await server.wait_until(lambda: len(server.sent_messages()) == 2)
    await asyncio.sleep(0.5)
    assert len(server.sent_messages()) == 2  # nothing answered twice


FLOOD = {"twitch": {"send_limit": 20, "send_window_s": 2.0},
         "limits": {"per_user_queue_of_one": True, "stale_after_s": 4}}


@pytest.mark.parametrize("live", [FLOOD], indirect=True)
async def test_flood_of_200_messages_from_50_viewers(live: Any) -> None:
    server, _adapter, runtime = live
    for index in range(200):
        await server.notify("channel.chat.message", server.chat_event(
            f"佩兒 訊息 {index}", user_id=f"v{index % 50}", login=f"viewer{index % 50}"))
        await asyncio.sleep(0.01)  # 200 messages in about 2 s

    async def settled() -> list[str]:
        statuses = []
        for viewer in range(50):
            user_id = await runtime.store.find_user("twitch", f"v{viewer}")
            rows = [] if user_id is None else await messages_for(runtime.store, user_id)
            statuses += [m.status for m in rows if m.role == "user"]
        return statuses

    for _ in range(300):
        statuses = await settled()
        if len(statuses) == 200 and "received" not in statuses:
            break
        await asyncio.sleep(0.1)
    assert len(statuses) == 200, "every inbound message is stored"
    assert set(statuses) <= {"answered", "dropped"}
    assert "answered" in statuses and "dropped" in statuses
    sends = server.sent_at
    for start in sends:  # never more than 20 sends in any 2 s window
        assert sum(1 for t in sends if start <= t < start + 2.0) <= 20


async def _login_error(tmp_path: Path, server: FakeTwitch | None,
                       monkeypatch: pytest.MonkeyPatch,
                       channels: tuple[str, ...] = (CHANNEL_LOGIN,)) -> BaseException:
    """Start the adapter against ``server`` (None: a port nobody listens on); return what
    ``run`` raised."""
    if server is None:
        server = FakeTwitch()
        await server.start()
        await server.stop()  # its port is now closed
    else:
        await server.start()
    _point_twitchio_at(server, monkeypatch)
    config = parse_config({"models": {"llm": {"backend": "scripted"},
                                      "embedding": {"enabled": False}},
                           "adapters": {"twitch": {"enabled": True,
                                                   "channels": list(channels)}}}, env=ENV)
    try:
        async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
            adapter = TwitchAdapter(config, services=runtime)
            with pytest.raises(BotError) as info:
                await asyncio.wait_for(adapter.run(runtime.service.handle), 30)
            await adapter.close()
    finally:
        await server.stop()
    return info.value


async def test_rejected_credentials_are_one_line(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters.twitch_adapter.adapter import TwitchLoginError

    error = await _login_error(tmp_path, FakeTwitch(reject_credentials=True), monkeypatch)
    assert isinstance(error, TwitchLoginError) and error.exit_code == 77
    assert "TWITCH_CLIENT_ID" in str(error) and "\n" not in str(error)


@pytest.mark.parametrize("status", [503, 429])
async def test_token_endpoint_failure_is_one_line_without_the_secret(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int) -> None:
    error = await _login_error(tmp_path, FakeTwitch(token_status=status), monkeypatch)
    assert isinstance(error, PlatformUnreachableError) and error.exit_code == 69
    assert str(error) == f"Twitch answered HTTP {status} while logging in; try again later"


async def test_a_misspelled_channel_is_a_config_error_not_a_silent_bot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A login Twitch does not know would leave the bot ready and deaf in that channel: it
    stops at start-up with one line naming it."""
    from bot.errors import ConfigError

    server = FakeTwitch(unknown_logins=frozenset({"lighthuose"}))
    error = await _login_error(tmp_path, server, monkeypatch,
                               channels=(CHANNEL_LOGIN, "lighthuose"))
    assert isinstance(error, ConfigError) and error.exit_code == 78
    assert "lighthuose" in str(error) and "\n" not in str(error)
    assert not [s for s in server.subscriptions if s]  # nothing subscribed half way


async def test_unreachable_twitch_is_one_line(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    error = await _login_error(tmp_path, None, monkeypatch)
    assert isinstance(error, PlatformUnreachableError) and error.exit_code == 69
    assert str(error).startswith("cannot reach Twitch (") and "\n" not in str(error)


async def test_ban_or_timeout_purges_that_viewers_messages(live: Any) -> None:
    server, _adapter, runtime = live
    await server.notify("channel.chat.message", server.chat_event("佩兒 spam spam"))
    await server.wait_until(lambda: server.sent_messages())
    await runtime.service.settle()  # on SQLite the intake is written behind the reply
    await server.notify("channel.chat.clear_user_messages", {
        "broadcaster_user_id": CHANNEL_ID, "broadcaster_user_login": CHANNEL_LOGIN,
        "broadcaster_user_name": "Lighthouse", "target_user_id": "200",
        "target_user_login": "viewer", "target_user_name": "Viewer"})
    user_id = await runtime.store.find_user("twitch", "200")
    for _ in range(200):
        rows = await messages_for(runtime.store, user_id)
        if rows[0].status == "purged":
            break
        await asyncio.sleep(0.05)
    assert rows[0].status == "purged" and rows[0].content == ""


async def test_a_message_a_crash_left_unanswered_is_answered_after_the_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime, timedelta

    from memory.store import IntakeItem

    server = FakeTwitch()
    await server.start()
    _point_twitchio_at(server, monkeypatch)
    config = parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": ["剛剛斷線了～"]}},
                   "embedding": {"enabled": False}},
        "adapters": {"console": {"enabled": False},
                     "twitch": {"enabled": True, "channels": [CHANNEL_LOGIN]}},
    }, env=ENV)
    paths = DataPaths.resolve(tmp_path)
    try:
        async with open_runtime(config, paths) as runtime:  # the run that crashed
            await runtime.store.intake([IntakeItem(
                "twitch", "200", "viewer", runtime.engine.persona.id, CHANNEL_ID, "parent-9",
                "佩兒 還在嗎", datetime.now(UTC) - timedelta(seconds=5))])
        async with open_runtime(config, paths) as runtime:
            adapter = TwitchAdapter(config, services=runtime)
            running = asyncio.create_task(runtime.run_adapters([adapter]))
            await server.wait_until(lambda: server.sent_messages(), 20)
            await settled(runtime.service)  # the answer is being recorded
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            user_id = await runtime.store.find_user("twitch", "200")
            assert user_id is not None
            [question] = [m for m in await messages_for(runtime.store, user_id)
                          if m.role == "user"]
    finally:
        await server.stop()
    [sent] = server.sent_messages()
    assert sent["message"] == "剛剛斷線了～"
    assert sent["broadcaster_id"] == CHANNEL_ID and sent["sender_id"] == BOT_ID
    assert sent["reply_parent_message_id"] == "parent-9"
    assert question.status == "answered"


async def test_a_new_command_row_is_answered_without_an_adapter_edit(
        live: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter reads the command table; a row added there is a Twitch command (a missing
    required argument gets its usage), and words that name none of ours stay unanswered."""
    from bot.commands import CommandResult, table

    async def shout(services: Any, call: Any) -> CommandResult:
        return CommandResult(f"shouting {call.value}")

    monkeypatch.setattr(table, "COMMANDS", (*table.COMMANDS, table.Command(
        ("shout",), "Shout", shout, frozenset({"twitch"}),
        table.Argument("word", "code", "what to shout", required=True))))
    server, _adapter, _runtime = live
    await server.notify("channel.chat.message", server.chat_event("!shout hey"))
    await server.wait_until(lambda: len(server.sent_messages()) == 1)
    await server.notify("channel.chat.message", server.chat_event("!uptime"))
    await server.notify("channel.chat.message", server.chat_event("!shout"))
    await server.wait_until(lambda: len(server.sent_messages()) == 2)
    assert [m["message"] for m in server.sent_messages()] == ["shouting hey",
                                                               "Usage: !shout WORD"]


@pytest.mark.parametrize(("server", "error_name", "channels"), [
    (FakeTwitch(reject_credentials=True), "TwitchLoginError", (CHANNEL_LOGIN,)),
    (FakeTwitch(unknown_logins=frozenset({"lighthuose"})), "ConfigError",
     (CHANNEL_LOGIN, "lighthuose")),
])
async def test_run_checks_credentials_and_channels_before_the_model_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: FakeTwitch,
        error_name: str, channels: tuple[str, ...]) -> None:
    """``vtuber-bot run`` asks Twitch first: a typo costs a second, not a model load."""
    import argparse

    from bot import cli

    def no_model(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the runtime (and its model) was opened")

    await server.start()
    _point_twitchio_at(server, monkeypatch)
    monkeypatch.setattr(cli, "open_runtime", no_model)
    config = parse_config({"models": {"llm": {"backend": "scripted"},
                                      "embedding": {"enabled": False}},
                           "adapters": {"twitch": {"enabled": True,
                                                   "channels": list(channels)}}}, env=ENV)
    args = argparse.Namespace(adapters=None, shard_ids=None, shard_count=None,
                              twitch_shard_ids=None, twitch_shard_count=None)
    try:
        with pytest.raises(BotError) as info:
            await cli.cmd_run(args, config, DataPaths.resolve(tmp_path))
    finally:
        await server.stop()
    assert type(info.value).__name__ == error_name and "\n" not in str(info.value)


async def test_good_credentials_pass_the_check(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeTwitch()
    await server.start()
    _point_twitchio_at(server, monkeypatch)
    config = parse_config({"adapters": {"twitch": {"enabled": True,
                                                   "channels": [CHANNEL_LOGIN]}}}, env=ENV)
    try:
        await TwitchAdapter.check_credentials(config)
    finally:
        await server.stop()
