"""The dashboard's live controls, as an operator uses them: say something as the persona,
edit or reset a viewer's mood and intimacy, mute and unmute them; each is recorded in the
audit log with how it ended (also when refused), and a mute survives a restart. One control
is driven through the page in a real headless Chromium."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from bot.events import ReplySink
from memory.store import NewMemory
from tests.sinks import RecordingSink
from tests.test_operator import (
    FakeAdapter,
    Served,
    _chromium,
    _serve,
    _until,
    browser,
    chat,
    make_config,
)


@dataclass
class PostingAdapter(FakeAdapter):
    """An adapter that can post into its channels (Discord's and Twitch's can)."""

    channels: dict[str, RecordingSink] = field(default_factory=dict)

    def channel_sink(self, channel_id: str) -> ReplySink:
        return self.channels.setdefault(channel_id, RecordingSink())


async def _audit(served: Served) -> list[tuple[str, str | None, str]]:
    entries = (await served.client.get("/api/audit")).json()
    return [(e["action"], e["target"], e["outcome"]) for e in reversed(entries)]


async def test_say_posts_as_the_persona_and_is_audited(tmp_path: Path) -> None:
    adapter = PostingAdapter("discord")
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    async for served in _serve(config, tmp_path, adapter):
        said = await served.client.post("/api/control/say", json={
            "platform": "discord", "channel_id": "42", "text": "大家晚安～"})
        empty = await served.client.post("/api/control/say", json={
            "platform": "discord", "channel_id": "42", "text": "  "})
        nowhere = await served.client.post("/api/control/say", json={
            "platform": "twitch", "channel_id": "42", "text": "hi"})
        audit = await _audit(served)
    assert said.status_code == 200 and adapter.channels["42"].sent == ["大家晚安～"]
    assert empty.status_code == 409 and nowhere.status_code == 409
    assert "twitch" in nowhere.json()["refused"]
    assert [(a, t) for a, t, _ in audit] == [("say", "discord:42")] * 2 + [("say", "twitch:42")]
    assert audit[0][2] == "ok" and all(o.startswith("refused") for *_, o in audit[1:])


async def test_a_viewers_state_is_set_and_reset_by_hand(tmp_path: Path) -> None:
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    async for served in _serve(config, tmp_path):
        await served.runtime.service.handle(chat("你好", user="dee"))
        persona = served.runtime.engine.persona
        mood = next(m for m in persona.moods.states if m != persona.moods.baseline)
        who = {"platform": "discord", "platform_user_id": "dee"}
        edited = await served.client.post("/api/control/state",
                                          json={**who, "mood": mood, "intimacy": 42})
        stats = (await served.client.get("/api/viewer/discord/dee")).json()["stats"]
        wrong = await served.client.post("/api/control/state", json={**who, "mood": "nope"})
        reset = await served.client.post("/api/control/state", json={**who, "reset": True})
        stranger = await served.client.post("/api/control/state", json={
            "platform": "discord", "platform_user_id": "nobody", "intimacy": 1})
        audit = await _audit(served)
    assert edited.json() == {"mood": mood, "intimacy": 42.0}
    assert (stats["current_mood"], stats["intimacy_level"]) == (mood, 42.0)
    assert wrong.status_code == 409 and "nope" in wrong.json()["refused"]
    assert reset.json() == {"mood": persona.moods.baseline, "intimacy": 0.0}
    assert stranger.status_code == 409
    assert [(a, o.split(":")[0]) for a, _, o in audit] == [
        ("set state", "ok"), ("set state", "refused"), ("reset state", "ok"),
        ("set state", "refused")]


async def test_a_muted_viewer_is_dropped_until_unmuted_across_a_restart(
        tmp_path: Path) -> None:
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    who = {"platform": "discord", "platform_user_id": "eve"}
    async for served in _serve(config, tmp_path):
        assert (await served.client.post("/api/control/mute",
                                         json={**who, "muted": True})).status_code == 200
        first = await served.runtime.service.handle(chat("哈囉", user="eve"))
        other = await served.runtime.service.handle(chat("哈囉", user="fay"))
    async for served in _serve(config, tmp_path):  # a new process
        after_restart = await served.runtime.service.handle(chat("還在嗎", user="eve"))
        await served.client.post("/api/control/mute", json={**who, "muted": False})
        unmuted = await served.runtime.service.handle(chat("我回來了", user="eve"))
        audit = await _audit(served)
    assert (first.status, first.reason) == ("dropped", "muted") and other.status == "answered"
    assert (after_restart.status, after_restart.reason) == ("dropped", "muted")
    assert unmuted.status == "answered"
    assert [(a, t) for a, t, _ in audit] == [("mute", "discord:eve"), ("unmute", "discord:eve")]


@browser
async def test_editing_a_viewer_on_the_page_takes_effect_and_is_audited(
        tmp_path: Path) -> None:
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    driver = await asyncio.to_thread(_chromium)
    try:
        async for served in _serve(config, tmp_path):
            await served.runtime.service.handle(chat("你好", user="gus"))
            gus = await served.runtime.store.find_user("discord", "gus")
            await served.runtime.store.add_memories([NewMemory(
                "user", served.runtime.engine.persona.id, "我家的貓叫 Mochi", "test", gus,
                None, None)])
            await asyncio.to_thread(driver.get, served.url + "/dashboard")
            await _until(driver, "return document.querySelector('#recent tr button')")
            await asyncio.to_thread(driver.execute_script,
                                    "document.querySelector('#recent tr button').click()")
            await _until(driver, "return !document.getElementById('viewer').hidden")
            await asyncio.to_thread(driver.execute_script, """
                document.getElementById('viewer-intimacy').value = '33';
                document.getElementById('viewer-save').click();""")
            await _until(driver, "return document.getElementById('viewer-result')"
                                 ".textContent === 'done'")
            audit_row = await _until(driver, "const r = document.querySelector('#audit tr');"
                                             "return r && [...r.cells].map(c => c.textContent)")
            shown = await _until(driver, "return document.querySelector("
                                         "'#viewer-memories tr')?.cells[1].textContent")
            await asyncio.to_thread(driver.execute_script,
                                    "document.querySelector('#viewer-memories button').click()")
            await _until(driver, "return !document.querySelector('#viewer-memories tr')")
            viewer = (await served.client.get("/api/viewer/discord/gus")).json()
    finally:
        await asyncio.to_thread(driver.quit)
    assert viewer["stats"]["intimacy_level"] == 33.0
    assert shown == "我家的貓叫 Mochi" and viewer["memories"] == []
    assert audit_row[1:3] == ["set state", "discord:gus"] and audit_row[4] == "ok"


async def test_the_operator_sees_a_viewers_memories_and_forgets_one(tmp_path: Path) -> None:
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    async for served in _serve(config, tmp_path):
        runtime = served.runtime
        for user in ("gus", "hal"):
            await runtime.service.handle(chat("你好", user=user))
        persona_id = runtime.engine.persona.id
        gus, hal = [await runtime.store.find_user("discord", u) for u in ("gus", "hal")]
        assert gus is not None and hal is not None
        mochi, exam, hals = await runtime.store.add_memories([
            NewMemory("user", persona_id, "我家的貓叫 Mochi", "test", gus, None, None),
            NewMemory("user", persona_id, "下週要考期末考", "test", gus, None, None),
            NewMemory("user", persona_id, "hal 的秘密", "test", hal, None, None)])
        shown = (await served.client.get("/api/viewer/discord/gus")).json()["memories"]
        who = {"platform": "discord", "platform_user_id": "gus"}
        not_his = await served.client.post("/api/control/forget-memory",
                                           json={**who, "memory_id": hals})
        forgot = await served.client.post("/api/control/forget-memory",
                                          json={**who, "memory_id": mochi})
        after = (await served.client.get("/api/viewer/discord/gus")).json()["memories"]
        audit = await _audit(served)
    assert [m["id"] for m in shown] == [exam, mochi]  # newest first, only gus's
    assert not_his.status_code == 409 and f"#{hals}" in not_his.json()["refused"]
    assert forgot.status_code == 200 and [m["text"] for m in after] == ["下週要考期末考"]
    assert [(a, o.split(":")[0]) for a, _, o in audit] == [
        ("forget memory", "refused"), ("forget memory", "ok")]
