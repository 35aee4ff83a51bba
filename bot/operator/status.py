"""What the operator server reads from and asks of the running bot: one small view over the
runtime and its adapters, so the pages never reach into their internals."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bot.events import Adapter
from bot.runtime import Runtime
from bot.signals import Signals
from memory.errors import StoreError
from memory.store import RecentExchange

log = logging.getLogger(__name__)
STORE_CHECK_TIMEOUT_S = 2.0


@dataclass
class RuntimeView:
    runtime: Runtime
    adapters: Sequence[Adapter]

    @property
    def signals(self) -> Signals:
        return self.runtime.service.signals

    @property
    def platforms(self) -> list[str]:
        return [adapter.name for adapter in self.adapters]

    def pending(self) -> int:
        return self.runtime.service.pending

    def store_up(self) -> bool:
        return self.runtime.service.store_health.ok

    def adapters_ready(self) -> dict[str, bool]:
        """Whether each adapter's platform session is ready (Discord's READY, Twitch's
        EventSub welcome), not merely whether a socket is open."""
        return {adapter.name: bool(getattr(adapter, "is_ready", lambda: True)())
                for adapter in self.adapters}

    def gpu_memory(self) -> dict[str, int]:
        status = self.runtime.engine.get_gpu_status()
        return {f"cuda:{device['index']}": int(device["used_memory_gb"] * 2**30)
                for device in status["devices"]}

    def engine_counters(self) -> dict[str, float]:
        return self.runtime.engine.counters()

    def build_info(self) -> dict[str, str]:
        engine = self.runtime.engine
        return {"version": _version(), "git_sha": _git_sha(),
                "backend": engine.config.llm.backend, "model": engine.model_name}

    def engine_loaded(self) -> bool:
        return bool(self.runtime.engine.get_model_info().get("initialized"))

    async def store_reachable(self) -> bool:
        try:
            async with asyncio.timeout(STORE_CHECK_TIMEOUT_S):
                await self.runtime.store.ping()
        except (StoreError, TimeoutError) as exc:
            log.debug("readiness: store check failed: %s", exc)
            return False
        return True

    async def readiness(self) -> dict[str, bool]:
        checks = {f"adapter:{name}": ready for name, ready in self.adapters_ready().items()}
        checks["store"] = await self.store_reachable()
        checks["engine"] = self.engine_loaded()
        return checks

    def paused(self) -> list[str]:
        return sorted(self.runtime.service.paused)

    def pause(self, platform: str) -> None:
        self.runtime.service.pause(platform)

    def resume(self, platform: str) -> None:
        self.runtime.service.resume(platform)

    async def reload(self) -> str | None:
        return await self.runtime.reload()

    async def recent(self, limit: int) -> list[RecentExchange]:
        return await self.runtime.store.recent_exchanges(limit)

    async def forget(self, platform: str, platform_user_id: str) -> dict[str, int]:
        return await self.runtime.forget(platform, platform_user_id)

    def summary(self) -> dict[str, Any]:
        ready = self.adapters_ready()
        paused = set(self.paused())
        return {"platforms": {name: {"ready": ready[name], "paused": name in paused}
                              for name in self.platforms},
                "pending": self.pending(), "store_up": self.store_up(),
                "latency_ms": self.runtime.service.latency_percentiles(),
                "moods": list(self.runtime.engine.persona.moods.states),
                "engine": self.engine_counters(), "gpu_memory": self.gpu_memory()}


def _version() -> str:
    try:
        return metadata.version("vtuber-bot")
    except metadata.PackageNotFoundError:
        return "unknown"


def _git_sha() -> str:
    """The commit this checkout runs (``VTUBER_GIT_SHA`` where there is no checkout, as in
    an image), read from the files without running git."""
    if sha := os.environ.get("VTUBER_GIT_SHA"):
        return sha[:12]
    git = Path(__file__).resolve().parents[2] / ".git"
    try:
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if head.startswith("ref: "):
            ref = head.removeprefix("ref: ")
            loose = git / ref
            head = loose.read_text(encoding="utf-8").strip() if loose.exists() else next(
                line.split()[0] for line in (git / "packed-refs").read_text(
                    encoding="utf-8").splitlines() if line.endswith(" " + ref))
    except (OSError, StopIteration):
        return "unknown"
    return head[:12]
