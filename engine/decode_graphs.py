"""The continuous batch's decode step with static shapes, captured as CUDA graphs.

An eager decode step of an 8B model launches about a thousand small kernels from Python:
measured on one H200 it took ~45 ms whether 1 or 8 rows ran (the GPU waited for the CPU).
Here the step runs over fixed buffers: token ids, positions, the slots' KV and mask, and the
column being written (a tensor), for a few batch-size buckets. On CUDA each bucket is captured
once at start-up and replayed per step; elsewhere (CPU, tests) the same static-shape forward
runs eagerly, so its output can be checked against ``generate()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from engine.kv_slots import SlotCache

log = logging.getLogger(__name__)


def buckets_for(slots: int) -> list[int]:
    """Batch sizes that get their own graph: powers of two up to ``slots``, and ``slots``."""
    sizes = {slots}
    size = 1
    while size < slots:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


class DecodeGraphs:
    def __init__(self, model: Any, cache: SlotCache, cache_keyword: str) -> None:
        self._model = model
        self._cache = cache
        self._cache_keyword = cache_keyword
        device = cache.mask.device
        self.buckets = buckets_for(cache.slots)
        self._ids = torch.zeros((cache.slots, 1), dtype=torch.long, device=device)
        self._positions = torch.zeros((cache.slots, 1), dtype=torch.long, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def _forward(self, rows: int) -> torch.Tensor:
        self._cache.use_full_width(rows)
        out = self._model(input_ids=self._ids[:rows], position_ids=self._positions[:rows],
                          attention_mask=self._cache.attention_mask(rows, self._cache.width),
                          use_cache=True, **{self._cache_keyword: self._cache})
        logits: torch.Tensor = out.logits
        return logits

    @torch.inference_mode()
    def capture(self, progress: Callable[[int, int], None]) -> None:
        """Capture every bucket, largest first (they share one memory pool). Only while the
        batch is empty: the warm-up runs write into the slots."""
        assert self._cache.rows == 0
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        for done, rows in enumerate(sorted(self.buckets, reverse=True)):
            progress(done, len(self.buckets))
            self._cache.mask[:rows, 0] = True  # something to attend to
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisations happen outside the capture
                    self._forward(rows)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(rows)
            self._graphs[rows] = (graph, logits)
        self._cache.clear()
        progress(len(self.buckets), len(self.buckets))

    def run(self, last: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step for the running rows (``last`` [rows, 1], ``positions`` [rows]);
        their logits [rows, vocab], valid until the next step."""
        rows = last.shape[0]
        bucket = next(size for size in self.buckets if size >= rows)
        self._ids[:rows].copy_(last)
        self._positions[:rows, 0].copy_(positions)
        self._cache.step_mask(bucket)
        captured = self._graphs.get(bucket)
        if captured is None:
            logits = self._forward(bucket)
        else:
            captured[0].replay()
            logits = captured[1]
        return logits[:rows, -1]
