"""Continuous batching over a transformers causal LM: rows join and leave between decode steps.

A request is prefilled (``prefill.py``: past the shared persona prefix, whose KV is
computed once, or past a returning viewer's kept start; together with the others that arrived
during the same step, or in chunks between steps); its KV then goes into a slot of the
batch's preallocated cache (``kv_slots.py``), right-aligned with the other rows, and
every decode step feeds each row its last token at its own position. A finished or cancelled
row frees its slot at once. With ``make_static`` the slots are fixed and the decode step has
static shapes, captured as CUDA graphs on a GPU (``decode_graphs.py``), and so does the
prefill of up to 4 requests joining together (``prefill_graphs.py``). Greedy output
is the same as ``generate()`` gives each prompt alone.

Supported: decoder-only models with full attention and a ``DynamicCache`` of plain
key/value layers (Llama, Qwen2/3, Mistral families). ``supports(model)`` says whether a model
qualifies; the backend keeps ``generate()`` for the rest.

The in-process backend drives it (``engine/backends/continuous_worker.py``) where
``llm.continuous_batching`` allows; ``llm.static_cache`` decides the static step.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from engine.errors import EngineError
from engine.serving.batch_rows import LaunchedStep, Row
from engine.serving.decode_graphs import DecodeGraphs
from engine.serving.kv_slots import SlotCache
from engine.serving.packed_prefill import PackedKV
from engine.serving.prefill import Chunked, Joining, Prefiller, kv_of
from engine.serving.prefill_graphs import PrefillGraphs
from engine.serving.prefix_cache import PrefixCache
from engine.serving.sampling import on_device, pick_tokens, seen_in_prompts
from engine.types import SamplingParams

__all__ = ["Chunked", "ContinuousBatch", "Joining", "supports"]

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


def supports(model: Any) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in SUPPORTED and not getattr(
        config, "sliding_window", None)


def _cache_keyword(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); take what it has."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class ContinuousBatch:
    """The running batch. Not thread-safe: one decode loop owns it.

    ``pipelined``: a step is launched before the previous one's tokens are read, so the
    host's work between steps (handing tokens out, joins, leaves) overlaps the device's;
    ``make_static`` turns it on when the steps are captured on a GPU.

    ``set_prefix`` prefills a shared prompt start once (the persona's system prompt); a
    request copies the KV of the tokens it shares with it and prefills only the rest. The
    rows' KV lives in preallocated slots (``kv_slots.py``): a decode step writes one
    column in place instead of copying the batch's cache."""

    pipelined = False

    def __init__(self, model: Any, slots: int = 8) -> None:
        self.model = model
        self._cache_kw = _cache_keyword(model)
        # A prefill needs the logits of its last position only (not prompt x vocabulary).
        self._last_logits_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.prefiller = Prefiller(model, self._cache_kw, self._last_logits_only)
        self._slot_hint = max(1, slots)
        self.last_cached: list[int] = []  # per request of the last join: tokens not prefilled
        self.rows: list[Row] = []
        self._cache: SlotCache | None = None
        self._graphs: DecodeGraphs | None = None  # static shapes: fixed slots, maybe captured
        self._positions: torch.Tensor | None = None  # [rows]: each row's next position
        self._last: torch.Tensor | None = None  # [rows, 1]: each row's last token
        self._seen: torch.Tensor | None = None  # [rows, vocab]: ids in prompt or output
        self._launched: deque[LaunchedStep] = deque()

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> int:
        """KV columns the next decode step attends over (the longest row, plus padding)."""
        return self._cache.length if self._cache is not None else 0

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.prefiller.prefix_cache

    @prefix_cache.setter
    def prefix_cache(self, cache: PrefixCache | None) -> None:
        self.prefiller.prefix_cache = cache

    @property
    def prefix_hits(self) -> int:
        return self.prefiller.prefix_hits

    def set_prefix(self, prefix_ids: list[int]) -> None:
        """Prefill the shared prompt start once; ``[]`` drops it (the persona changed)."""
        self.prefiller.set_prefix(prefix_ids)

    @property
    def static(self) -> bool:
        return self._graphs is not None

    @property
    def captured(self) -> bool:
        return self._graphs is not None and self._graphs.captured

    @property
    def graph_replays(self) -> int:
        """Decode steps so far that replayed a captured graph."""
        return self._graphs.replays if self._graphs is not None else 0

    @torch.inference_mode()
    def make_static(self, slots: int, width: int,
                    progress: Callable[[int, int], None] | None = None,
                    compile_step: bool = False) -> None:
        """Fixed slots (``slots`` rows of ``width`` columns, allocated now) and a decode step
        with static shapes, captured as CUDA graphs when the model sits on one GPU (compiled
        first with ``compile_step``)."""
        probe = DynamicCache()  # one token through the model: each layer's KV shape and device
        self.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.model.device),
                   use_cache=True, **{self._cache_kw: probe})
        like = kv_of(probe)
        self._cache = SlotCache(like, slots, width)
        self._graphs = DecodeGraphs(self.model, self._cache, self._cache_kw, compile_step)
        if self._last_logits_only:
            self.prefiller.use_graphs(PrefillGraphs(self.model, like, width, self._cache_kw))
        devices = {keys.device for keys, _ in like}
        if progress is not None and len(devices) == 1 and next(iter(devices)).type == "cuda":
            self._graphs.capture(progress)
            if self.prefiller.graphs is not None:
                self.prefiller.graphs.capture(progress)
            self.pipelined = True

    def reset(self) -> None:
        """Drop every row (after a failed step); static slots and graphs stay."""
        self.rows = []
        self._launched.clear()
        self._positions = self._last = self._seen = None
        if self._cache is not None and self.static:
            self._cache.clear()
        else:
            self._cache = None

    def join(self, request_id: str, prompt_ids: list[int], max_new_tokens: int,
             eos_ids: frozenset[int], params: SamplingParams | None = None) -> int:
        """Prefill one request (past the shared prefix), add its row, return its first
        token."""
        return self.join_many([Joining(request_id, prompt_ids, max_new_tokens, eos_ids,
                                       params)])[0]

    @torch.inference_mode()
    def join_many(self, joining: list[Joining]) -> list[int]:
        """Prefill several requests together, add their rows, return each one's first
        token. A prefill is mostly fixed cost (kernel launches) or, for a burst, GEMMs over
        the prompts' own tokens, so requests that arrived during a step join together: new
        viewers past the shared prefix, returning viewers (their start kept in
        ``prefix_cache``) each past their own. ``last_cached``: how many prompt tokens of
        each came from a cache."""
        starts = [self.prefiller.reusable(j.prompt_ids) for j in joining]
        order = ([i for i, s in enumerate(starts) if s is None]
                 + [i for i, s in enumerate(starts) if s is not None])
        ordered = [joining[i] for i in order]
        logits, packs = self.prefiller.prefill(ordered, [starts[i] for i in order])
        firsts = self._add_joined(ordered, logits, packs)
        result, cached = [0] * len(joining), [0] * len(joining)
        prefilled = [covered for packed in packs for covered in packed.covered]
        for position, index in enumerate(order):
            result[index], cached[index] = firsts[position], prefilled[position]
        self.last_cached = cached
        return result

    @torch.inference_mode()
    def join_chunked(self, chunked: Chunked) -> int:
        """Add the row of a prompt prefilled in chunks (``Prefiller.advance`` until done);
        return its first token."""
        assert chunked.left == 0 and chunked.logits is not None
        [first] = self._add_joined([chunked.joining], chunked.logits, [chunked.pack()])
        self.last_cached = [chunked.start]
        return first

    def _add_joined(self, joining: list[Joining], logits: torch.Tensor,
                    packs: list[PackedKV]) -> list[int]:
        """Pick each prefilled prompt's first token, add their rows (in order), keep their
        prompts for their viewers' next messages; return the first tokens."""
        device = self.model.device
        generators = [torch.Generator().manual_seed(j.params.seed)
                      if j.params is not None and j.params.seed is not None else None
                      for j in joining]
        seen = seen_in_prompts([j.prompt_ids for j in joining], logits.shape[-1], device)
        first_tokens = pick_tokens(logits, [j.params for j in joining], seen,
                                   [0] * len(joining), sorted(joining[0].eos_ids), generators)
        seen.scatter_(1, first_tokens[:, None], True)
        # Everything that can run out of memory happens before the batch changes; and all of
        # it is queued before the host waits for the first tokens, so the device copies the
        # prompts into the slots (and the prefix cache) while the host is still launching.
        slots = self._room_for(packs[0].layers, max(len(j.prompt_ids) for j in joining),
                               len(joining),
                               max(len(j.prompt_ids) + j.max_new_tokens + 1 for j in joining))
        for packed in packs:
            slots.append_packed(packed)
        if self.prefix_cache is not None:
            self.prefix_cache.keep_packs([j.prompt_ids for j in joining], packs)
        firsts = first_tokens.tolist()  # waits: the first tokens are streamed at once
        for index, j in enumerate(joining):
            self.rows.append(Row(j.request_id, j.max_new_tokens, j.eos_ids, [firsts[index]],
                                 j.params, generators[index]))
        self._cache = slots
        self._add_rows(on_device([len(j.prompt_ids) for j in joining], device),
                       first_tokens[:, None], seen)
        return [int(first) for first in firsts]

    def _add_rows(self, positions: torch.Tensor, last: torch.Tensor,
                  seen: torch.Tensor) -> None:
        if self._positions is None or self._last is None or self._seen is None:
            self._positions, self._last, self._seen = positions, last, seen
        else:
            self._positions = torch.cat([self._positions, positions])
            self._last = torch.cat([self._last, last])
            self._seen = torch.cat([self._seen, seen])

    def _room_for(self, like: list[tuple[torch.Tensor, torch.Tensor]], tokens: int,
                  rows: int, columns: int) -> SlotCache:
        """Slots with room for ``rows`` more rows, whose prompts (at most ``tokens``) end at
        the newest column and that may grow to ``columns`` columns in all."""
        slots = self._cache
        if self.static and slots is not None and (
                slots.rows + rows > slots.slots or columns > slots.width):
            raise EngineError(f"no room in the batch's slots for {rows} rows of {columns} "
                              f"columns ({slots.rows} of {slots.slots} rows in use, "
                              f"{slots.width} columns)")
        if slots is None:
            slots = SlotCache(like, max(self._slot_hint, rows), _round_up(2 * columns, 256))
        elif slots.rows + rows > slots.slots or columns > slots.width:
            slots = slots.grown(slots.rows + rows, columns)
        if tokens > slots.length and slots.rows:
            slots.shift_right(tokens - slots.length)
        slots.length = max(slots.length, tokens)
        return slots

    @torch.inference_mode()
    def step(self) -> list[tuple[str, int]]:
        """Launch one decode step for every unfinished row and return the new tokens
        (request id, token) of the steps done: this one, or when ``pipelined`` the one before
        (the device runs this step while the host hands those tokens out). A row that
        finished meanwhile was stepped once more; that token is dropped."""
        if self.rows:
            self._launch()
        produced: list[tuple[str, int]] = []
        while len(self._launched) > (1 if self.pipelined and self.rows else 0):
            produced += self._launched.popleft().collect()
        return produced

    def _launch(self) -> None:
        assert self._cache is not None and self._positions is not None
        assert self._last is not None
        if self._cache.length == self._cache.width and not self._cache.compact():
            if self.static:
                raise EngineError("the batch's slots are full")  # rows fit by construction
            self._cache = self._cache.grown(self._cache.rows, 2 * self._cache.width)
        if self._graphs is not None:
            logits = self._graphs.run(self._last, self._positions)
        else:
            out = self.model(input_ids=self._last, attention_mask=self._cache.step_mask(),
                             position_ids=self._positions[:, None], use_cache=True,
                             **{self._cache_kw: self._cache})
            logits = out.logits[:, -1]
        self._cache.advance()
        if all(row.params is None for row in self.rows):
            tokens = logits.argmax(dim=-1)
        else:
            assert self._seen is not None
            tokens = pick_tokens(logits, [row.params for row in self.rows], self._seen,
                                 [len(row.tokens) + row.pending for row in self.rows],
                                 sorted(self.rows[0].eos_ids),
                                 [row.generator for row in self.rows])
            # scatter_, not an index assignment: that copies True from the host and waits
            self._seen.scatter_(1, tokens[:, None], True)
        self._positions, self._last = self._positions + 1, tokens[:, None]
        self._launched.append(LaunchedStep.queue(self.rows, tokens))

    @torch.inference_mode()
    def leave(self, request_ids: set[str]) -> None:
        """Drop these rows (finished or cancelled) from the batch at once: each freed slot
        takes the last row (one row's KV copied)."""
        leaving = [i for i, row in enumerate(self.rows) if row.request_id in request_ids]
        if not leaving:
            return
        assert self._cache is not None
        order = list(range(len(self.rows)))
        for position in leaving:
            self.rows[position].left = True
        for position in reversed(leaving):
            self._cache.remove_row(position)
            order[position] = order[-1]
            order.pop()
        self.rows = [self.rows[i] for i in order]
        if not order:
            self._positions = self._last = self._seen = None
            self._launched.clear()  # steps still queued served only rows that have left
            return
        assert self._positions is not None and self._last is not None
        index = on_device(order, self._positions.device)  # queued behind the running step
        self._positions, self._last = self._positions[index], self._last[index]
        if self._seen is not None:
            self._seen = self._seen[index]

    def finished(self) -> list[Row]:
        return [row for row in self.rows if row.finished]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
