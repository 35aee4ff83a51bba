"""Discord adapter with the real discord.py client over dpytest's fake connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

discord = pytest.importorskip("discord")
dpytest = pytest.importorskip("discord.ext.test")

from adapters.common.text_split import split_message  # noqa: E402
from adapters.discord_adapter import DiscordAdapter  # noqa: E402
from adapters.discord_adapter.sink import DiscordSink  # noqa: E402
from bot.config import parse_config  # noqa: E402
from bot.paths import DataPaths  # noqa: E402
from bot.runtime import Runtime, open_runtime  # noqa: E402
from tests.store_reads import messages_for  # noqa: E402

# ~5,000 characters of distinct sentences (repeated ones would be removed by the filter).
LONG_REPLY = "".join(f"第{i}顆星今晚也很亮喔，我們一起把它畫進星圖裡吧。" for i in range(200))
REPLIES = ["你好呀～", "Hi @everyone. And <@123> and <@&456>!", LONG_REPLY]


@pytest.fixture
async def env(request: pytest.FixtureRequest,
              tmp_path: Path) -> AsyncIterator[tuple[DiscordAdapter, Runtime, list[dict]]]:
    stream_interval = getattr(request, "param", 0)  # streaming edits off unless asked
    config = parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": REPLIES}},
                   "embedding": {"enabled": False}},
        "vtuber": {"response": {"max_tokens": 4000}},
        "adapters": {"discord": {"enabled": True}},
        "limits": {"user_messages_per_minute": 100, "stream_edit_interval_s": stream_interval},
    }, env={"DISCORD_TOKEN": "test-token"})
    sends: list[dict] = []
    original_send = discord.abc.Messageable.send

    async def spy_send(self: Any, content: Any = None, **kwargs: Any) -> Any:
        sends.append({"content": content, **kwargs})
        return await original_send(self, content, **kwargs)

    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
        # dpytest resolves mentions through the member cache, which needs the members intent.
        adapter = DiscordAdapter(config, services=runtime,
                                 client_options={"intents": discord.Intents.all()})
        adapter._handle = runtime.service.handle
        client = adapter.client
        await client._async_setup_hook()
        await client.setup_hook()  # login() would call it; registers the slash commands
        client._connection.loop = asyncio.get_running_loop()
        dpytest.configure(client, members=2)
        client._connection._command_tree = client.tree  # dpytest swaps in its own state
        discord.abc.Messageable.send = spy_send  # type: ignore[method-assign]
        try:
            yield adapter, runtime, sends
        finally:
            discord.abc.Messageable.send = original_send  # type: ignore[method-assign]
            await dpytest.empty_queue()


async def _say(text: str, member: Any = 0) -> None:
    await dpytest.message(text, member=member)
    await dpytest.run_all_events()
    for _ in range(50):  # the reply is generated in a task; let it finish
        await asyncio.sleep(0.01)
        if not dpytest.sent_queue.empty():
            break


async def test_mention_is_answered_and_both_messages_persisted(env: Any) -> None:
    adapter, runtime, _sends = env
    me = adapter.client.user
    await _say(f"<@{me.id}> 你好")
    assert dpytest.verify().message().content("你好呀～")
    await runtime.service.settle()  # on SQLite the intake is written behind the reply
    member = dpytest.get_config().members[0]
    user_id = await runtime.store.find_user("discord", str(member.id))
    assert user_id is not None
    rows = await messages_for(runtime.store, user_id)
    assert [(r.role, r.content, r.status) for r in rows] == [
        ("user", "你好", "answered"), ("assistant", "你好呀～", "sent")]
    assert rows[0].platform_message_id is not None


async def test_unaddressed_and_bot_messages_get_no_reply(env: Any) -> None:
    adapter, runtime, _sends = env
    await _say("just chatting, not to the bot")
    assert dpytest.verify().message().nothing()
    config = dpytest.get_config()
    other_bot = config.members[1]
    other_bot._user.bot = True
    await _say(f"<@{adapter.client.user.id}> beep boop", member=other_bot)
    assert dpytest.verify().message().nothing()
    assert await runtime.store.find_user("discord", str(other_bot.id)) is None


async def test_model_text_pings_nobody(env: Any) -> None:
    adapter, _runtime, sends = env
    await _say(f"<@{adapter.client.user.id}> first")
    await dpytest.empty_queue()
    sends.clear()
    await _say(f"<@{adapter.client.user.id}> second")
    assert sends and "@everyone" in sends[0]["content"]
    for call in sends:
        mentions = call["allowed_mentions"]
        assert mentions.everyone is False and mentions.users is False
        assert mentions.roles is False and mentions.replied_user is False


async def test_long_reply_is_split_on_sentence_ends(env: Any) -> None:
    adapter, _runtime, sends = env
    for text in ("one", "two"):
        await _say(f"<@{adapter.client.user.id}> {text}")
    await dpytest.empty_queue()
    sends.clear()
    await _say(f"<@{adapter.client.user.id}> tell me a long story")
    await asyncio.sleep(0.2)
    pieces = [call["content"] for call in sends]
    assert len(pieces) >= 3
    assert all(len(piece) <= 2000 for piece in pieces)
    assert all(piece.endswith("。") for piece in pieces)
    assert "".join(pieces) == LONG_REPLY


def test_split_message_prefers_sentence_ends() -> None:
    text = "First sentence. Second one! 第三句。" * 100
    pieces = split_message(text, 500)
    assert all(len(p) <= 500 for p in pieces)
    assert all(p.endswith(("。", ".", "!")) for p in pieces[:-1])
    assert split_message("x" * 1200, 500) == ["x" * 500, "x" * 500, "x" * 200]


async def test_deleted_message_is_purged(env: Any) -> None:
    adapter, runtime, _sends = env
    await _say(f"<@{adapter.client.user.id}> secret thing")
    await runtime.service.settle()
    member = dpytest.get_config().members[0]
    user_id = await runtime.store.find_user("discord", str(member.id))
    rows = await messages_for(runtime.store, user_id)
    await adapter.on_message_deleted(rows[0].platform_message_id)
    rows = await messages_for(runtime.store, user_id)
    assert rows[0].status == "purged" and rows[0].content == ""


async def test_sink_sends_with_no_pings() -> None:
    class Channel:
        def __init__(self) -> None:
            self.calls: list[dict] = []

        async def send(self, content: str, **kwargs: Any) -> Any:
            self.calls.append({"content": content, **kwargs})

            class Sent:
                id = len(self.calls)

            return Sent()

    channel = Channel()
    await DiscordSink(channel).send("@everyone hello")
    assert channel.calls[0]["allowed_mentions"].everyone is False


async def test_direct_message_is_answered(env: Any) -> None:
    _adapter, runtime, _sends = env
    member = dpytest.get_config().members[0]
    dm = await member.create_dm()
    await dpytest.message("你好", channel=dm, member=member)
    await dpytest.run_all_events()
    for _ in range(50):
        await asyncio.sleep(0.01)
        if not dpytest.sent_queue.empty():
            break
    assert dpytest.verify().message().content("你好呀～")
    await runtime.service.settle()
    assert await runtime.store.find_user("discord", str(member.id)) is not None


# -- slash commands: real INTERACTION_CREATE payloads through discord.py's parser ------------

def _interaction(client: Any, name: str, member: Any, *, admin: bool,
                 options: list[dict] | None = None, subcommand: str | None = None) -> dict:
    config = dpytest.get_config()
    guild, channel = config.guilds[0], config.channels[0]
    data: dict[str, Any] = {"id": "900", "name": name, "type": 1}
    if subcommand:
        data["options"] = [{"name": subcommand, "type": 1, "options": options or []}]
    elif options:
        data["options"] = options
    user = member._user
    return {
        "id": "800", "application_id": str(client.user.id), "type": 2, "token": "tok",
        "version": 1, "guild_id": str(guild.id), "channel_id": str(channel.id),
        "channel": {"id": str(channel.id), "type": 0, "guild_id": str(guild.id),
                    "name": channel.name, "position": 0, "permission_overwrites": []},
        "member": {"user": {"id": str(user.id), "username": user.name,
                            "discriminator": user.discriminator, "avatar": None,
                            "global_name": None},
                   "roles": [], "joined_at": "2026-01-01T00:00:00+00:00", "deaf": False,
                   "mute": False, "flags": 0, "permissions": "8" if admin else "0"},
        "data": data, "locale": "en-US", "guild_locale": "en-US", "app_permissions": "0",
        "entitlements": [], "authorizing_integration_owners": {}, "context": 0,
        "attachment_size_limit": 10 * 1024 * 1024,
    }


@pytest.fixture
def responses(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    from discord.webhook import async_ as webhook

    captured: list[dict] = []

    async def capture(self: Any, interaction_id: int, token: str, *, session: Any,
                      proxy: Any = None, proxy_auth: Any = None, params: Any = None,
                      **kwargs: Any) -> dict:
        import json

        payload = params.payload if params is not None else None
        if payload is None and params is not None and params.multipart:  # with attachments
            form = next(part for part in params.multipart if part["name"] == "payload_json")
            payload = json.loads(form["value"])
        files = params.files if params is not None else []
        captured.append({"payload": payload, "files": files})
        flags = (payload.get("data") or {}).get("flags", 0)
        return {"interaction": {"id": str(interaction_id), "type": 2,
                                "response_message_ephemeral": bool(flags & 64)}}

    monkeypatch.setattr(webhook.AsyncWebhookAdapter, "create_interaction_response", capture)
    return captured


async def _invoke(client: Any, payload: dict) -> None:
    client._connection.parse_interaction_create(payload)
    for _ in range(100):
        await asyncio.sleep(0.01)


async def test_diagnose_is_admin_only(env: Any, responses: list[dict]) -> None:
    adapter, _runtime, _sends = env
    member = dpytest.get_config().members[0]
    await _invoke(adapter.client, _interaction(adapter.client, "diagnose", member, admin=False))
    assert responses, "no interaction response"
    refused = responses[-1]["payload"]["data"]
    assert "Only moderators and admins" in refused["content"]
    assert refused["flags"] & 64  # ephemeral
    await _invoke(adapter.client, _interaction(adapter.client, "diagnose", member, admin=True))
    allowed = responses[-1]["payload"]["data"]
    assert "issues:" in allowed["content"] and allowed["flags"] & 64


async def test_gpu_status_answers_operators_with_an_embed(env: Any,
                                                         responses: list[dict]) -> None:
    adapter, _runtime, _sends = env
    member = dpytest.get_config().members[0]
    await _invoke(adapter.client, _interaction(adapter.client, "gpu", member, admin=False,
                                               subcommand="status"))
    assert "Only moderators" in responses[-1]["payload"]["data"]["content"]
    await _invoke(adapter.client, _interaction(adapter.client, "gpu", member, admin=True,
                                               subcommand="status"))
    embed = responses[-1]["payload"]["data"]["embeds"][0]
    assert embed["title"] == "GPU status"
    assert any(field["name"] == "GPUs" for field in embed["fields"])


async def test_stats_and_forget(env: Any, responses: list[dict]) -> None:
    adapter, runtime, _sends = env
    await _say(f"<@{adapter.client.user.id}> 謝謝你")
    member = dpytest.get_config().members[0]
    await _invoke(adapter.client, _interaction(adapter.client, "stats", member, admin=False))
    stats = responses[-1]
    assert "conversations: 1" in stats["payload"]["data"]["content"]
    assert stats["files"] and stats["files"][0].filename == "stats.png"
    await _invoke(adapter.client, _interaction(
        adapter.client, "forget", member, admin=False,
        options=[{"name": "confirm", "type": 5, "value": True}]))
    assert "deleted" in responses[-1]["payload"]["data"]["content"]
    assert await runtime.store.find_user("discord", str(member.id)) is None


async def test_rejected_token_is_one_clear_error(env: Any, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    from adapters.discord_adapter.adapter import DiscordLoginError

    adapter, _runtime, _sends = env

    async def refuse(token: str, *, reconnect: bool = True) -> None:
        raise discord.LoginFailure("Improper token has been passed.")

    monkeypatch.setattr(adapter.client, "start", refuse)
    with pytest.raises(DiscordLoginError, match="DISCORD_TOKEN") as info:
        await adapter.run(adapter._handle)
    assert "\n" not in str(info.value) and info.value.exit_code != 0


async def test_trace_for_admins(env: Any, responses: list[dict]) -> None:
    adapter, runtime, _sends = env
    await _say(f"<@{adapter.client.user.id}> 你好")
    await runtime.service.settle()
    member = dpytest.get_config().members[0]
    user_id = await runtime.store.find_user("discord", str(member.id))
    question = (await messages_for(runtime.store, user_id))[0]
    payload = _interaction(adapter.client, "trace", member, admin=True,
                           options=[{"name": "message_id", "type": 4, "value": question.id}])
    await _invoke(adapter.client, payload)
    content = responses[-1]["payload"]["data"]["content"]
    assert '"backend": "scripted"' in content and "timings_ms" in content


@pytest.mark.parametrize("env", [0.001], indirect=True)
async def test_reply_streams_by_editing_one_message(env: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    adapter, runtime, sends = env
    runtime.engine.backend._chunk_delay_s = 0.01  # a reply that takes a while to generate
    edits: list[dict] = []
    original_edit = discord.Message.edit

    async def spy_edit(self: Any, **kwargs: Any) -> Any:
        edits.append(kwargs)
        return await original_edit(self, **kwargs)

    monkeypatch.setattr(discord.Message, "edit", spy_edit)
    await _say(f"<@{adapter.client.user.id}> first")
    await dpytest.empty_queue()
    sends.clear()
    edits.clear()
    await _say(f"<@{adapter.client.user.id}> second")  # "Hi @everyone. And <@123> ..."
    await asyncio.sleep(0.2)
    assert len(sends) == 1, "the reply should appear once, then grow by edits"
    assert edits, "no streaming edits"
    assert edits[-1]["content"] == REPLIES[1]
    for call in [*sends, *edits]:
        assert call["allowed_mentions"].everyone is False
        assert call["allowed_mentions"].users is False


async def test_blocked_user_and_denied_channel_are_ignored(env: Any) -> None:
    adapter, runtime, _sends = env
    member = dpytest.get_config().members[0]
    adapter.config.adapters.discord.deny_user_ids = [member.id]
    await _say(f"<@{adapter.client.user.id}> let me in")
    assert dpytest.verify().message().nothing()
    assert await runtime.store.find_user("discord", str(member.id)) is None
    adapter.config.adapters.discord.deny_user_ids = []
    adapter.config.adapters.discord.deny_channel_ids = [dpytest.get_config().channels[0].id]
    await _say(f"<@{adapter.client.user.id}> and now?")
    assert dpytest.verify().message().nothing()


def test_sharded_option_uses_the_auto_sharded_client() -> None:
    config = parse_config({"adapters": {"discord": {"enabled": True, "sharded": True}}},
                          env={"DISCORD_TOKEN": "discord-token-3481"})
    adapter = DiscordAdapter(config, services=object())  # type: ignore[arg-type]
    assert isinstance(adapter.client, discord.AutoShardedClient)
    mentions = adapter.client.allowed_mentions
    assert mentions is not None and mentions.everyone is False and mentions.roles is False


async def test_link_code_links_a_twitch_identity(env: Any, responses: list[dict]) -> None:
    adapter, runtime, _sends = env
    await _say(f"<@{adapter.client.user.id}> 謝謝")
    member = dpytest.get_config().members[0]
    await _invoke(adapter.client, _interaction(adapter.client, "link", member, admin=False))
    content = responses[-1]["payload"]["data"]["content"]
    code = content.split("`!link ")[1].split("`")[0]
    assert await runtime.redeem_link_code(code, "twitch", "ann_tv", "ann_tv")
    assert not await runtime.redeem_link_code(code, "twitch", "ann_tv", "ann_tv")  # one-time
    discord_user = await runtime.store.find_user("discord", str(member.id))
    assert await runtime.store.find_user("twitch", "ann_tv") == discord_user
    stats = await runtime.stats("twitch", "ann_tv")
    assert stats is not None and stats["conversation_count"] == 1


class FakeMessage:
    def __init__(self, channel: Any, content: str) -> None:
        self.id, self.content, self.channel = next(channel.ids), content, channel

    async def edit(self, *, content: str, **_: Any) -> FakeMessage:
        await self.channel.edit_gate.wait()
        self.content = content
        self.channel.edits += 1
        return self


class FakeChannel:
    def __init__(self) -> None:
        import itertools

        self.id = 3000
        self.ids = itertools.count(1)
        self.messages: list[FakeMessage] = []
        self.edits = 0
        self.edit_gate = asyncio.Event()  # edits wait on it (a held rate-limit bucket)
        self.edit_gate.set()

    async def send(self, content: str, **_: Any) -> FakeMessage:
        message = FakeMessage(self, content)
        self.messages.append(message)
        return message

    async def typing(self) -> None:
        return None


async def test_a_long_streamed_reply_posts_its_overflow_once() -> None:
    from adapters.discord_adapter.sink import DiscordSink

    channel = FakeChannel()
    sink = DiscordSink(channel)
    head = await sink.send("start")
    assert head is not None
    for length in (1500, 2500, 2800, 3000):  # the reply grows past 2,000 characters
        await sink.edit(head, "字" * length)
    assert len(channel.messages) == 2  # the head and one overflow message, never re-posted
    assert "".join(m.content for m in channel.messages) == "字" * 3000


async def test_previews_pause_in_a_channel_while_an_edit_there_waits() -> None:
    """Replies in one channel share Discord's edit bucket: while an edit of one reply waits
    (a preview or a final text), the others' previews pause, so the finals are not queued
    behind a preview per reply per second. Other channels are not affected."""
    from adapters.discord_adapter.sink import ChannelEdits, DiscordSink

    edits = ChannelEdits()
    busy_channel, other_channel = FakeChannel(), FakeChannel()
    other_channel.id = 3001
    first, second = DiscordSink(busy_channel, edits=edits), DiscordSink(busy_channel, edits=edits)
    elsewhere = DiscordSink(other_channel, edits=edits)
    head = await first.send("第一句。")
    assert head is not None
    assert not second.previews_paused()
    busy_channel.edit_gate.clear()
    held = asyncio.create_task(first.edit(head, "第一句。第二句。"))
    await asyncio.sleep(0)
    assert second.previews_paused() and not elsewhere.previews_paused()
    busy_channel.edit_gate.set()
    await held
    assert not second.previews_paused()


async def test_a_guild_admin_reaches_only_that_guilds_data(env: Any,
                                                          responses: list[dict]) -> None:
    from bot.events import ChatEvent
    from tests.sinks import RecordingSink

    adapter, runtime, _sends = env

    elsewhere = await runtime.service.handle(ChatEvent(
        platform="twitch", channel_id="twitch-channel", platform_user_id="v1",
        display_name="v1", text="hello from twitch", sink=RecordingSink(),
        message_id="tw-1"))
    assert elsewhere.message_id is not None
    member = dpytest.get_config().members[0]
    trace = [{"name": "message_id", "type": 4, "value": elsewhere.message_id}]
    await _invoke(adapter.client, _interaction(adapter.client, "trace", member, admin=True,
                                               options=trace))
    assert "No trace" in responses[-1]["payload"]["data"]["content"]
    adapter.config.admins.discord_user_ids = [member.id]  # a bot-wide admin, from config
    await _invoke(adapter.client, _interaction(adapter.client, "trace", member, admin=False,
                                               options=trace))
    assert '"backend": "scripted"' in responses[-1]["payload"]["data"]["content"]


async def test_a_server_admin_sees_stats_of_that_servers_members_only() -> None:
    from bot import commands
    from bot.commands import Caller
    from bot.events import Roles

    class Services:
        async def stats(self, platform: str, user: str) -> dict:
            return {"conversation_count": 1, "current_mood": "calm", "intimacy_level": 1.0,
                    "intimacy_tier": "stranger", "intimacy_trend": "steady"}

        async def chart(self, platform: str, user: str) -> None:
            return None

    server_admin = Caller("discord", "1", "admin", Roles(is_server_admin=True))
    outside = await commands.stats(Services(), server_admin, "2", target_in_server=False)
    inside = await commands.stats(Services(), server_admin, "2", target_in_server=True)
    assert outside.refused and not inside.refused
