"""Platform-neutral commands: one function each, gated by role, returning a typed result.

Adapters only translate their syntax onto these (see ``base`` for the contract)."""

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
from bot.commands.viewer import export, forget, link_code, persona, redeem_link, stats

__all__ = [
    "Access",
    "Attachment",
    "Caller",
    "CommandResult",
    "allowed",
    "diagnose",
    "export",
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
