"""Prefill past the shared prefix with static shapes, captured as CUDA graphs.

An eager prefill of an 8B model spends most of its time launching kernels from Python: on one
H200 a single request's join paused the running rows 63 ms for 16 ms of GPU work, and a group
of 8 copied the shared prefix's KV once per row before its forward. Here the prefix's KV sits
in every row of a small scratch cache, loaded once; the joining requests' own tokens (padded
to a bucket of 64, 128, 256, 384 or 512; 1, 2 or 4 rows) are written past it, attending to the
prefix columns they share and causally to each other, all through a prepared mask, so shapes
and addresses never change. Each bucket is captured once at start-up and replayed per join.
Longer prompts, larger groups and models off a single GPU take the eager path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from engine.serving.kv_slots import SlotCache, SlotLayer
from engine.serving.packed_prefill import PackedKV
from engine.serving.sampling import on_device

log = logging.getLogger(__name__)
# A returning viewer's new tokens (last message and reply, this message's hint, memories and
# message) are ~300-350 with a real tokenizer: 384 spares them a 512 bucket's padding.
TOKEN_BUCKETS = (64, 128, 256, 384, 512)
# Groups of more (bursts) prefill eagerly: measured on an H200, 8 rows padded to a bucket and
# attending over the scratch's full width took 170 ms against 137 ms eager.
ROW_BUCKETS = (1, 2, 4)

KV = list[tuple[torch.Tensor, torch.Tensor]]


class _Bucket:
    """Static inputs of one (rows, tokens) bucket and the graph that reads them."""

    def __init__(self, rows: int, tokens: int, width: int, start: int,
                 device: torch.device) -> None:
        self.rows, self.tokens = rows, tokens
        self.ids = torch.zeros((rows, tokens), dtype=torch.long, device=device)
        self.positions = torch.zeros((rows, tokens), dtype=torch.long, device=device)
        # The requests' own tokens always go to the columns right after the prefix area.
        self.columns = torch.arange(start, start + tokens, device=device)
        self.mask = torch.zeros((rows, 1, tokens, width), dtype=torch.bool, device=device)
        self.causal = torch.ones((tokens, tokens), dtype=torch.bool, device=device).tril()
        self.last = torch.zeros(rows, dtype=torch.long, device=device)  # each row's last token
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class PrefillGraphs:
    def __init__(self, model: Any, like: KV, prefix_room: int, cache_keyword: str) -> None:
        self._model = model
        self._cache_keyword = cache_keyword
        self._room = prefix_room  # columns kept for the prefix; the requests' tokens follow
        self._scratch = SlotCache(like, ROW_BUCKETS[-1], prefix_room + TOKEN_BUCKETS[-1])
        device = self._scratch.mask.device
        self._buckets = {(rows, tokens): _Bucket(rows, tokens, self._scratch.width,
                                                 prefix_room, device)
                         for rows in ROW_BUCKETS for tokens in TOKEN_BUCKETS}
        self._prefix_length = 0
        self._shared: KV = []  # the shared prefix's KV, as loaded
        self._own_rows = 0  # scratch rows holding returning viewers' starts, not the shared

    @property
    def captured(self) -> bool:
        return any(b.graph is not None for b in self._buckets.values())

    def _layers(self) -> list[SlotLayer]:
        return self._scratch.layers  # type: ignore[return-value]

    @torch.inference_mode()
    def load_prefix(self, prefix: KV, length: int) -> None:
        """Copy the shared prefix's KV (its first ``length`` tokens) into every scratch row,
        once per prefix."""
        length = min(length, self._room)
        self._copy_prefix(prefix, length, rows=slice(None))
        self._prefix_length = length
        self._shared, self._own_rows = prefix, 0

    def _copy_prefix(self, prefix: KV, length: int, rows: slice) -> None:
        for layer, (keys, values) in zip(self._layers(), prefix, strict=True):
            assert layer.keys is not None and layer.values is not None
            layer.keys[rows, :, :length] = keys[:1, :, :length]
            layer.values[rows, :, :length] = values[:1, :, :length]

    @property
    def max_rows(self) -> int:
        return ROW_BUCKETS[-1]

    def fits_past(self, covered: int, tokens: int) -> bool:
        """Whether a request past a prefix of its own (``run_past``) fits a bucket."""
        return covered <= self._room and tokens <= TOKEN_BUCKETS[-1]

    @torch.inference_mode()
    def run_past(self, prefixes: list[KV], covered: list[int], rests: list[list[int]]
                 ) -> tuple[torch.Tensor, PackedKV]:
        """``run`` for up to ``max_rows`` requests, each past a prefix of its own (a
        returning viewer's kept start, its first ``covered[i]`` tokens): each is copied into
        its scratch row first (a ~0.15 MB-a-token copy on the device), and each row attends
        to its own; the shared prefix is put back before the next shared ``run``."""
        for row, (prefix, length) in enumerate(zip(prefixes, covered, strict=True)):
            self._copy_prefix(prefix, length, rows=slice(row, row + 1))
        self._own_rows = max(self._own_rows, len(prefixes))
        return self._replay(rests, covered, shared=False)

    def fits(self, rows: int, covered: int, tokens: int) -> bool:
        return (rows <= ROW_BUCKETS[-1] and covered <= self._prefix_length
                and tokens <= TOKEN_BUCKETS[-1])

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        for layer in self._layers():
            layer.full_width, layer.rows, layer.column = True, bucket.rows, bucket.columns
        out = self._model(input_ids=bucket.ids, position_ids=bucket.positions,
                          attention_mask=bucket.mask, use_cache=True, logits_to_keep=bucket.last,
                          **{self._cache_keyword: self._scratch})
        logits: torch.Tensor = out.logits  # [rows, rows, vocab]: every row at every "last"
        return logits

    @torch.inference_mode()
    def capture(self, progress: Callable[[int, int], None]) -> None:
        """Capture every bucket (the warm-up writes only past the prefix area)."""
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        ordered = sorted(self._buckets.values(), key=lambda b: (-b.rows, -b.tokens))
        for done, bucket in enumerate(ordered):
            progress(done, len(ordered))
            bucket.mask[..., bucket.columns] = bucket.causal  # something to attend to
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisations happen outside the capture
                    self._forward(bucket)
            torch.cuda.current_stream().wait_stream(side)
            bucket.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(bucket.graph, pool=pool):
                bucket.logits = self._forward(bucket)
        progress(len(ordered), len(ordered))

    @torch.inference_mode()
    def run(self, rests: list[list[int]], covered: int) -> tuple[torch.Tensor, PackedKV]:
        """Prefill ``rests`` (prompts past their first ``covered`` tokens, which the prefix
        holds): each one's last logits [rows, vocab] and the prompts' KV, packed."""
        if self._own_rows and self._shared:  # rows held returning viewers' starts
            self._copy_prefix(self._shared, self._prefix_length, rows=slice(0, self._own_rows))
            self._own_rows = 0
        return self._replay(rests, [covered] * len(rests), shared=True)

    def _replay(self, rests: list[list[int]], covered: list[int], shared: bool
                ) -> tuple[torch.Tensor, PackedKV]:
        count, longest = len(rests), max(len(rest) for rest in rests)
        bucket = next(b for (rows, tokens), b in self._buckets.items()
                      if rows >= count and tokens >= longest)
        device = bucket.ids.device
        padded = [rest + rest[-1:] * (bucket.tokens - len(rest)) for rest in rests]
        padded += padded[-1:] * (bucket.rows - count)  # idle rows repeat the last request
        idle = bucket.rows - count
        ends = [len(rest) - 1 for rest in rests]
        # One copy from the host (queued: never waits for a running step).
        sent = on_device([token for row in padded for token in row]
                         + ends + ends[-1:] * idle + covered + covered[-1:] * idle, device)
        tokens = bucket.rows * bucket.tokens
        bucket.ids.copy_(sent[:tokens].view(bucket.rows, bucket.tokens))
        bucket.last.copy_(sent[tokens:tokens + bucket.rows])
        starts = sent[tokens + bucket.rows:]
        bucket.positions.copy_(starts[:, None] + torch.arange(bucket.tokens, device=device))
        bucket.mask.zero_()
        prefix = torch.arange(self._room, device=device)[None, :] < starts[:, None]
        bucket.mask[:, 0, :, :self._room] = prefix[:, None, :]
        bucket.mask[:, 0, :, self._room:self._room + bucket.tokens] = bucket.causal
        if bucket.graph is not None and bucket.logits is not None:
            bucket.graph.replay()
            logits = bucket.logits
        else:
            logits = self._forward(bucket)
        index = torch.arange(count, device=device)
        start = self._room
        layers = [(_packed(layer.keys, covered, start, rests, shared),  # type: ignore[arg-type]
                   _packed(layer.values, covered, start, rests, shared))  # type: ignore[arg-type]
                  for layer in self._layers()]
        return logits[index, index], PackedKV(layers, [len(rest) for rest in rests], covered,
                                              shared)


def _packed(buffer: torch.Tensor, covered: list[int], start: int, rests: list[list[int]],
            shared: bool) -> torch.Tensor:
    """The scratch rows' KV packed: the shared prefix once (or each row's own in turn),
    then each row's own tokens."""
    if shared:
        parts = [buffer[:1, :, :covered[0]]]
    else:
        parts = [buffer[row:row + 1, :, :length] for row, length in enumerate(covered)]
    parts += [buffer[row:row + 1, :, start:start + len(rest)] for row, rest in enumerate(rests)]
    return torch.cat(parts, dim=2)
