"""Discord adapter (discord.py 2.x): mentions, DMs, replies and configured channels; slash
commands for viewers and admins. Install with the ``discord`` extra."""

from adapters.discord_adapter.adapter import DiscordAdapter

__all__ = ["DiscordAdapter"]
