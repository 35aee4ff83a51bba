"""The in-process backend run in an engine process of its own (``llm.engine_process``): the
runtime's side. Why, and the child's side: ``worker_process.py``.

The runtime's event loop reads the pipe (``add_reader``: no thread of its own here), hands
each request's items to its stream, and sends ``Generate``/``Abort`` as requests come and go.
An engine process that exits while the runtime runs fails the requests in flight with the
reason (their viewers get the fallback) and is started again, with a growing pause between
tries, while ``health`` reports it down and new requests are refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from engine.backends import worker_process
from engine.backends.base import RecentUsage
from engine.backends.worker_process import (
    Abort,
    AskHealth,
    Ended,
    Failed,
    Generate,
    Health,
    Items,
    LogLine,
    Ready,
    StartFailed,
    Stop,
)
from engine.config import LLMConfig
from engine.errors import BackendUnavailableError, EngineError
from engine.types import GenerationRequest, PromptUsage

log = logging.getLogger(__name__)
STOP_WAIT_S = 30.0  # for the engine process to fail what it still holds and exit
RESTART_PAUSES_S = (1.0, 2.0, 5.0, 15.0, 60.0)  # between tries; the last repeats


def wanted(config: LLMConfig) -> bool:
    """``llm.engine_process``: auto = where the model runs on a GPU (there the GIL, not the
    device, bounds a busy runtime); on = also on the CPU."""
    if config.engine_process != "auto":
        return config.engine_process == "on"
    if config.device == "cpu":
        return False
    import torch

    return bool(torch.cuda.is_available())


def _log_levels() -> dict[str, int]:
    """The levels the engine process logs at: this process's, for its root and the engine."""
    return {name: logging.getLogger(name).getEffectiveLevel() for name in ("", "engine")}


