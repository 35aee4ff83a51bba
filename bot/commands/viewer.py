"""Commands every viewer may run about themselves."""

from __future__ import annotations

import json

from bot.commands.base import (
    REFUSALS,
    Access,
    Attachment,
    Caller,
    CommandResult,
    allowed,
    requires,
)
from bot.commands.format import format_stats
from bot.events import RuntimeServices

LINK_CODE_MINUTES = 10


@requires(Access.EVERYONE)
async def stats(services: RuntimeServices, caller: Caller, /, target: str | None = None, *,
                target_in_server: bool = False, with_chart: bool = False) -> CommandResult:
    """The caller's stats. Bot-wide admins may name any viewer (``target``: a platform user
    id); a server's admins only a member of that server (``target_in_server``)."""
    user = target or caller.platform_user_id
    server_admin = caller.roles.is_server_admin and target_in_server
    if (user != caller.platform_user_id and not allowed(caller.roles, Access.ADMIN)
            and not server_admin):
        return CommandResult(REFUSALS[Access.ADMIN], refused=True)
    numbers = await services.stats(caller.platform, user)
    if numbers is None:
        return CommandResult("No conversations yet.")
    chart = await services.chart(caller.platform, user) if with_chart else None
    return CommandResult(format_stats(numbers),
                         attachment=Attachment("stats.png", chart) if chart else None)


@requires(Access.EVERYONE)
async def forget(services: RuntimeServices, caller: Caller, /, confirm: bool = False, *,
                 confirm_hint: str = "the command again with confirm") -> CommandResult:
    """Delete everything stored about the caller, only once they confirm."""
    if not confirm:
        return CommandResult("This deletes all your messages, memories and stats. "
                             f"Run {confirm_hint} to go ahead.")
    counts = await services.forget(caller.platform, caller.platform_user_id)
    return CommandResult(f"Done: deleted {sum(counts.values())} rows about you.")


@requires(Access.EVERYONE)
async def memories(services: RuntimeServices, caller: Caller, /) -> CommandResult:
    """What the persona remembers of the caller (their own long-term memories, newest first),
    each with the number that forgets it."""
    kept = await services.memories(caller.platform, caller.platform_user_id)
    if not kept:
        return CommandResult("I don't remember anything you told me yet.",
                             title="What I remember about you")
    lines = [f"#{memory.id}: {_shortened(memory.text)}" for memory in kept]
    return CommandResult("\n".join(lines), title="What I remember about you",
                         fields=(("Forget one", "memory forget with its number"),))


@requires(Access.EVERYONE)
async def forget_memory(services: RuntimeServices, caller: Caller, /,
                        memory_id: int) -> CommandResult:
    """Forget one of the caller's memories, by the number ``memories`` shows."""
    if await services.forget_memory(caller.platform, caller.platform_user_id, memory_id):
        return CommandResult(f"Forgotten: #{memory_id}.")
    return CommandResult(f"You have no memory #{memory_id} (see the list again).")


def _shortened(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


@requires(Access.EVERYONE)
async def export(services: RuntimeServices, caller: Caller, /) -> CommandResult:
    """Everything stored about the caller, as a JSON file sent by direct message."""
    data = await services.export(caller.platform, caller.platform_user_id)
    if data is None:
        return CommandResult("Nothing stored about you.")
    payload = json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")
    return CommandResult("Everything stored about you:", by_dm=True,
                         attachment=Attachment("my-data.json", payload))


@requires(Access.EVERYONE)
async def link_code(services: RuntimeServices, caller: Caller, /,
                    other_platform: str = "Twitch") -> CommandResult:
    code = await services.create_link_code(caller.platform, caller.platform_user_id)
    return CommandResult(
        f"Type `!link {code}` in the {other_platform} chat within {LINK_CODE_MINUTES} minutes "
        "to link that account to this one: your history, mood and intimacy will be shared.")


@requires(Access.EVERYONE)
async def redeem_link(services: RuntimeServices, caller: Caller, /,
                      code: str) -> CommandResult:
    linked = await services.redeem_link_code(code, caller.platform, caller.platform_user_id,
                                             caller.display_name)
    return CommandResult("Linked!" if linked else "That code is unknown or expired.")


@requires(Access.EVERYONE)
async def persona(services: RuntimeServices, caller: Caller, /) -> CommandResult:
    info = services.persona_info()
    names = info["names"]
    return CommandResult(f"{names['zh']} ({names['en']}) — {info['identity']}\n"
                         f"{info['disclosure']}", private=False)
