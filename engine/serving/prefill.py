"""Joining prompts' KV and last logits, for the continuous batch (``continuous.py``).

A prompt is prefilled past what is already computed: the shared persona prefix (prefilled
once, ``set_prefix``) or, for a returning viewer, the longest start it shares with a prompt
kept in ``prefix_cache`` (``prefix_cache.py``). Prompts with no kept start prefill
together, packed; each returning viewer's past its own start. Where a prefill fits a static
bucket it replays a captured graph (``prefill_graphs.py``); else it runs eagerly.

A long prompt joining while rows run is prefilled in chunks (``Chunked``), one chunk between
two decode steps, each chunk past the KV of the ones before: the running rows pause for a
chunk's prefill at a time, not the whole prompt's (as vLLM and SGLang schedule prefill within
a token budget per step). KV at a position depends only on the tokens up to it, so a prompt
prefilled in chunks has the KV and the last logits it has prefilled whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from engine.serving.packed_prefill import (
    KV,
    Packed,
    PackedKV,
    cache_of,
    cache_of_own,
    pack,
    split,
    split_own,
)
from engine.serving.prefill_graphs import PrefillGraphs
from engine.serving.prefix_cache import BLOCK, Entry, PrefixCache, common_prefix
from engine.types import SamplingParams


@dataclass(frozen=True)
class Joining:
    """A request about to join the batch."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    eos_ids: frozenset[int]
    params: SamplingParams | None = None


@dataclass
class Chunked:
    """A prompt being prefilled a chunk at a time: the KV of its first ``done`` tokens (of
    which ``start`` came from a prefix, not prefilled), and the last chunk's logits."""

    joining: Joining
    start: int
    done: int
    kv: KV | None
    logits: torch.Tensor | None = None

    @property
    def left(self) -> int:
        return len(self.joining.prompt_ids) - self.done

    def pack(self) -> PackedKV:
        """Its whole prompt's KV as a pack past its ``start`` prefix tokens."""
        assert self.kv is not None
        return PackedKV(self.kv, [len(self.joining.prompt_ids) - self.start], [self.start])


@dataclass
class _Prefix:
    ids: list[int]
    cache: DynamicCache


Start = tuple[Entry, int] | None  # a kept start and how many of its tokens, or the persona's


