"""The dashboard's live controls: say something as the persona, pause or resume a platform,
edit or reset a viewer's mood and intimacy, mute or unmute a viewer, forget them or one of
their memories, reload.
Every one is recorded in the store's audit log with what it was asked and how it ended, also
when it was refused or failed."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from bot.delivery import DeliveryFailed, deliver
from bot.events import PostsToChannels
from bot.operator.status import RuntimeView
from memory.errors import StoreError
from memory.store import StateChange, StateSnapshot

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_SAY_CHARS = 2000
MAX_INTIMACY = 100.0


class ControlRefused(Exception):
    """A control that cannot be done as asked (unknown viewer, mood, platform...)."""


class Controls:
    def __init__(self, view: RuntimeView) -> None:
        self._view = view
        self._runtime = view.runtime

    async def audited(self, action: str, target: str | None, detail: dict[str, Any],
                      run: Callable[[], Awaitable[T]]) -> T:
        """Run one control and record it, whatever its end."""
        try:
            result = await run()
        except ControlRefused as exc:
            await self._record(action, target, detail, f"refused: {exc}")
            raise
        except (StoreError, DeliveryFailed) as exc:
            await self._record(action, target, detail, f"failed: {exc}")
            raise
        await self._record(action, target, detail, "ok")
        log.info("operator: %s %s %s", action, target or "", detail or "")
        return result

    async def _record(self, action: str, target: str | None, detail: dict[str, Any],
                      outcome: str) -> None:
        try:
            await self._runtime.store.record_operator_action(action, target, detail, outcome,
                                                             datetime.now(UTC))
        except StoreError as exc:  # the control happened; its record could not be kept
            log.error("operator: %s %s (%s) not recorded in the audit log: %s", action,
                      target or "", outcome, exc)

    async def say(self, platform: str, channel_id: str, text: str) -> str | None:
        """Post ``text`` as the persona; the platform message id."""
        text = text.strip()
        if not text or len(text) > MAX_SAY_CHARS:
            raise ControlRefused(f"say 1 to {MAX_SAY_CHARS} characters")
        adapter = next((a for a in self._view.adapters if a.name == platform), None)
        if not isinstance(adapter, PostsToChannels):
            raise ControlRefused(f"no running adapter {platform!r} that can post")
        sink = adapter.channel_sink(channel_id)
        return await deliver(lambda: sink.send(text), "say")

    async def set_state(self, platform: str, platform_user_id: str, *,
                        mood: str | None = None, intimacy: float | None = None,
                        reset: bool = False) -> StateSnapshot:
        """A viewer's mood and intimacy set by hand (``reset``: the persona's baseline mood
        and no intimacy); the state's own audit row says ``operator``."""
        persona = self._runtime.engine.persona
        if mood is not None and mood not in persona.moods.states:
            raise ControlRefused(f"unknown mood {mood!r}; the persona has "
                                 f"{', '.join(persona.moods.states)}")
        if intimacy is not None and not 0 <= intimacy <= MAX_INTIMACY:
            raise ControlRefused(f"intimacy goes from 0 to {MAX_INTIMACY:g}")
        user_id = await self._runtime.store.find_user(platform, platform_user_id)
        if user_id is None:
            raise ControlRefused(f"no viewer {platform}:{platform_user_id}")
        if reset:
            mood, intimacy = persona.moods.baseline, 0.0

        def by_hand(current: StateSnapshot) -> StateChange:
            new = replace(current, mood=mood or current.mood,
                          mood_intensity=current.mood_intensity if mood is None else 0.5,
                          intimacy=current.intimacy if intimacy is None else intimacy)
            return StateChange(new, "operator", {"reset": reset})

        return await self._runtime.store.update_state(user_id, persona.id,
                                                      persona.moods.baseline, by_hand)

    async def mute(self, platform: str, platform_user_id: str, muted: bool) -> None:
        store = self._runtime.store
        if muted:
            await store.mute_viewer(platform, platform_user_id, datetime.now(UTC))
        else:
            await store.unmute_viewer(platform, platform_user_id)
        self._runtime.service.mute(platform, platform_user_id, muted)

    async def forget_memory(self, platform: str, platform_user_id: str,
                            memory_id: int) -> None:
        """One of a viewer's memories forgotten (the viewer's own ``/memory forget``)."""
        if not await self._runtime.forget_memory(platform, platform_user_id, memory_id):
            raise ControlRefused(f"{platform}:{platform_user_id} has no memory #{memory_id}")
