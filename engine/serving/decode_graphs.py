"""The continuous batch's decode step with static shapes, captured as CUDA graphs.

An eager decode step of an 8B model launches about a thousand small kernels from Python:
measured on one H200 it took ~45 ms whether 1 or 8 rows ran (the GPU waited for the CPU).
Here the step runs over fixed buffers: token ids, positions, the slots' KV and mask, and the
column being written (a tensor), for a few batch-size buckets. On CUDA each bucket is captured
once at start-up and replayed per step; elsewhere (CPU, tests) the same static-shape forward
runs eagerly, so its output can be checked against ``generate()``.

With ``compile_step`` the model is compiled before each bucket is captured: the graph then
replays inductor's fused kernels instead of ~30 small ones per layer (norms, rotary, SiLU,
residuals), 9.8 -> 6.8 ms for one row on an H200. Attention is left out of the compiled code
for buckets above ``FULLY_COMPILED_ROWS``, where cuDNN's kernel was the faster one
(docs/performance-history.md); a graph break per layer costs nothing once the step is one
CUDA graph.
Where attention is compiled along, SDPA is ``grouped_decode_attention`` (no repeated KV heads:
6.46 -> 5.67 ms for one row on an H200); above one row, compiled or not, it is
``packed_decode_attention`` (SDPA's kernels on the same packed heads), whatever the installed
transformers would otherwise do.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from engine.serving.decode_attention import grouped_decode_attention, packed_decode_attention
from engine.serving.kv_slots import SlotCache

log = logging.getLogger(__name__)
FULLY_COMPILED_ROWS = 1
RECOMPILE_ROOM = 256  # compiled frames per function while capturing (one per layer and shape)


def buckets_for(slots: int) -> list[int]:
    """Batch sizes that get their own graph: powers of two up to ``slots``, and ``slots``."""
    sizes = {slots}
    size = 1
    while size < slots:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def _step_attention(name: str, attention: Any, rows: int, compiled: bool) -> Any:
    """What a bucket of ``rows`` runs as attention: for SDPA the packed-heads kinds (written
    out where compiled along, SDPA's kernels above that); anything else as it is, kept out of
    the compiled code above ``FULLY_COMPILED_ROWS``. None: leave the registry alone."""
    disable: Any = torch.compiler.disable
    if name == "sdpa":
        if compiled and rows <= FULLY_COMPILED_ROWS:
            return grouped_decode_attention
        return disable(packed_decode_attention) if compiled else packed_decode_attention
    if attention is None or not compiled:
        return None
    return attention if rows <= FULLY_COMPILED_ROWS else disable(attention)


class DecodeGraphs:
    def __init__(self, model: Any, cache: SlotCache, cache_keyword: str,
                 compile_step: bool = False) -> None:
        self._model = model
        self._compile = compile_step
        self._cache = cache
        self._cache_keyword = cache_keyword
        device = cache.mask.device
        self.buckets = buckets_for(cache.slots)
        self._ids = torch.zeros((cache.slots, 1), dtype=torch.long, device=device)
        self._positions = torch.zeros((cache.slots, 1), dtype=torch.long, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0  # steps that ran a captured graph (the rest ran the model eagerly)

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def _forward(self, rows: int) -> torch.Tensor:
        """The step's forward only: whatever runs here is captured and replayed, so the
        write column (filled by the slots from the host) must be set before, never here."""
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
        compiled = torch.compile(self._model.forward) if self._compile else None
        for done, rows in enumerate(sorted(self.buckets, reverse=True)):
            progress(done, len(self.buckets))
            self._cache.use_full_width(rows)
            self._cache.mask[:rows, 0] = True  # something to attend to
            try:
                with self._compiled(compiled, rows):
                    self._warm_up(rows, side)
            except Exception as error:  # the uncompiled step still works (raised if not)
                if compiled is None:
                    raise
                log.warning("decode step: compiling failed (%s: %s); capturing it uncompiled",
                            type(error).__name__, str(error).splitlines()[0][:200])
                compiled = None
                with self._compiled(compiled, rows):
                    self._warm_up(rows, side)
            graph = torch.cuda.CUDAGraph()
            with self._compiled(compiled, rows), torch.cuda.graph(graph, pool=pool):
                logits = self._forward(rows)
            self._graphs[rows] = (graph, logits)
        self._cache.clear()
        progress(len(self.buckets), len(self.buckets))

    def _warm_up(self, rows: int, side: torch.cuda.Stream) -> None:
        """Lazy initialisations (and compiling) happen before the capture, on a side stream."""
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(rows)
        torch.cuda.current_stream().wait_stream(side)

    @contextlib.contextmanager
    def _compiled(self, compiled: Any, rows: int) -> Iterator[None]:
        """The model's forward compiled for this bucket (attention too, for the smallest), and
        the decode attention that bucket captures."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        name = self._model.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get(name)
        step_attention = _step_attention(name, attention, rows, compiled is not None)
        if step_attention is not None:  # restored below
            ALL_ATTENTION_FUNCTIONS[name] = step_attention
        own_forward = self._model.__dict__.get("forward")  # accelerate's hook, say
        if compiled is not None:
            self._model.forward = compiled
        # Between the graph breaks each layer's attention code is compiled for its own layer
        # index (it picks the layer's cache by it): room for all of them, or past the default
        # limit of 8 the later layers would run uncompiled.
        room = torch._dynamo.config.patch(recompile_limit=RECOMPILE_ROOM,
                                          accumulated_recompile_limit=4 * RECOMPILE_ROOM)
        try:
            with room:
                yield
        finally:
            if compiled is not None:
                if own_forward is None:
                    del self._model.forward  # the class's own again
                else:
                    self._model.forward = own_forward
            if step_attention is not None:
                ALL_ATTENTION_FUNCTIONS[name] = attention

    def run(self, last: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step for the running rows (``last`` [rows, 1], ``positions`` [rows]);
        their logits [rows, vocab], valid until the next step."""
        rows = last.shape[0]
        bucket = next(size for size in self.buckets if size >= rows)
        self._ids[:rows].copy_(last)
        self._positions[:rows, 0].copy_(positions)
        self._cache.step_mask(bucket)
        captured = self._graphs.get(bucket)
        self.replays += captured is not None
        if captured is None:
            self._cache.use_full_width(bucket)
            logits = self._forward(bucket)
        else:
            captured[0].replay()
            logits = captured[1]
        return logits[:rows, -1]
