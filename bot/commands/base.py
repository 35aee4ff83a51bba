"""What every command shares: who calls it, who may, and what comes back.

A command is one async function ``(services, caller, ...) -> CommandResult``. Adapters map
their own syntax (Discord's ``/`` app commands, Twitch's ``!`` words, the console's ``/``)
onto these functions and render the result; they decide nothing themselves.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec

from bot.events import Roles, RuntimeServices


class Access(enum.Enum):
    EVERYONE = "everyone"
    MODERATOR = "moderator"  # channel moderators, the broadcaster and admins
    ADMIN = "admin"  # configured admins (and, on Discord, a guild's Administrators)


def allowed(roles: Roles, access: Access) -> bool:
    """The one place that decides whether a caller's roles open a command."""
    if access is Access.EVERYONE or roles.is_admin:
        return True
    if access is Access.MODERATOR:
        return roles.is_moderator or roles.is_broadcaster or roles.is_server_admin
    return False


REFUSALS = {
    Access.MODERATOR: "Only moderators and admins can use this command.",
    Access.ADMIN: "Only admins can use this command.",
}


@dataclass(frozen=True, slots=True)
class Caller:
    """Who runs a command, in platform-neutral terms."""

    platform: str
    platform_user_id: str
    display_name: str
    roles: Roles = field(default_factory=Roles)
    # The channels of the server the command runs in: a server admin's reach.
    server_channels: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    data: bytes


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A command's answer. ``title`` and ``fields`` let rich platforms (Discord embeds) lay it
    out; plain ones render ``plain_text()``. ``private`` answers go to the caller only where
    the platform can (ephemeral replies); ``by_dm`` asks for a direct message (files)."""

    text: str
    title: str | None = None
    fields: tuple[tuple[str, str], ...] = ()
    private: bool = True
    attachment: Attachment | None = None
    by_dm: bool = False
    preformatted: bool = False  # code/JSON: keep line breaks, use a monospace block
    refused: bool = False

    def plain_text(self, separator: str = "\n") -> str:
        """One text, lines joined by ``separator`` (" | " for one-line chats like Twitch)."""
        parts = [f"{self.title}: {self.text}" if self.title else self.text]
        parts.extend(f"{name}: {value}" for name, value in self.fields)
        return separator.join(line for part in parts for line in part.splitlines() if line)


P = ParamSpec("P")
CommandFunction = Callable[Concatenate[RuntimeServices, Caller, P], Awaitable[CommandResult]]


def requires(access: Access) -> Callable[[CommandFunction[P]], CommandFunction[P]]:
    """Gate a command: callers without the role get the refusal, and nothing runs."""

    def decorate(command: CommandFunction[P]) -> CommandFunction[P]:
        @functools.wraps(command)
        async def gated(services: RuntimeServices, caller: Caller, /, *args: P.args,
                        **kwargs: P.kwargs) -> CommandResult:
            if not allowed(caller.roles, access):
                return CommandResult(REFUSALS[access], refused=True)
            return await command(services, caller, *args, **kwargs)

        return gated

    return decorate
