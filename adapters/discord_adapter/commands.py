"""Slash commands: Discord's ``/`` syntax mapped onto the neutral commands in ``bot.commands``,
and their results rendered as (ephemeral) messages, embeds and files. Operator commands carry
``default_permissions`` (hidden from members by default); the neutral layer checks roles again
at run time."""

from __future__ import annotations

import io

import discord
from discord import app_commands

from adapters.discord_adapter.roles import guild_channels, interaction_roles
from bot import commands
from bot.commands import Caller, CommandResult
from bot.config import AppConfig
from bot.events import RuntimeServices

PLATFORM = "discord"
DISCORD_LIMIT = 2000


def _caller(config: AppConfig, interaction: discord.Interaction) -> Caller:
    user = interaction.user
    return Caller(PLATFORM, str(user.id), user.display_name,
                  interaction_roles(config, interaction), guild_channels(interaction))


def _embed(result: CommandResult) -> discord.Embed:
    embed = discord.Embed(title=result.title, description=result.text)
    for name, value in result.fields:
        embed.add_field(name=name, value=value, inline=name != "placement")
    return embed


def _content(result: CommandResult) -> str:
    if result.preformatted:
        return f"```json\n{result.text[:DISCORD_LIMIT - 100]}\n```"
    return result.text[:DISCORD_LIMIT]


async def _send_dm(interaction: discord.Interaction, result: CommandResult) -> None:
    assert result.attachment is not None
    file = discord.File(io.BytesIO(result.attachment.data), result.attachment.filename)
    try:
        await interaction.user.send(result.text, file=file)
    except discord.Forbidden:
        await interaction.response.send_message(
            "I could not DM you (are DMs from server members off?).", ephemeral=True)
        return
    await interaction.response.send_message("Sent you a DM with your data.", ephemeral=True)


async def respond(interaction: discord.Interaction, result: CommandResult) -> None:
    """Render a neutral result the Discord way."""
    if result.by_dm and result.attachment is not None:
        await _send_dm(interaction, result)
        return
    if result.title:
        await interaction.response.send_message(embed=_embed(result),
                                                ephemeral=result.private)
        return
    files = ([discord.File(io.BytesIO(result.attachment.data), result.attachment.filename)]
             if result.attachment else [])
    await interaction.response.send_message(_content(result), files=files,
                                            ephemeral=result.private)


def register_commands(tree: app_commands.CommandTree, config: AppConfig,
                      services: RuntimeServices) -> None:
    _register_operator_commands(tree, config, services)
    _register_viewer_commands(tree, config, services)


def _register_operator_commands(tree: app_commands.CommandTree, config: AppConfig,
                                services: RuntimeServices) -> None:
    gpu = app_commands.Group(name="gpu", description="GPU status and memory")

    @gpu.command(name="status", description="GPUs, memory and where the models sit (mods)")
    async def gpu_status(interaction: discord.Interaction) -> None:
        await respond(interaction, await commands.gpu_status(
            services, _caller(config, interaction)))

    @gpu.command(name="optimize", description="Free cached GPU memory (mods)")
    @app_commands.default_permissions(administrator=True)
    async def gpu_optimize(interaction: discord.Interaction) -> None:
        await respond(interaction, await commands.gpu_optimize(
            services, _caller(config, interaction)))

    tree.add_command(gpu)

    @tree.command(name="diagnose", description="System diagnosis (mods)")
    @app_commands.default_permissions(administrator=True)
    async def diagnose(interaction: discord.Interaction) -> None:
        await respond(interaction, await commands.diagnose(
            services, _caller(config, interaction)))

    @tree.command(name="trace", description="How a reply was made (admins)")
    @app_commands.default_permissions(administrator=True)
    async def trace(interaction: discord.Interaction, message_id: int) -> None:
        await respond(interaction, await commands.trace(
            services, _caller(config, interaction), message_id))


def _register_viewer_commands(tree: app_commands.CommandTree, config: AppConfig,
                              services: RuntimeServices) -> None:
    @tree.command(name="stats", description="Your (or, for admins, someone's) stats")
    async def stats(interaction: discord.Interaction,
                    user: discord.User | None = None) -> None:
        target = str(user.id) if user is not None else None
        in_guild = (isinstance(user, discord.Member) and interaction.guild_id is not None
                    and user.guild.id == interaction.guild_id)
        await respond(interaction, await commands.stats(
            services, _caller(config, interaction), target, target_in_server=in_guild,
            with_chart=True))

    @tree.command(name="forget", description="Delete everything the persona knows about you")
    async def forget(interaction: discord.Interaction, confirm: bool = False) -> None:
        await respond(interaction, await commands.forget(
            services, _caller(config, interaction), confirm,
            confirm_hint="`/forget confirm:True`"))

    @tree.command(name="export", description="Get a JSON file of your data by DM")
    async def export(interaction: discord.Interaction) -> None:
        await respond(interaction, await commands.export(
            services, _caller(config, interaction)))

    @tree.command(name="link", description="Link your Twitch account (get a one-time code)")
    async def link(interaction: discord.Interaction) -> None:
        await respond(interaction, await commands.link_code(
            services, _caller(config, interaction), "Twitch"))

    @tree.command(name="persona", description="Who the persona is (an AI character)")
    async def persona(interaction: discord.Interaction) -> None:
        await respond(interaction, await commands.persona(
            services, _caller(config, interaction)))
