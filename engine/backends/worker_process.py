"""The in-process backend's model and decode loop in a process of their own
(``llm.engine_process``): the child side; ``process_backend.py`` is the runtime's side.

In the runtime's process the decode loop shares one GIL with the event loop. Every torch call
lets the GIL go and takes it back, and while the event loop runs Python (the store, retrieval,
the output stage) each take waits up to a switch interval: a prefill is hundreds of calls, a
decode step tens, so a busy event loop stretches both (500 small torch calls took 1.6 ms alone
and 146 ms beside a thread running Python, at the runtime's 1 ms switch interval). Here the
decode loop is the main thread of a spawned process with its own interpreter, as vLLM runs its
engine core; a reader thread takes the runtime's messages from the pipe and blocks in ``recv``
with the GIL released.

Messages, runtime to engine: ``Generate``, ``Abort``, ``AskHealth``, ``Stop`` (or the pipe's
end: the runtime is gone). Engine to runtime: ``Ready`` or ``StartFailed`` once, ``Items``
once per pass of the decode loop (a text chunk, ``Ended`` or ``Failed`` per request),
``Health`` when asked, ``LogLine`` for every log record (the runtime's handlers write them).
"""

from __future__ import annotations

import logging
import pickle
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from engine.config import LLMConfig
from engine.errors import EngineError
from engine.types import GenerationRequest


@dataclass(frozen=True)
class Generate:
    request: GenerationRequest


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class AskHealth:
    pass


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Ready:
    info: dict[str, Any]
    tokenizer: Any  # the runtime counts tokens with the model's own tokenizer


@dataclass(frozen=True)
class StartFailed:
    error: BaseException


@dataclass(frozen=True)
class Ended:
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclass(frozen=True)
class Items:
    items: list[tuple[str, str | Ended | Failed]]  # (request id, item), in order


@dataclass(frozen=True)
class Health:
    report: dict[str, Any]


@dataclass(frozen=True)
class LogLine:
    record: dict[str, Any]


class Channel:
    """The pipe to the runtime; sends from any thread, one message at a time."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def send(self, message: object) -> None:
        with self._lock:
            self._connection.send(message)


def portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling as itself, else an ``EngineError`` with its text."""
    try:
        copy = pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - whatever an exception's pickling raises
        copy = None
    if type(copy) is type(error) and str(copy) == str(error):
        return error
    return EngineError(f"{type(error).__name__}: {error}")


class PipeOutbox:
    """The ``Outbox`` of a decode loop whose consumers are in the runtime's process: what the
    requests emitted during a pass goes over the pipe in one message."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._items: list[tuple[str, str | Ended | Failed]] = []
        self._lock = threading.Lock()

    def add(self, request_id: str, item: str | Ended | Failed) -> None:
        with self._lock:
            self._items.append((request_id, item))

    def send(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        if items:
            self._channel.send(Items(items))


class _ForwardLogs(logging.Handler):
    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = dict(record.__dict__)
            fields.update(msg=record.getMessage(), args=None, exc_info=None,
                          exc_text=self.format(record) if record.exc_info else None)
            self._channel.send(LogLine(fields))
        except Exception:  # noqa: BLE001 - logging never fails its caller
            self.handleError(record)


def main(connection: Connection, config: LLMConfig, cache_dir: Path | None,
         log_levels: dict[str, int]) -> None:
    """The engine process: load, answer ``Ready`` (or ``StartFailed``), run the decode loop
    until ``Stop`` or the runtime's end of the pipe."""
    # Ctrl-C and a service manager's stop reach the whole process group: the runtime decides
    # when the engine stops (it finishes the replies in flight first).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = Channel(connection)
    logging.getLogger().handlers[:] = [_ForwardLogs(channel)]
    for name, level in log_levels.items():
        logging.getLogger(name).setLevel(level)

    from engine.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(config, cache_dir)
    outbox = PipeOutbox(channel)
    backend.outbox = outbox  # type: ignore[assignment]
    try:
        run = backend.open_worker()
    except Exception as error:  # noqa: BLE001 - the runtime raises it from start()
        channel.send(StartFailed(portable(error)))
        return
    from engine.gpu_manager import diagnose_allocation

    # The layer map is only known here; ``/diagnose`` reads it from the info.
    info = {**backend.info(), "allocation": diagnose_allocation(backend.model, backend.placement)}
    channel.send(Ready(info, backend.tokenizer))
    threading.Thread(target=_read, args=(connection, channel, backend, outbox),
                     name="engine-pipe", daemon=True).start()
    run()


def _read(connection: Connection, channel: Channel, backend: Any, outbox: PipeOutbox) -> None:
    """The runtime's messages, until ``Stop`` or the pipe's end: both stop the decode loop."""
    from engine.backends.jobs import END, STOP_WORKER, Failure, Job

    aborts: dict[str, threading.Event] = {}

    def emitter(job: Job) -> Any:
        request_id = job.request.request_id

        def emit(item: Any) -> None:
            if item is END or isinstance(item, Failure):
                aborts.pop(request_id, None)
            if item is END:
                outbox.add(request_id, Ended(job.prompt_tokens, job.cached_tokens,
                                             job.generated))
            elif isinstance(item, Failure):
                outbox.add(request_id, Failed(portable(item.error)))
            else:
                outbox.add(request_id, item)
        return emit

    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            message = Stop()
        if isinstance(message, Generate):
            job = Job(message.request, emit=lambda item: None, abort=threading.Event())
            job.emit = emitter(job)
            aborts[message.request.request_id] = job.abort
            backend.submit(job)
        elif isinstance(message, Abort):
            event = aborts.get(message.request_id)
            if event is not None:
                event.set()
        elif isinstance(message, AskHealth):
            channel.send(Health(_report(backend)))
        elif isinstance(message, Stop):
            for event in list(aborts.values()):
                event.set()
            backend.submit(STOP_WORKER)
            return


def _report(backend: Any) -> dict[str, Any]:
    """``health`` with the decode loop's own totals (benchmarks read them) and the device
    allocator's retries (a pause each: memory ran short), which only this process sees."""
    report: dict[str, Any] = backend.health()
    worker = backend.continuous
    if worker is not None:
        report["timings"] = {**worker.timings, "steps": worker.steps}
    import torch

    if torch.cuda.is_available():
        report["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    return report
