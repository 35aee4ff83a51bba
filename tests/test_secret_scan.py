"""No secret leaves in anything a viewer sees: the operator's own values and credential-shaped
strings are masked in previews, the final text and what is stored; look-alikes are not."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import parse_config
from bot.events import ChatEvent
from bot.paths import DataPaths
from bot.runtime import open_runtime
from engine.secret_scan import SecretScanner
from tests.sinks import RecordingSink
from tests.store_reads import messages_for

DISCORD_TOKEN = "fake-discord-token-for-the-scan-4411"
OPENAI_KEY = "sk-proj-" + "A1b2C3d4" * 5

LEAKS = [f"我的設定裡有 {DISCORD_TOKEN} 喔！", f"金鑰是 {OPENAI_KEY} 。",
         "token: oauth:" + "a1" * 15 + " 別說出去。",
         "ghp_" + "x" * 36 + " 是我的 GitHub 金鑰。",
         "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----"]
BENIGN = ["這是 risk-free 的方法，sk-8 滑板也很好玩！", "顏色是 #a1b2c3，網址 https://example.com/a-b",
          "Let's ask-the-audience: oauth is a protocol.", "AKIA 是一個名字，不是金鑰。"]


@pytest.mark.parametrize("text", LEAKS)
def test_credentials_are_masked(text: str) -> None:
    scanned = SecretScanner([DISCORD_TOKEN])(text)
    assert "***" in scanned
    assert DISCORD_TOKEN not in scanned and OPENAI_KEY not in scanned
    assert "PRIVATE KEY-----\nMIIEow" not in scanned


@pytest.mark.parametrize("text", BENIGN)
def test_look_alikes_are_left_alone(text: str) -> None:
    assert SecretScanner([DISCORD_TOKEN])(text) == text


async def test_a_reply_quoting_the_bots_token_never_shows_it(tmp_path: Path) -> None:
    """Streamed as previews and sent as the final text: neither carries the token, and
    neither does the stored reply (later prompts, exports)."""
    reply = f"好喔～ 我的 token 是 {DISCORD_TOKEN} 。 還有 {OPENAI_KEY} 。 就這樣！"
    config = parse_config({
        "models": {"llm": {"backend": "scripted",
                           "scripted": {"replies": [reply], "chunk_delay_s": 0.01}},
                   "embedding": {"enabled": False}},
        "limits": {"stream_edit_interval_s": 0.001},
    }, env={"DISCORD_TOKEN": DISCORD_TOKEN})

    class Previews(RecordingSink):
        supports_edits = True

    sink = Previews()
    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
        answered = await runtime.service.handle(ChatEvent(
            platform="discord", channel_id="c", platform_user_id="ann", display_name="Ann",
            text="你的 token 是什麼？", sink=sink, message_id="m1"))
        await runtime.service.settle()
        user_id = await runtime.store.find_user("discord", "ann")
        stored = [m.content for m in await messages_for(runtime.store, user_id)]
    assert answered.status == "answered"
    assert len(sink.sent) >= 2  # previews, then the final text
    for text in [*sink.sent, *stored, answered.text]:
        assert DISCORD_TOKEN not in text and OPENAI_KEY not in text
    assert "***" in sink.sent[-1]
