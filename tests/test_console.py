"""The console REPL as a new operator meets it: the reply streams into the terminal, each
reply shows its id (for `vtuber-bot trace`), an unknown /command says so."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

from adapters.console.adapter import ConsoleAdapter
from bot.config import parse_config
from bot.paths import DataPaths
from bot.runtime import open_runtime
from engine.backends.scripted import ScriptedBackend
from engine.types import GenerationRequest

SENTENCES = ["今晚的星星很亮。", "要一起看嗎？"]


class SentenceBackend(ScriptedBackend):
    """Answers one sentence every 0.3 s, slower than the console's preview pace."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        self.requests.append(request)
        for sentence in SENTENCES:
            await asyncio.sleep(0.3)
            yield sentence


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def _session(tmp_path: Path, typed: str, out: io.StringIO,
                   limits: dict[str, int] | None = None) -> None:
    config = parse_config({"models": {"llm": {"backend": "scripted"},
                                      "embedding": {"enabled": False}},
                           "vtuber": {"response": {"chinese_conversion": "off"}},
                           "limits": limits or {}}, env={})
    async with open_runtime(config, DataPaths.resolve(tmp_path),
                            backend=SentenceBackend()) as runtime:
        adapter = ConsoleAdapter(config, user="ann", speaker="佩兒", services=runtime,
                                 stdin=io.StringIO(typed), stdout=out)
        await runtime.run_adapters([adapter])


async def test_the_reply_streams_into_a_terminal_and_shows_its_id(tmp_path: Path) -> None:
    out = Terminal()
    await _session(tmp_path, "你好\n", out)
    text = out.getvalue()
    # A typing mark first, erased by the first sentence; the second sentence is appended to
    # the same line; the line ends with the stored reply's id.
    assert "佩兒> …\r\x1b[K佩兒> 今晚的星星很亮。要一起看嗎？  [#2]\n" in text


async def test_piped_output_gets_the_whole_reply_once(tmp_path: Path) -> None:
    out = io.StringIO()
    await _session(tmp_path, "你好\n", out)
    text = out.getvalue()
    assert text.count("今晚的星星很亮。要一起看嗎？") == 1 and "…" not in text


async def test_an_unknown_command_says_so(tmp_path: Path) -> None:
    out = io.StringIO()
    await _session(tmp_path, "/stast\n/help\n", out)
    text = out.getvalue()
    assert "unknown command /stast. Commands:" in text
    assert text.count("unknown command") == 1


async def test_a_message_that_gets_no_reply_says_why(tmp_path: Path) -> None:
    """Over the per-viewer limit the persona stays silent on a platform; at the terminal
    the operator is told why, in one line."""
    out = io.StringIO()
    await _session(tmp_path, "你好\n還在嗎\n", out, limits={"user_messages_per_minute": 1})
    text = out.getvalue()
    assert text.count("今晚的星星很亮。") == 1
    assert "(no reply: more than limits.user_messages_per_minute messages a minute)" in text


class StartedBackend(SentenceBackend):
    """Says when it starts writing a reply."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        self.started.set()
        async for sentence in super().generate(request):
            yield sentence


async def test_a_stop_mid_reply_exits_once_the_reply_is_done(tmp_path: Path) -> None:
    """Ctrl-C while a reply is being written: the reply finishes and the process goes, without
    waiting out the shutdown grace for the prompt that is waiting for the next line."""
    import os
    import signal
    import time

    config = parse_config({"models": {"llm": {"backend": "scripted"},
                                      "embedding": {"enabled": False}},
                           "limits": {"shutdown_grace_s": 60}}, env={})
    reading, writing = os.pipe()
    out = io.StringIO()
    with os.fdopen(reading) as stdin, os.fdopen(writing, "w") as typed:
        backend = StartedBackend()
        async with open_runtime(config, DataPaths.resolve(tmp_path),
                                backend=backend) as runtime:
            adapter = ConsoleAdapter(config, user="ann", speaker="佩兒", services=runtime,
                                     stdin=stdin, stdout=out)
            running = asyncio.create_task(runtime.run_adapters([adapter]))
            typed.write("你好\n")
            typed.flush()
            await asyncio.wait_for(backend.started.wait(), timeout=30)
            started = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(running, timeout=30)
            took = time.monotonic() - started
    assert "今晚的星星很亮。要一起看嗎？" in out.getvalue()
    assert took < 30  # the grace is 60 s: it did not wait for the idle prompt


async def test_a_final_text_unlike_its_preview_replaces_it_on_the_same_line() -> None:
    from adapters.console.adapter import ConsoleSink

    out = Terminal()
    sink = ConsoleSink(out, "佩兒", stream=True)
    message = await sink.send("今晚的星星")
    await sink.edit(message, "今晚的星星很亮。")  # grows: only the new part is written
    await sink.edit(message, "今晚很冷。")  # the final text took another turn
    sink.end_reply("  [#2]")
    assert out.getvalue() == ("佩兒> 今晚的星星很亮。\r\x1b[K佩兒> 今晚很冷。  [#2]\n")


async def test_a_log_line_never_lands_on_the_prompt(tmp_path: Path) -> None:
    """While the prompt waits, a log line (a warning from anywhere) clears it first and the
    prompt comes back after, once however many lines came."""
    import logging
    import os

    config = parse_config({"models": {"llm": {"backend": "scripted"},
                                      "embedding": {"enabled": False}}}, env={})
    reading, writing = os.pipe()
    out = Terminal()
    with os.fdopen(reading) as stdin, os.fdopen(writing, "w") as typed:
        async with open_runtime(config, DataPaths.resolve(tmp_path),
                                backend=SentenceBackend()) as runtime:
            adapter = ConsoleAdapter(config, user="ann", speaker="佩兒", services=runtime,
                                     stdin=stdin, stdout=out)
            running = asyncio.create_task(runtime.run_adapters([adapter]))
            for _ in range(100_000):  # until the banner is out and the prompt waits
                if adapter.prompting:
                    break
                await asyncio.sleep(0)
            for _ in range(3):
                logging.getLogger("somewhere").warning("the store is slow")
            await asyncio.sleep(0)  # the prompt comes back on the loop
            typed.write("/quit\n")
            typed.flush()
            await asyncio.wait_for(running, timeout=30)
    assert out.getvalue().endswith("ann> \r\x1b[Kann> ")
