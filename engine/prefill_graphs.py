"""One request's prefill past the shared prefix with static shapes, captured as CUDA graphs.

An eager prefill of an 8B model spends most of its time launching kernels from Python: on one
H200 a single request's join paused the running rows 63 ms for 16 ms of GPU work, and copied
the shared prefix's KV twice (once into a per-request cache, once into its slot). Here the
prefix's KV sits once in a one-row scratch cache; a request's own tokens (padded to a bucket
of 64, 128, 256 or 512) are written past it, attending to the prefix columns it shares and
causally to each other, all through a prepared mask, so shapes and addresses never change.
Each bucket is captured once at start-up and replayed per join. Longer prompts, groups and
models off a single GPU take the eager path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from engine.kv_slots import SlotCache, SlotLayer

log = logging.getLogger(__name__)
BUCKETS = (64, 128, 256, 512)

KV = list[tuple[torch.Tensor, torch.Tensor]]


class _Bucket:
    """Static inputs of one token bucket and the graph that reads them."""

    def __init__(self, tokens: int, width: int, start: int, device: torch.device) -> None:
        self.tokens = tokens
        self.ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
        self.positions = torch.zeros((1, tokens), dtype=torch.long, device=device)
        # The request's own tokens always go to the columns right after the prefix area.
        self.columns = torch.arange(start, start + tokens, device=device)
        self.mask = torch.zeros((1, 1, tokens, width), dtype=torch.bool, device=device)
        self.causal = torch.ones((tokens, tokens), dtype=torch.bool, device=device).tril()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class PrefillGraphs:
    def __init__(self, model: Any, like: KV, prefix_room: int, cache_keyword: str) -> None:
        self._model = model
        self._cache_keyword = cache_keyword
        self._room = prefix_room  # columns kept for the prefix; the request's tokens follow
        self._scratch = SlotCache(like, 1, prefix_room + BUCKETS[-1])
        device = self._scratch.mask.device
        self._buckets = {size: _Bucket(size, self._scratch.width, prefix_room, device)
                         for size in BUCKETS}
        self._prefix_length = 0

    @property
    def captured(self) -> bool:
        return any(b.graph is not None for b in self._buckets.values())

    def _layers(self) -> list[SlotLayer]:
        return self._scratch.layers  # type: ignore[return-value]

    @torch.inference_mode()
    def load_prefix(self, prefix: KV, length: int) -> None:
        """Copy the shared prefix's KV (its first ``length`` tokens) into the scratch once."""
        length = min(length, self._room)
        for layer, (keys, values) in zip(self._layers(), prefix, strict=True):
            assert layer.keys is not None and layer.values is not None
            layer.keys[0, :, :length] = keys[0, :, :length]
            layer.values[0, :, :length] = values[0, :, :length]
        self._prefix_length = length

    def fits(self, covered: int, tokens: int) -> bool:
        return covered <= self._prefix_length and tokens <= BUCKETS[-1]

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        for layer in self._layers():
            layer.full_width, layer.rows, layer.column = True, 1, bucket.columns
        out = self._model(input_ids=bucket.ids, position_ids=bucket.positions,
                          attention_mask=bucket.mask, use_cache=True,
                          **{self._cache_keyword: self._scratch})
        logits: torch.Tensor = out.logits
        return logits

    @torch.inference_mode()
    def capture(self, progress: Callable[[int, int], None]) -> None:
        """Capture every bucket (the warm-up writes only past the prefix area)."""
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        for done, bucket in enumerate(self._buckets.values()):
            progress(done, len(self._buckets))
            bucket.mask[..., bucket.columns] = bucket.causal  # something to attend to
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisations happen outside the capture
                    self._forward(bucket)
            torch.cuda.current_stream().wait_stream(side)
            bucket.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(bucket.graph, pool=pool):
                bucket.logits = self._forward(bucket)
        progress(len(self._buckets), len(self._buckets))

    @torch.inference_mode()
    def run(self, rest: list[int], covered: int) -> tuple[torch.Tensor, KV]:
        """Prefill ``rest`` (the prompt past its first ``covered`` tokens, which the prefix
        holds): the last position's logits [vocab] and the prompt's KV per layer
        (``[1, heads, covered + len(rest), dim]``), valid until the next run."""
        size = len(rest)
        bucket = next(b for b in self._buckets.values() if b.tokens >= size)
        device = bucket.ids.device
        bucket.ids[0].copy_(torch.tensor(rest + rest[-1:] * (bucket.tokens - size),
                                         device=device))
        torch.arange(covered, covered + bucket.tokens, out=bucket.positions[0])
        bucket.mask.zero_()
        bucket.mask[0, 0, :, :covered] = True
        bucket.mask[0, 0, :, self._room:self._room + bucket.tokens] = bucket.causal
        if bucket.graph is not None and bucket.logits is not None:
            bucket.graph.replay()
            logits = bucket.logits
        else:
            logits = self._forward(bucket)
        start = self._room
        kv = [(torch.cat([layer.keys[:1, :, :covered],  # type: ignore[index]
                          layer.keys[:1, :, start:start + size]], dim=2),  # type: ignore[index]
               torch.cat([layer.values[:1, :, :covered],  # type: ignore[index]
                          layer.values[:1, :, start:start + size]], dim=2))  # type: ignore[index]
              for layer in self._layers()]
        return logits[0, size - 1], kv