class Prefiller:
    def __init__(self, model: Any, cache_keyword: str, last_logits_only: bool) -> None:
        self.model = model
        self._cache_kw = cache_keyword
        self._last_logits_only = last_logits_only
        self._prefix: _Prefix | None = None
        self.graphs: PrefillGraphs | None = None  # static prefill (up to 4 rows)
        # Returning viewers' prompt starts; None: not kept.
        self.prefix_cache: PrefixCache | None = None
        self.prefix_hits = 0

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
        if self.graphs is not None:
            self.graphs.load_prefix(kv_of(cache), len(prefix_ids))

    def use_graphs(self, graphs: PrefillGraphs) -> None:
        self.graphs = graphs
        if self._prefix is not None:
            graphs.load_prefix(kv_of(self._prefix.cache), len(self._prefix.ids))

    def covered(self, prompt_ids: list[int]) -> int:
        """The tokens this prompt shares with the shared prefix, leaving at least one to
        prefill."""
        prefix = self._prefix
        return common_prefix(prompt_ids[:-1], prefix.ids) if prefix is not None else 0

    def reusable(self, prompt_ids: list[int]) -> Start:
        """A kept prompt start this prompt shares beyond the shared prefix, if any (a block
        more at least: a viewer's own history, not just a turn's opening tokens)."""
        if self.prefix_cache is None:
            return None
        entry, tokens = self.prefix_cache.longest(prompt_ids)
        if entry is None or tokens < self.covered(prompt_ids) + BLOCK:
            return None
        return entry, tokens

    def start_of(self, prompt_ids: list[int]) -> int:
        """How many of this prompt's tokens need no prefill."""
        reused = self.reusable(prompt_ids)
        return reused[1] if reused is not None else self.covered(prompt_ids)

    @torch.inference_mode()
    def prefill(self, joining: list[Joining], starts: list[Start]
                ) -> tuple[torch.Tensor, list[PackedKV]]:
        """Logits of each prompt's last token, in order, and the packs' KV: those with no
        kept start (``starts`` None: they come first in ``joining``) together past the
        shared prefix, then the returning viewers past their own kept starts (packed
        together where there are several)."""
        logits: list[torch.Tensor] = []
        packs: list[PackedKV] = []
        shared = [j for j, s in zip(joining, starts, strict=True) if s is None]
        if shared:
            covered = min(self.covered(j.prompt_ids) for j in shared)
            rests = [j.prompt_ids[covered:] for j in shared]
            self.prefix_hits += len(rests) if covered else 0
            if self.graphs is not None and self.graphs.fits(
                    len(rests), covered, max(len(rest) for rest in rests)):
                group_logits, packed = self.graphs.run(rests, covered)
                prefilled = [packed]
            else:
                group_logits, prefilled = self._eager(rests, covered, self._prefix_kv())
            logits.append(group_logits)
            packs += prefilled
        returning = [(j, s) for j, s in zip(joining, starts, strict=True) if s is not None]
        if returning:
            own_logits, own = self._returning(returning)
            logits.append(own_logits)
            packs += own
        return torch.cat(logits), packs

    def _returning(self, returning: list[tuple[Joining, tuple[Entry, int]]]
                   ) -> tuple[torch.Tensor, list[PackedKV]]:
        """Returning viewers past their kept starts: through static buckets (a few rows at
        a time, each row its own start) where they fit, else packed together eagerly, each
        seeing only its own start."""
        assert self.prefix_cache is not None
        prefixes = [self.prefix_cache.use(entry, tokens) for _, (entry, tokens) in returning]
        covered = [tokens for _, (_, tokens) in returning]
        rests = [j.prompt_ids[tokens:] for j, (_, tokens) in returning]
        graphs = self.graphs
        if graphs is not None and all(graphs.fits_past(c, len(r))
                                      for c, r in zip(covered, rests, strict=True)):
            logits, packs = [], []
            for first in range(0, len(rests), graphs.max_rows):
                part = slice(first, first + graphs.max_rows)
                part_logits, packed = graphs.run_past(prefixes[part], covered[part],
                                                      rests[part])
                logits.append(part_logits)
                packs.append(packed)
            return torch.cat(logits), packs
        if len(returning) == 1:
            return self._eager([rests[0]], covered[0], prefixes[0])
        return self._eager_own(prefixes, covered, rests)

    def begin(self, joining: Joining) -> Chunked:
        """A prompt to prefill in chunks (``advance``), from its best start."""
        reused = self.reusable(joining.prompt_ids)
        if reused is not None:
            assert self.prefix_cache is not None
            entry, tokens = reused
            return Chunked(joining, tokens, tokens, self.prefix_cache.use(entry, tokens))
        covered = self.covered(joining.prompt_ids)
        self.prefix_hits += 1 if covered else 0
        return Chunked(joining, covered, covered, self._prefix_kv())

    @torch.inference_mode()
    def advance(self, chunked: Chunked, tokens: int) -> bool:
        """Prefill the next ``tokens`` of ``chunked``'s prompt; True once it is all done."""
        chunk = chunked.joining.prompt_ids[chunked.done:chunked.done + max(1, tokens)]
        chunked.logits, packed = self._past(chunked.kv, chunked.done, chunk)
        chunked.kv, chunked.done = packed.layers, chunked.done + len(chunk)
        return chunked.left == 0

    def _past(self, prefix: KV | None, covered: int, rest: list[int]
              ) -> tuple[torch.Tensor, PackedKV]:
        """One prompt past the first ``covered`` tokens of ``prefix``: its last logits and
        its whole KV (``covered`` + ``rest``), through a static bucket where one fits."""
        if prefix is not None and self.graphs is not None and self.graphs.fits_past(
                covered, len(rest)):
            return self.graphs.run_past([prefix], [covered], [rest])
        logits, [packed] = self._eager([rest], covered, prefix)
        return logits, packed

    def _eager(self, rests: list[list[int]], covered: int, prefix: KV | None
               ) -> tuple[torch.Tensor, list[PackedKV]]:
        """Prefill ``rests`` (each prompt past the ``covered`` tokens of ``prefix``), packed
        a few thousand tokens to a forward (``packed_prefill.py``): each one's last
        logits [rows, vocab] and the packs' KV."""
        logits, prefilled = [], []
        for group in split(rests):
            cache = cache_of(prefix, covered)
            group_covered = [covered] * len(group)
            logits.append(self._forward(pack(group, group_covered, True, self.model.device),
                                        cache))
            prefilled.append(PackedKV(kv_of(cache), [len(rest) for rest in group],
                                      group_covered))
        return torch.cat(logits), prefilled

    def _eager_own(self, prefixes: list[KV], covered: list[int], rests: list[list[int]]
                   ) -> tuple[torch.Tensor, list[PackedKV]]:
        """``_eager`` for prompts each past a prefix of its own (``covered[i]`` tokens of
        ``prefixes[i]``): the prefixes' KV one after the other in the pack's cache."""
        logits, prefilled = [], []
        for group in split_own(rests, covered):
            cache = cache_of_own([prefixes[i] for i in group])
            group_covered, group_rests = [covered[i] for i in group], [rests[i] for i in group]
            packed = pack(group_rests, group_covered, False, self.model.device)
            logits.append(self._forward(packed, cache))
            prefilled.append(PackedKV(kv_of(cache), [len(rest) for rest in group_rests],
                                      group_covered, shared=False))
        return torch.cat(logits), prefilled

    def _forward(self, packed: Packed, cache: DynamicCache) -> torch.Tensor:
        """One packed forward into ``cache``: each prompt's last logits [prompts, vocab]."""
        keep = {"logits_to_keep": packed.ends} if self._last_logits_only else {}
        out = self.model(input_ids=packed.ids, position_ids=packed.positions,
                         attention_mask=packed.mask, use_cache=True,
                         **{self._cache_kw: cache}, **keep)
        logits: torch.Tensor = out.logits[0] if keep else out.logits[0, packed.ends]
        return logits

    def _prefix_kv(self) -> KV | None:
        return kv_of(self._prefix.cache) if self._prefix is not None else None


def kv_of(cache: DynamicCache) -> KV:
    """The cache's keys and values per layer (plain layers only: ``supports`` rules out the
    others)."""
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]
