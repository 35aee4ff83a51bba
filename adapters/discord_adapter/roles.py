"""Who is an admin or a moderator on Discord, computed once per event or interaction."""

from __future__ import annotations

import discord

from bot.config import AppConfig
from bot.events import Roles


def is_configured_admin(config: AppConfig, user: discord.abc.User) -> bool:
    """Bot-wide admins: the configured user ids, or members holding a configured role."""
    admins = config.admins
    if user.id in admins.discord_user_ids:
        return True
    return isinstance(user, discord.Member) and any(
        role.id in admins.discord_role_ids for role in user.roles)


def member_roles(config: AppConfig, user: discord.abc.User) -> Roles:
    if not isinstance(user, discord.Member):  # a DM: no guild, no guild roles
        return Roles(is_admin=is_configured_admin(config, user))
    permissions = user.guild_permissions
    return Roles(is_admin=is_configured_admin(config, user),
                 is_moderator=permissions.manage_messages,
                 is_server_admin=permissions.administrator)


def interaction_roles(config: AppConfig, interaction: discord.Interaction) -> Roles:
    """Discord's own computed permissions for the caller in this guild, and the configured
    bot-wide admins. A guild's Administrators are admins of that guild only."""
    permissions = interaction.permissions
    in_guild = interaction.guild_id is not None
    return Roles(
        is_admin=is_configured_admin(config, interaction.user),
        is_moderator=in_guild and permissions.manage_messages,
        is_server_admin=in_guild and permissions.administrator,
    )


def guild_channels(interaction: discord.Interaction) -> frozenset[str]:
    guild = interaction.guild
    return frozenset(str(c.id) for c in guild.channels) if guild is not None else frozenset()
