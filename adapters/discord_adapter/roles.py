"""Who is an admin or a moderator on Discord, computed once per event or interaction."""

from __future__ import annotations

import discord

from bot.config import AppConfig
from bot.events import Roles


def is_configured_admin(config: AppConfig, user: discord.abc.User) -> bool:
    """Configured admin user/role ids, or Administrator in the guild."""
    admins = config.admins
    if user.id in admins.discord_user_ids:
        return True
    if isinstance(user, discord.Member):
        if user.guild_permissions.administrator:
            return True
        return any(role.id in admins.discord_role_ids for role in user.roles)
    return False


def member_roles(config: AppConfig, user: discord.abc.User) -> Roles:
    moderator = isinstance(user, discord.Member) and user.guild_permissions.manage_messages
    return Roles(is_admin=is_configured_admin(config, user), is_moderator=moderator)


def interaction_roles(config: AppConfig, interaction: discord.Interaction) -> Roles:
    """Discord's own computed permissions for the caller here, or the configured admins."""
    permissions = interaction.permissions
    return Roles(
        is_admin=permissions.administrator or is_configured_admin(config, interaction.user),
        is_moderator=permissions.manage_messages,
    )
