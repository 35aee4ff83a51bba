"""Slash commands: the command table (``bot.commands.COMMANDS``) in Discord's ``/`` syntax,
and the results rendered as (ephemeral) messages, embeds and files. Top-level operator commands
carry ``default_permissions`` (hidden from members by default); the neutral layer checks roles
again at run time."""

from __future__ import annotations

import io
from typing import Any

import discord
from discord import app_commands

from adapters.discord_adapter.roles import guild_channels, interaction_roles
from bot.commands import Caller, Command, CommandResult, Invocation, commands_on
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
    """Every command the table offers on Discord: one word a top-level command, two words a
    command in a group."""
    groups: dict[str, app_commands.Group] = {}
    for command in commands_on(PLATFORM):
        slash: app_commands.Command[Any, ..., None] = app_commands.Command(
            name=command.words[-1], description=command.description,
            callback=_callback(command, config, services))
        if len(command.words) == 1:
            if command.operators_listing:
                slash.default_permissions = discord.Permissions(administrator=True)
            tree.add_command(slash)
            continue
        group = groups.get(command.words[0])
        if group is None:
            group = groups[command.words[0]] = app_commands.Group(
                name=command.words[0], description=f"{command.words[0]} commands")
            tree.add_command(group)
        group.add_command(slash)


def _callback(command: Command, config: AppConfig, services: RuntimeServices) -> Any:
    """A slash callback whose signature is the command's argument (discord.py reads the
    option's type from the annotation), named and described as the table says."""
    async def run(interaction: discord.Interaction, value: Any = None) -> None:
        await respond(interaction, await command.run(services, Invocation(
            _caller(config, interaction), _plain(value), rich=True,
            viewer_in_server=_in_server(interaction, value),
            confirm_hint=f"`/{command.name} confirm:True`")))

    async def no_argument(interaction: discord.Interaction) -> None:
        await run(interaction)

    async def confirm(interaction: discord.Interaction, value: bool = False) -> None:
        await run(interaction, value)

    async def integer(interaction: discord.Interaction, value: int) -> None:
        await run(interaction, value)

    async def integer_or_none(interaction: discord.Interaction, value: int | None = None
                              ) -> None:
        await run(interaction, value)

    async def code(interaction: discord.Interaction, value: str) -> None:
        await run(interaction, value)

    async def code_or_none(interaction: discord.Interaction, value: str | None = None) -> None:
        await run(interaction, value)

    async def viewer(interaction: discord.Interaction,
                     value: discord.User | None = None) -> None:
        await run(interaction, value)

    argument = command.argument
    if argument is None:
        return no_argument
    callback = {("confirm", False): confirm, ("confirm", True): confirm,
                ("integer", True): integer, ("integer", False): integer_or_none,
                ("code", True): code, ("code", False): code_or_none,
                ("viewer", False): viewer, ("viewer", True): viewer,
                }[argument.kind, argument.required]
    callback = app_commands.rename(value=argument.name)(callback)
    return app_commands.describe(value=argument.description)(callback)


def _plain(value: Any) -> str | int | bool | None:
    """A user becomes their id; everything else is already plain."""
    if isinstance(value, discord.abc.User):
        return str(value.id)
    return value  # type: ignore[no-any-return]


def _in_server(interaction: discord.Interaction, value: Any) -> bool:
    return (isinstance(value, discord.Member) and interaction.guild_id is not None
            and value.guild.id == interaction.guild_id)
