"""The in-process backend's decode loop with continuous batching (``llm.continuous_batching``).

Between two decode steps, waiting requests join (those that arrived together prefilled in one
pass, past the shared persona prefix or a returning viewer's kept start) and finished or
cancelled ones leave, so a viewer who arrives mid-batch waits one step, not a whole batch. A
prompt with more than ``llm.prefill_chunk_tokens`` to prefill while rows run joins a chunk
at a time, one chunk between two steps, so the running replies never pause for a whole
prompt.
Each request keeps its own sampling parameters. With ``llm.static_cache`` the slots are fixed
and the decode step is captured as CUDA graphs before the first request. Out of memory while
requests join: they wait in the queue and the batch limit halves (or, with nothing running,
they join in smaller groups); while decoding: the running rows fail (a half-done step leaves
their caches unusable), the limit halves, and the waiting ones go on.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import defaultdict, deque
from typing import Any, Protocol

from engine.backends.batch_limit import LimitRecovery
from engine.backends.detokenize import IncrementalDecoder
from engine.backends.jobs import STOP_WORKER, Failure, Job, Outbox, is_oom
from engine.errors import EngineError, GenerationAborted
from engine.serving import Chunked, ContinuousBatch, Joining, PrefixCache, common_prefix

log = logging.getLogger(__name__)
JOIN_GROUP = 8  # requests prefilled together at most while rows run: bounds their pause
IDLE_JOIN_GROUP = 32  # with no row running, no one waits on the prefill: a burst joins at once
# Decode steps without running out of memory before a lowered batch limit doubles back
# (~10 s of decoding on a GPU).
GROW_AFTER_STEPS = 1000


class _Backend(Protocol):
    model: Any
    tokenizer: Any
    max_batch_size: int  # lowered after running out of memory, never above batch_limit
    oom_retries: int
    static_cache: bool
    compile_decode: bool
    outbox: Outbox

    @property
    def max_length(self) -> int: ...

    @property
    def batch_limit(self) -> int: ...

    @property
    def prefix_cache_bytes(self) -> int: ...

    @property
    def prefill_chunk_tokens(self) -> int: ...

    def prompt_parts(self, job: Job) -> tuple[list[int], list[int]]: ...

    def eos_ids(self) -> frozenset[int]: ...

    def free_memory(self) -> None: ...


class ContinuousWorker:
    def __init__(self, backend: _Backend, jobs: queue.Queue[Job | None]) -> None:
        self._backend = backend
        self._jobs = jobs
        self._waiting: deque[Job] = deque()
        self._running: dict[str, Job] = {}
        self._chunked: deque[tuple[Job, Chunked]] = deque()  # prefilling, a chunk a step
        self._batch = self._new_batch()
        self._prefix: list[int] = []
        self._eos = backend.eos_ids()
        self.steps = 0
        self._recovery = LimitRecovery(GROW_AFTER_STEPS)  # of a limit lowered by an OOM
        # Where the decode loop's time goes (read by benchmarks and ``/gpu status``).
        self.timings: defaultdict[str, float] = defaultdict(float)

    def _new_batch(self) -> ContinuousBatch:
        batch = ContinuousBatch(self._backend.model, slots=self._backend.max_batch_size)
        if self._backend.prefix_cache_bytes:
            batch.prefix_cache = PrefixCache(self._backend.prefix_cache_bytes)
        return batch

    def prepare(self) -> None:
        """Before the first request: fixed KV slots and a decode step with static shapes,
        captured as CUDA graphs on a GPU (``llm.static_cache``), so traffic never compiles.
        Without memory for the slots, the batch stays dynamic."""
        if not self._backend.static_cache:
            return
        slots = self._backend.max_batch_size
        # A row never holds more than max_length tokens (the prompt is cut to leave room for
        # the reply): one more column and it always fits after the unused ones are cut.
        width = -(-(self._backend.max_length + 1) // 64) * 64

        def progress(done: int, total: int) -> None:
            # Decode steps (batch sizes up to the slots), then prefills (rows x tokens).
            log.info("capturing CUDA graphs (decode up to %d rows, then prefill): %d of %d",
                     slots, done, total)

        try:
            self._batch.make_static(slots, width, progress,
                                    compile_step=self._backend.compile_decode)
        except Exception as error:  # noqa: BLE001 - the dynamic batch still serves
            log.warning("static decode unavailable (%s: %s); decoding without it",
                        type(error).__name__, error)
            self._batch = self._new_batch()
            self._backend.free_memory()
            return
        if self._batch.prefix_cache is not None:  # sized for what the slots left
            self._batch.prefix_cache.max_bytes = self._backend.prefix_cache_bytes
        log.info("decode step ready: %d slots of %d tokens%s; %.1f GiB for returning "
                 "viewers' prompt starts", slots, width,
                 ", CUDA graphs" if self._batch.captured else "",
                 (self._batch.prefix_cache.max_bytes / 2**30
                  if self._batch.prefix_cache is not None else 0))

    def counters(self) -> dict[str, float]:
        """Running totals for metrics: decode steps and time, prefill time, prompt tokens
        computed and from the prefix cache."""
        timings = self.timings
        return {"decode_steps": float(self.steps), "decode_s": timings["step_s"],
                "prefill_s": timings["admit_s"] + timings["chunk_s"],
                "prompt_tokens": timings["prompt_tokens"],
                "cached_tokens": timings["cached_tokens"]}

    def run(self) -> None:
        """Until ``STOP_WORKER``: admit, step, retire; then what the pass produced goes to
        the requests' consumers in one hand-over."""
        try:
            while self._fetch(block=not (self._running or self._waiting or self._chunked)):
                started = time.perf_counter()
                self._admit()
                self.timings["admit_s"] += time.perf_counter() - started
                if self._running:
                    started = time.perf_counter()
                    self._step()
                    self.timings["step_s"] += time.perf_counter() - started
                self._backend.outbox.send()
        finally:
            self._backend.outbox.send()  # the failures of a stopping worker

    def _fetch(self, block: bool) -> bool:
        """Move queued jobs to the waiting line; False once the worker must stop."""
        try:
            job = self._jobs.get(block=block)
            while True:
                if job is STOP_WORKER:
                    self._fail_all(EngineError("the backend is closing"))
                    return False
                self._waiting.append(job)
                job = self._jobs.get_nowait()
        except queue.Empty:
            return True

    def _admit(self) -> None:
        """Let waiting requests join, those that arrived together in one prefill; a long
        prompt's next chunk first."""
        self._advance_chunked()
        while self._waiting and self._rows() < self._backend.max_batch_size:
            group_limit = JOIN_GROUP if self._running else IDLE_JOIN_GROUP
            room = min(group_limit, self._backend.max_batch_size - self._rows())
            group: list[Job] = []
            while self._waiting and len(group) < room:
                job = self._waiting.popleft()
                if job.abort.is_set():
                    job.ended = True
                    job.emit(Failure(GenerationAborted(job.request.request_id)))
                else:
                    group.append(job)
            if group and not self._join_group(group):
                return

    def _join_group(self, group: list[Job]) -> bool:
        """Join ``group``; False when out of memory stopped admission for now."""
        try:
            self._join(group)
        except Exception as error:  # noqa: BLE001 - every failure reaches its requester
            chunking = {id(job) for job, _ in self._chunked}  # taken already: not again
            group = [job for job in group if id(job) not in chunking]
            if not group:
                return True
            oom = is_oom(error)
            if oom:
                self._backend.free_memory()
            if oom and self._running:  # running rows hold the memory: wait for them to leave
                self._shrink("requests joined")
                self._waiting.extendleft(reversed(group))
                return False
            if len(group) == 1:
                self._fail(group[0], error)
                return True
            # Smaller groups: a prefill too large for the memory left, or one bad request,
            # must not fail the others.
            half = len(group) // 2
            return self._join_group(group[:half]) and self._join_group(group[half:])
        return True

    def _rows(self) -> int:
        return len(self._running) + len(self._chunked)

    def _join(self, group: list[Job]) -> None:
        started = time.perf_counter()
        parts = [self._backend.prompt_parts(job) for job in group]
        self.timings["tokenize_s"] += time.perf_counter() - started
        prefix = parts[0][0]
        # The persona's system turn, the same for every viewer in one language: prefilled
        # again only when most of it is new (first request, new persona, other language).
        if common_prefix(prefix, self._prefix) < len(prefix) // 2:
            self._batch.set_prefix(prefix)
            self._prefix = prefix
        group, parts = self._chunk_long(group, parts)
        if not group:
            return
        self.timings["prefills"] += 1
        self.timings["joined"] += len(group)
        started = time.perf_counter()
        firsts = self._batch.join_many([
            Joining(job.request.request_id, prompt, job.request.sampling.max_new_tokens,
                    self._eos, job.request.sampling)
            for job, (_prefix, prompt) in zip(group, parts, strict=True)])
        self.timings["join_s"] += time.perf_counter() - started  # to the first tokens read
        for job, (_prefix, prompt), cached, first in zip(
                group, parts, self._batch.last_cached, firsts, strict=True):
            self._started(job, len(prompt), cached, first)

    def _started(self, job: Job, prompt_tokens: int, cached: int, first: int) -> None:
        """``job``'s row joined the batch with ``first`` as its first token."""
        job.prompt_tokens, job.cached_tokens = prompt_tokens, cached
        self.timings["prompt_tokens"] += prompt_tokens
        self.timings["cached_tokens"] += cached
        job.decoder = IncrementalDecoder(self._backend.tokenizer)
        self._running[job.request.request_id] = job
        self._deliver(job, first)

    def _chunk_long(self, group: list[Job], parts: list[tuple[list[int], list[int]]]
                    ) -> tuple[list[Job], list[tuple[list[int], list[int]]]]:
        """While rows run, a prompt with more to prefill than a chunk goes to ``_chunked``
        (a chunk between two steps); the rest of ``group`` joins at once."""
        chunk, prefiller = self._backend.prefill_chunk_tokens, self._batch.prefiller
        if not chunk or not self._running:
            return group, parts
        short: list[int] = []
        for index, (job, (_prefix, prompt)) in enumerate(zip(group, parts, strict=True)):
            if len(prompt) - prefiller.start_of(prompt) <= chunk:
                short.append(index)
                continue
            sampling = job.request.sampling
            self._chunked.append((job, prefiller.begin(Joining(
                job.request.request_id, prompt, sampling.max_new_tokens, self._eos,
                sampling))))
        return [group[i] for i in short], [parts[i] for i in short]

    def _advance_chunked(self) -> None:
        """Prefill the next chunk of the first prompt being chunked (all of it if no row
        runs: nobody waits); a finished one joins the batch."""
        while self._chunked:
            job, chunked = self._chunked[0]
            if job.abort.is_set():
                self._chunked.popleft()
                job.ended = True
                job.emit(Failure(GenerationAborted(job.request.request_id)))
                continue
            budget = max(64, self._backend.prefill_chunk_tokens - len(self._running))
            started = time.perf_counter()
            try:
                done = self._batch.prefiller.advance(chunked, budget)
                if done:
                    self._chunked.popleft()
                    first = self._batch.join_chunked(chunked)
            except Exception as error:  # noqa: BLE001 - it reaches its requester
                self._chunked.popleft()
                self._fail(job, error)
                continue
            finally:
                self.timings["chunks"] += 1
                self.timings["chunk_s"] += time.perf_counter() - started
            if done:
                self._started(job, len(chunked.joining.prompt_ids), chunked.start, first)
            if self._running:
                return

    def _step(self) -> None:
        replays, started = self._batch.graph_replays, time.perf_counter()
        try:
            produced = self._batch.step()
        except Exception as error:  # noqa: BLE001 - every failure reaches its requester
            # A step that failed half way leaves the rows' caches unusable: all of them fail
            # (their viewers get the fallback), the batch starts afresh.
            if is_oom(error):
                self._shrink("decoding")
            for job in self._running.values():
                self._fail(job, error)
            self._running.clear()
            self._batch.reset()
            self._backend.free_memory()
            return
        # The batch's own share of the step (the rest hands tokens out), and whether it ran
        # a captured graph: a step of the size that was not captured runs eagerly.
        self.timings["forward_s"] += time.perf_counter() - started
        self.timings["graph_steps"] += self._batch.graph_replays - replays
        self.steps += 1
        self._grow_back()
        self.timings["rows_stepped"] += len(produced)
        for request_id, token in produced:
            self._deliver(self._running[request_id], token)
        gone = {row.request_id for row in self._batch.rows
                if row.finished or self._running[row.request_id].abort.is_set()}
        self._batch.leave(gone)
        for request_id in gone:
            self._running.pop(request_id).finish()

    def _deliver(self, job: Job, token: int) -> None:
        if token not in self._eos:
            job.push(token)

    def _shrink(self, when: str) -> None:
        self._backend.oom_retries += 1
        self._backend.max_batch_size = max(1, len(self._running) // 2)
        self._recovery.ran_out()
        log.warning("out of memory while %s; batch limit now %d", when,
                    self._backend.max_batch_size)

    def _grow_back(self) -> None:
        backend = self._backend
        backend.max_batch_size = self._recovery.next_limit(backend.max_batch_size,
                                                           backend.batch_limit)

    def _fail(self, job: Job, error: BaseException) -> None:
        log.error("generation failed for %s: %s", job.request.request_id, error)
        job.fail(error)

    def _fail_all(self, error: EngineError) -> None:
        for job in [*self._running.values(), *(job for job, _ in self._chunked),
                    *self._waiting]:
            if not job.ended:
                self._fail(job, error)
        self._running.clear()
        self._chunked.clear()
        self._waiting.clear()
