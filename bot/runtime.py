"""The runtime: opens the store and the engine, wires the service, runs adapters, and closes
everything in ``finally`` — also on SIGINT/SIGTERM, after in-flight replies finish."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from bot.config import AppConfig
from bot.events import Adapter, AnswersLeftovers
from bot.linking import LinkCodes
from bot.paths import DataPaths
from bot.recovery import instance_owner, keep_lease, roles_overlap
from bot.registry import load_adapter_class
from bot.reload import reload_runtime
from bot.reports import (
    PersonaInfo,
    ReplyTrace,
    RuntimeDiagnosis,
    RuntimeGpuStatus,
    ViewerStats,
)
from bot.service import Clock, ConversationService, utcnow
from bot.spool_file import SpoolFile
from bot.startup import freeze_heap as freeze_heap_now
from bot.startup import load_embedder
from bot.stats import reply_trace, user_chart, user_stats
from engine.backends.base import Backend
from engine.core import Engine
from engine.persona import knowledge_folder
from engine.reports import OptimizeReport
from engine.secret_scan import SecretScanner
from engine.system_info import diagnose_system
from memory.errors import StoreError
from memory.rag import MemoryRetriever
from memory.store import ExportedUserData, Store, StoredMemory, sqlite_url

log = logging.getLogger(__name__)

# The newest of a viewer's memories ``/memory`` lists.
MEMORIES_LISTED = 20
# How long an adapter may take to connect before an earlier run's leftovers there expire.
LEFTOVER_READY_TIMEOUT_S = 60


@dataclass(slots=True)
class Runtime:
    config: AppConfig
    paths: DataPaths
    store: Store
    engine: Engine
    service: ConversationService
    retriever: MemoryRetriever | None = None
    # One-time codes for linking accounts across platforms (kept in the store).
    link_codes: LinkCodes | None = None
    # Reads the config file again for ``reload`` (set by ``run``; None: the persona only).
    reload_config: Callable[[], AppConfig] | None = None
    # Renews this process's role on a shared database; ends with ``RoleLostError``.
    lease: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        if self.link_codes is None:
            self.link_codes = LinkCodes(self.store)

    def allow_command(self, platform: str, platform_user_id: str) -> bool:
        return self.service.allow_command(platform, platform_user_id)

    async def create_link_code(self, platform: str, platform_user_id: str) -> str:
        """A short-lived code the viewer types on another platform (``!link CODE``)."""
        assert self.link_codes is not None
        return await self.link_codes.create(platform, platform_user_id)

    async def redeem_link_code(self, code: str, platform: str, platform_user_id: str,
                               display_name: str) -> bool:
        assert self.link_codes is not None
        request = await self.link_codes.redeem(code, platform, platform_user_id)
        if request is None:
            return False
        owner = await self.store.find_user(request.platform, request.platform_user_id)
        if owner is None:
            owner = await self.store.resolve_user(request.platform, request.platform_user_id,
                                                  request.platform_user_id)
        await self.store.link_identity(owner, platform, platform_user_id, display_name)
        self._memories_changed()
        return True

    def _memories_changed(self) -> None:
        """Memories were deleted or changed owner: the dense index is rebuilt before the
        next search (privacy: no viewer may see another's memory through a stale index)."""
        if self.retriever is not None:
            self.retriever.invalidate()

    async def stats(self, platform: str, platform_user_id: str) -> ViewerStats | None:
        return await user_stats(self.store, self.engine.persona, platform, platform_user_id)

    async def chart(self, platform: str, platform_user_id: str) -> bytes | None:
        return await user_chart(self.store, self.engine.persona, platform, platform_user_id)

    async def forget(self, platform: str, platform_user_id: str) -> dict[str, int]:
        user_id = await self.store.find_user(platform, platform_user_id)
        if user_id is None:
            return {}
        counts = await self.store.delete_user_data(user_id)
        self._memories_changed()
        return counts

    async def memories(self, platform: str, platform_user_id: str,
                       limit: int = MEMORIES_LISTED) -> list[StoredMemory]:
        user_id = await self.store.find_user(platform, platform_user_id)
        if user_id is None:
            return []
        return await self.store.viewer_memories(self.engine.persona.id, user_id, limit)

    async def forget_memory(self, platform: str, platform_user_id: str,
                            memory_id: int) -> bool:
        user_id = await self.store.find_user(platform, platform_user_id)
        if user_id is None:
            return False
        deleted = await self.store.delete_viewer_memory(self.engine.persona.id, user_id,
                                                        memory_id)
        if deleted:
            self._memories_changed()
        return deleted

    async def export(self, platform: str,
                     platform_user_id: str) -> ExportedUserData | None:
        user_id = await self.store.find_user(platform, platform_user_id)
        return None if user_id is None else await self.store.export_user_data(user_id)

    async def purge_message(self, platform: str, platform_message_id: str) -> int:
        purged = await self.store.purge_platform_message(platform, platform_message_id)
        self._memories_changed()
        return purged

    async def purge_messages(self, platform: str, channel_id: str,
                             platform_user_id: str | None = None) -> int:
        purged = await self.store.purge_messages(platform, channel_id, platform_user_id)
        self._memories_changed()
        return purged

    async def trace(self, message_id: int) -> ReplyTrace | None:
        return await reply_trace(self.store, message_id)

    def gpu_status(self) -> RuntimeGpuStatus:
        info = self.engine.get_model_info()
        return RuntimeGpuStatus(**self.engine.get_gpu_status(), model=self.engine.model_name,
                                loading_mode=info["loading_mode"],
                                placement=info["gpu_cluster"]["placement"])

    def gpu_optimize(self) -> OptimizeReport:
        return self.engine.optimize_gpu_memory()

    def diagnose(self) -> RuntimeDiagnosis:
        model = {k: v for k, v in self.engine.get_model_info().items() if k != "gpu_cluster"}
        return RuntimeDiagnosis(
            **diagnose_system(), model=model,
            engine_config=self.engine.config.model_dump(mode="json"),
            allocation_warnings=self.engine.diagnose_gpu_allocation()["warnings"],
            queue_depth=self.service.pending, latency_ms=self.service.latency_percentiles())

    def persona_info(self) -> PersonaInfo:
        persona = self.engine.persona
        names = [n for n in persona.names.all() if n]
        # What viewers call the persona in chat: full names, short forms, protected terms.
        call_names = {*names, *(n.split()[0] for n in names), *persona.protected_terms}
        return PersonaInfo(id=persona.id, names=persona.names.model_dump(),
                           call_names=sorted(call_names), identity=persona.identity,
                           disclosure=persona.disclosure)

    async def reload(self) -> str | None:
        """Reload the config file, the persona and its knowledge (``bot/reload.py``);
        returns the refusal, or None."""
        return await reload_runtime(self.config, self.reload_config, self.engine,
                                    self.service, self.retriever)

    async def _answer_leftovers(self, adapters: list[Adapter]) -> None:
        by_platform = {adapter.name: adapter for adapter in adapters}
        platforms = {m.platform for m in self.service.leftovers}
        await asyncio.gather(*(_answer_platform_leftovers(self.service, p, by_platform.get(p))
                               for p in platforms))

    async def _sweep_abandoned(self) -> None:
        """PostgreSQL: another process may die and never restart; its messages must not stay
        ``received``. Every reply timeout, what is older than two ends expired."""
        if self.store.dialect != "postgresql":
            return  # one process per SQLite file: start-up recovers everything
        while True:
            await asyncio.sleep(self.config.limits.reply_timeout_s)
            try:
                await self.service.expire_abandoned()
            except StoreError as exc:
                log.debug("sweeping abandoned messages failed: %s", exc)

    async def _adopt_orphans(self, adapters: list[Adapter]) -> None:
        """PostgreSQL with a role: a few times a lease, the questions a stopped process left
        waiting on this process's platforms are taken over and answered."""
        platforms = sorted(a.name for a in adapters if isinstance(a, AnswersLeftovers))
        if self.store.dialect != "postgresql" or self.lease is None or not platforms:
            return
        while True:
            await asyncio.sleep(self.config.store.role_lease_s / 3)
            try:
                adopted = await self.service.adopt_orphans(platforms)
            except StoreError as exc:
                log.debug("adopting a stopped process's questions failed: %s", exc)
                continue
            if adopted:
                await self._answer_leftovers(adapters)

    async def run_adapters(self, adapters: list[Adapter]) -> None:
        """Run until every adapter returns, one fails, or a signal asks us to stop."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[Any]] = {
            asyncio.create_task(a.run(self.service.handle), name=f"adapter-{a.name}")
            for a in adapters}
        leftovers = asyncio.create_task(self._answer_leftovers(adapters), name="leftovers")
        sweeper = asyncio.create_task(self._sweep_abandoned(), name="sweep-abandoned")
        adopter = asyncio.create_task(self._adopt_orphans(adapters), name="adopt-orphans")
        stop = asyncio.Event()
        reloads: set[asyncio.Task[Any]] = set()

        def reload() -> None:
            task = loop.create_task(self.reload(), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        installed = _install_signal_handlers(loop, stop, reload)
        waiter: asyncio.Task[Any] = asyncio.create_task(stop.wait())
        failure: BaseException | None = None
        try:
            # The lease is watched beside the adapters: losing it ends the run.
            pending = set(tasks) | ({self.lease} if self.lease is not None else set())
            while pending & tasks and failure is None and not stop.is_set():
                done, pending = await asyncio.wait(pending | {waiter},
                                                   return_when=asyncio.FIRST_COMPLETED)
                pending.discard(waiter)
                failure = next((t.exception() for t in done - {waiter}
                                if not t.cancelled() and t.exception()), None)
            if stop.is_set():
                log.info("stop requested; finishing in-flight replies")
                await self.service.drain(self.config.limits.shutdown_grace_s)
        finally:
            waiter.cancel()
            leftovers.cancel()
            sweeper.cancel()
            adopter.cancel()
            for task in tasks:
                task.cancel()
            for adapter in adapters:
                try:
                    await adapter.close()
                except Exception:
                    log.exception("closing adapter %s failed", adapter.name)
            await asyncio.gather(*tasks, return_exceptions=True)
            for sig in installed:
                loop.remove_signal_handler(sig)
        if failure is not None:
            raise failure


async def _answer_platform_leftovers(service: ConversationService, platform: str,
                                     adapter: Adapter | None) -> None:
    """Answer ``platform``'s leftovers once its adapter can send; expire them if it cannot."""
    sink_for = None
    if isinstance(adapter, AnswersLeftovers):
        try:
            async with asyncio.timeout(LEFTOVER_READY_TIMEOUT_S):
                await adapter.ready()
            sink_for = adapter.reply_sink
        except TimeoutError:
            log.warning("%s did not connect within %d s: the messages an earlier run left "
                        "unanswered there end expired (crash)", platform,
                        LEFTOVER_READY_TIMEOUT_S)
    replies = await service.answer_leftovers(platform, sink_for)
    outcomes = Counter(f"{r.status}({r.reason})" if r.reason else r.status for r in replies)
    log.info("start-up: %d message(s) an earlier run left unanswered on %s: %s",
             len(replies), platform, ", ".join(f"{n} {k}" for k, n in outcomes.items()))


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event,
                             reload: Callable[[], None]) -> list[signal.Signals]:
    """SIGINT/SIGTERM stop; SIGHUP reloads the persona and knowledge."""
    installed = []
    for sig, action in ((signal.SIGINT, stop.set), (signal.SIGTERM, stop.set),
                        (signal.SIGHUP, reload)):
        try:
            loop.add_signal_handler(sig, action)
        except (NotImplementedError, RuntimeError):  # not the main thread / not Unix
            continue
        installed.append(sig)
    return installed


