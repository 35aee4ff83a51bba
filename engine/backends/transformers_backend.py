"""In-process transformers backend: the model, its tokenizer and one decode loop.

All torch work runs on one dedicated worker thread (never on the event loop), or as the main
thread of an engine process of its own (``worker_process.py``). The loop is continuous
batching (``continuous_worker.py``) where the model and ``llm.continuous_batching`` allow,
else micro-batches of ``generate()`` calls (``micro_batch.py``); either streams each
request's text back to its caller's loop through the ``Outbox``. Cancelling a consumer
stops its row at the next decode step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from engine.backends.base import RecentUsage
from engine.backends.continuous_worker import ContinuousWorker
from engine.backends.jobs import END, STOP_WORKER, Failure, Job, Outbox
from engine.backends.micro_batch import MicroBatchWorker
from engine.backends.prompts import ChatPrompts, template_stop_ids
from engine.config import LLMConfig
from engine.errors import BackendUnavailableError
from engine.gpu_manager import Placement, discover_devices, plan_placement
from engine.model_fit import estimate_model_bytes, fit_to_model
from engine.model_loader import LoadReport, load_llm, resolve_llm_dir
from engine.serving import supports
from engine.types import GenerationRequest, PromptUsage

log = logging.getLogger(__name__)

class TransformersBackend:
    name = "transformers"

    def __init__(self, config: LLMConfig, cache_dir: Path | None = None,
                 placement: Placement | None = None) -> None:
        self._config = config
        self._cache_dir = cache_dir
        self._placement = placement
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._aborts: dict[str, threading.Event] = {}
        self.outbox = Outbox()  # what the worker streams back, sent once per pass or step
        self._usage = RecentUsage()
        self.max_batch_size = config.max_batch_size
        self.model: Any = None
        self.tokenizer: Any = None
        self.report = LoadReport()
        self.model_dir: Path | None = None
        self.static_cache = False
        self.compile_decode = False
        self.oom_retries = 0
        self.continuous: ContinuousWorker | None = None
        self.micro_batch: MicroBatchWorker | None = None
        self.prompts: ChatPrompts | None = None  # once the tokenizer is loaded
        self._closed = False

    @property
    def max_length(self) -> int:
        return self._config.max_length

    @property
    def batch_limit(self) -> int:
        """The configured batch size: ``max_batch_size`` returns to it after an OOM."""
        return self._config.max_batch_size

    @property
    def batch_window_s(self) -> float:
        return self._config.batch_window_ms / 1000

    @property
    def prefill_chunk_tokens(self) -> int:
        return self._config.prefill_chunk_tokens

    @property
    def prefix_cache_bytes(self) -> int:
        """``llm.prefix_cache_gb`` in bytes; auto: half the model's GPU's free memory now
        (1 GiB on the CPU). The allocator's unused cache is handed back first: after graph
        capture it holds most of the warm-ups' memory, which the driver counts as taken (and
        which the prefix cache could use), while what the captured graphs keep stays theirs."""
        wanted = self._config.prefix_cache_gb
        if wanted != "auto":
            return int(wanted * 2**30)
        import torch

        device = getattr(self.model, "device", None)
        if device is None or device.type != "cuda":
            return 2**30
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        log.info("GPU memory for the prefix cache: %.1f of %.1f GiB free; torch holds %.1f "
                 "GiB (%.1f GiB of it in use)", free / 2**30, total / 2**30,
                 torch.cuda.memory_reserved(device) / 2**30,
                 torch.cuda.memory_allocated(device) / 2**30)
        return int(free // 2)

    @property
    def placement(self) -> Placement | None:
        return self._placement

    async def start(self) -> None:
        loop = await asyncio.to_thread(self.open_worker)
        self._worker = threading.Thread(target=loop, name="llm-worker", daemon=True)
        self._worker.start()

    def open_worker(self) -> Callable[[], None]:
        """Load the model and prepare its decode loop (blocking); returns the loop, which
        runs ``jobs`` until ``STOP_WORKER`` (on a thread here, or as the main thread of an
        engine process: ``worker_process.py``)."""
        self._load()
        if not self._continuous():
            self.micro_batch = MicroBatchWorker(self, self._jobs)
            return self.micro_batch.run
        self.continuous = ContinuousWorker(self, self._jobs)
        self.continuous.prepare()
        return self.continuous.run

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def _load(self) -> None:
        config = self._config
        cache = self._cache_dir or Path.cwd() / ".cache"
        self.model_dir = resolve_llm_dir(config.model_path, config.gguf_file, cache)
        if self._placement is None:
            devices = discover_devices()
            self._placement = fit_to_model(
                plan_placement(devices, config.device), devices,
                estimate_model_bytes(self.model_dir, config.quantization), self.model_dir)
        self.model, self.tokenizer = load_llm(
            self.model_dir, config.quantization, self._placement, self.report
        )
        self.prompts = ChatPrompts(self.tokenizer, config.max_length)
        on_gpu = self._placement.llm_device != "cpu" and self.report.mode != "cpu"
        wanted = config.static_cache
        # A static KV cache lets transformers compile the decode step; bitsandbytes layers do
        # not compile, so 4/8-bit stays on the dynamic cache.
        self.static_cache = wanted == "on" or (
            wanted == "auto" and on_gpu and self.report.mode not in ("4bit", "8bit")
        )
        self.compile_decode = config.compile_decode == "auto" and on_gpu
        log.info("LLM loaded from %s (%s on %s) in %.1f s; max batch %d%s", self.model_dir,
                 self.report.mode, self.report.device, self.report.seconds,
                 self.max_batch_size, ", static cache" if self.static_cache else "")

    # -- request side (event loop) ----------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self.model is None or self._closed:
            raise BackendUnavailableError("transformers backend is not started")
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Any] = asyncio.Queue()
        abort = threading.Event()
        self._aborts[request.request_id] = abort

        job = Job(request, self.outbox.sender(loop, chunks.put_nowait), abort)
        self.submit(job)
        try:
            while True:
                item = await chunks.get()
                if item is END:
                    break
                if isinstance(item, Failure):
                    raise item.error
                yield item
        finally:
            abort.set()  # consumer gone (done, error or cancelled): stop decoding its row
            self._aborts.pop(request.request_id, None)
            if job.prompt_tokens:  # set by the decode loop when it joined (read after END)
                self._usage.record(request.request_id, PromptUsage(
                    job.prompt_tokens, job.cached_tokens, job.generated))

    def prompt_usage(self, request_id: str) -> PromptUsage | None:
        return self._usage.pop(request_id)

    def _continuous(self) -> bool:
        """Continuous batching: "on" where the model qualifies, "auto" also only on a GPU."""
        wanted = self._config.continuous_batching
        on_gpu = self._placement is not None and self._placement.llm_device != "cpu"
        return supports(self.model) and (wanted == "on" or (wanted == "auto" and on_gpu))

    def eos_ids(self) -> frozenset[int]:
        """Ids that end a reply: the model's end of sequence and the chat template's own
        special tokens (``template_stop_ids``)."""
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return template_stop_ids(self.tokenizer, ids)

    def prompt_parts(self, job: Job) -> tuple[list[int], list[int]]:
        """(the shared prefix: the system turn alone, if the prompt starts with it; the
        whole prompt)."""
        assert self.prompts is not None
        return self.prompts.parts(job.request)

    def free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- status and shutdown ----------------------------------------------------------------

    async def abort(self, request_id: str) -> None:
        event = self._aborts.get(request_id)
        if event is not None:
            event.set()

    def health(self) -> dict[str, Any]:
        return {"ok": self.model is not None and not self._closed, "backend": self.name,
                "in_flight": len(self._aborts), "queued": self._jobs.qsize(),
                "max_batch_size": self.max_batch_size, "oom_retries": self.oom_retries,
                **(self.continuous.counters() if self.continuous is not None else {})}

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model_dir": str(self.model_dir) if self.model_dir else None,
            "load": self.report.as_dict(),
            "placement": self._placement.as_dict() if self._placement else None,
            "static_cache": self.static_cache,
            "max_batch_size": self.max_batch_size,
        }

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return max(1, len(text) // 3) if text else 0
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    async def close(self) -> None:
        self._closed = True
        for event in self._aborts.values():
            event.set()
        if self._worker is not None:
            self._jobs.put(STOP_WORKER)
            await asyncio.to_thread(self._worker.join, 30)
            self._worker = None
        self.model = None
        self.tokenizer = None
