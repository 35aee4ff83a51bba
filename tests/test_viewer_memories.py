"""What the persona remembers about a viewer is theirs to see and to forget item by item
(``/memory list``, ``/memory forget``): only their own memories, newest first; a number that
is not theirs forgets nothing; a forgotten memory never reaches a prompt again."""

from __future__ import annotations

import io
import re
from pathlib import Path

from adapters.console.adapter import ConsoleAdapter
from bot.commands import viewer
from bot.commands.base import Caller
from bot.config import parse_config
from bot.events import ChatEvent
from bot.paths import DataPaths
from bot.runtime import open_runtime
from engine.backends.scripted import ScriptedBackend
from tests.sinks import RecordingSink

CONFIG = {"models": {"llm": {"backend": "scripted"}, "embedding": {"enabled": False}},
          "vtuber": {"response": {"chinese_conversion": "off"}},
          "store": {"rag_enabled": True, "remember_messages_min_chars": 8}}
SAID = [("ann", "我家的貓叫 Mochi，牠今年三歲了喔"), ("bob", "我明天要考數學期末考，好緊張"),
        ("ann", "我下個月要去東京看演唱會")]


def _caller(user: str) -> Caller:
    return Caller("console", user, user)


async def test_a_viewer_lists_their_memories_and_forgets_one(tmp_path: Path) -> None:
    config = parse_config(CONFIG, env={})
    async with open_runtime(config, DataPaths.resolve(tmp_path),
                            backend=ScriptedBackend(["好喔"])) as runtime:
        for number, (user, text) in enumerate(SAID):
            await runtime.service.handle(ChatEvent(
                platform="console", channel_id="c", platform_user_id=user, display_name=user,
                text=text, sink=RecordingSink(), message_id=f"m{number}"))
        listed = await viewer.memories(runtime, _caller("ann"))
        lines = listed.text.splitlines()
        assert "東京" in lines[0] and "Mochi" in lines[1] and "數學" not in listed.text
        mochi = int(re.findall(r"#(\d+)", lines[1])[0])

        refused = await viewer.forget_memory(runtime, _caller("bob"), mochi)
        assert "no memory" in refused.text
        assert "Mochi" in (await viewer.memories(runtime, _caller("ann"))).text

        done = await viewer.forget_memory(runtime, _caller("ann"), mochi)
        assert f"#{mochi}" in done.text and "Forgotten" in done.text
        again = (await viewer.memories(runtime, _caller("ann"))).text
        assert "Mochi" not in again and "東京" in again
        user_id = await runtime.store.find_user("console", "ann")
        assert runtime.retriever is not None
        found = await runtime.retriever.search("我家的貓叫什麼 Mochi", user_id=user_id)
        assert all("Mochi" not in chunk.text for chunk in found)
        nothing = await viewer.memories(runtime, _caller("carol"))
        assert "don't remember anything" in nothing.text


async def test_the_console_offers_the_memory_commands(tmp_path: Path) -> None:
    config = parse_config(CONFIG, env={})
    out = io.StringIO()
    typed = "我家的貓叫 Mochi，牠今年三歲了喔\n/memory\n/memory forget 999999\n"
    async with open_runtime(config, DataPaths.resolve(tmp_path),
                            backend=ScriptedBackend(["好喔"])) as runtime:
        adapter = ConsoleAdapter(config, user="ann", speaker="佩兒", services=runtime,
                                 stdin=io.StringIO(typed), stdout=out)
        await runtime.run_adapters([adapter])
    text = out.getvalue()
    assert "What I remember about you" in text and "Mochi" in text
    assert "You have no memory #999999" in text
