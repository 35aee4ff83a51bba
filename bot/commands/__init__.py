"""Platform-neutral commands: one function each, gated by role, returning a typed result,
and one table of them all (``table.COMMANDS``) that adapters build their syntax from."""

from bot.commands.admin import diagnose, gpu_optimize, gpu_status, trace
from bot.commands.base import (
    Access,
    Attachment,
    Caller,
    CommandResult,
    allowed,
    requires,
)
from bot.commands.format import format_stats
from bot.commands.table import (
    COMMANDS,
    Argument,
    Command,
    Invocation,
    chat_argument,
    commands_on,
    find,
)
from bot.commands.viewer import export, forget, link_code, persona, redeem_link, stats

__all__ = [
    "COMMANDS",
    "Access",
    "Argument",
    "Attachment",
    "Caller",
    "Command",
    "CommandResult",
    "Invocation",
    "allowed",
    "chat_argument",
    "commands_on",
    "diagnose",
    "export",
    "find",
    "forget",
    "format_stats",
    "gpu_optimize",
    "gpu_status",
    "link_code",
    "persona",
    "redeem_link",
    "requires",
    "stats",
    "trace",
]
