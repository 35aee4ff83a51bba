"""Every command, once: its words, what it says of itself, its one argument, the platforms
that offer it and what runs. Adapters build their own syntax from this table (Discord's slash
commands, Twitch's ``!`` words, the console's ``/``) and never name a command themselves, so a
new command is one row here (and its function), not an edit per adapter.

A command of two words belongs to a group (``gpu status``); on a chat platform the group's
word alone runs its first command (``!gpu`` is ``!gpu status``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from bot.commands import admin, viewer
from bot.commands.base import Caller, CommandResult
from bot.events import RuntimeServices

ArgumentKind = Literal["confirm", "integer", "code", "viewer"]
DISCORD, TWITCH, CONSOLE = "discord", "twitch", "console"


@dataclass(frozen=True, slots=True)
class Argument:
    """A command's one argument. ``confirm``: a yes/no that guards something destructive;
    ``integer``: a number; ``code``: one word; ``viewer``: someone on the platform (offered
    only where the platform can point at a user)."""

    name: str
    kind: ArgumentKind
    description: str
    required: bool = False


@dataclass(frozen=True, slots=True)
class Invocation:
    """One call as the adapter read it: who, the argument's value (None when not given),
    and what the platform can do with the answer."""

    caller: Caller
    value: str | int | bool | None = None
    viewer_in_server: bool = False  # a ``viewer`` argument is a member of the caller's server
    rich: bool = False  # images and files are shown
    confirm_hint: str = "the command again with confirm"  # how to confirm, in its syntax


Runner = Callable[[RuntimeServices, Invocation], Awaitable[CommandResult]]


@dataclass(frozen=True, slots=True)
class Command:
    words: tuple[str, ...]
    description: str
    run: Runner
    platforms: frozenset[str]
    argument: Argument | None = None
    # Listed to operators only (Discord hides it from members); the role gate decides anyway.
    operators_listing: bool = False

    @property
    def name(self) -> str:
        return " ".join(self.words)


def _on(*platforms: str) -> frozenset[str]:
    return frozenset(platforms)


async def _stats(services: RuntimeServices, call: Invocation) -> CommandResult:
    target = str(call.value) if call.value is not None else None
    return await viewer.stats(services, call.caller, target,
                              target_in_server=call.viewer_in_server, with_chart=call.rich)


async def _forget(services: RuntimeServices, call: Invocation) -> CommandResult:
    return await viewer.forget(services, call.caller, bool(call.value),
                               confirm_hint=call.confirm_hint)


async def _forget_memory(services: RuntimeServices, call: Invocation) -> CommandResult:
    return await viewer.forget_memory(services, call.caller, int(call.value or 0))


async def _trace(services: RuntimeServices, call: Invocation) -> CommandResult:
    return await admin.trace(services, call.caller, int(call.value or 0))


async def _redeem(services: RuntimeServices, call: Invocation) -> CommandResult:
    return await viewer.redeem_link(services, call.caller, str(call.value or ""))


def _simple(command: Callable[[RuntimeServices, Caller], Awaitable[CommandResult]]) -> Runner:
    async def run(services: RuntimeServices, call: Invocation) -> CommandResult:
        return await command(services, call.caller)

    return run


COMMANDS: tuple[Command, ...] = (
    Command(("gpu", "status"), "GPUs, memory and where the models sit (mods)",
            _simple(admin.gpu_status), _on(DISCORD, TWITCH, CONSOLE)),
    Command(("gpu", "optimize"), "Free cached GPU memory (mods)",
            _simple(admin.gpu_optimize), _on(DISCORD, CONSOLE), operators_listing=True),
    Command(("diagnose",), "System diagnosis (mods)", _simple(admin.diagnose),
            _on(DISCORD, TWITCH, CONSOLE), operators_listing=True),
    Command(("trace",), "How a reply was made (admins)", _trace, _on(DISCORD, CONSOLE),
            Argument("message_id", "integer", "the stored message's id", required=True),
            operators_listing=True),
    Command(("stats",), "Your (or, for admins, someone's) stats", _stats,
            _on(DISCORD, TWITCH, CONSOLE),
            Argument("user", "viewer", "whose stats (admins)")),
    Command(("forget",), "Delete everything the persona knows about you", _forget,
            _on(DISCORD, TWITCH, CONSOLE),
            Argument("confirm", "confirm", "yes, delete it all")),
    Command(("memory", "list"), "What the persona remembers about you",
            _simple(viewer.memories),
            _on(DISCORD, CONSOLE)),
    Command(("memory", "forget"), "Make the persona forget one thing about you",
            _forget_memory, _on(DISCORD, CONSOLE),
            Argument("number", "integer", "the number /memory list shows", required=True)),
    Command(("export",), "Get a JSON file of your data by DM", _simple(viewer.export),
            _on(DISCORD)),
    Command(("link",), "Link your Twitch account (get a one-time code)",
            _simple(viewer.link_code), _on(DISCORD)),
    Command(("link",), "Link this account to your Discord one (the code from /link)",
            _redeem, _on(TWITCH), Argument("code", "code", "the one-time code", required=True)),
    Command(("persona",), "Who the persona is (an AI character)", _simple(viewer.persona),
            _on(DISCORD, CONSOLE)),
)


def commands_on(platform: str) -> list[Command]:
    """The commands ``platform`` offers, in the table's order."""
    return [command for command in COMMANDS if platform in command.platforms]


def find(platform: str, words: list[str]) -> tuple[Command, list[str]] | None:
    """The command a chat line's leading ``words`` name on ``platform`` (casefolded), and the
    words left for its argument; None when they name none of ours."""
    offered = commands_on(platform)
    if not words:
        return None
    head = words[0].casefold()
    for command in offered:
        if len(command.words) == 2 and words[1:2] and (
                command.words == (head, words[1].casefold())):
            return command, words[2:]
    for command in offered:
        if command.words[0] == head:  # a group's word alone: its first command
            return command, words[1:]
    return None


def chat_argument(argument: Argument | None, words: list[str]) -> str | int | bool | None:
    """An argument's value from the words typed after a command in a chat line (None: not
    given, or not one a chat line can give: a ``viewer`` needs a platform's user picker)."""
    if argument is None or argument.kind == "viewer":
        return None
    if argument.kind == "confirm":
        return bool(words) and words[0].casefold() == argument.name
    if not words:
        return None
    if argument.kind == "integer":
        return int(words[0]) if words[0].isdigit() else None
    return words[0]