class ProcessBackend:
    name = "transformers"

    def __init__(self, config: LLMConfig, cache_dir: Path | None = None) -> None:
        self._config = config
        self._cache_dir = cache_dir
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None
        self._ready: asyncio.Future[Ready] | None = None
        self._streams: dict[str, asyncio.Queue[str | Ended | Failed]] = {}
        self._health: dict[str, Any] = {}
        self._health_waiters: list[asyncio.Future[dict[str, Any]]] = []
        self._info: dict[str, Any] = {"backend": self.name}
        self._usage = RecentUsage()
        self._down: str | None = "not started"
        self._closing = False
        self._restarts: asyncio.Task[None] | None = None
        self.tokenizer: Any = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine process and wait until its model is loaded; its start-up error
        is raised here, as the in-process backend raises it."""
        await self._spawn()

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
        here, there = context.Pipe()
        process = context.Process(
            target=worker_process.main, name="llm-engine", daemon=True,
            args=(there, self._config, self._cache_dir, _log_levels()))
        process.start()
        there.close()
        self._process, self._connection = process, here
        self._ready = loop.create_future()
        loop.add_reader(here.fileno(), self._drain)
        try:
            ready = await self._ready
        except BaseException:
            self._disconnect()
            await asyncio.to_thread(process.join, 5.0)  # a start-up error: it has returned
            if process.is_alive():  # cancelled while it loads: nothing of it is kept
                process.kill()
            raise
        self._info, self.tokenizer, self._down = ready.info, ready.tokenizer, None
        log.info("engine process %d ready", process.pid)

    async def close(self) -> None:
        self._closing = True
        if self._restarts is not None:
            self._restarts.cancel()
        process = self._process
        if self._connection is not None:
            self._send(Stop())
        if process is not None:
            await asyncio.to_thread(process.join, STOP_WAIT_S)
            if process.is_alive():
                process.kill()
        self._disconnect()
        self._end_streams(BackendUnavailableError("the backend is closing"))
        self._down = "closed"

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self._down is not None or self._connection is None:
            raise BackendUnavailableError(f"the engine process is not running ({self._down})")
        request_id = request.request_id
        if request_id in self._streams:
            raise EngineError(f"request {request_id} is already in flight")
        stream: asyncio.Queue[str | Ended | Failed] = asyncio.Queue()
        self._streams[request_id] = stream
        finished = False
        try:
            self._send(Generate(request))
            while True:
                item = await stream.get()
                if isinstance(item, Ended):
                    finished = True
                    self._usage.record(request_id, PromptUsage(
                        item.prompt_tokens, item.cached_tokens, item.generated_tokens))
                    return
                if isinstance(item, Failed):
                    finished = True
                    raise item.error
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer left (done early, cancelled): stop its row
                self._send(Abort(request_id))

    async def abort(self, request_id: str) -> None:
        if request_id in self._streams:
            self._send(Abort(request_id))

    def prompt_usage(self, request_id: str) -> PromptUsage | None:
        return self._usage.pop(request_id)

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return max(1, len(text) // 3) if text else 0
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    # -- status -----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The engine's last report (a fresh one is asked for), with this side's view."""
        if self._down is not None:
            return {"ok": False, "backend": self.name, "detail": self._down,
                    "in_flight": len(self._streams)}
        if not self._health_waiters:
            self._send(AskHealth())
        return self._view(self._health)

    def _view(self, report: dict[str, Any]) -> dict[str, Any]:
        return {**report, "ok": True, "in_flight": len(self._streams),
                "engine_pid": self._process.pid if self._process is not None else None}

    async def fresh_health(self) -> dict[str, Any]:
        """The engine's report as of now (benchmarks read the decode loop's totals)."""
        if self._down is not None:
            return self.health()
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._health_waiters.append(waiter)
        self._send(AskHealth())
        return await waiter

    def info(self) -> dict[str, Any]:
        pid = self._process.pid if self._process is not None else None
        return {**self._info, "engine_process": pid}

    # -- the pipe ---------------------------------------------------------------------------

    def _send(self, message: object) -> None:
        if self._connection is None:
            return
        try:
            self._connection.send(message)
        except OSError:
            self._lost()

    def _drain(self) -> None:
        connection = self._connection
        try:
            while connection is not None and connection.poll():
                self._dispatch(connection.recv())
                connection = self._connection
        except (EOFError, OSError):
            self._lost()

    def _dispatch(self, message: object) -> None:
        if isinstance(message, Items):
            for request_id, item in message.items:
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.put_nowait(item)
        elif isinstance(message, Health):
            self._health = message.report
            waiters, self._health_waiters = self._health_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(self._view(message.report))
        elif isinstance(message, LogLine):
            record = logging.makeLogRecord(message.record)
            logging.getLogger(record.name).handle(record)
        elif isinstance(message, Ready | StartFailed):
            self._started(message)

    def _started(self, message: Ready | StartFailed) -> None:
        if self._ready is None or self._ready.done():
            return
        if isinstance(message, Ready):
            self._ready.set_result(message)
        else:
            self._ready.set_exception(message.error)

    def _lost(self) -> None:
        """The engine process is gone (exited, killed, or its pipe broke)."""
        process = self._process
        self._disconnect()
        # Its exit code where already known: waiting for it here would block the event loop
        # (the next start or ``close`` reaps it).
        code = process.exitcode if process is not None else None
        reason = "the engine process exited" + (f" (code {code})" if code is not None else "")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(EngineError(reason))
            return
        self._end_streams(BackendUnavailableError(reason))
        if self._closing or self._down is not None:
            return
        self._down = reason
        log.error("%s; the requests in flight failed; starting it again", reason)
        self._restarts = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        for attempt in range(1_000_000):
            await asyncio.sleep(RESTART_PAUSES_S[min(attempt, len(RESTART_PAUSES_S) - 1)])
            try:
                await self._spawn()
                return
            except Exception as error:  # noqa: BLE001 - tried again until it starts
                self._down = f"the engine process does not start: {error}"
                log.error("%s; trying again", self._down)

    def _disconnect(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._connection.fileno())
            self._connection.close()
            self._connection = None

    def _end_streams(self, error: EngineError) -> None:
        for stream in self._streams.values():
            stream.put_nowait(Failed(error))
        waiters, self._health_waiters = self._health_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result({"ok": False, "backend": self.name, "detail": str(error)})
