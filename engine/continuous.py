"""Continuous batching over a transformers causal LM: rows join and leave between decode steps.

Every row lives in one left-padded KV cache at its own position: a request is prefilled on
its own, then its cache is aligned with the batch's (the shorter side gets pad columns that
the attention mask hides) and stacked onto it; every decode step feeds each row its last
token at its own position; a finished or cancelled row leaves at once (its cache rows are
dropped, and columns no row needs any more are trimmed from the left). Greedy output is the
same as ``generate()`` gives each prompt alone.

Supported: decoder-only models with full attention and a ``DynamicCache`` of plain
key/value layers (Llama, Qwen2/3, Mistral families). ``supports(model)`` says whether a model
qualifies; the backend keeps ``generate()`` for the rest.

The in-process backend drives it (``engine/backends/continuous_worker.py``) where
``llm.continuous_batching`` allows.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from engine.sampling import pick_tokens
from engine.types import SamplingParams

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


def supports(model: Any) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in SUPPORTED and not getattr(
        config, "sliding_window", None)


@dataclass
class Row:
    request_id: str
    max_new_tokens: int
    eos_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)  # generated so far
    params: SamplingParams | None = None  # None: greedy, no penalty
    generator: torch.Generator | None = None  # a seeded request's own random stream

    @property
    def finished(self) -> bool:
        return bool(self.tokens) and (self.tokens[-1] in self.eos_ids
                                      or len(self.tokens) >= self.max_new_tokens)


def _cache_keyword(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); take what it has."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@dataclass
class _Prefix:
    ids: list[int]
    cache: DynamicCache


class ContinuousBatch:
    """The running batch. Not thread-safe: one decode loop owns it.

    ``set_prefix`` prefills a shared prompt start once (the persona's system prompt); a
    request copies the KV of the tokens it shares with it and prefills only the rest."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._cache_kw = _cache_keyword(model)
        # A prefill needs the logits of its last position only (not prompt x vocabulary).
        self._last_logits_only: dict[str, int] = (
            {"logits_to_keep": 1}
            if "logits_to_keep" in inspect.signature(model.forward).parameters else {})
        self._prefix: _Prefix | None = None
        self.prefix_hits = 0
        self.rows: list[Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, columns]: 1 = a real token
        self._positions: torch.Tensor | None = None  # [rows]: each row's next position
        self._last: torch.Tensor | None = None  # [rows, 1]: each row's last token
        self._seen: torch.Tensor | None = None  # [rows, vocab]: ids in prompt or output

    @property
    def size(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def set_prefix(self, prefix_ids: list[int]) -> None:
        """Prefill the shared prompt start once; ``[]`` drops it (the persona changed)."""
        if not prefix_ids:
            self._prefix = None
            return
        cache = DynamicCache()
        self.model(input_ids=torch.tensor([prefix_ids], device=self.model.device),
                   use_cache=True, **{self._cache_kw: cache})
        self._prefix = _Prefix(list(prefix_ids), cache)

    def _start_cache(self, prompt_ids: list[int]) -> tuple[DynamicCache, int]:
        """A cache holding the shared prefix if the prompt starts with it (a copy: rows
        extend their own), and how many prompt tokens it already covers."""
        prefix = self._prefix
        cache = DynamicCache()
        # The tokens this prompt shares with the prefix (the persona's part of a system turn
        # whose mood hint differs per viewer), leaving at least one token to prefill.
        shared = common_prefix(prompt_ids[:-1], prefix.ids) if prefix is not None else 0
        if prefix is None or shared == 0:
            return cache, 0
        for layer, (keys, values) in enumerate(
                (kv.keys, kv.values) for kv in _kv_layers(prefix.cache)):
            cache.update(keys[:, :, :shared].clone(), values[:, :, :shared].clone(), layer)
        self.prefix_hits += 1
        return cache, shared

    @torch.inference_mode()
    def join(self, request_id: str, prompt_ids: list[int], max_new_tokens: int,
             eos_ids: frozenset[int], params: SamplingParams | None = None) -> int:
        """Prefill ``prompt_ids`` alone (past the shared prefix), add the row, return its
        first token."""
        device = self.model.device
        cache, covered = self._start_cache(prompt_ids)
        rest = torch.tensor([prompt_ids[covered:]], device=device)
        positions = torch.arange(covered, len(prompt_ids), device=device)[None]
        out = self.model(input_ids=rest, position_ids=positions, use_cache=True,
                         **{self._cache_kw: cache}, **self._last_logits_only)
        generator = (torch.Generator().manual_seed(params.seed)
                     if params is not None and params.seed is not None else None)
        seen = torch.zeros((1, out.logits.shape[-1]), dtype=torch.bool, device=device)
        seen[0, torch.tensor(prompt_ids, device=device)] = True
        first = int(pick_tokens(out.logits[:, -1], [params], seen, [0], sorted(eos_ids),
                                [generator])[0])
        seen[0, first] = True
        row = Row(request_id, max_new_tokens, eos_ids, [first], params, generator)
        mask = torch.ones((1, len(prompt_ids)), dtype=torch.long, device=device)
        positions = torch.tensor([len(prompt_ids)], device=device)
        last = torch.tensor([[first]], device=device)
        if self._cache is None:
            self._cache, self._mask, self._positions, self._last = cache, mask, positions, last
            self._seen = seen
        else:
            self._stack(cache, mask, positions, last)
            assert self._seen is not None
            self._seen = torch.cat([self._seen, seen])
        self.rows.append(row)
        return first

    def _stack(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor,
               last: torch.Tensor) -> None:
        assert self._cache is not None and self._mask is not None
        assert self._positions is not None and self._last is not None
        width = max(self._mask.shape[1], mask.shape[1])
        layers = list(zip(_kv_layers(self._cache), _kv_layers(cache), strict=True))
        # Everything is built before anything is replaced: running out of memory half way
        # leaves the batch as it was.
        stacked = [(torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)]),
                    torch.cat([_pad_left(mine.values, width, 2),
                               _pad_left(theirs.values, width, 2)]))
                   for mine, theirs in layers]
        new_mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)])
        for (mine, _theirs), (keys, values) in zip(layers, stacked, strict=True):
            mine.keys, mine.values = keys, values
        self._mask = new_mask
        self._positions = torch.cat([self._positions, positions])
        self._last = torch.cat([self._last, last])

    @torch.inference_mode()
    def step(self) -> list[tuple[str, int]]:
        """One decode step for every unfinished row: (request id, new token) each."""
        if not self.rows:
            return []
        assert self._mask is not None and self._positions is not None
        mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        out = self.model(input_ids=self._last, attention_mask=mask,
                         position_ids=self._positions[:, None], use_cache=True,
                         **{self._cache_kw: self._cache})
        logits = out.logits[:, -1]
        if all(row.params is None for row in self.rows):
            tokens = logits.argmax(dim=-1)
        else:
            assert self._seen is not None
            tokens = pick_tokens(logits, [row.params for row in self.rows], self._seen,
                                 [len(row.tokens) for row in self.rows],
                                 sorted(self.rows[0].eos_ids),
                                 [row.generator for row in self.rows])
            self._seen[torch.arange(len(self.rows), device=tokens.device), tokens] = True
        self._mask, self._positions, self._last = mask, self._positions + 1, tokens[:, None]
        produced = []
        for row, token in zip(self.rows, tokens.tolist(), strict=True):
            if not row.finished:
                row.tokens.append(int(token))
                produced.append((row.request_id, int(token)))
        return produced

    def leave(self, request_ids: set[str]) -> None:
        """Drop these rows (finished or cancelled) from the batch at once."""
        keep = [i for i, row in enumerate(self.rows) if row.request_id not in request_ids]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._positions = self._last = self._seen = None
            return
        assert self._cache is not None and self._mask is not None
        assert self._positions is not None and self._last is not None
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask, self._positions, self._last = (
            self._mask[index], self._positions[index], self._last[index])
        if self._seen is not None:
            self._seen = self._seen[index]
        self._trim()

    def _trim(self) -> None:
        """Cut columns that are padding in every row (left over from a long row that left)."""
        assert self._mask is not None and self._cache is not None
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start == 0:
            return
        self._mask = self._mask[:, start:]
        for layer in _kv_layers(self._cache):
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]

    def finished(self) -> list[Row]:
        return [row for row in self.rows if row.finished]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def _kv_layers(cache: DynamicCache) -> list[Any]:
    """The cache's key/value layers (plain ones only: ``supports`` rules out the others)."""
    return list(cache.layers)


def _pad_left(tensor: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
