"""The in-process backend's decode loop without continuous batching (``llm.continuous_batching``
off, or a model it does not support): requests that arrive within ``llm.batch_window_ms`` are
generated together as one left-padded ``generate()`` call, each streaming its own text. A CUDA
out-of-memory error frees memory, halves the batch (and the batch limit, until enough batches
ran without one) and retries; a consumer gone stops its row at the next decode step.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.backends.batch_limit import LimitRecovery
from engine.backends.detokenize import IncrementalDecoder
from engine.backends.jobs import STOP_WORKER, Failure, Job, Outbox, is_oom
from engine.backends.prompts import ChatPrompts
from engine.errors import GenerationAborted
from engine.types import SamplingParams

log = logging.getLogger(__name__)
# Micro-batches without running out of memory before a lowered batch limit doubles back.
GROW_AFTER_BATCHES = 20


class _Backend(Protocol):
    model: Any
    tokenizer: Any
    prompts: ChatPrompts | None
    max_batch_size: int
    oom_retries: int
    static_cache: bool
    outbox: Outbox

    @property
    def batch_limit(self) -> int: ...

    @property
    def batch_window_s(self) -> float: ...

    def eos_ids(self) -> frozenset[int]: ...

    def free_memory(self) -> None: ...


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


class MicroBatchWorker:
    def __init__(self, backend: _Backend, jobs: queue.Queue[Job | None]) -> None:
        self._backend = backend
        self._jobs = jobs
        self.batches_run = 0
        self._recovery = LimitRecovery(GROW_AFTER_BATCHES)  # of a limit lowered by an OOM

    def run(self) -> None:
        """Until ``STOP_WORKER``: collect a micro-batch, generate it per sampling setting."""
        while True:
            first = self._jobs.get()
            if first is STOP_WORKER:
                return
            groups: dict[tuple[Any, ...], list[Job]] = {}
            for job in self._collect(first):
                groups.setdefault(_sampling_key(job.request.sampling), []).append(job)
            for jobs in groups.values():
                try:
                    self._run_with_oom_retry(jobs)
                finally:
                    self._backend.outbox.send()

    def _collect(self, first: Job) -> list[Job]:
        """The first job plus whatever arrives within the batching window."""
        batch = [first]
        deadline = time.monotonic() + self._backend.batch_window_s
        while len(batch) < self._backend.max_batch_size:
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
        backend = self._backend
        live = [job for job in jobs if not job.abort.is_set()]
        for job in jobs:
            if job.abort.is_set():
                job.emit(Failure(GenerationAborted(job.request.request_id)))
                job.ended = True
        if not live:
            return
        try:
            self._generate_batch(live)
            backend.max_batch_size = self._recovery.next_limit(backend.max_batch_size,
                                                               backend.batch_limit)
        except Exception as error:  # noqa: BLE001 - every failure must reach its requester
            if is_oom(error) and len(live) > 1 and not any(j.generated for j in live):
                self._retry_halved(live)
                return
            if is_oom(error):
                backend.free_memory()
            log.error("generation failed for %d request(s): %s", len(live), error)
            for job in live:
                job.fail(error)
            return
        for job in live:
            job.finish()

    def _retry_halved(self, live: list[Job]) -> None:
        backend = self._backend
        backend.free_memory()
        backend.oom_retries += 1
        self._recovery.ran_out()
        backend.max_batch_size = max(1, len(live) // 2)
        log.warning("out of memory with a batch of %d; retrying as %d", len(live),
                    backend.max_batch_size)
        for job in live:
            job.done = False
        half = len(live) // 2
        self._run_with_oom_retry(live[:half])
        self._run_with_oom_retry(live[half:])

    def _generate_batch(self, jobs: list[Job]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        backend = self._backend
        for job in jobs:
            job.decoder = IncrementalDecoder(backend.tokenizer)
            job.generated = 0
        inputs = self._encode_batch(jobs)
        sampling = jobs[0].request.sampling
        eos_ids = set(backend.eos_ids())

        class _RowsDone(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                flags = [job.done or job.abort.is_set() for job in jobs]
                return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

        kwargs: dict[str, Any] = {
            "max_new_tokens": max(job.request.sampling.max_new_tokens for job in jobs),
            "min_new_tokens": sampling.min_new_tokens or None,
            "repetition_penalty": sampling.repetition_penalty,
            "pad_token_id": backend.tokenizer.pad_token_id,
            "eos_token_id": sorted(eos_ids),  # so min_new_tokens holds every stop back
            "stopping_criteria": StoppingCriteriaList([_RowsDone()]),
            "streamer": _BatchStreamer(jobs, eos_ids, backend.outbox),
        }
        if backend.static_cache:
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
            backend.model.generate(**inputs, **kwargs)
        self.batches_run += 1
        log.debug("batch of %d generated in %.2f s", len(jobs), time.monotonic() - started)

    def _encode_batch(self, jobs: list[Job]) -> dict[str, Any]:
        import torch

        prompts = self._backend.prompts
        assert prompts is not None
        rows = [prompts.ids(job.request) for job in jobs]
        width = max(len(row) for row in rows)
        pad = self._backend.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                            dtype=torch.long)
        device = next(self._backend.model.parameters()).device
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