def build_adapters(config: AppConfig, names: list[str], **options: Any) -> list[Adapter]:
    return [load_adapter_class(name)(config, **options.get(name, {})) for name in names]


def store_url(config: AppConfig, paths: DataPaths) -> str:
    if config.secrets.database_url is not None:
        return config.secrets.database_url.get_secret_value()
    return config.store.url or sqlite_url(paths.sqlite_file)


async def _open_retriever(config: AppConfig, engine: Engine,
                          store: Store) -> MemoryRetriever | None:
    """Hybrid retrieval over the persona's knowledge (re-indexed when files change)."""
    if not config.store.rag_enabled:
        return None
    persona = engine.persona
    retriever = MemoryRetriever(store, persona.id, engine.embedder, k=config.store.rag_top_k,
                                min_similarity=config.store.rag_min_similarity)
    folder = knowledge_folder(persona, config.vtuber.persona)
    if folder is not None:
        await retriever.index_knowledge(folder)
    return retriever


@contextlib.asynccontextmanager
async def open_store(config: AppConfig, paths: DataPaths) -> AsyncIterator[Store]:
    """The configured store, closed on exit (for commands that need no engine)."""
    settings = config.store
    store = await Store.open(store_url(config, paths), auto_migrate=settings.auto_migrate,
                             busy_timeout_ms=settings.busy_timeout_ms,
                             pool_size=settings.pool_size, pool_timeout_s=settings.pool_timeout_s)
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def open_runtime(
    config: AppConfig,
    paths: DataPaths,
    *,
    backend: Backend | None = None,
    clock: Clock = utcnow,
    role: str | None = None,
    freeze_heap: bool = False,
) -> AsyncIterator[Runtime]:
    """Open store and engine; always close both, in reverse order. With a ``role`` (see
    ``bot.recovery.runtime_role``) this process holds it on a shared database, or fails.
    ``freeze_heap`` (a process that runs one runtime, like ``vtuber-bot run``): what start-up
    loaded is moved out of the garbage collector's sight, see ``bot.startup.freeze_heap``."""
    async with open_store(config, paths) as store:
        if role is not None:
            await store.take_role(role, instance_owner(paths.data_dir), config.store.role_lease_s,
                                  lambda other: roles_overlap(role, other))
        engine = Engine(config.engine_config(), cache_dir=paths.cache_dir, backend=backend,
                        redact=SecretScanner(config.secrets.values()))
        try:
            await engine.start()
            retriever = await _open_retriever(config, engine, store)
            service = ConversationService(config, engine, store, clock=clock,
                                          retriever=retriever, role=role,
                                          spool_file=SpoolFile(paths.spool_file))
            await service.recover()
            if freeze_heap:
                freeze_heap_now()
            warm_up = asyncio.create_task(load_embedder(engine), name="embedder-warm-up")
            lease = (asyncio.create_task(keep_lease(store, config.store.role_lease_s),
                                         name="role-lease")
                     if role is not None and store.dialect == "postgresql" else None)
            try:
                yield Runtime(config, paths, store, engine, service, retriever, lease=lease)
            finally:
                if lease is not None:
                    lease.cancel()
                await service.drain(config.limits.shutdown_grace_s)
                await warm_up  # its thread cannot be interrupted; let it end first
                if freeze_heap:
                    gc.unfreeze()  # what it held can be collected again
        finally:
            await engine.aclose()
