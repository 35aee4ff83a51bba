"""The console adapter: a line-based REPL on stdin/stdout, or one message with ``--once``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import threading
import uuid
from typing import TextIO

from bot import commands
from bot.commands import Caller
from bot.config import AppConfig
from bot.events import ChatEvent, EventHandler, Reply, Roles, RuntimeServices

PLATFORM = "console"
QUIT_COMMANDS = {"/quit", "/exit"}


def help_text() -> str:
    offered = ", ".join(f"/{command.name}" for command in commands.commands_on(PLATFORM))
    return f"Commands: {offered}, /help, /quit (or Ctrl-D)."


class ConsoleSink:
    """ReplySink over a text stream. With ``stream`` it shows the reply while it is generated
    (previews come as edits; a terminal has no edit rate limit): each edit prints only what
    was added. The adapter ends the line once the message is final (``end_reply``)."""

    edit_interval_s = 0.15

    def __init__(self, out: TextIO, speaker: str | None, *, stream: bool = False) -> None:
        self._out = out
        self._prefix = f"{speaker}> " if speaker else ""
        self._ids = itertools.count(1)
        self.supports_edits = stream
        self._shown = ""  # the reply on the current line so far
        self._open = False
        self._typing = False

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()

    async def send(self, text: str) -> str:
        self._clear_typing()
        self.end_reply()
        self._write(self._prefix + text)
        self._shown, self._open = text, True
        return f"console-{next(self._ids)}"

    async def edit(self, message_id: str, text: str) -> None:
        if self._open and text.startswith(self._shown):
            self._write(text[len(self._shown):])
        elif self._open:  # the final text is not what the preview promised: it replaces it
            self._write("\r\x1b[K" + self._prefix + text)
        else:
            await self.send(text)
            return
        self._shown = text

    async def typing(self) -> None:
        if self.supports_edits and not self._open:
            self._write(self._prefix + "…")
            self._typing = True

    def _clear_typing(self) -> None:
        if self._typing:
            self._write("\r\x1b[K")  # back to the line's start, erase it
            self._typing = False

    def end_reply(self, note: str = "") -> None:
        """End the reply's line (with ``note``, e.g. its id); a no-op if none is open."""
        self._clear_typing()
        if self._open:
            self._write(f"{note}\n")
            self._open, self._shown = False, ""


class _PromptGuard(logging.Filter):
    """On a terminal, a log line clears the waiting prompt first and puts it back after, so
    it never lands on the line being typed. Installed on the root logger's handlers while
    the prompt runs."""

    def __init__(self, adapter: ConsoleAdapter) -> None:
        super().__init__()
        self._adapter = adapter
        self._loop = asyncio.get_running_loop()

    def filter(self, record: logging.LogRecord) -> bool:
        if self._adapter.prompting:
            self._adapter.clear_prompt()
            self._loop.call_soon_threadsafe(self._adapter.restore_prompt)
        return True

    def __enter__(self) -> _PromptGuard:
        for handler in logging.getLogger().handlers:
            handler.addFilter(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self)


def _start_line_reader(stream: TextIO, loop: asyncio.AbstractEventLoop,
                       lines: asyncio.Queue[str | None]) -> None:
    """Read lines on a daemon thread: a blocked read never holds up shutdown."""

    def pump() -> None:
        for line in iter(stream.readline, ""):
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)  # EOF (Ctrl-D)

    threading.Thread(target=pump, name="console-stdin", daemon=True).start()


