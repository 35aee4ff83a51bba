"""In-process transformers backend with micro-batching.

All torch work runs on one dedicated worker thread (never on the event loop). Requests that
arrive within a short window are generated together as one left-padded batch, each streaming
its own text back to the caller's loop through ``call_soon_threadsafe``. A CUDA out-of-memory
error frees memory, halves the batch (and the maximum batch size from then on) and retries.
Cancelling a consumer stops its row at the next decode step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.backends.base import RecentUsage
from engine.backends.batch_limit import LimitRecovery
from engine.backends.continuous_worker import ContinuousWorker
from engine.backends.detokenize import IncrementalDecoder
from engine.backends.jobs import END, STOP_WORKER, Failure, Job, Outbox, is_oom
from engine.backends.prompts import ChatPrompts, template_stop_ids
from engine.config import LLMConfig
from engine.errors import BackendUnavailableError, GenerationAborted
from engine.gpu_manager import Placement, discover_devices, plan_placement
from engine.model_fit import estimate_model_bytes, fit_to_model
from engine.model_loader import LoadReport, load_llm, resolve_llm_dir
from engine.serving import supports
from engine.types import GenerationRequest, PromptUsage, SamplingParams

log = logging.getLogger(__name__)
# Micro-batches without running out of memory before a lowered batch limit doubles back.
GROW_AFTER_BATCHES = 20

@dataclass
class _BatchStreamer:
    """transformers streamer for a batch: the prompt first, then one token per row per step."""

    jobs: list[Job]
    eos_ids: set[int]
    outbox: Outbox
    prompt_seen: bool = field(default=False)

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(-1).tolist(), strict=True):
            if job.done:
                continue
            if token in self.eos_ids:
                job.done = True
                continue
            job.push(token)
            if job.generated >= job.request.sampling.max_new_tokens:
                job.done = True
        self.outbox.send()  # this step's text, all rows at once

    def end(self) -> None:
        for job in self.jobs:
            job.done = True


def _sampling_key(sampling: SamplingParams) -> tuple[Any, ...]:
    """Requests that may share one generate() call (max_new_tokens is enforced per row)."""
    return (sampling.temperature, sampling.top_p, sampling.top_k, sampling.repetition_penalty,
            sampling.min_new_tokens, sampling.seed)


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
        self.batches_run = 0
        self.oom_retries = 0
        self._recovery = LimitRecovery(GROW_AFTER_BATCHES)  # of a limit lowered by an OOM
        self.continuous: ContinuousWorker | None = None
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
        await asyncio.to_thread(self._load)
        loop = self._work
        if self._continuous():
            self.continuous = ContinuousWorker(self, self._jobs)
            await asyncio.to_thread(self.continuous.prepare)
            loop = self.continuous.run
        self._worker = threading.Thread(target=loop, name="llm-worker", daemon=True)
        self._worker.start()

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
        self._jobs.put(job)
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
                self._usage.record(request.request_id,
                                   PromptUsage(job.prompt_tokens, job.cached_tokens))

    def prompt_usage(self, request_id: str) -> PromptUsage | None:
        return self._usage.pop(request_id)

    # -- worker thread ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            first = self._jobs.get()
            if first is STOP_WORKER:
                return
            batch = self._collect(first)
            groups: dict[tuple[Any, ...], list[Job]] = {}
            for job in batch:
                groups.setdefault(_sampling_key(job.request.sampling), []).append(job)
            for jobs in groups.values():
                try:
                    self._run_with_oom_retry(jobs)
                finally:
                    self.outbox.send()

    def _collect(self, first: Job) -> list[Any]:
        """The first job plus whatever arrives within the batching window."""
        batch: list[Any] = [first]
        deadline = time.monotonic() + self._config.batch_window_ms / 1000
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                job = self._jobs.get(timeout=remaining)
            except queue.Empty:
                break
            if job is STOP_WORKER:
                self._jobs.put(STOP_WORKER)
                break
            batch.append(job)
        return batch

    def _run_with_oom_retry(self, jobs: list[Job]) -> None:
        live = [job for job in jobs if not job.abort.is_set()]
        for job in jobs:
            if job.abort.is_set():
                job.emit(Failure(GenerationAborted(job.request.request_id)))
                job.ended = True
        if not live:
            return
        try:
            self._generate_batch(live)
            self.max_batch_size = self._recovery.next_limit(self.max_batch_size,
                                                            self.batch_limit)
        except Exception as error:  # noqa: BLE001 - every failure must reach its requester
            if is_oom(error) and len(live) > 1 and not any(j.generated for j in live):
                self.free_memory()
                self.oom_retries += 1
                self._recovery.ran_out()
                self.max_batch_size = max(1, len(live) // 2)
                log.warning("out of memory with a batch of %d; retrying as %d", len(live),
                            self.max_batch_size)
                for job in live:
                    job.done = False
                half = len(live) // 2
                self._run_with_oom_retry(live[:half])
                self._run_with_oom_retry(live[half:])
                return
            if is_oom(error):
                self.free_memory()
            log.error("generation failed for %d request(s): %s", len(live), error)
            for job in live:
                job.fail(error)
            return
        for job in live:
            job.finish()

    def _generate_batch(self, jobs: list[Job]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        for job in jobs:
            job.decoder = IncrementalDecoder(self.tokenizer)
            job.generated = 0
        inputs = self._encode_batch([job.request for job in jobs])
        sampling = jobs[0].request.sampling
        eos_ids = set(self.eos_ids())

        class _RowsDone(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                flags = [job.done or job.abort.is_set() for job in jobs]
                return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

        kwargs: dict[str, Any] = {
            "max_new_tokens": max(job.request.sampling.max_new_tokens for job in jobs),
            "min_new_tokens": sampling.min_new_tokens or None,
            "repetition_penalty": sampling.repetition_penalty,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": sorted(eos_ids),  # so min_new_tokens holds every stop back
            "stopping_criteria": StoppingCriteriaList([_RowsDone()]),
            "streamer": _BatchStreamer(jobs, eos_ids, self.outbox),
        }
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
        if sampling.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=sampling.top_k or None)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        started = time.monotonic()
        with torch.inference_mode():
            self.model.generate(**inputs, **kwargs)
        self.batches_run += 1
        log.debug("batch of %d generated in %.2f s", len(jobs), time.monotonic() - started)

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

    def _encode_batch(self, requests: list[GenerationRequest]) -> dict[str, Any]:
        import torch

        assert self.prompts is not None
        rows = [self.prompts.ids(request) for request in requests]
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                            dtype=torch.long)
        device = next(self.model.parameters()).device
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}

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
