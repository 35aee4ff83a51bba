"""The command table is the one place a command is declared: each adapter builds its syntax
from it, so a new row reaches Discord, Twitch and the console without an edit to any of them."""

from __future__ import annotations

import io
from pathlib import Path

import discord
import pytest
from discord import app_commands

from adapters.console.adapter import ConsoleAdapter
from adapters.discord_adapter.commands import register_commands
from bot.commands import CommandResult, Invocation, table
from bot.commands.table import Argument, Command, chat_argument, commands_on, find
from bot.config import parse_config
from bot.events import RuntimeServices
from bot.paths import DataPaths
from bot.runtime import open_runtime


async def _wave(services: RuntimeServices, call: Invocation) -> CommandResult:
    return CommandResult(f"{call.caller.display_name} waves {call.value or 'once'}")


WAVE = Command(("wave",), "Wave at the persona", _wave,
               frozenset({"discord", "twitch", "console"}),
               Argument("times", "integer", "how many times"))


@pytest.fixture
def with_wave(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table, "COMMANDS", (*table.COMMANDS, WAVE))


def test_chat_words_find_their_command() -> None:
    gpu_status = find("twitch", ["gpu"])
    assert gpu_status is not None and gpu_status[0].name == "gpu status"
    spelled_out = find("console", ["GPU", "optimize"])
    assert spelled_out is not None and spelled_out[0].name == "gpu optimize"
    forget = find("twitch", ["forget", "confirm"])
    assert forget is not None and forget[1] == ["confirm"]
    assert find("twitch", ["uptime"]) is None  # another bot's
    assert find("twitch", ["export"]) is None  # a file by DM: Discord only
    assert find("twitch", []) is None


def test_chat_arguments_are_read_by_kind() -> None:
    confirm = Argument("confirm", "confirm", "")
    assert chat_argument(confirm, ["Confirm"]) is True
    assert chat_argument(confirm, []) is False
    number = Argument("n", "integer", "")
    assert chat_argument(number, ["42"]) == 42 and chat_argument(number, ["x"]) is None
    assert chat_argument(Argument("code", "code", ""), ["AB12"]) == "AB12"
    assert chat_argument(Argument("user", "viewer", ""), ["someone"]) is None
    assert chat_argument(None, ["anything"]) is None


def test_discord_registers_exactly_the_tables_commands(with_wave: None) -> None:
    tree = app_commands.CommandTree(discord.Client(intents=discord.Intents.none()))
    register_commands(tree, parse_config({}, env={}), services=None)  # type: ignore[arg-type]
    registered = set()
    for command in tree.get_commands():
        if isinstance(command, app_commands.Group):
            registered |= {f"{command.name} {sub.name}" for sub in command.commands}
        else:
            registered.add(command.name)
    assert registered == {command.name for command in commands_on("discord")}
    wave = tree.get_command("wave")
    assert isinstance(wave, app_commands.Command)
    [times] = wave.parameters
    assert (times.display_name, times.type, times.required) == (
        "times", discord.AppCommandOptionType.integer, False)
    trace = tree.get_command("trace")
    assert isinstance(trace, app_commands.Command) and trace.parameters[0].required
    diagnose = tree.get_command("diagnose")
    assert diagnose is not None and diagnose.default_permissions is not None


async def test_a_new_row_is_a_console_command(tmp_path: Path, with_wave: None) -> None:
    config = parse_config({"models": {"llm": {"backend": "scripted"},
                                      "embedding": {"enabled": False}}}, env={})
    out = io.StringIO()
    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
        adapter = ConsoleAdapter(config, user="ann", speaker="佩兒", services=runtime,
                                 stdin=io.StringIO("/help\n/wave 3\n/wave\n/trace\n"),
                                 stdout=out)
        await runtime.run_adapters([adapter])
    text = out.getvalue()
    assert "/wave" in text.splitlines()[0]  # listed in the help
    assert "ann waves 3" in text and "ann waves once" in text
    assert "usage: /trace MESSAGE_ID" in text