class ConsoleAdapter:
    name = PLATFORM

    def __init__(
        self,
        config: AppConfig,
        *,
        user: str | None = None,
        once: str | None = None,
        speaker: str = "",
        banner: str = "",
        services: RuntimeServices | None = None,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
    ) -> None:
        self._user = user or config.adapters.console.user
        self._once = once
        self._speaker = speaker
        self._banner = banner
        self._services = services
        self._stdin = stdin or sys.stdin
        self._out = stdout or sys.stdout
        self._counter = itertools.count(1)
        self.once_outcome: Reply | None = None  # how the ``--once`` message ended
        self.prompting = False  # waiting for a line at the prompt
        self._prompt_shown = False
        # Message ids must not repeat across runs (the store keeps each platform id once).
        self._session = uuid.uuid4().hex[:12]

    def _event(self, text: str, sink: ConsoleSink) -> ChatEvent:
        return ChatEvent(
            platform=PLATFORM,
            channel_id="console",
            platform_user_id=self._user,
            display_name=self._user,
            text=text,
            sink=sink,
            message_id=f"console-{self._session}-{next(self._counter)}",
            addressed=True,
            roles=Roles(is_admin=True),  # whoever holds the terminal owns the bot
        )

    async def run(self, handle: EventHandler) -> None:
        if self._once is not None:
            once_sink = ConsoleSink(self._out, None)
            self.once_outcome = await handle(self._event(self._once, once_sink))
            once_sink.end_reply()
            return
        sink = ConsoleSink(self._out, self._speaker or None, stream=self._out.isatty())
        if self._banner:
            self._out.write(self._banner + "\n")
        self._out.write(help_text() + "\n")
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        _start_line_reader(self._stdin, asyncio.get_running_loop(), lines)
        with _PromptGuard(self) if self._out.isatty() else contextlib.nullcontext():
            await self._read_loop(handle, sink, lines)

    async def _read_loop(self, handle: EventHandler, sink: ConsoleSink,
                         lines: asyncio.Queue[str | None]) -> None:
        while True:
            self._prompt()
            self.prompting = True
            line = await lines.get()
            self.prompting = False
            if line is None:
                self._out.write("\n")
                return
            text = line.strip()
            if text in QUIT_COMMANDS:
                return
            if text.startswith("/"):
                await self._command(text)
                continue
            if text:
                reply = await handle(self._event(text, sink))
                if reply.status == "dropped":  # silent on a platform; here the operator asks
                    self._out.write(f"(no reply: {_why(reply.reason)})\n")
                    continue
                # The stored reply's id, for `vtuber-bot trace ID`.
                sink.end_reply(f"  [#{reply.message_id}]" if reply.message_id else "")

    def _prompt(self) -> None:
        self._out.write(f"{self._user}> ")
        self._out.flush()
        self._prompt_shown = True

    def clear_prompt(self) -> None:
        if self._prompt_shown:
            self._out.write("\r\x1b[K")
            self._out.flush()
            self._prompt_shown = False

    def restore_prompt(self) -> None:
        if self.prompting and not self._prompt_shown:
            self._prompt()

    async def _command(self, text: str) -> None:
        words = text[1:].split()
        found = commands.find(PLATFORM, words) if self._services is not None else None
        if found is None:
            if text not in ("/help", "/?"):
                self._out.write(f"unknown command {text.split()[0]}. ")
            self._out.write(help_text() + "\n")
            return
        command, rest = found
        # Whoever holds the terminal owns the bot.
        caller = Caller(PLATFORM, self._user, self._user, Roles(is_admin=True))
        argument = command.argument
        value = commands.chat_argument(argument, rest)
        if argument is not None and argument.required and value is None:
            self._out.write(f"usage: /{command.name} {argument.name.upper()}\n")
            return
        assert self._services is not None
        result = await command.run(self._services, commands.Invocation(
            caller, value, confirm_hint=f"/{command.name} confirm"))
        self._out.write(result.plain_text() + "\n")

    async def close(self) -> None:
        return None


# Why a message got no reply, for the person at the terminal (``Reply.reason``).
NO_REPLY = {
    "rate_limited": "more than limits.user_messages_per_minute messages a minute",
    "channel_cooldown": "the channel is over limits.channel_messages_per_minute",
    "paused": "replying is paused on this platform (the dashboard can resume it)",
    "muted": "the operator muted you (the dashboard can unmute you)",
    "queue_full": "too many messages waiting (limits.max_pending)",
    "busy": "the bot is over capacity right now",
    "stale": "it waited longer than limits.stale_after_s",
    "superseded": "a newer message of yours came first",
    "empty": "nothing to answer",
    "shutdown": "the bot is stopping",
}


def _why(reason: str | None) -> str:
    return NO_REPLY.get(reason or "", f"dropped ({reason})")
