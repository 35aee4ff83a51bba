"""Slash commands. Admin-only ones carry ``default_permissions`` (hidden from members by
default) and are checked again at run time against the configured admins."""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING

import discord
from discord import app_commands

if TYPE_CHECKING:
    from adapters.discord_adapter.adapter import DiscordAdapter

PLATFORM = "discord"


def _gpu_embed(status: dict) -> discord.Embed:
    embed = discord.Embed(title="GPU status",
                          description=f"model: {status.get('model')} "
                                      f"({status.get('loading_mode')})")
    if not status.get("devices"):
        embed.add_field(name="GPUs", value="none (running on CPU)")
    for device in status.get("devices", []):
        embed.add_field(name=f"cuda:{device['index']} {device['name']}",
                        value=f"{device['used_memory_gb']} / {device['total_memory_gb']} GiB")
    placement = status.get("placement") or {}
    if placement:
        embed.add_field(name="placement", inline=False,
                        value=f"LLM {placement.get('llm_device')} "
                              f"(GPUs {placement.get('llm_gpus')}), embedder "
                              f"{placement.get('embedder_device')}")
    return embed


def register_commands(tree: app_commands.CommandTree, adapter: DiscordAdapter) -> None:
    services = adapter.services

    def admin_only(interaction: discord.Interaction) -> bool:
        """Discord's own computed permissions for the caller, or the configured admins."""
        from adapters.discord_adapter.adapter import is_admin

        return interaction.permissions.administrator or is_admin(adapter.config,
                                                                 interaction.user)

    async def refuse(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("Only admins can use this command.",
                                                ephemeral=True)

    gpu = app_commands.Group(name="gpu", description="GPU status and memory")

    @gpu.command(name="status", description="GPUs, memory and where the models sit")
    async def gpu_status(interaction: discord.Interaction) -> None:
        await interaction.response.send_message(embed=_gpu_embed(services.gpu_status()))

    @gpu.command(name="optimize", description="Free cached GPU memory (admins)")
    @app_commands.default_permissions(administrator=True)
    async def gpu_optimize(interaction: discord.Interaction) -> None:
        if not admin_only(interaction):
            await refuse(interaction)
            return
        report = services.gpu_optimize()
        await interaction.response.send_message(
            f"Freed {report['freed_gb']} GiB ({report['objects_collected']} objects).",
            ephemeral=True)

    tree.add_command(gpu)

    @tree.command(name="diagnose", description="System diagnosis (admins)")
    @app_commands.default_permissions(administrator=True)
    async def diagnose(interaction: discord.Interaction) -> None:
        if not admin_only(interaction):
            await refuse(interaction)
            return
        report = services.diagnose()
        lines = [f"issues: {report['issues'] or 'none'}",
                 f"recommendations: {report['recommendations'] or 'none'}",
                 f"load steps: {report['model'].get('load', {}).get('steps')}",
                 f"queue depth: {report['queue_depth']}, latency: {report['latency_ms']}",
                 f"allocation warnings: {report['allocation_warnings'] or 'none'}"]
        await interaction.response.send_message("\n".join(lines)[:2000], ephemeral=True)

    @tree.command(name="trace", description="How a reply was made (admins)")
    @app_commands.default_permissions(administrator=True)
    async def trace(interaction: discord.Interaction, message_id: int) -> None:
        if not admin_only(interaction):
            await refuse(interaction)
            return
        found = await services.trace(message_id)
        if found is None:
            await interaction.response.send_message(f"No trace for message {message_id}.",
                                                    ephemeral=True)
            return
        text = json.dumps(found["trace"], ensure_ascii=False, indent=1)
        await interaction.response.send_message(f"```json\n{text[:1900]}\n```",
                                                ephemeral=True)

    @tree.command(name="stats", description="Your (or, for admins, someone's) stats")
    async def stats(interaction: discord.Interaction,
                    user: discord.User | None = None) -> None:
        target = user or interaction.user
        if target.id != interaction.user.id and not admin_only(interaction):
            await refuse(interaction)
            return
        numbers = await services.stats(PLATFORM, str(target.id))
        if numbers is None:
            await interaction.response.send_message("No conversations yet.", ephemeral=True)
            return
        chart = await services.chart(PLATFORM, str(target.id))
        text = (f"conversations: {numbers['conversation_count']}, mood: "
                f"{numbers['current_mood']}, intimacy: {numbers['intimacy_level']} "
                f"({numbers['intimacy_tier']}, {numbers['intimacy_trend']})")
        files = [discord.File(io.BytesIO(chart), "stats.png")] if chart else []
        await interaction.response.send_message(text, files=files, ephemeral=True)

    @tree.command(name="forget", description="Delete everything the persona knows about you")
    async def forget(interaction: discord.Interaction, confirm: bool = False) -> None:
        if not confirm:
            await interaction.response.send_message(
                "This deletes all your messages, memories and stats. Run `/forget confirm:"
                "True` to go ahead.", ephemeral=True)
            return
        counts = await services.forget(PLATFORM, str(interaction.user.id))
        await interaction.response.send_message(
            f"Done: deleted {sum(counts.values())} rows about you.", ephemeral=True)

    @tree.command(name="export", description="Get a JSON file of your data by DM")
    async def export(interaction: discord.Interaction) -> None:
        data = await services.export(PLATFORM, str(interaction.user.id))
        if data is None:
            await interaction.response.send_message("Nothing stored about you.",
                                                    ephemeral=True)
            return
        payload = json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")
        try:
            await interaction.user.send(
                "Everything stored about you:",
                file=discord.File(io.BytesIO(payload), "my-data.json"))
        except discord.Forbidden:
            await interaction.response.send_message(
                "I could not DM you (are DMs from server members off?).", ephemeral=True)
            return
        await interaction.response.send_message("Sent you a DM with your data.",
                                                ephemeral=True)

    @tree.command(name="link", description="Link your Twitch account (get a one-time code)")
    async def link(interaction: discord.Interaction) -> None:
        code = services.create_link_code(PLATFORM, str(interaction.user.id))
        await interaction.response.send_message(
            f"Type `!link {code}` in the Twitch chat within 10 minutes to link that account "
            "to this one: your history, mood and intimacy will be shared.", ephemeral=True)

    @tree.command(name="persona", description="Who the persona is (an AI character)")
    async def persona(interaction: discord.Interaction) -> None:
        info = services.persona_info()
        names = info["names"]
        await interaction.response.send_message(
            f"**{names['zh']}** ({names['en']}) — {info['identity']}\n{info['disclosure']}")
