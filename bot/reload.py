"""Reloading while connections stay up (SIGHUP, the dashboard): the config file, the persona
and its knowledge. All or nothing: a file that does not load is refused with the reason and
what is in use stays. Limits, admins, the log level, the persona path and the moderation
blocklist apply at once (the same config object is read where they are used); the rest needs
a restart, and says so."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from bot.config import AppConfig, changes_needing_restart
from bot.errors import ConfigError
from bot.service import ConversationService
from engine.core import Engine
from engine.persona import PersonaError, knowledge_folder, load_persona
from memory.rag import MemoryRetriever

log = logging.getLogger(__name__)


async def reload_runtime(config: AppConfig, reload_config: Callable[[], AppConfig] | None,
                         engine: Engine, service: ConversationService,
                         retriever: MemoryRetriever | None) -> str | None:
    """Read the config file again (``reload_config``; None: the persona only), then the
    persona and its knowledge; returns the refusal, or None."""
    new = config
    if reload_config is not None:
        try:
            new = await asyncio.to_thread(reload_config)
        except ConfigError as exc:
            return _refused("; ".join(exc.problems))
    path = new.vtuber.persona
    try:
        persona = await asyncio.to_thread(load_persona, path)
        folder = knowledge_folder(persona, path)
    except PersonaError as exc:
        return _refused(f"{path or 'the bundled persona'}: {exc}")
    if persona.id != engine.persona.id:
        return _refused(f"{path}: id changed from {engine.persona.id!r} to "
                        f"{persona.id!r}: switching personas needs a restart (stored "
                        "moods belong to a persona id)")
    apply_config(config, new, engine, service)
    engine.replace_persona(persona)
    if retriever is not None and folder is not None:
        await retriever.index_knowledge(folder)
    log.info("reloaded persona %s (%s) and its knowledge", persona.id, path or "bundled")
    return None


def apply_config(old: AppConfig, new: AppConfig, engine: Engine,
                 service: ConversationService) -> None:
    """Copy what applies at once from ``new`` into the config in use, ``old``."""
    if new is old:
        return
    restart = changes_needing_restart(old, new)
    if new.vtuber.moderation != old.vtuber.moderation:
        engine.replace_blocklist(new.vtuber.moderation.blocklist)
    old_limits = old.limits
    old.limits, old.admins, old.logging = new.limits, new.admins, new.logging
    old.vtuber.persona, old.vtuber.moderation = new.vtuber.persona, new.vtuber.moderation
    service.apply_limits(old_limits)
    logging.getLogger().setLevel(new.logging.level)
    if restart:
        log.warning("config reloaded; these changes take a restart: %s", ", ".join(restart))


def _refused(reason: str) -> str:
    log.error("reload refused, what is in use stays: %s", reason)
    return reason
