"""Reloading the persona and its knowledge without a restart (SIGHUP, the dashboard): the next
reply uses the edited file, live connections stay up, a broken file is refused and named."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import pytest

from bot.config import parse_config
from bot.events import ChatEvent, EventHandler
from bot.paths import DataPaths
from bot.runtime import Runtime, open_runtime
from engine.backends.scripted import ScriptedBackend
from tests.sinks import RecordingSink

OLD = "住在海邊舊燈塔裡的見習星圖繪師"
NEW = "住在山頂天文台裡的見習星圖繪師"


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    personas = tmp_path / "personas"
    shutil.copytree(str(resources.files("engine").joinpath("personas")), personas)
    config = parse_config({
        "models": {"llm": {"backend": "scripted"}, "embedding": {"enabled": False}},
        "store": {"url": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"},
        "vtuber": {"persona": str(personas / "pell.yaml")},
    }, env={})
    async with open_runtime(config, DataPaths.resolve(tmp_path / "data")) as opened:
        yield opened


def _system_prompt(runtime: Runtime) -> str:
    backend = runtime.engine.backend
    assert isinstance(backend, ScriptedBackend)
    return backend.requests[-1].messages[0].content


async def _ask(runtime: Runtime, text: str = "你好") -> None:
    reply = await runtime.service.handle(ChatEvent(
        platform="console", channel_id="local", platform_user_id="ann", display_name="Ann",
        text=text, sink=RecordingSink()))
    assert reply.status == "answered"


def _edit(runtime: Runtime, old: str, new: str) -> Path:
    path = Path(str(runtime.config.vtuber.persona))
    path.write_text(path.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
    return path


async def test_the_next_reply_uses_the_reloaded_persona(runtime: Runtime) -> None:
    await _ask(runtime)
    assert OLD in _system_prompt(runtime)
    _edit(runtime, OLD, NEW)
    assert await runtime.reload() is None
    await _ask(runtime)
    assert NEW in _system_prompt(runtime) and OLD not in _system_prompt(runtime)


async def test_a_broken_persona_is_refused_and_the_old_one_stays(runtime: Runtime) -> None:
    path = _edit(runtime, "baseline: calm", "baseline: [not, a, mood]")
    refusal = await runtime.reload()
    assert refusal is not None and str(path) in refusal and "baseline" in refusal
    await _ask(runtime)
    assert OLD in _system_prompt(runtime)
    _edit(runtime, "id: pell", "id: someone-else")
    _edit(runtime, "baseline: [not, a, mood]", "baseline: calm")
    refusal = await runtime.reload()
    assert refusal is not None and "restart" in refusal


class WaitingAdapter:
    """An adapter that stays connected until closed, counting its connections."""

    name = "console"

    def __init__(self) -> None:
        self.connections = 0
        self._closed = asyncio.Event()

    async def run(self, handle: EventHandler) -> None:
        self.connections += 1
        await self._closed.wait()

    async def close(self) -> None:
        self._closed.set()


async def test_sighup_reloads_while_the_adapters_stay_connected(runtime: Runtime) -> None:
    adapter = WaitingAdapter()
    running = asyncio.create_task(runtime.run_adapters([adapter]))  # type: ignore[list-item]
    await asyncio.sleep(0.2)
    _edit(runtime, OLD, NEW)
    os.kill(os.getpid(), signal.SIGHUP)
    async with asyncio.timeout(10):
        while OLD in runtime.engine.persona.identity:  # noqa: ASYNC110 - a signal's task
            await asyncio.sleep(0.05)
    await _ask(runtime)
    assert NEW in _system_prompt(runtime)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(running, 30)
    assert adapter.connections == 1  # nothing reconnected


async def test_a_reloaded_config_changes_limits_and_a_broken_one_is_refused(
        runtime: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bot.config import load_config

    config_file = tmp_path / "config.yaml"
    base = (f"models: {{llm: {{backend: scripted}}, embedding: {{enabled: false}}}}\n"
            f"store: {{url: 'sqlite+aiosqlite:///{tmp_path / 'bot.db'}'}}\n"
            f"vtuber: {{persona: '{runtime.config.vtuber.persona}'}}\n")
    config_file.write_text(base + "limits: {user_messages_per_minute: 1}\n", encoding="utf-8")
    runtime.reload_config = lambda: load_config(config_file, env={})
    assert await runtime.reload() is None
    await _ask(runtime)
    limited = await runtime.service.handle(ChatEvent(
        platform="console", channel_id="local", platform_user_id="ann", display_name="Ann",
        text="再一次", sink=RecordingSink()))
    assert (limited.status, limited.reason) == ("dropped", "rate_limited")

    config_file.write_text(base + "limits: {user_messages_per_minute: 1, typo_here: 3}\n",
                           encoding="utf-8")
    refusal = await runtime.reload()
    assert refusal is not None and "limits.typo_here" in refusal
    assert runtime.config.limits.user_messages_per_minute == 1  # what was in use stays

    config_file.write_text(base.replace("backend: scripted", "backend: scripted, "
                                        "max_batch_size: 4")
                           + "limits: {user_messages_per_minute: 30}\n", encoding="utf-8")
    assert await runtime.reload() is None
    await _ask(runtime, "第三次")  # the new per-viewer limit applies at once
    assert "take a restart: models" in caplog.text


async def test_a_reloaded_blocklist_moderates_the_next_reply(runtime: Runtime,
                                                             tmp_path: Path) -> None:
    """The moderation blocklist is for the operator to change mid-show: a reload applies it
    to the next reply, no restart."""
    from bot.config import load_config

    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"models: {{llm: {{backend: scripted, scripted: {{replies: ['收到 收到']}}}}, "
        f"embedding: {{enabled: false}}}}\n"
        f"store: {{url: 'sqlite+aiosqlite:///{tmp_path / 'bot.db'}'}}\n"
        f"vtuber: {{persona: '{runtime.config.vtuber.persona}', "
        f"moderation: {{blocklist: ['收到']}}}}\n", encoding="utf-8")
    runtime.reload_config = lambda: load_config(config_file, env={})
    assert await runtime.reload() is None
    sink = RecordingSink()
    reply = await runtime.service.handle(ChatEvent(
        platform="console", channel_id="local", platform_user_id="ann", display_name="Ann",
        text="你好", sink=sink))
    assert reply.text in runtime.engine.persona.fallback_lines
