"""Operator commands: GPU status and housekeeping, diagnosis, reply traces."""

from __future__ import annotations

import json

from bot.commands.base import REFUSALS, Access, Caller, CommandResult, requires
from bot.events import RuntimeServices


@requires(Access.MODERATOR)
async def gpu_status(services: RuntimeServices, caller: Caller, /) -> CommandResult:
    status = services.gpu_status()
    fields = [(f"cuda:{d['index']} {d['name']}",
               f"{d['used_memory_gb']} / {d['total_memory_gb']} GiB")
              for d in status["devices"]] or [("GPUs", "none (running on CPU)")]
    placement = status["placement"]
    if placement:
        fields.append(("placement", f"LLM {placement['llm_device']} (GPUs "
                                    f"{placement['llm_gpus']}), embedder "
                                    f"{placement['embedder_device']}"))
    return CommandResult(f"model: {status['model']} ({status['loading_mode']})",
                         title="GPU status", fields=tuple(fields), private=False)


@requires(Access.MODERATOR)
async def gpu_optimize(services: RuntimeServices, caller: Caller, /) -> CommandResult:
    report = services.gpu_optimize()
    return CommandResult(f"Freed {report['freed_gb']} GiB "
                         f"({report['objects_collected']} objects).")


@requires(Access.MODERATOR)
async def diagnose(services: RuntimeServices, caller: Caller, /) -> CommandResult:
    report = services.diagnose()
    load = report["model"].get("load") or {}
    lines = [f"issues: {'; '.join(report['issues']) or 'none'}",
             f"recommendations: {'; '.join(report['recommendations']) or 'none'}",
             f"load steps: {load.get('steps')}",
             f"queue depth: {report['queue_depth']}, latency: {report['latency_ms']}",
             f"allocation warnings: {'; '.join(report['allocation_warnings']) or 'none'}"]
    return CommandResult("\n".join(lines))


@requires(Access.EVERYONE)  # bot-wide admins; a server's admins for that server's messages
async def trace(services: RuntimeServices, caller: Caller, /, message_id: int) -> CommandResult:
    roles = caller.roles
    if not (roles.is_admin or roles.is_server_admin):
        return CommandResult(REFUSALS[Access.ADMIN], refused=True)
    found = await services.trace(message_id)
    if found is None or not (roles.is_admin or found["channel_id"] in caller.server_channels):
        return CommandResult(f"No trace for message {message_id}.")
    return CommandResult(json.dumps(found["trace"], ensure_ascii=False, indent=1),
                         preformatted=True)
